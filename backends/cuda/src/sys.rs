//! The backend's only unsafe code: the CUDA driver API through `cudarc::driver::sys` (libcuda is
//! dlopened at run time), device memory, pinned host memory and copies with bounded waits.
//!
//! Owns: every driver handle and its lifetime. `RawDevice` (primary context + copy stream) <-
//! `RawMemory` / `RawPinned` are chained by `Arc`, so memory keeps its device alive and is freed
//! first, whatever order the safe wrappers are dropped in. A copy holds both sides until its
//! event completes; one that outlives its deadline is parked on its device with them until a
//! later call sees it done. Every function here checks ranges itself before the driver sees
//! them. Must not: choose policy (allocation kind, timeouts): `device` does.
//!
//! cudarc panics when libcuda or one of its symbols is missing; `load` probes the library and
//! every entry point used here first, so a missing driver is `CudaError::NoDriver`.
//!
//! Submodules: `cufile` (libcufile, GPUDirect Storage) and `external` (opaque-fd imports).

use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::driver::sys::CUresult;
use peermem::PeerMemory;

use crate::error::{code, CudaError, DriverCall};
use crate::info::{parse_pci_bus_id, DeviceInfo, DevicePtr, DriverVersion};

pub(crate) mod cufile;
pub(crate) mod external;

/// Every entry point called below except the dma-buf export (optional: checked where used).
const REQUIRED: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetPCIBusId",
    "cuDeviceGetUuid_v2",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventDestroy_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetAllocationGranularity",
    "cuMemCreate",
    "cuMemAddressReserve",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemAddressFree",
    "cuMemRelease",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuPointerGetAttribute",
];
const DMA_BUF_EXPORT: &str = "cuMemGetHandleForAddressRange";

/// The library names cudarc tries, for the error message: the first, the last, how many.
fn tried() -> String {
    let mut v = cudarc::get_lib_name_candidates("cuda");
    let (first, last) = (v.first().cloned().unwrap_or_default(), v.last().cloned().unwrap_or_default());
    v.sort_unstable();
    v.dedup();
    format!("{first} ... {last}, {} names", v.len())
}

