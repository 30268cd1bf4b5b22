//! The backend's errors: every refusal of a device, every failed completion and every bounded
//! wait that ran out is a variant here, carrying the device, the call and the errno or status.
//!
//! Owns: `RdmaError`, `WcError`, `Refusal`, `Method`. Must not: decide what to do about an error
//! (callers and `mr` do).

use std::fmt;
use std::io;

use peermem::nic::NicError;
use peermem::{RegionError, RegistryError, ResolveError};

/// How a region was (or was to be) registered with a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `ibv_reg_dmabuf_mr`: the NIC's kernel driver imports the region's dma-buf.
    DmaBuf,
    /// `ibv_reg_mr` on the region's CPU mapping: the kernel pins the pages behind it.
    CpuMapping,
    /// A host-memory bounce buffer is registered instead; data is staged by copies.
    Bounce,
    /// `ibv_reg_dm_mr` on NIC device memory.
    DeviceMemory,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::DmaBuf => "dmabuf_mr",
            Method::CpuMapping => "reg_mr",
            Method::Bounce => "bounce",
            Method::DeviceMemory => "dm_mr",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One registration method the device (or the region) refused, and why.
#[derive(Debug)]
pub struct Refusal {
    pub method: Method,
    pub error: RdmaError,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.method, self.error)
    }
}

/// A work completion that did not succeed, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WcError {
    pub wr_id: u64,
    /// `ibv_wc_status` value.
    pub status: u32,
    /// The library's name for it (`ibv_wc_status_str`).
    pub name: String,
    pub vendor_err: u32,
    /// The operation the work request was (the CQE opcode is undefined on error, so this is ours).
    pub op: &'static str,
}

impl WcError {
    /// What the status usually means, in one line.
    pub fn meaning(&self) -> &'static str {
        match self.status {
            1 => "local length error: the buffer is shorter than the message",
            2 => "local QP operation error (QP in a bad state or malformed work request)",
            4 => "local protection error: the lkey does not cover the local buffer",
            5 => "flushed: the QP went to the error state before this request ran",
            8 => "local access error",
            9 => "remote invalid request: the peer rejected the operation",
            10 => "remote access error: the rkey is invalid, deregistered, or lacks the access this operation needs",
            11 => "remote operation error: the peer could not complete the operation",
            12 => "transport retries exceeded: the peer stopped answering (gone, or the link is down)",
            13 => "receiver-not-ready retries exceeded: the peer posted no receive",
            _ => "see ibv_wc_status_str",
        }
    }

    /// True for statuses that mean the remote key was refused.
    pub fn is_remote_access(&self) -> bool {
        self.status == 10
    }
}

impl fmt::Display for WcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} wr {}: {} (status {}, vendor error {:#x}): {}",
            self.op,
            self.wr_id,
            self.name,
            self.status,
            self.vendor_err,
            self.meaning()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("libibverbs.so.1 cannot be loaded (install the libibverbs1 package)")]
    NoLibrary,
    #[error("no RDMA device{}", .wanted.as_ref().map(|w| format!(" named {w}")).unwrap_or_default())]
    NoDevice { wanted: Option<String> },
    #[error("{dev}: {what}: {source}")]
    Verbs { dev: String, what: &'static str, source: io::Error },
    #[error("{dev}: {what} is not supported: {why}")]
    NotSupported { dev: String, what: &'static str, why: String },
    #[error("{dev}: port {port} is not active (state {state})")]
    PortDown { dev: String, port: u8, state: u32 },
    #[error("{0}")]
    Invalid(String),
    /// rdma_cm reaches `peer` through another RDMA device than the one asked for.
    #[error("{peer} is reached through {via}, not through {wanted}")]
    OtherDevice { peer: String, via: String, wanted: String },
    /// A CPU copy through a region's mapping (bounce buffers) that could not happen.
    #[error(transparent)]
    Access(#[from] peermem::AccessError),
    #[error("{dev}: every way to register the region was refused: {}", .refusals.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    AllRefused { dev: String, refusals: Vec<Refusal> },
    #[error("work completion failed: {0}")]
    Completion(WcError),
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout { what: String, ms: u128 },
    #[error("rdma_cm {what} ({peer}): {source}")]
    Cm { peer: String, what: &'static str, source: io::Error },
    /// Address or route resolution failed, or the peer's CM never answered.
    #[error("{peer} is unreachable over RDMA: {event} (status {status})")]
    Unreachable { peer: String, event: String, status: i32 },
    /// The peer's connection manager refused the connection (`status` is the CM reject reason).
    #[error("{peer} rejected the connection: {}", reject_reason(*.status))]
    Rejected { peer: String, status: i32 },
    /// The peer disconnected (or its process ended) while the connection was in use.
    #[error("{peer} disconnected")]
    PeerDisconnected { peer: String },
    #[error("out-of-band exchange with {peer}: {source}")]
    Exchange { peer: String, source: io::Error },
    /// Where the NICs sit, read from sysfs (core's `peermem::nic`).
    #[error(transparent)]
    Nic(#[from] NicError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// The CM reject reason for a connect request to a port nobody listens on (invalid service ID).
const REJ_INVALID_SERVICE_ID: i32 = 8;

/// What an InfiniBand CM reject reason (RoCE uses the same CM) means.
pub fn reject_reason(status: i32) -> String {
    let what = match status {
        REJ_INVALID_SERVICE_ID => "nothing listens on that port (invalid service ID)",
        28 => "the peer's application refused it",
        1..=3 => "the peer has no resources for it",
        _ => "reject",
    };
    format!("{what} (CM reason {status})")
}

impl RdmaError {
    /// The errno behind a verbs failure, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RdmaError::Verbs { source, .. } | RdmaError::Cm { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the peer's CM answered that nothing listens on the port: the process that
    /// listened there is gone (or never started).
    pub fn nothing_listens(&self) -> bool {
        matches!(self, RdmaError::Rejected { status: REJ_INVALID_SERVICE_ID, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_invalid_service_id_reject_says_nothing_listens() {
        let rej = |status| RdmaError::Rejected { peer: "10.0.0.2:7".into(), status };
        assert!(rej(8).nothing_listens());
        assert!(!rej(28).nothing_listens());
        assert!(!RdmaError::PeerDisconnected { peer: "10.0.0.2:7".into() }.nothing_listens());
        assert!(rej(8).to_string().contains("nothing listens"), "{}", rej(8));
    }
}
