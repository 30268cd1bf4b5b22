//! Memory another API allocated and exported as an opaque fd (a Vulkan allocation through
//! `VK_KHR_external_memory_fd`), imported into CUDA (`cuImportExternalMemory`) and mapped as one
//! buffer (`cuExternalMemoryGetMappedBuffer`).
//!
//! Owns: the import's handles: the mapping is freed, then the external memory destroyed, when
//! the last user of the region is gone. Must not: decide whether the exporter is this GPU
//! (`DeviceInfo::same_gpu` does, before this is called).

use std::ffi::c_void;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::sys as cu;

use super::{check, ExtMem, MemKind, RawDevice, RawMemory};
use crate::error::CudaError;
use crate::info::DevicePtr;

/// The entry points of an import (optional in the driver: checked before use).
const CALLS: &[&str] = &["cuImportExternalMemory", "cuExternalMemoryGetMappedBuffer", "cuDestroyExternalMemory"];

/// Imports `fd` (an opaque fd of an allocation of `alloc_size` bytes; `dedicated` when it is a
/// dedicated allocation) and maps its first `len` bytes on `dev`. The driver owns the fd once
/// the import succeeded; on failure it is closed here.
pub(crate) fn import_opaque_fd(
    dev: &Arc<RawDevice>,
    fd: OwnedFd,
    alloc_size: u64,
    dedicated: bool,
    len: u64,
) -> Result<RawMemory, CudaError> {
    for c in CALLS {
        // SAFETY: `load` found the library before any device was opened; a lookup only.
        if unsafe { cu::culib().get::<*const c_void>(c.as_bytes()) }.is_err() {
            return Err(CudaError::MissingSymbol { symbol: c });
        }
    }
    if len == 0 || len > alloc_size {
        return Err(CudaError::BadLength { len, why: "zero, or past the exported allocation" });
    }
    dev.current()?;
    // SAFETY: a plain C struct; all-zero is its documented default (no name, no flags).
    let mut desc: cu::CUDA_EXTERNAL_MEMORY_HANDLE_DESC = unsafe { std::mem::zeroed() };
    desc.type_ = cu::CUexternalMemoryHandleType::CU_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD;
    desc.handle.fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
    desc.size = alloc_size;
    desc.flags = if dedicated { cu::CUDA_EXTERNAL_MEMORY_DEDICATED } else { 0 };
    let mut ext: cu::CUexternalMemory = std::ptr::null_mut();
    // SAFETY: live out-pointer and descriptor; the fd is open (owned here until success).
    check("cuImportExternalMemory", unsafe { cu::cuImportExternalMemory(&mut ext, &desc) })?;
    // The driver took the fd: it closes it when the external memory is destroyed.
    let _ = fd.into_raw_fd();
    // SAFETY: as above; zeroed flags and reserved words.
    let mut buf: cu::CUDA_EXTERNAL_MEMORY_BUFFER_DESC = unsafe { std::mem::zeroed() };
    buf.offset = 0;
    buf.size = len;
    let mut ptr: cu::CUdeviceptr = 0;
    // SAFETY: live out-pointer and descriptor; `ext` was just imported.
    if let Err(e) =
        check("cuExternalMemoryGetMappedBuffer", unsafe { cu::cuExternalMemoryGetMappedBuffer(&mut ptr, ext, &buf) })
    {
        // SAFETY: imported above, nothing mapped from it.
        unsafe { cu::cuDestroyExternalMemory(ext) };
        return Err(e);
    }
    Ok(RawMemory { dev: dev.clone(), ptr: DevicePtr::new(ptr), len, kind: MemKind::External { ext: ExtMem(ext) } })
}
