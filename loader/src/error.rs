//! The loader's one error type.

use std::path::PathBuf;

use peermem_nvme::NvmeError;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("range {start:#x}..{end:#x} is empty or runs past the source's {len} bytes")]
    BadRange { start: u64, end: u64, len: u64 },
    #[error("{len} bytes at offset {offset:#x} do not fit the {region_len}-byte destination")]
    TooSmall { len: u64, offset: u64, region_len: u64 },
    #[error("the destination cannot be reached by the CPU either: {0}")]
    Unreachable(String),
    #[error(transparent)]
    MapBar(#[from] peermem::MapBarError),
    #[error(transparent)]
    Access(#[from] peermem::AccessError),
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    #[error("resolve: {0}")]
    Resolve(#[from] peermem::ResolveError),
    #[error(transparent)]
    Registry(#[from] peermem::RegistryError),
    #[error("staging: {0}")]
    Region(#[from] peermem::RegionError),
    #[error("{path}: not a regular file or block device ({kind})")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{var}={value:?}: {why}")]
    BadSetting { var: &'static str, value: String, why: String },
    /// `reasons`: the route's and the planner's reasons for the destination (the `why` of the
    /// refusal is the last word; these say what the plan was based on).
    #[error("strict: {what} cannot go direct: {why}")]
    NotDirect { what: String, why: String, reasons: Vec<String> },
    #[error("destination region {region} was unregistered while reads into it were in flight")]
    Unregistered { region: peermem::RegionId },
    #[error("{what}: no progress within {ms} ms")]
    Timeout { what: &'static str, ms: u128 },
    #[error("{path}: short read at offset {offset:#x}: {got} of {want} bytes (the file shrank?)")]
    ShortRead { path: PathBuf, offset: u64, got: u64, want: u64 },
    /// `what`: the source, as opened.
    #[error("{what}: xxh3 mismatch for {len} bytes at offset {offset:#x}: destination {dest:#018x}, expected {expected:#018x}")]
    HashMismatch { what: String, offset: u64, len: u64, dest: u64, expected: u64 },
    #[error("vulkan: {0}")]
    Vulkan(Box<peermem_vulkan::VkError>),
    #[error("cuda: {0}")]
    Cuda(Box<peermem_cuda::CudaError>),
    #[error("the io engine: {0}")]
    Engine(String),
    #[error("the loader has shut down")]
    Closed,
    #[error("the ring of {slots} batch buffers is full: drop a batch before asking for more")]
    RingFull { slots: usize },
    #[error("shard layout: {0}")]
    Layout(String),
    #[error("PCI device {bdf} (the {role}) was removed from the machine: {cause}")]
    DeviceGone { bdf: peermem::Bdf, role: &'static str, cause: Box<LoadError> },
}

impl From<peermem_vulkan::VkError> for LoadError {
    fn from(e: peermem_vulkan::VkError) -> LoadError {
        LoadError::Vulkan(Box::new(e))
    }
}

impl From<peermem_cuda::CudaError> for LoadError {
    fn from(e: peermem_cuda::CudaError) -> LoadError {
        LoadError::Cuda(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_error_stays_small_enough_to_return_by_value() {
        assert!(std::mem::size_of::<super::LoadError>() <= 128, "{}", std::mem::size_of::<super::LoadError>());
    }
}
