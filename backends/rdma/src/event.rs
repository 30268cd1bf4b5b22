//! What the verbs layer reports back, as plain data: work completions (`Wc`) and a device's
//! asynchronous events (`AsyncEvent`).
//!
//! Owns: these two types, which the private `sys` layer fills and the public API returns
//! (`Connection::wait_send`, `Nic::poll_async_event`). Must not: import from any other module
//! of the crate (both sides import it).

/// One work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wc {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub qp_num: u32,
}

/// An asynchronous event of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncEvent {
    pub kind: u32,
    pub name: String,
}
