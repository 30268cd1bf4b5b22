//! Memory a load can fill or the transfer engine can register: `HostBuffer` (page-aligned host
//! pages), `VulkanBuffer` (a Vulkan allocation), `CudaBuffer` (CUDA device memory), any
//! writable contiguous Python buffer, and any CUDA tensor lent through DLPack (`__dlpack__` on a
//! CUDA device: PyTorch, CuPy, JAX), the last two registered for the length of one load or of
//! one engine registration. The package's registry over the live system holds every
//! registration.
//!
//! Owns: the package registry and the Python-facing buffer classes. Must not: touch raw
//! pointers (the `sys` module does) or decide routes (the registry does).

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use peermem::{HostRegion, PeerMemory, RegionId, Registration, Registry, VirtAddr};
use peermem_cuda::{Cuda, CudaRegion};
use peermem_loader::{Dest, LoadError};
use peermem_vulkan::{Device, Placement, Select};

use crate::errors::peermem_err;
use crate::sys::{Lent, PyBufferRegion};

/// The registry of the live system every buffer of the package is registered in.
pub fn registry() -> PyResult<&'static Registry> {
    static REG: OnceLock<Result<Registry, String>> = OnceLock::new();
    REG.get_or_init(|| {
        peermem::Topology::discover("/")
            .map(|t| Registry::new(Arc::new(t)))
            .map_err(|e| format!("reading the live PCI topology for the buffer registry: {e}"))
    })
    .as_ref()
    .map_err(peermem_err)
}

/// The number of regions registered in the package's registry (buffers alive, and the
/// destinations of loads in flight).
#[pyfunction]
pub fn registered_buffers() -> PyResult<usize> {
    Ok(registry()?.len())
}

/// Registered memory: the region and its registration. Held by the Python object that owns it
/// and by every load into it until the load is reaped.
pub struct Owned {
    pub region: Arc<dyn PeerMemory>,
    /// Bytes the caller asked for (the region may be rounded up to whole pages).
    pub nbytes: u64,
    pub reg: Registration,
    /// CUDA memory: the region as such and its device (loads stage into it).
    pub cuda: Option<(peermem_cuda::Device, Arc<CudaRegion>)>,
}

/// The live table and the size at which it is next pruned.
type Live = (HashMap<RegionId, Weak<Owned>>, usize);

/// Every live `Owned` by region id, so a load into memory that is already registered (a numpy
/// view of a `HostBuffer`, one array filled by several loads at once) shares that registration.
/// Dead entries are pruned as the table grows; nothing is ever dropped while it is locked
/// except `Weak`s.
fn live() -> &'static Mutex<Live> {
    static LIVE: OnceLock<Mutex<Live>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new((HashMap::new(), 64)))
}

/// Registers `region` and records it in the live table (the table's lock held by the caller).
fn register_locked(table: &mut Live, region: Arc<dyn PeerMemory>, nbytes: u64) -> PyResult<Arc<Owned>> {
    let reg = registry()?.register(region.clone()).map_err(peermem_err)?;
    let owned = Arc::new(Owned { region, nbytes, reg, cuda: None });
    let (map, prune_at) = table;
    map.insert(owned.reg.entry().id(), Arc::downgrade(&owned));
    if map.len() >= *prune_at {
        map.retain(|_, w| w.strong_count() > 0);
        *prune_at = (map.len() * 2).max(64);
    }
    Ok(owned)
}

impl Owned {
    fn new(region: Arc<dyn PeerMemory>, nbytes: u64) -> PyResult<Arc<Owned>> {
        let mut t = live().lock().map_err(peermem_err)?;
        register_locked(&mut t, region, nbytes)
    }
    /// Registers CUDA memory (not in the live table: it has no CPU address to be found by).
    fn cuda(device: &peermem_cuda::Device, region: CudaRegion, nbytes: u64) -> PyResult<Arc<Owned>> {
        let region = Arc::new(region);
        let reg = registry()?.register(region.clone()).map_err(peermem_err)?;
        Ok(Arc::new(Owned { region: region.clone(), nbytes, reg, cuda: Some((device.clone(), region)) }))
    }
    fn data_ptr(&self) -> Option<u64> {
        self.region.cpu_mapping().map(|s| s.addr().raw())
    }
    /// All `nbytes` bytes, one-dimensional, for the buffer protocol.
    fn lent(&self) -> Lent<'_> {
        Lent { region: &*self.region, nbytes: self.nbytes, rows: None }
    }
}

