//! libcufile (NVIDIA GPUDirect Storage), opened at run time by path or name: the library and the
//! entry points used, the driver's open and properties, file handles, and synchronous reads
//! from a file into device memory. cuFile's own codes come back as data (`CufileCall`).
//!
//! Owns: the library handle (never unloaded: cuFile's driver state lives in it), every call into
//! it, and the names of its codes (from cudarc's bindings). Must not: choose where to look for
//! the library or whether a read goes through cuFile (`gds` and the loader do).
//!
//! The functions are called through pointers typed here rather than cudarc's wrappers: those
//! look the library up by names a wheel's `libcufile.so.0` does not match, and their status
//! type is an enum, which an unknown code from a newer library would make undefined behaviour
//! to read. The status is read as two plain integers instead.

use std::ffi::{c_int, c_void, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd};

use cudarc::cufile::sys as cf;
use libloading::Library;

use super::RawMemory;
use crate::error::CufileCall;

/// `CUfileError_t` read as integers: cuFile's code, and the CUDA driver's for
/// `CU_FILE_CUDA_DRIVER_ERROR`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawStatus {
    err: c_int,
    cu_err: c_int,
}

type DriverOpen = unsafe extern "C" fn() -> RawStatus;
type GetProperties = unsafe extern "C" fn(*mut cf::CUfileDrvProps) -> RawStatus;
type SetBool = unsafe extern "C" fn(u32, bool) -> RawStatus;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> RawStatus;
type HandleRegister = unsafe extern "C" fn(*mut cf::CUfileHandle_t, *mut cf::CUfileDescr_t) -> RawStatus;
type HandleDeregister = unsafe extern "C" fn(cf::CUfileHandle_t);
type Read = unsafe extern "C" fn(cf::CUfileHandle_t, *mut c_void, usize, cf::off_t, cf::off_t) -> isize;

/// cuFile's codes this library knows, by cudarc's names (CUDA 13.0 bindings).
const CODES: &[cf::CUfileOpError] = {
    use cf::CUfileOpError::*;
    &[
        CU_FILE_DRIVER_NOT_INITIALIZED,
        CU_FILE_DRIVER_INVALID_PROPS,
        CU_FILE_DRIVER_UNSUPPORTED_LIMIT,
        CU_FILE_DRIVER_VERSION_MISMATCH,
        CU_FILE_DRIVER_VERSION_READ_ERROR,
        CU_FILE_DRIVER_CLOSING,
        CU_FILE_PLATFORM_NOT_SUPPORTED,
        CU_FILE_IO_NOT_SUPPORTED,
        CU_FILE_DEVICE_NOT_SUPPORTED,
        CU_FILE_NVFS_DRIVER_ERROR,
        CU_FILE_CUDA_DRIVER_ERROR,
        CU_FILE_CUDA_POINTER_INVALID,
        CU_FILE_CUDA_MEMORY_TYPE_INVALID,
        CU_FILE_CUDA_POINTER_RANGE_ERROR,
        CU_FILE_CUDA_CONTEXT_MISMATCH,
        CU_FILE_INVALID_MAPPING_SIZE,
        CU_FILE_INVALID_MAPPING_RANGE,
        CU_FILE_INVALID_FILE_TYPE,
        CU_FILE_INVALID_FILE_OPEN_FLAG,
        CU_FILE_DIO_NOT_SET,
        CU_FILE_INVALID_VALUE,
        CU_FILE_MEMORY_ALREADY_REGISTERED,
        CU_FILE_MEMORY_NOT_REGISTERED,
        CU_FILE_PERMISSION_DENIED,
        CU_FILE_DRIVER_ALREADY_OPEN,
        CU_FILE_HANDLE_NOT_REGISTERED,
        CU_FILE_HANDLE_ALREADY_REGISTERED,
        CU_FILE_DEVICE_NOT_FOUND,
        CU_FILE_INTERNAL_ERROR,
        CU_FILE_GETNEWFD_FAILED,
        CU_FILE_NVFS_SETUP_ERROR,
        CU_FILE_IO_DISABLED,
        CU_FILE_BATCH_SUBMIT_FAILED,
        CU_FILE_GPU_MEMORY_PINNING_FAILED,
        CU_FILE_BATCH_FULL,
        CU_FILE_ASYNC_NOT_SUPPORTED,
        CU_FILE_INTERNAL_BATCH_SETUP_ERROR,
        CU_FILE_INTERNAL_BATCH_SUBMIT_ERROR,
        CU_FILE_INTERNAL_BATCH_GETSTATUS_ERROR,
        CU_FILE_INTERNAL_BATCH_CANCEL_ERROR,
        CU_FILE_NOMEM_ERROR,
        CU_FILE_IO_ERROR,
        CU_FILE_INTERNAL_BUF_REGISTER_ERROR,
        CU_FILE_HASH_OPR_ERROR,
        CU_FILE_INVALID_CONTEXT_ERROR,
        CU_FILE_NVFS_INTERNAL_DRIVER_ERROR,
        CU_FILE_BATCH_NOCOMPAT_ERROR,
        CU_FILE_IO_MAX_ERROR,
    ]
};