/// Why loading failed, kept to answer every later call the same way.
#[derive(Clone)]
enum LoadFailure {
    NoDriver(String),
    MissingSymbol(&'static str),
    Init(DriverCall),
}

/// Loads libcuda (once per process), checks its entry points and initialises the driver.
pub(crate) fn load() -> Result<DriverVersion, CudaError> {
    static LOADED: OnceLock<Result<DriverVersion, LoadFailure>> = OnceLock::new();
    let r = LOADED.get_or_init(|| {
        // SAFETY: tries dlopen on each candidate name, with no other effect; the library's
        // initialisers are those any CUDA program runs.
        if !unsafe { cu::is_culib_present() } {
            return Err(LoadFailure::NoDriver(tried()));
        }
        // SAFETY: the library is present (checked above), so `culib` returns it instead of
        // panicking; looking a symbol up has no side effect.
        let lib = unsafe { cu::culib() };
        for s in REQUIRED {
            // SAFETY: a lookup only; the pointer type is never called through.
            if unsafe { lib.get::<*const c_void>(s.as_bytes()) }.is_err() {
                return Err(LoadFailure::MissingSymbol(s));
            }
        }
        // SAFETY: every symbol cudarc resolves from here on was checked present above.
        let r = unsafe { cu::cuInit(0) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(LoadFailure::Init(driver_call("cuInit", r)));
        }
        let mut v: c_int = 0;
        // SAFETY: an out-pointer to a live int.
        let r = unsafe { cu::cuDriverGetVersion(&mut v) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(LoadFailure::Init(driver_call("cuDriverGetVersion", r)));
        }
        Ok(DriverVersion::from_raw(v))
    });
    match r {
        Ok(v) => Ok(*v),
        Err(LoadFailure::NoDriver(tried)) => Err(CudaError::NoDriver { tried: tried.clone() }),
        Err(LoadFailure::MissingSymbol(s)) => Err(CudaError::MissingSymbol { symbol: s }),
        Err(LoadFailure::Init(c)) => Err(CudaError::from_driver(c.call, c.code, Some(&c.name))),
    }
}

/// The status flags of an open file (`fcntl(F_GETFL)`: `O_DIRECT` among them).
pub(crate) fn file_flags(file: &std::fs::File) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on an fd the borrowed file keeps open; no memory is passed.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// True when the loaded driver exports the dma-buf entry point (`load` succeeded first).
pub(crate) fn has_dma_buf_export() -> bool {
    // SAFETY: only called after `load` found the library; a lookup has no side effect.
    unsafe { cu::culib().get::<*const c_void>(DMA_BUF_EXPORT.as_bytes()).is_ok() }
}

/// The failed call `call` returning `r`, named by the driver.
fn driver_call(call: &'static str, r: CUresult) -> DriverCall {
    let mut p: *const c_char = std::ptr::null();
    // SAFETY: `cuGetErrorName` is present (probed); it writes a pointer to a static string.
    let named = unsafe { cu::cuGetErrorName(r, &mut p) } == CUresult::CUDA_SUCCESS && !p.is_null();
    // SAFETY: on success `p` points at a NUL-terminated static string of the driver.
    let name = named.then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    let code = r as u32 as i32;
    DriverCall { call, code, name: name.unwrap_or_else(|| format!("CUDA error {code}")) }
}

fn check(call: &'static str, r: CUresult) -> Result<(), CudaError> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let c = driver_call(call, r);
    Err(CudaError::from_driver(call, c.code, Some(&c.name)))
}

/// The number of devices (`load` succeeded first).
pub(crate) fn device_count() -> Result<usize, CudaError> {
    let mut n: c_int = 0;
    // SAFETY: an out-pointer to a live int; the driver is initialised.
    check("cuDeviceGetCount", unsafe { cu::cuDeviceGetCount(&mut n) })?;
    Ok(n.max(0) as usize)
}

fn handle(ordinal: usize) -> Result<cu::CUdevice, CudaError> {
    let mut dev: cu::CUdevice = 0;
    let ord = c_int::try_from(ordinal).map_err(|_| CudaError::NoSuchDevice { ordinal, count: 0 })?;
    // SAFETY: an out-pointer to a live int; the driver checks the ordinal.
    check("cuDeviceGet", unsafe { cu::cuDeviceGet(&mut dev, ord) })?;
    Ok(dev)
}

fn attribute(dev: cu::CUdevice, a: cu::CUdevice_attribute) -> Result<i32, CudaError> {
    let mut v: c_int = 0;
    // SAFETY: an out-pointer to a live int, a device handle from `cuDeviceGet`.
    check("cuDeviceGetAttribute", unsafe { cu::cuDeviceGetAttribute(&mut v, a, dev) })?;
    Ok(v)
}

/// A NUL-terminated string the driver writes into a buffer of 256 bytes.
fn driver_string(
    call: &'static str,
    f: unsafe fn(*mut c_char, c_int, cu::CUdevice) -> CUresult,
    dev: cu::CUdevice,
) -> Result<String, CudaError> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the buffer is live and its true length is passed; the driver NUL-terminates.
    check(call, unsafe { f(buf.as_mut_ptr(), buf.len() as c_int - 1, dev) })?;
    // SAFETY: the last byte stays 0 (length passed one short), so a NUL is always found.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Everything the backend reports about device `ordinal`.
pub(crate) fn describe(ordinal: usize, driver: DriverVersion) -> Result<DeviceInfo, CudaError> {
    use cu::CUdevice_attribute as A;
    let dev = handle(ordinal)?;
    let name = driver_string("cuDeviceGetName", cu::cuDeviceGetName, dev)?;
    let pci_text = driver_string("cuDeviceGetPCIBusId", cu::cuDeviceGetPCIBusId, dev)?;
    // A bus id that does not parse leaves the provider unknown (`DeviceInfo::provider_note`).
    let pci = parse_pci_bus_id(&pci_text).ok();
    let mut uuid = cu::CUuuid_st { bytes: [0; 16] };
    // SAFETY: an out-pointer to a live CUuuid.
    check("cuDeviceGetUuid_v2", unsafe { cu::cuDeviceGetUuid_v2(&mut uuid, dev) })?;
    let mut total: usize = 0;
    // SAFETY: an out-pointer to a live usize.
    check("cuDeviceTotalMem_v2", unsafe { cu::cuDeviceTotalMem_v2(&mut total, dev) })?;
    let flag = |a| attribute(dev, a).map(|v| v != 0);
    Ok(DeviceInfo {
        ordinal,
        name,
        pci,
        pci_text,
        uuid: uuid.bytes.map(|b| b as u8),
        total_mem: total as u64,
        compute_capability: (
            attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        vmm: flag(A::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)?,
        dma_buf: flag(A::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)?,
        gpu_direct_rdma: flag(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED)?,
        gpu_direct_rdma_vmm: flag(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED)?,
        driver,
    })
}

/// A copy that outlived its deadline, and the memory it uses, kept until its event completes.
struct InFlight {
    event: cu::CUevent,
    _keep: Vec<Arc<dyn Any + Send + Sync>>,
}

/// One device's primary context (the one the CUDA runtime, PyTorch and CuPy use) and the stream
/// the backend copies on. The stream is a blocking one: each copy waits for the work queued
/// before it on the legacy default stream, which is where a DLPack producer asked with
/// `stream=1` orders its pending writes of a tensor handed in (PyTorch's default stream is
/// that stream too).
pub(crate) struct RawDevice {
    pub(crate) info: DeviceInfo,
    dev: cu::CUdevice,
    ctx: cu::CUcontext,
    stream: cu::CUstream,
    /// Copies past their deadline, with their memory.
    parked: Mutex<Vec<InFlight>>,
}

// SAFETY: the driver API is thread-safe; contexts, streams and events are opaque handles any
// thread may pass to it (each call makes the context current on the calling thread first).
unsafe impl Send for RawDevice {}
// SAFETY: as above; `parked` is behind a mutex.
unsafe impl Sync for RawDevice {}

impl Drop for RawDevice {
    fn drop(&mut self) {
        // Every memory and pinned buffer holds an `Arc<RawDevice>`, and parked copies hold
        // those: nothing is parked any more when the device drops.
        // SAFETY: the context is retained by this device; the stream was created in it.
        unsafe {
            let _ = cu::cuCtxSetCurrent(self.ctx);
            let _ = cu::cuStreamDestroy_v2(self.stream);
            let _ = cu::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
        tracing::debug!(ordinal = self.info.ordinal, "CUDA device released");
    }
}

impl RawDevice {
    /// Retains device `info.ordinal`'s primary context and creates the (blocking) copy stream.
    pub(crate) fn open(info: DeviceInfo) -> Result<Arc<RawDevice>, CudaError> {
        let dev = handle(info.ordinal)?;
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: an out-pointer to a live handle; released in `Drop` (or below on failure).
        check("cuDevicePrimaryCtxRetain", unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
        let mut stream: cu::CUstream = std::ptr::null_mut();
        // SAFETY: the context was just retained; the stream is created in it.
        let made = unsafe {
            check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))
                .and_then(|()| check("cuStreamCreate", cu::cuStreamCreate(&mut stream, 0 /* CU_STREAM_DEFAULT */)))
        };
        if let Err(e) = made {
            // SAFETY: retained above, nothing made in it.
            unsafe { cu::cuDevicePrimaryCtxRelease_v2(dev) };
            return Err(e);
        }
        Ok(Arc::new(RawDevice { info, dev, ctx, stream, parked: Mutex::new(Vec::new()) }))
    }

    /// Makes the device's context current on the calling thread (every call below does).
    fn current(&self) -> Result<(), CudaError> {
        // SAFETY: a context this device retains.
        check("cuCtxSetCurrent", unsafe { cu::cuCtxSetCurrent(self.ctx) })
    }

    /// Forgets parked copies that completed (their memory may then be freed). Returns how many
    /// are still running.
    pub(crate) fn reap(&self) -> usize {
        let done: Vec<InFlight> = {
            let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            let (done, running) = std::mem::take(&mut *p).into_iter().partition(|f| {
                // SAFETY: an event this device created and has not destroyed.
                let r = unsafe { cu::cuEventQuery(f.event) };
                r != CUresult::CUDA_ERROR_NOT_READY
            });
            *p = running;
            done
        };
        let _ = self.current();
        for f in &done {
            // SAFETY: the event completed (or failed); nothing waits on it any more.
            unsafe { cu::cuEventDestroy_v2(f.event) };
        }
        drop(done);
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How device memory came to be, and how it is given back.
enum MemKind {
    /// `cuMemCreate` + `cuMemAddressReserve` + `cuMemMap` of `size` bytes.
    Vmm { handle: cu::CUmemGenericAllocationHandle, size: usize },
    /// `cuMemAlloc`.
    Alloc,
    /// Someone else's allocation, kept alive by its owner.
    Foreign { _owner: Box<dyn Any + Send + Sync> },
    /// An imported opaque fd (`cuImportExternalMemory`), mapped at `ptr`.
    External { ext: ExtMem },
}

/// An imported external memory handle.
pub(crate) struct ExtMem(cu::CUexternalMemory);

// SAFETY: an opaque driver handle; the driver API is thread-safe and only `RawMemory::drop`
// destroys it.
unsafe impl Send for ExtMem {}
// SAFETY: as above; nothing reads it but `drop`.
unsafe impl Sync for ExtMem {}

/// Device memory: `len` bytes at `ptr` on `dev`.
pub(crate) struct RawMemory {
    pub(crate) dev: Arc<RawDevice>,
    pub(crate) ptr: DevicePtr,
    pub(crate) len: u64,
    kind: MemKind,
}

impl Drop for RawMemory {
    fn drop(&mut self) {
        // Every copy into or out of this memory holds an `Arc<RawMemory>`: none runs now.
        let _ = self.dev.current();
        let p = self.ptr.raw();
        // SAFETY: the handles were made by the calls `kind` names and are released once.
        unsafe {
            match &self.kind {
                MemKind::Vmm { handle, size } => {
                    let _ = cu::cuMemUnmap(p, *size);
                    let _ = cu::cuMemAddressFree(p, *size);
                    let _ = cu::cuMemRelease(*handle);
                }
                MemKind::Alloc => {
                    let _ = cu::cuMemFree_v2(p);
                }
                MemKind::Foreign { .. } => {}
                MemKind::External { ext } => {
                    let _ = cu::cuMemFree_v2(p);
                    let _ = cu::cuDestroyExternalMemory(ext.0);
                }
            }
        }
    }
}

impl RawMemory {
    /// True for a `cuMemCreate` allocation.
    pub(crate) fn is_vmm(&self) -> bool {
        matches!(self.kind, MemKind::Vmm { .. })
    }
    /// Bytes the driver allocated (the length rounded up to the allocation granularity).
    pub(crate) fn alloc_size(&self) -> u64 {
        match self.kind {
            MemKind::Vmm { size, .. } => size as u64,
            _ => self.len,
        }
    }
}

fn vmm_prop(ordinal: usize, rdma: bool) -> cu::CUmemAllocationProp {
    cu::CUmemAllocationProp {
        type_: cu::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: cu::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: cu::CUmemLocation { type_: cu::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: ordinal as c_int },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: cu::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: rdma as u8,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// A VMM allocation of at least `len` bytes (rounded up to the recommended granularity),
/// mapped read/write for the device; `rdma` asks for GPUDirect RDMA capable memory.
pub(crate) fn alloc_vmm(dev: &Arc<RawDevice>, len: u64, rdma: bool) -> Result<RawMemory, CudaError> {
    dev.current()?;
    let prop = vmm_prop(dev.info.ordinal, rdma);
    let mut gran: usize = 0;
    let opt = cu::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED;
    // SAFETY: live out-pointer and property struct.
    check("cuMemGetAllocationGranularity", unsafe { cu::cuMemGetAllocationGranularity(&mut gran, &prop, opt) })?;
    let gran = gran.max(1) as u64;
    let size = len
        .div_ceil(gran)
        .checked_mul(gran)
        .and_then(|s| usize::try_from(s).ok())
        .ok_or(CudaError::BadLength { len, why: "rounding to the allocation granularity overflows" })?;
    let mut h: cu::CUmemGenericAllocationHandle = 0;
    // SAFETY: live out-pointer and property struct; `size` is a granularity multiple.
    check("cuMemCreate", unsafe { cu::cuMemCreate(&mut h, size, &prop, 0) })?;
    let mut ptr: cu::CUdeviceptr = 0;
    // SAFETY: as above; released below on failure.
    if let Err(e) =
        check("cuMemAddressReserve", unsafe { cu::cuMemAddressReserve(&mut ptr, size, gran as usize, 0, 0) })
    {
        // SAFETY: created above, mapped nowhere.
        unsafe { cu::cuMemRelease(h) };
        return Err(e);
    }
    // From here `RawMemory::drop` undoes whatever was done (unmapping an unmapped range fails
    // harmlessly).
    let mem = RawMemory { dev: dev.clone(), ptr: DevicePtr::new(ptr), len, kind: MemKind::Vmm { handle: h, size } };
    // SAFETY: the reserved range and the handle are both `size` bytes.
    check("cuMemMap", unsafe { cu::cuMemMap(ptr, size, 0, h, 0) })?;
    let access = cu::CUmemAccessDesc {
        location: prop.location,
        flags: cu::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: the range was just mapped; one descriptor.
    check("cuMemSetAccess", unsafe { cu::cuMemSetAccess(ptr, size, &access, 1) })?;
    Ok(mem)
}

/// A `cuMemAlloc` allocation of `len` bytes.
pub(crate) fn alloc_plain(dev: &Arc<RawDevice>, len: u64) -> Result<RawMemory, CudaError> {
    dev.current()?;
    let size = usize::try_from(len).map_err(|_| CudaError::BadLength { len, why: "larger than the address space" })?;
    let mut ptr: cu::CUdeviceptr = 0;
    // SAFETY: a live out-pointer; freed by `RawMemory::drop`.
    check("cuMemAlloc_v2", unsafe { cu::cuMemAlloc_v2(&mut ptr, size) })?;
    Ok(RawMemory { dev: dev.clone(), ptr: DevicePtr::new(ptr), len, kind: MemKind::Alloc })
}

fn pointer_attr<T: Default>(a: cu::CUpointer_attribute, ptr: DevicePtr) -> Result<T, CudaError> {
    let mut v = T::default();
    // SAFETY: `T` is the type the driver writes for `a` (each caller pairs them as the API
    // documents); a live out-pointer.
    check("cuPointerGetAttribute", unsafe {
        cu::cuPointerGetAttribute(&mut v as *mut T as *mut c_void, a, ptr.raw())
    })?;
    Ok(v)
}

/// Someone else's device memory, checked with the driver: device memory of `dev`, inside one
/// live allocation (`Foreign::new`'s contract keeps it alive).
pub(crate) fn foreign(dev: &Arc<RawDevice>, f: Foreign) -> Result<RawMemory, CudaError> {
    use cu::CUpointer_attribute as P;
    let Foreign { ptr, len, owner } = f;
    if len == 0 {
        return Err(CudaError::BadLength { len, why: "zero length" });
    }
    dev.current()?;
    let bad = |why: String| CudaError::NotDeviceMemory { ptr, why };
    let kind: u32 = pointer_attr(P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr)
        .map_err(|e| bad(format!("the driver does not know it ({e})")))?;
    if kind != cu::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        return Err(bad(format!("memory type {kind}, not device memory (2)")));
    }
    let ordinal: c_int = pointer_attr(P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)?;
    if ordinal as usize != dev.info.ordinal {
        return Err(CudaError::ForeignDevice { which: "memory", ours: dev.info.ordinal, theirs: ordinal as usize });
    }
    let start: cu::CUdeviceptr = pointer_attr(P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, ptr)?;
    let size: usize = pointer_attr(P::CU_POINTER_ATTRIBUTE_RANGE_SIZE, ptr)?;
    let end = start.saturating_add(size as u64);
    if ptr.checked_add(len).is_none_or(|e| e.raw() > end) {
        return Err(bad(format!("{len:#x} bytes run past its allocation {start:#x}..{end:#x}")));
    }
    Ok(RawMemory { dev: dev.clone(), ptr, len, kind: MemKind::Foreign { _owner: owner } })
}

/// Memory someone else allocated on a device (a tensor's data through DLPack): `len` bytes at
/// `ptr`, and the owner that keeps the allocation alive. `Device::adopt` checks it with the driver.
pub struct Foreign {
    pub(crate) ptr: DevicePtr,
    pub(crate) len: u64,
    pub(crate) owner: Box<dyn Any + Send + Sync>,
}

impl Foreign {
    /// # Safety
    /// `owner` must keep the allocation under `ptr..ptr+len` alive (not freed, not handed to
    /// another user by a caching allocator) for as long as it is held: the region made of it
    /// holds it until dropped, and every copy into the region holds the region.
    pub unsafe fn new(ptr: DevicePtr, len: u64, owner: Box<dyn Any + Send + Sync>) -> Foreign {
        Foreign { ptr, len, owner }
    }
}

impl std::fmt::Debug for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Foreign").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

/// Exports `len` bytes at `ptr` (host-page aligned, inside `mem`) as a dma-buf.
pub(crate) fn export_dma_buf(mem: &RawMemory) -> Result<OwnedFd, CudaError> {
    mem.dev.current()?;
    let size =
        usize::try_from(mem.alloc_size()).map_err(|_| CudaError::BadLength { len: mem.len, why: "too large" })?;
    let mut fd: c_int = -1;
    let t = cu::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD;
    // SAFETY: the caller checked the entry point exists (`has_dma_buf_export`); the range is
    // this live allocation; the driver writes an fd into the int.
    let r =
        unsafe { cu::cuMemGetHandleForAddressRange(&mut fd as *mut c_int as *mut c_void, mem.ptr.raw(), size, t, 0) };
    check("cuMemGetHandleForAddressRange", r)?;
    if fd < 0 {
        return Err(CudaError::from_driver(
            "cuMemGetHandleForAddressRange",
            code::INVALID_VALUE,
            Some("no fd returned"),
        ));
    }
    // SAFETY: the driver just created this fd for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Host memory registered with the driver (`cuMemHostRegister`): what async copies need to run
/// as DMA. Holds the region, so its pages outlive the registration.
pub(crate) struct RawPinned {
    pub(crate) dev: Arc<RawDevice>,
    pub(crate) region: Arc<dyn PeerMemory>,
    addr: usize,
    pub(crate) len: u64,
    /// False when the pages were registered already (by someone else): not unregistered here.
    ours: bool,
}

// SAFETY: `addr` is the address of `region`'s CPU mapping, owned through `region`, which is
// Send + Sync itself; the raw value is only handed to the driver.
unsafe impl Send for RawPinned {}
// SAFETY: as above.
unsafe impl Sync for RawPinned {}

impl Drop for RawPinned {
    fn drop(&mut self) {
        if self.ours {
            let _ = self.dev.current();
            // SAFETY: registered by `pin` at this address; every copy using it held an Arc of
            // this, so none runs now.
            unsafe { cu::cuMemHostUnregister(self.addr as *mut c_void) };
        }
    }
}

/// Registers `region`'s CPU mapping with the driver (portable: usable by every context).
pub(crate) fn pin(dev: &Arc<RawDevice>, region: Arc<dyn PeerMemory>) -> Result<RawPinned, CudaError> {
    let span = region.cpu_mapping().ok_or_else(|| CudaError::BadHost("the region has no CPU mapping".into()))?;
    let (addr, len) = (span.addr().raw() as usize, region.len());
    if span.len() < len {
        return Err(CudaError::BadHost(format!("the mapping covers {:#x} of {len:#x} bytes", span.len())));
    }
    dev.current()?;
    // SAFETY: `addr..addr+len` is the region's live mapping, kept by the returned value until
    // it unregisters it.
    let r = unsafe { cu::cuMemHostRegister_v2(addr as *mut c_void, len as usize, cu::CU_MEMHOSTREGISTER_PORTABLE) };
    let ours = match r {
        CUresult::CUDA_SUCCESS => true,
        CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => false,
        r => return Err(check("cuMemHostRegister_v2", r).expect_err("not success")),
    };
    Ok(RawPinned { dev: dev.clone(), region, addr, len, ours })
}

/// Which way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    ToDevice,
    ToHost,
}

fn in_range(which: &'static str, offset: u64, len: u64, size: u64) -> Result<(), CudaError> {
    match offset.checked_add(len) {
        Some(end) if len > 0 && end <= size => Ok(()),
        _ => Err(CudaError::OutOfRange { which, offset, len, size }),
    }
}

/// Copies `n` bytes between `host` at `hoff` and `mem` at `moff` on the device's stream, and
/// waits at most `timeout` for them (polling the copy's event). A copy past its deadline is
/// parked with both sides and `CudaError::Timeout` returned.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy(
    dir: Dir,
    host: &Arc<RawPinned>,
    hoff: u64,
    mem: &Arc<RawMemory>,
    moff: u64,
    n: u64,
    timeout: Duration,
) -> Result<(), CudaError> {
    let dev = &mem.dev;
    // Pinned memory is portable and every `Device` of an ordinal shares its primary context.
    if host.dev.info.ordinal != dev.info.ordinal {
        let theirs = host.dev.info.ordinal;
        return Err(CudaError::ForeignDevice { which: "pinned buffer", ours: dev.info.ordinal, theirs });
    }
    in_range("host buffer", hoff, n, host.len)?;
    in_range("device memory", moff, n, mem.len)?;
    dev.reap();
    dev.current()?;
    let (h, d) = (host.addr + hoff as usize, mem.ptr.raw() + moff);
    let mut ev: cu::CUevent = std::ptr::null_mut();
    // SAFETY: a live out-pointer; destroyed below or by `reap`.
    check("cuEventCreate", unsafe {
        cu::cuEventCreate(&mut ev, 2 /* CU_EVENT_DISABLE_TIMING */)
    })?;
    // SAFETY: both ranges were checked inside memory that `host` and `mem` keep alive; the host
    // side is pinned. They stay alive until the event completes: below, or parked with it.
    let queued = unsafe {
        match dir {
            Dir::ToDevice => {
                check("cuMemcpyHtoDAsync_v2", cu::cuMemcpyHtoDAsync_v2(d, h as *const c_void, n as usize, dev.stream))
            }
            Dir::ToHost => {
                check("cuMemcpyDtoHAsync_v2", cu::cuMemcpyDtoHAsync_v2(h as *mut c_void, d, n as usize, dev.stream))
            }
        }
    };
    if let Err(e) = queued {
        // SAFETY: nothing was queued, nothing waits on the event.
        unsafe { cu::cuEventDestroy_v2(ev) };
        return Err(e);
    }
    // SAFETY: a live event and stream of this device.
    if let Err(e) = check("cuEventRecord", unsafe { cu::cuEventRecord(ev, dev.stream) }) {
        // The copy is queued with nothing to tell when it ends: its memory is never released.
        std::mem::forget((host.clone(), mem.clone()));
        // SAFETY: the event was not recorded; nothing waits on it.
        unsafe { cu::cuEventDestroy_v2(ev) };
        return Err(e);
    }
    wait(dev, ev, timeout, || vec![host.clone() as Arc<dyn Any + Send + Sync>, mem.clone()])
}

/// Polls `ev` until it completes or `timeout` passes (then parks it with `keep()`).
fn wait(
    dev: &RawDevice,
    ev: cu::CUevent,
    timeout: Duration,
    keep: impl FnOnce() -> Vec<Arc<dyn Any + Send + Sync>>,
) -> Result<(), CudaError> {
    let t0 = Instant::now();
    let mut nap = Duration::from_micros(10);
    loop {
        // SAFETY: a live event of this device.
        let r = unsafe { cu::cuEventQuery(ev) };
        if r != CUresult::CUDA_ERROR_NOT_READY {
            // SAFETY: completed or failed: nothing waits on it any more.
            unsafe { cu::cuEventDestroy_v2(ev) };
            return check("cuEventQuery", r);
        }
        if t0.elapsed() >= timeout {
            dev.parked.lock().unwrap_or_else(|p| p.into_inner()).push(InFlight { event: ev, _keep: keep() });
            return Err(CudaError::Timeout(timeout));
        }
        // Short copies finish within microseconds: poll fast first, then back off.
        if t0.elapsed() < Duration::from_micros(200) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_before_the_driver_sees_them() {
        assert!(in_range("x", 0, 4096, 4096).is_ok());
        assert!(in_range("x", 1, 4096, 4096).is_err());
        assert!(in_range("x", 0, 0, 4096).is_err(), "an empty copy is refused");
        assert!(matches!(in_range("x", u64::MAX, 2, 4096), Err(CudaError::OutOfRange { .. })));
    }

    #[test]
    fn every_required_entry_point_is_named_once() {
        let mut v = REQUIRED.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), REQUIRED.len());
        assert!(!REQUIRED.contains(&DMA_BUF_EXPORT), "the dma-buf export is optional");
    }
}