fn check_nbytes(nbytes: u64) -> PyResult<()> {
    if nbytes == 0 {
        return Err(PyValueError::new_err("nbytes must be > 0"));
    }
    Ok(())
}

/// Page-aligned, zero-filled host memory registered in the package's registry. Supports the
/// buffer protocol (`memoryview(buf)`, `numpy.asarray(buf)`) and DLPack (`numpy.from_dlpack`,
/// `torch.from_dlpack`), both zero copy.
#[pyclass(module = "peermem", frozen)]
pub struct HostBuffer {
    pub mem: Arc<Owned>,
}

impl HostBuffer {
    /// What the buffer protocol lends: all `nbytes` bytes, one-dimensional.
    fn lend(&self, _flags: c_int) -> PyResult<Lent<'_>> {
        Ok(self.mem.lent())
    }
}

crate::sys::buffer_protocol!(HostBuffer);

#[pymethods]
impl HostBuffer {
    #[new]
    fn new(py: Python<'_>, nbytes: u64) -> PyResult<HostBuffer> {
        check_nbytes(nbytes)?;
        let region = py.detach(|| HostRegion::new(nbytes)).map_err(peermem_err)?;
        Ok(HostBuffer { mem: Owned::new(Arc::new(region), nbytes)? })
    }

    /// Bytes usable through the buffer protocol and DLPack.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.mem.nbytes
    }

    /// The CPU address of the first byte.
    #[getter]
    fn data_ptr(&self) -> Option<u64> {
        self.mem.data_ptr()
    }

    fn __len__(&self) -> usize {
        self.mem.nbytes as usize
    }

    /// A DLPack capsule over the bytes (1-D uint8 on the CPU); the memory stays alive while the
    /// consumer holds it.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // CPU memory: there is no stream to synchronize with.
        let _ = stream;
        crate::sys::dlpack(py, self.mem.region.clone(), self.mem.nbytes, max_version, dl_device, copy)
    }

    /// `(1, 0)`: DLPack's CPU device.
    fn __dlpack_device__(&self) -> (i32, i32) {
        crate::sys::DLPACK_CPU
    }

    fn __repr__(&self) -> String {
        format!("<peermem.HostBuffer {} bytes at {:#x}>", self.mem.nbytes, self.mem.data_ptr().unwrap_or(0))
    }
}

/// The Vulkan device buffers are allocated on (opened once, on first use).
fn vulkan() -> PyResult<&'static Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    DEV.get_or_init(|| Device::open(Select::Best).map_err(|e| format!("no Vulkan device: {e}")))
        .as_ref()
        .map_err(peermem_err)
}

/// True when a Vulkan device can be opened (lavapipe counts).
#[pyfunction]
pub fn vulkan_available(py: Python<'_>) -> bool {
    py.detach(|| vulkan().is_ok())
}

/// A Vulkan buffer registered in the package's registry. Host-visible memory (the default,
/// `device_local=False`) supports the buffer protocol and DLPack (as CPU memory, zero copy).
#[pyclass(module = "peermem", frozen)]
pub struct VulkanBuffer {
    pub mem: Arc<Owned>,
}

impl VulkanBuffer {
    /// What the buffer protocol lends: all `nbytes` bytes of host-visible memory (a
    /// `BufferError` without a CPU mapping).
    fn lend(&self, _flags: c_int) -> PyResult<Lent<'_>> {
        Ok(self.mem.lent())
    }
}

crate::sys::buffer_protocol!(VulkanBuffer);

