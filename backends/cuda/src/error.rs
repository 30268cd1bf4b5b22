//! The backend's one error type. Every variant names what was wrong and with which input; a
//! failed driver call carries the driver's own name for its error (`cuGetErrorName`).
//!
//! Owns: `CudaError`, `DriverCall` (a failed call as data) and the mapping of the driver's codes
//! that mean something to a caller (no device, too old a driver, out of memory). Must not: hold a
//! raw handle, pointer or fd (errors outlive all three).

use std::time::Duration;

use peermem::RegionError;

use crate::info::{DevicePtr, DmaBufRefusal};

/// The codes of `CUresult` this crate tells apart (the driver API's numbering, stable across
/// releases).
pub(crate) mod code {
    pub const INVALID_VALUE: i32 = 1;
    pub const OUT_OF_MEMORY: i32 = 2;
    pub const INSUFFICIENT_DRIVER: i32 = 35;
    pub const NO_DEVICE: i32 = 100;
    pub const INVALID_DEVICE: i32 = 101;
    pub const SYSTEM_NOT_READY: i32 = 802;
    pub const SYSTEM_DRIVER_MISMATCH: i32 = 803;
}

/// A driver call that returned an error: the entry point, the numeric `CUresult` and its name
/// as the driver spells it (`CUDA_ERROR_OUT_OF_MEMORY`), or `CUDA error <n>` when the driver
/// does not know the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverCall {
    pub call: &'static str,
    pub code: i32,
    pub name: String,
}

impl std::fmt::Display for DriverCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {} ({})", self.call, self.name, self.code)
    }
}

/// A cuFile call that returned an error: the entry point, cuFile's code and its name
/// (`CU_FILE_DRIVER_NOT_INITIALIZED`, or `cuFile error <n>` for a code this build does not
/// know), and for `CU_FILE_CUDA_DRIVER_ERROR` the CUDA driver's code behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CufileCall {
    pub call: &'static str,
    pub code: i32,
    pub name: String,
    pub cuda: Option<i32>,
}

