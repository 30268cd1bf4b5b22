//! peermem-loader: a byte range of a file, block device or NVMe namespace into any registered
//! peer-memory region (a GPU BAR, a p2pmem/CMB region, a Vulkan buffer, host memory).
//!
//! - [`source`]: files and block devices through the kernel (O_DIRECT when the filesystem
//!   allows), and namespaces through the userspace VFIO driver of `peermem-nvme`.
//! - [`load()`]: asks the mover's planner (`peermem::mover`) whether the reader reaches the
//!   destination directly (the kernel pins pages for O_DIRECT; the VFIO driver programs the
//!   routed address; device memory is probed with the source's own bytes first), then moves the
//!   range directly or through a pipeline of host staging buffers.
//! - [`report`]: options and the per-load report (route, method, every reason, MB/s, checksum).
//! - [`checksum`]: the streaming checksum of moved bytes.

pub mod checksum;
mod engine;
pub mod error;
mod gone;
mod io;
mod load;
pub mod options;
pub mod report;
pub mod shard;
pub mod source;
#[allow(unsafe_code)]
mod sys;

pub use checksum::Checksum;
pub use engine::{Batch, BatchReport, Dest, DestReport, FileHandle, Loader, NvmeHandle, Ticket, Via};
pub use error::LoadError;
pub use load::load;
pub use options::{Engine, Options, Verify};
pub use report::{LoadOptions, LoadReport, Method};
pub use shard::{partition, Layout, RingBuffer, ShardBatch, ShardOptions, ShardReader};
pub use source::{KernelSource, Source, ALIGN};