#[pymethods]
impl VulkanBuffer {
    #[new]
    #[pyo3(signature = (nbytes, device_local=false))]
    fn new(py: Python<'_>, nbytes: u64, device_local: bool) -> PyResult<VulkanBuffer> {
        check_nbytes(nbytes)?;
        let placement = if device_local { Placement::DeviceLocal } else { Placement::Mappable };
        let region = py.detach(|| vulkan()?.allocate(nbytes, placement).map_err(peermem_err))?;
        Ok(VulkanBuffer { mem: Owned::new(Arc::new(region), nbytes)? })
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.mem.nbytes
    }

    /// True when the CPU can reach the bytes (buffer protocol and DLPack work).
    #[getter]
    fn host_visible(&self) -> bool {
        self.mem.region.cpu_mapping().is_some()
    }

    /// The CPU address of the first byte, None without a CPU mapping.
    #[getter]
    fn data_ptr(&self) -> Option<u64> {
        self.mem.data_ptr()
    }

    fn __len__(&self) -> usize {
        self.mem.nbytes as usize
    }

    /// A DLPack capsule over host-visible memory (as CPU memory); `PeerMemError` otherwise.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // CPU memory: there is no stream to synchronize with.
        let _ = stream;
        crate::sys::dlpack(py, self.mem.region.clone(), self.mem.nbytes, max_version, dl_device, copy)
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        crate::sys::DLPACK_CPU
    }

    fn __repr__(&self) -> String {
        format!(
            "<peermem.VulkanBuffer {} bytes, {}>",
            self.mem.nbytes,
            if self.host_visible() { "host-visible" } else { "device-only" }
        )
    }
}

/// CUDA device `ordinal`, opened once per process on first use.
pub fn cuda_device(ordinal: usize) -> PyResult<peermem_cuda::Device> {
    static DEVS: OnceLock<Mutex<HashMap<usize, Result<peermem_cuda::Device, String>>>> = OnceLock::new();
    let mut m = DEVS.get_or_init(|| Mutex::new(HashMap::new())).lock().map_err(peermem_err)?;
    m.entry(ordinal)
        .or_insert_with(|| Cuda::open(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}")))
        .clone()
        .map_err(peermem_err)
}

/// True when CUDA device 0 can be opened (an NVIDIA driver and a GPU).
#[pyfunction]
pub fn cuda_available(py: Python<'_>) -> bool {
    py.detach(|| cuda_device(0).is_ok())
}

/// Tells peermem's cuFile loader where NVIDIA's pip wheels keep `libcufile.so.0`
/// (`nvidia-cufile`: `nvidia/cu13/lib`; `nvidia-cufile-cu12`: `nvidia/cufile/lib`), searched
/// after `PEERMEM_CUFILE` and the dynamic loader. Imports nothing: the `nvidia` namespace
/// package's directories come from importlib's spec.
pub fn add_cufile_wheels(py: Python<'_>) -> PyResult<()> {
    let spec = py.import("importlib.util")?.call_method1("find_spec", ("nvidia",))?;
    if spec.is_none() {
        return Ok(());
    }
    let locations = spec.getattr("submodule_search_locations")?;
    if locations.is_none() {
        return Ok(());
    }
    for p in locations.try_iter()? {
        let p: std::path::PathBuf = p?.extract()?;
        peermem_cuda::gds::wheel_dirs(&p).into_iter().for_each(peermem_cuda::gds::search_also);
    }
    Ok(())
}

/// Whether GPUDirect Storage (cuFile) is usable in this process: `(True, what the driver said)`
/// or `(False, why not)` (no library, or its driver refused to open, in cuFile's own words).
#[pyfunction]
pub fn cufile_status(py: Python<'_>) -> (bool, String) {
    py.detach(|| match peermem_cuda::Gds::open() {
        Ok(g) => (true, g.info().describe()),
        Err(e) => (false, e.to_string()),
    })
}

/// `"cuda:N"`, `"cuda"` or an int: the device ordinal.
pub fn cuda_ordinal(device: &Bound<'_, PyAny>) -> PyResult<usize> {
    if let Ok(n) = device.extract::<usize>() {
        return Ok(n);
    }
    let s: String = device.str()?.extract()?;
    let bad = || PyValueError::new_err(format!("device {s:?}: expected \"cuda\", \"cuda:N\" or an ordinal"));
    match s.strip_prefix("cuda") {
        Some("") => Ok(0),
        Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()).ok_or_else(bad),
        None => Err(bad()),
    }
}

