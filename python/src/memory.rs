//! Memory a load can fill or the transfer engine can register: `HostBuffer` (page-aligned host
//! pages), `VulkanBuffer` (a Vulkan allocation), and any writable contiguous Python buffer,
//! registered for the length of one load or of one engine registration. The package's registry
//! over the live system holds every registration.
//!
//! Owns: the package registry and the Python-facing buffer classes. Must not: touch raw
//! pointers (the `sys` module does) or decide routes (the registry does).

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use peermem::{HostRegion, PeerMemory, RegionId, Registration, Registry, VirtAddr};
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
    let owned = Arc::new(Owned { region, nbytes, reg });
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
