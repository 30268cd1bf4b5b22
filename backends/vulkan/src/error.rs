//! The backend's one error type. Every variant names what was wrong and with which input.
//!
//! Owns: `VkError`. Must not: carry a raw Vulkan handle or an fd (errors outlive both).

use std::time::Duration;

use ash::vk;
use peermem::{Bdf, RegionError, VirtAddr};

use crate::info::HandleType;

/// Everything that can go wrong in the Vulkan backend.
#[derive(Debug, thiserror::Error)]
pub enum VkError {
    /// libvulkan could not be opened or lacks its entry points.
    #[error(
        "no Vulkan loader: {0} (install libvulkan1 and a driver, e.g. mesa-vulkan-drivers for lavapipe; \
         set PEERMEM_SKIP_VULKAN=1 to skip the tests that need one)"
    )]
    NoLoader(String),
    /// The loader works but no driver (ICD) offers a device.
    #[error(
        "the Vulkan loader found no physical device (no ICD installed or all failed to load: install \
         mesa-vulkan-drivers for lavapipe, check VK_ICD_FILENAMES / VK_DRIVER_FILES)"
    )]
    NoDevice,
    /// The loader or device speaks a Vulkan older than 1.1 (external memory is core in 1.1).
    #[error("{what} supports Vulkan {major}.{minor}; external memory needs 1.1 or newer")]
    TooOld { what: String, major: u32, minor: u32 },
    /// A Vulkan call returned an error code.
    #[error("{call} failed: {result}")]
    Call { call: &'static str, result: vk::Result },
    /// `Select::Index` past the number of devices.
    #[error("Vulkan device index {index} does not exist ({count} device(s) found)")]
    NoSuchIndex { index: usize, count: usize },
    /// `Select::Pci`: no device reports that PCI address.
    #[error("no Vulkan device at PCI {bdf}: {why}")]
    NoDeviceAt { bdf: Bdf, why: String },
    /// A device extension the backend needs is absent.
    #[error("Vulkan device '{device}' lacks {ext}")]
    MissingExtension { device: String, ext: &'static str },
    /// The device cannot do this kind of export or import.
    #[error("Vulkan device '{device}' cannot {what}")]
    Unsupported { device: String, what: String },
    /// No memory type fits.
    #[error("no memory type for {what} among type bits {bits:#x}")]
    NoMemoryType { what: &'static str, bits: u32 },
    /// Zero-length or otherwise impossible region.
    #[error("invalid length {len:#x}: {why}")]
    BadLength { len: u64, why: &'static str },
    /// A host-pointer import whose start is not aligned as the device requires.
    #[error(
        "host pointer {addr} is not aligned to minImportedHostPointerAlignment {align:#x} of '{device}' \
         ({misalign:#x} bytes past a boundary)"
    )]
    Misaligned { addr: VirtAddr, align: u64, misalign: u64, device: String },
    /// A host-pointer import whose length is not a multiple of the required alignment.
    #[error(
        "host import of {len:#x} bytes: must be a non-zero multiple of minImportedHostPointerAlignment \
         {align:#x} of '{device}'"
    )]
    BadImportSize { len: u64, align: u64, device: String },
    /// The imported memory is smaller than what the import needs.
    #[error("{what}: need {need:#x} bytes, the imported memory holds {have:#x}")]
    ImportTooSmall { what: &'static str, need: u64, have: u64 },
    /// An opaque fd made by another device or driver (only the same driver and device can import it).
    #[error(
        "opaque fd exported by device {exporter} (driver {exporter_driver}) cannot be imported into '{device}' \
         (device {importer}, driver {importer_driver}): opaque fds only work between the same device and driver"
    )]
    ForeignDevice {
        device: String,
        exporter: String,
        exporter_driver: String,
        importer: String,
        importer_driver: String,
    },
    /// A GPU copy given a region of another `VkDevice`.
    #[error("{which} region belongs to another VkDevice than '{device}': import it into this device first")]
    ForeignRegion { which: &'static str, device: String },
    /// A CPU access to a region without a CPU mapping.
    #[error("{which} region has no CPU mapping (not host-visible and coherent)")]
    NotMapped { which: &'static str },
    /// A CPU access through a region's mapping that could not happen.
    #[error(transparent)]
    Access(#[from] peermem::AccessError),
    /// An access past a region's end.
    #[error("{which}: {len:#x} bytes at offset {offset:#x} run past the region's {size:#x} bytes")]
    OutOfRange { which: &'static str, offset: u64, len: u64, size: u64 },
    /// A handle type this device did not enable.
    #[error("'{device}' cannot import a {handle} fd (extension or capability missing)")]
    CannotImport { device: String, handle: HandleType },
    /// A GPU copy or wait that did not finish in time. The copy's regions stay alive until it does.
    #[error("GPU work did not complete within {0:?} (the regions it uses are kept alive until it does)")]
    Timeout(Duration),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    /// A bad export descriptor (over IPC).
    #[error("bad export descriptor: {0}")]
    BadDescriptor(String),
    /// From a core region.
    #[error(transparent)]
    Region(#[from] RegionError),
}

impl VkError {
    pub(crate) fn call(call: &'static str) -> impl FnOnce(vk::Result) -> VkError {
        move |result| VkError::Call { call, result }
    }
}

impl From<VkError> for RegionError {
    fn from(e: VkError) -> RegionError {
        match e {
            VkError::Region(r) => r,
            VkError::Os { what, source } => RegionError::Os { what, source },
            other => RegionError::Os { what: "vulkan", source: std::io::Error::other(other.to_string()) },
        }
    }
}