impl std::fmt::Display for CufileCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {} ({})", self.call, self.name, self.code)?;
        if let Some(c) = self.cuda {
            write!(f, ", CUDA error {c}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// libcuda could not be loaded: no NVIDIA driver on this machine (or not on the loader path).
    #[error(
        "libcuda.so.1 not found: no NVIDIA driver (tried {tried}; install the NVIDIA driver, or put the \
         directory holding libcuda.so.1 on LD_LIBRARY_PATH)"
    )]
    NoDriver { tried: String },
    /// libcuda loaded but lacks an entry point this backend calls.
    #[error("the NVIDIA driver's libcuda lacks {symbol} (driver too old for this backend: CUDA 11.7 or newer needed)")]
    MissingSymbol { symbol: &'static str },
    /// `cuInit` found no usable GPU (driver loaded, device nodes missing or hidden).
    #[error("the NVIDIA driver found no CUDA device ({0})")]
    NoDevice(DriverCall),
    /// The kernel module and libcuda disagree, or the driver is older than the API asks for.
    #[error("the NVIDIA driver cannot serve this process: {0} (kernel module and libcuda of different versions?)")]
    DriverMismatch(DriverCall),
    /// A driver call failed.
    #[error("{0}")]
    Call(DriverCall),
    /// Device memory ran out.
    #[error("out of GPU memory: {0}")]
    OutOfMemory(DriverCall),
    /// An ordinal past the number of devices.
    #[error("CUDA device {ordinal} does not exist ({count} device(s) found)")]
    NoSuchDevice { ordinal: usize, count: usize },
    /// The driver says the device cannot do what was asked (VMM, dma-buf).
    #[error("CUDA device {ordinal} cannot {what}")]
    Unsupported { ordinal: usize, what: String },
    /// A region cannot be exported as a dma-buf, and why.
    #[error("no dma-buf for this CUDA memory: {0}")]
    NoDmaBuf(DmaBufRefusal),
    /// A zero-length or otherwise impossible length.
    #[error("invalid length {len:#x}: {why}")]
    BadLength { len: u64, why: &'static str },
    /// An access past a region's end.
    #[error("{which}: {len:#x} bytes at offset {offset:#x} run past its {size:#x} bytes")]
    OutOfRange { which: &'static str, offset: u64, len: u64, size: u64 },
    /// Memory someone else allocated that is not what the caller said it is.
    #[error("device pointer {ptr}: {why}")]
    NotDeviceMemory { ptr: DevicePtr, why: String },
    /// Host memory that the GPU cannot copy from or to (no CPU mapping).
    #[error("host memory for a GPU copy: {0}")]
    BadHost(String),
    /// A region or pinned buffer of another device given to this device's copy.
    #[error("the {which} belongs to CUDA device {theirs}, not to device {ours}")]
    ForeignDevice { which: &'static str, ours: usize, theirs: usize },
    /// A copy that did not finish in time. Its memory stays alive until it does.
    #[error("GPU copy did not complete within {0:?} (the memory it uses is kept alive until it does)")]
    Timeout(Duration),
    /// libcufile (GPUDirect Storage) could not be loaded.
    #[error(
        "libcufile.so not found (tried {tried}): GPUDirect Storage needs NVIDIA's cuFile library (CUDA's \
         libcufile, or the nvidia-cufile wheel); set PEERMEM_CUFILE to the library or its directory"
    )]
    NoCufile { tried: String },
    /// libcufile loaded but lacks an entry point used here.
    #[error("{library} lacks {symbol} (too old a cuFile library)")]
    CufileSymbol { library: String, symbol: &'static str },
    /// `cuFileDriverOpen` (or a setting made before it) failed; `here` adds what peermem sees of
    /// its prerequisites (libcuda, the nvidia-fs driver), empty when there is nothing to add.
    #[error("{call}{here}")]
    CufileDriver { call: CufileCall, here: String },
    /// cuFile will not read this file directly, and why.
    #[error("{why}: {call}")]
    CufileFile { why: &'static str, call: CufileCall },
    /// The file is not open with O_DIRECT, which GPUDirect Storage reads need.
    #[error("O_DIRECT not possible for this file: {0}")]
    NoDirectIo(String),
    /// A cuFile read failed: cuFile's code, or the error it returned from the OS.
    #[error("{0}")]
    CufileRead(String),
    /// Memory another API exported is not on this CUDA device (or cannot be shown to be).
    #[error("{exporter} and CUDA device {ordinal} (PCI {cuda}) are different GPUs: {why}")]
    DifferentGpu { ordinal: usize, cuda: String, exporter: String, why: String },
    /// A CPU access to host memory that could not happen.
    #[error(transparent)]
    Access(#[from] peermem::AccessError),
    /// From a core region.
    #[error(transparent)]
    Region(#[from] RegionError),
}

impl CudaError {
    /// The error for `call` returning `code`, named `name` by `cuGetErrorName` (None: the driver
    /// does not know the code). Codes that mean something to the caller get their own variant.
    pub fn from_driver(call: &'static str, code: i32, name: Option<&str>) -> CudaError {
        let name = name.map_or_else(|| format!("CUDA error {code}"), str::to_string);
        let c = DriverCall { call, code, name };
        match code {
            code::NO_DEVICE | code::INVALID_DEVICE => CudaError::NoDevice(c),
            code::INSUFFICIENT_DRIVER | code::SYSTEM_DRIVER_MISMATCH | code::SYSTEM_NOT_READY => {
                CudaError::DriverMismatch(c)
            }
            code::OUT_OF_MEMORY => CudaError::OutOfMemory(c),
            _ => CudaError::Call(c),
        }
    }

    /// The failed driver call behind this error, if it is one.
    pub fn driver_call(&self) -> Option<&DriverCall> {
        match self {
            CudaError::NoDevice(c) | CudaError::DriverMismatch(c) | CudaError::Call(c) | CudaError::OutOfMemory(c) => {
                Some(c)
            }
            _ => None,
        }
    }

    /// True when the error says no CUDA is usable here (no driver, no device): what a test
    /// skips on.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CudaError::NoDriver { .. } | CudaError::NoDevice(_) | CudaError::MissingSymbol { .. })
    }
}

impl From<CudaError> for RegionError {
    fn from(e: CudaError) -> RegionError {
        match e {
            CudaError::Region(r) => r,
            other => RegionError::Backend(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_codes_that_mean_something_get_their_own_variant() {
        let e = CudaError::from_driver("cuInit", code::NO_DEVICE, Some("CUDA_ERROR_NO_DEVICE"));
        assert!(matches!(e, CudaError::NoDevice(_)) && e.is_unavailable(), "{e:?}");
        let e =
            CudaError::from_driver("cuInit", code::SYSTEM_DRIVER_MISMATCH, Some("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"));
        assert!(matches!(e, CudaError::DriverMismatch(_)));
        assert!(e.to_string().contains("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH (803)"), "{e}");
        let e = CudaError::from_driver("cuMemCreate", code::OUT_OF_MEMORY, Some("CUDA_ERROR_OUT_OF_MEMORY"));
        assert!(matches!(e, CudaError::OutOfMemory(_)) && !e.is_unavailable());
        assert_eq!(e.to_string(), "out of GPU memory: cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (2)");
    }

    #[test]
    fn a_code_the_driver_cannot_name_is_named_by_its_number() {
        let e = CudaError::from_driver("cuMemcpyHtoDAsync_v2", 9999, None);
        assert_eq!(e.to_string(), "cuMemcpyHtoDAsync_v2 failed: CUDA error 9999 (9999)");
        assert_eq!(e.driver_call().map(|c| c.code), Some(9999));
    }

    #[test]
    fn no_driver_names_the_library_and_the_fix() {
        let e = CudaError::NoDriver { tried: "libcuda.so, libcuda.so.1".into() };
        let s = e.to_string();
        assert!(s.starts_with("libcuda.so.1 not found: no NVIDIA driver"), "{s}");
        assert!(e.is_unavailable());
        // Into a core error, whole.
        let r: RegionError = e.into();
        assert!(r.to_string().contains("no NVIDIA driver"), "{r}");
    }
}