/// CUDA device memory allocated by peermem, registered in the package's registry. No CPU
/// mapping: DLPack (`torch.from_dlpack`, `cupy.from_dlpack`) gives a zero-copy uint8 tensor on
/// the device; `read` copies bytes back to the host. A dma-buf is exported where the driver
/// allows (`dma_buf`), else `dma_buf_reason` says why not.
#[pyclass(module = "peermem", frozen)]
pub struct CudaBuffer {
    pub mem: Arc<Owned>,
}

impl CudaBuffer {
    fn cuda(&self) -> &(peermem_cuda::Device, Arc<CudaRegion>) {
        self.mem.cuda.as_ref().expect("a CudaBuffer holds CUDA memory")
    }
}

#[pymethods]
impl CudaBuffer {
    #[new]
    #[pyo3(signature = (nbytes, device=None))]
    fn new(py: Python<'_>, nbytes: u64, device: Option<&Bound<'_, PyAny>>) -> PyResult<CudaBuffer> {
        check_nbytes(nbytes)?;
        let ordinal = device.map(cuda_ordinal).transpose()?.unwrap_or(0);
        let (dev, region) = py.detach(|| {
            let dev = cuda_device(ordinal)?;
            let r = dev.allocate(nbytes).map_err(peermem_err)?;
            Ok::<_, PyErr>((dev, r))
        })?;
        Ok(CudaBuffer { mem: Owned::cuda(&dev, region, nbytes)? })
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.mem.nbytes
    }
    /// The device ordinal (`cuda:N`).
    #[getter]
    fn device(&self) -> usize {
        self.cuda().0.info().ordinal
    }
    /// The device pointer of the first byte.
    #[getter]
    fn data_ptr(&self) -> u64 {
        self.cuda().1.device_ptr().raw()
    }
    /// True when the memory was exported as a dma-buf (a NIC's driver can import it).
    #[getter]
    fn dma_buf(&self) -> bool {
        self.cuda().1.has_dma_buf()
    }
    /// Why there is no dma-buf (None when there is one).
    #[getter]
    fn dma_buf_reason(&self) -> Option<String> {
        self.cuda().1.dma_buf_refusal().map(ToString::to_string)
    }
    /// What the registry cannot know: the allocation, the device, the dma-buf or why not.
    #[getter]
    fn notes(&self) -> Vec<String> {
        self.cuda().1.notes()
    }
    /// `size` bytes at `offset` (default: to the end), copied back to the host.
    #[pyo3(signature = (offset=0, size=None))]
    fn read<'py>(&self, py: Python<'py>, offset: u64, size: Option<u64>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let size = size.unwrap_or(self.mem.nbytes.saturating_sub(offset));
        if offset.checked_add(size).is_none_or(|e| e > self.mem.nbytes) {
            return Err(PyValueError::new_err(format!("{size} bytes at {offset} run past {} bytes", self.mem.nbytes)));
        }
        let (dev, region) = self.cuda();
        let mut v = vec![0u8; size as usize];
        py.detach(|| dev.read(region, offset, &mut v)).map_err(peermem_err)?;
        Ok(pyo3::types::PyBytes::new(py, &v))
    }
    fn __len__(&self) -> usize {
        self.mem.nbytes as usize
    }
    /// A DLPack capsule: 1-D uint8 on `(kDLCUDA, device)`, zero copy. The memory is written
    /// only by loads, which complete before they return: there is no stream to order against.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = stream;
        let n = i64::try_from(self.mem.nbytes).map_err(|_| PyValueError::new_err("buffer too large"))?;
        let (ptr, ord) = (self.data_ptr(), self.device() as i32);
        let r = self.mem.region.clone();
        crate::sys::dlpack_cuda(py, r, ptr, ord, self.mem.nbytes, &[n], None, max_version, dl_device, copy)
    }
    fn __dlpack_device__(&self) -> (i32, i32) {
        (crate::sys::DLPACK_CUDA, self.device() as i32)
    }
    fn __repr__(&self) -> String {
        format!("<peermem.CudaBuffer {} bytes on cuda:{}>", self.mem.nbytes, self.device())
    }
}