/// cuFile's name for `code` (`CU_FILE_DRIVER_NOT_INITIALIZED`), or `cuFile error <n>`.
pub(crate) fn code_name(code: i32) -> String {
    CODES
        .iter()
        .find(|c| **c as u32 as i32 == code)
        .map_or_else(|| format!("cuFile error {code}"), |c| format!("{c:?}"))
}

/// The storage kinds the driver's properties mark supported (`dstatusflags` bits).
const STORAGE: &[cf::CUfileDriverStatusFlags] = {
    use cf::CUfileDriverStatusFlags::*;
    &[
        CU_FILE_LUSTRE_SUPPORTED,
        CU_FILE_WEKAFS_SUPPORTED,
        CU_FILE_NFS_SUPPORTED,
        CU_FILE_GPFS_SUPPORTED,
        CU_FILE_NVME_SUPPORTED,
        CU_FILE_NVMEOF_SUPPORTED,
        CU_FILE_SCSI_SUPPORTED,
        CU_FILE_SCALEFLUX_CSD_SUPPORTED,
        CU_FILE_NVMESH_SUPPORTED,
        CU_FILE_BEEGFS_SUPPORTED,
        CU_FILE_NVME_P2P_SUPPORTED,
        CU_FILE_SCATEFS_SUPPORTED,
    ]
};

/// The storage kinds set in `flags`, by name (`NVME`, `NVME_P2P`, ...).
pub(crate) fn storage_names(flags: u32) -> Vec<String> {
    STORAGE
        .iter()
        .filter(|s| (**s as u32) < 32 && flags & (1 << (**s as u32)) != 0)
        .map(|s| format!("{s:?}").trim_start_matches("CU_FILE_").trim_end_matches("_SUPPORTED").to_string())
        .collect()
}

fn status(call: &'static str, s: RawStatus) -> Result<(), CufileCall> {
    if s.err == 0 {
        return Ok(());
    }
    let cuda = (s.err == cf::CUfileOpError::CU_FILE_CUDA_DRIVER_ERROR as i32 && s.cu_err != 0).then_some(s.cu_err);
    Err(CufileCall { call, code: s.err, name: code_name(s.err), cuda })
}

/// What the driver reports after it opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Properties {
    pub nvfs_version: (u32, u32),
    pub storage_flags: u32,
    pub max_direct_io_size: usize,
}

/// libcufile and its entry points (`cuFileSetParameterBool` and `cuFileGetVersion` are optional:
/// older libraries lack them). Lives for the process (`gds` keeps it in a static).
pub(crate) struct Lib {
    _lib: Library,
    open: DriverOpen,
    props: GetProperties,
    set_bool: Option<SetBool>,
    version: Option<GetVersion>,
    register: HandleRegister,
    deregister: HandleDeregister,
    read: Read,
}

