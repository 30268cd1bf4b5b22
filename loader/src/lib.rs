//! peermem-loader: byte ranges of files, block devices and NVMe namespaces into any registered
//! peer-memory region (a GPU BAR, a p2pmem/CMB region, a Vulkan buffer, host memory), direct
//! when the route allows, else through staging buffers.
//!
//! [`Loader`] + [`Batch`] is the only way bytes move: `Loader::new(&registry, opts)`,
//! `open(path)` or `open_nvme(controller)` for a [`Source`], reads added to a `Batch`,
//! `submit(batch) -> Ticket`, `ticket.wait() -> Report`. Each batch runs through four stages,
//! each a module: plan, I/O, verify, report.
//!
//! - [`options`]: `Options`, `Verify`, `Engine`, `IoMode`, and the `PEERMEM_*` variables that
//!   set them.
//! - [`error`]: `LoadError`, the crate's one error type.
//! - [`source`]: `Source`: a file or block device through the kernel (O_DIRECT or the page
//!   cache), or a namespace through the VFIO driver, with its reader, reach, alignment,
//!   known-bytes reads and hashing.
//! - `pagecache`: the Auto I/O mode's rule and its measurements (page-cache residency, memory).
//! - `dest`: `Dest`: a registered region, optionally with GPU staging (device-local memory).
//! - `batch`: `Batch`: reads submitted together.
//! - `plan`: stage 1: checks, one planner decision per destination and reading device, the
//!   split into direct bodies and staged pieces.
//! - `stage`: the staging buffers (the one bounce) and the copy out of them.
//! - `io`: stage 2: the request loop over an engine (`io::files`: io_uring or a pread pool;
//!   `io::nvme`: the VFIO driver).
//! - `verify`: stage 3: xxh3 of destinations, expected hashes, re-reads of sources.
//! - [`report`]: stage 4: `Report`, one `DestReport` per destination.
//! - `loader`: `Loader` and `Ticket`: the worker running batches through the stages.
//! - `gone`: a failed batch whose device left the machine becomes `LoadError::DeviceGone`.
//! - [`shard`]: `ShardReader`: shuffled, sharded record batches (per rank, per DataLoader worker)
//!   into a ring of buffers.
//! - `sys`: the FFI edge: `pread` into mapped memory, the io_uring ring, and the page-cache calls
//!   (`cachestat`, `mincore`, `posix_fadvise`, clearing O_DIRECT).

mod batch;
mod dest;
pub mod error;
mod gone;
mod io;
mod loader;
pub mod options;
mod pagecache;
mod plan;
pub mod report;
pub mod shard;
pub mod source;
mod stage;
#[allow(unsafe_code)]
mod sys;
mod verify;

pub use batch::Batch;
pub use dest::Dest;
pub use error::LoadError;
pub use loader::{Loader, Ticket};
pub use options::{Access, Engine, IoMode, Options, Verify};
pub use report::{DestReport, Report, Via};
pub use shard::{partition, worker_partition, Layout, RingBuffer, ShardBatch, ShardOptions, ShardReader};
pub use source::{Source, ALIGN};