/// Where a load writes, or what the engine registers: registered memory (a buffer of the
/// package, or any other writable contiguous Python buffer, registered for as long as a load or
/// an engine holds it) and the byte offset of the caller's buffer in it.
pub struct Target {
    pub owned: Arc<Owned>,
    /// Where the caller's buffer starts in the registered region.
    pub at: u64,
    /// Bytes of the caller's buffer.
    pub nbytes: u64,
    /// The caller's buffer export, held until the load is reaped (None for package buffers).
    export: Option<Arc<PyBufferRegion>>,
}

impl Target {
    /// The loader's destination for this memory: CUDA memory through `loader`'s pinned staging,
    /// everything else as registered.
    pub fn dest(&self, loader: &peermem_loader::Loader) -> Result<Dest, LoadError> {
        match &self.owned.cuda {
            Some((dev, region)) => loader.cuda_dest(&self.owned.reg, dev, region.clone()),
            None => Ok(Dest::region(&self.owned.reg)),
        }
    }

    /// `out` as registered memory; `name` is the argument's name in error messages.
    pub fn from_py(out: &Bound<'_, PyAny>, name: &str) -> PyResult<Target> {
        if let Ok(b) = out.cast::<HostBuffer>() {
            let m = &b.get().mem;
            return Ok(Target { owned: m.clone(), at: 0, nbytes: m.nbytes, export: None });
        }
        if let Ok(b) = out.cast::<VulkanBuffer>() {
            let m = &b.get().mem;
            return Ok(Target { owned: m.clone(), at: 0, nbytes: m.nbytes, export: None });
        }
        if let Ok(b) = out.cast::<CudaBuffer>() {
            let m = &b.get().mem;
            return Ok(Target { owned: m.clone(), at: 0, nbytes: m.nbytes, export: None });
        }
        if let Some(ordinal) = crate::sys::dlpack_cuda_device(out)? {
            // The device first: without CUDA no capsule is taken from the producer.
            let dev = cuda_device(usize::try_from(ordinal).map_err(peermem_err)?)?;
            let t = crate::sys::cuda_from_dlpack(out)?.ok_or_else(|| peermem_err("the tensor left the CUDA device"))?;
            let nbytes = t.nbytes;
            let region = crate::sys::adopt_cuda(&dev, t).map_err(peermem_err)?;
            return Ok(Target { owned: Owned::cuda(&dev, region, nbytes)?, at: 0, nbytes, export: None });
        }
        let export = Arc::new(PyBufferRegion::new(out, name)?);
        let (addr, len) = (export.addr(), export.len());
        let mut t = live().lock().map_err(peermem_err)?;
        // Memory inside a live registration of this package: load through that registration.
        let covering = {
            let snap = registry()?.snapshot();
            snap.lookup_va(VirtAddr::new(addr))
                .filter(|h| h.entry.is_live() && h.offset.checked_add(len).is_some_and(|e| e <= h.entry.len()))
                .map(|h| (h.entry.id(), h.offset))
        };
        if let Some((id, at)) = covering {
            if let Some(owned) = t.0.get(&id).and_then(Weak::upgrade) {
                return Ok(Target { owned, at, nbytes: len, export: Some(export) });
            }
        }
        let owned = register_locked(&mut t, export.clone(), len)?;
        Ok(Target { owned, at: 0, nbytes: len, export: Some(export) })
    }

    /// The memory of exactly the caller's buffer, to register on its own elsewhere (the transfer
    /// engine): the registered region when the buffer is all of it, else the buffer export (a
    /// view into a package buffer, or into memory registered through another view).
    pub fn region(&self) -> Arc<dyn PeerMemory> {
        match &self.export {
            Some(e) if self.at != 0 || self.nbytes != self.owned.nbytes => e.clone(),
            _ => self.owned.region.clone(),
        }
    }
}