/// Entry point `name` of `lib`, as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the function's type as cuFile's header declares it.
unsafe fn sym<T: Copy>(lib: &Library, name: &'static str) -> Result<T, LoadFailed> {
    // SAFETY: the caller names the type; the pointer is copied out while `lib` lives, and the
    // library is never unloaded while a `Lib` holds it.
    unsafe { lib.get::<T>(name.as_bytes()) }.map(|f| *f).map_err(|_| LoadFailed::MissingSymbol(name))
}

/// Why a library could not be used.
pub(crate) enum LoadFailed {
    /// `dlopen` refused it (not found, or not loadable): its message.
    Open(String),
    MissingSymbol(&'static str),
}

impl Lib {
    /// Opens `name` (a path, or a name the dynamic loader searches for) and finds the entry points.
    pub(crate) fn load(name: &OsStr) -> Result<Lib, LoadFailed> {
        // SAFETY: libcufile's initialisers are those any GPUDirect Storage program runs; it
        // starts no thread and touches no device until `cuFileDriverOpen`.
        let lib = unsafe { Library::new(name) }.map_err(|e| LoadFailed::Open(e.to_string()))?;
        // SAFETY: each symbol is looked up under the C name and type cuFile's header gives it.
        unsafe {
            Ok(Lib {
                open: sym(&lib, "cuFileDriverOpen")?,
                props: sym(&lib, "cuFileDriverGetProperties")?,
                register: sym(&lib, "cuFileHandleRegister")?,
                deregister: sym(&lib, "cuFileHandleDeregister")?,
                read: sym(&lib, "cuFileRead")?,
                set_bool: sym(&lib, "cuFileSetParameterBool").ok(),
                version: sym(&lib, "cuFileGetVersion").ok(),
                _lib: lib,
            })
        }
    }

    /// `cuFileGetVersion` (e.g. 1170 for 1.17), where the library has it and answers.
    pub(crate) fn version(&self) -> Option<i32> {
        let f = self.version?;
        let mut v: c_int = 0;
        // SAFETY: an out-pointer to a live int.
        status("cuFileGetVersion", unsafe { f(&mut v) }).ok().map(|()| v)
    }

    /// Forbids cuFile's compatibility mode (POSIX reads into its own host bounce buffers) before
    /// the driver opens, so a file cuFile cannot read directly is refused instead of read
    /// through host memory unannounced. False where the library lacks the setting.
    pub(crate) fn forbid_compat_mode(&self) -> Result<bool, CufileCall> {
        let Some(f) = self.set_bool else { return Ok(false) };
        let p = cf::CUFileBoolConfigParameter_t::CUFILE_PARAM_PROPERTIES_ALLOW_COMPAT_MODE as u32;
        // SAFETY: a plain setting, made before the driver opens, as the API requires.
        status("cuFileSetParameterBool", unsafe { f(p, false) }).map(|()| true)
    }

    /// `cuFileDriverOpen`, then its properties.
    pub(crate) fn open_driver(&self) -> Result<Properties, CufileCall> {
        // SAFETY: no arguments; the library is loaded for the process.
        status("cuFileDriverOpen", unsafe { (self.open)() })?;
        let mut p = std::mem::MaybeUninit::<cf::CUfileDrvProps>::zeroed();
        // SAFETY: an out-pointer to a zeroed struct of the type the call fills.
        status("cuFileDriverGetProperties", unsafe { (self.props)(p.as_mut_ptr()) })?;
        // SAFETY: zeroed plain integers, filled by the call that succeeded.
        let p = unsafe { p.assume_init() };
        Ok(Properties {
            nvfs_version: (p.nvfs.major_version, p.nvfs.minor_version),
            storage_flags: p.nvfs.dstatusflags,
            max_direct_io_size: p.nvfs.max_direct_io_size,
        })
    }

    /// Registers an open file (`cuFileHandleRegister`). The fd must stay open until the handle
    /// is dropped: the caller keeps the file beside the handle.
    pub(crate) fn register(&'static self, fd: BorrowedFd<'_>) -> Result<Handle, CufileCall> {
        let mut d = std::mem::MaybeUninit::<cf::CUfileDescr_t>::zeroed();
        // SAFETY: the descriptor is zeroed (no filesystem ops: the kernel's) and then given
        // its type and the fd, as the header describes.
        let mut d = unsafe {
            let p = d.as_mut_ptr();
            (*p).type_ = cf::CUfileFileHandleType::CU_FILE_HANDLE_TYPE_OPAQUE_FD;
            (*p).handle.fd = fd.as_raw_fd();
            d.assume_init()
        };
        let mut h: cf::CUfileHandle_t = std::ptr::null_mut();
        // SAFETY: live out-pointer and descriptor; the fd is open (borrowed).
        status("cuFileHandleRegister", unsafe { (self.register)(&mut h, &mut d) })?;
        Ok(Handle { raw: h, lib: self })
    }
}

/// A registered file. Deregistered on drop (before its file closes: the owner drops it first).
pub(crate) struct Handle {
    raw: cf::CUfileHandle_t,
    lib: &'static Lib,
}

// SAFETY: cuFile's handles are opaque and its read and deregister calls are thread-safe.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: registered by `Lib::register`, deregistered once; reads borrow the handle, so
        // none runs now.
        unsafe { (self.lib.deregister)(self.raw) }
    }
}

/// Why a read failed: cuFile's code, or the OS error it returned as -1 with errno.
pub(crate) enum ReadFailed {
    Cufile(CufileCall),
    Os(std::io::Error),
}

impl Handle {
    /// Reads `n` bytes at `file_off` of the file into `mem` at `moff` (`cuFileRead`, on the
    /// calling thread, on `mem`'s context). Returns the bytes read (fewer at the end of a file).
    pub(crate) fn read(&self, mem: &RawMemory, moff: u64, file_off: u64, n: u64) -> Result<u64, ReadFailed> {
        let bad = |why: &str| {
            ReadFailed::Os(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("cuFileRead: {why}")))
        };
        if n == 0 || moff.checked_add(n).is_none_or(|e| e > mem.len) {
            return Err(bad("the range is outside the device memory"));
        }
        let (size, foff, doff) = match (usize::try_from(n), cf::off_t::try_from(file_off), cf::off_t::try_from(moff)) {
            (Ok(s), Ok(f), Ok(d)) => (s, f, d),
            _ => return Err(bad("an offset or length does not fit the call")),
        };
        mem.dev.current().map_err(|e| bad(&e.to_string()))?;
        // SAFETY: `moff..moff+n` lies inside `mem`, live device memory borrowed for the call;
        // the handle's file is open; the call returns when the bytes arrived.
        let r = unsafe { (self.lib.read)(self.raw, mem.ptr.raw() as *mut c_void, size, foff, doff) };
        match r {
            r if r >= 0 => Ok(r as u64),
            -1 => Err(ReadFailed::Os(std::io::Error::last_os_error())),
            r => {
                let code = r.unsigned_abs().min(i32::MAX as usize) as i32;
                Err(ReadFailed::Cufile(CufileCall { call: "cuFileRead", code, name: code_name(code), cuda: None }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_by_cufile_and_unknown_ones_by_number() {
        assert_eq!(code_name(5011), "CU_FILE_CUDA_DRIVER_ERROR");
        assert_eq!(code_name(5020), "CU_FILE_DIO_NOT_SET");
        assert_eq!(code_name(5021), "cuFile error 5021");
        let s = status("cuFileDriverOpen", RawStatus { err: 5011, cu_err: 100 }).unwrap_err();
        assert_eq!(s.cuda, Some(100));
        assert!(status("x", RawStatus { err: 0, cu_err: 7 }).is_ok());
    }

    #[test]
    fn storage_flags_are_named() {
        assert_eq!(storage_names(1 << 4 | 1 << 11), vec!["NVME".to_string(), "NVME_P2P".to_string()]);
        assert!(storage_names(0).is_empty());
    }
}
