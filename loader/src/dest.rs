//! Where a read's bytes go: a registered region, and for GPU memory without a CPU mapping
//! (device-local Vulkan memory, CUDA memory) the staging buffers made for its device (the GPU
//! copies them on: `vkCmdCopyBuffer` from an imported host buffer, or a CUDA copy from pinned
//! host memory).
//!
//! Owns: `Dest`, the GPU staging of a destination (`GpuStage`), and the CPU's view of a
//! destination. Must not: decide how a destination is filled
//! (the plan stage asks the planner) or compute an address (`Topology::map_bar` maps a BAR
//! range).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use peermem::{Backing, Entry, PeerMemory, RegionId, Registration, Registry};
use peermem_cuda::CudaRegion;
use peermem_vulkan::{Device, VulkanRegion};

use crate::error::LoadError;
use crate::stage::{self, Gpu, Slot};

/// A destination of a batch's reads. Cheap to clone.
#[derive(Clone)]
pub struct Dest {
    pub(crate) entry: Arc<Entry>,
    pub(crate) gpu: Option<Arc<GpuStage>>,
}

impl std::fmt::Debug for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dest").field("region", &self.entry.id()).field("gpu_staged", &self.gpu.is_some()).finish()
    }
}

impl Dest {
    /// A registered region (host memory, p2pmem, a BAR, a host-visible Vulkan buffer).
    pub fn region(reg: &Registration) -> Dest {
        Dest { entry: reg.entry().clone(), gpu: None }
    }
    /// Device-local GPU memory `region` (registered as `reg`) on `device`: reads are staged
    /// through `count` pinned host buffers of `slot_len` bytes imported into the device, and
    /// copied there by the GPU while the next reads are in flight.
    pub fn gpu(
        reg: &Registration,
        device: &Device,
        region: Arc<VulkanRegion>,
        slot_len: u64,
        count: usize,
    ) -> Result<Dest, LoadError> {
        if reg.len() != region.len() || reg.cpu_range() != region.cpu_range() {
            return Err(LoadError::Layout("the registration is not the given Vulkan region's".into()));
        }
        Dest::staged(reg, Gpu::Vulkan { device: device.clone(), region }, slot_len, count)
    }
    /// CUDA device memory `region` (registered as `reg`) on `device`: reads are staged through
    /// `count` host buffers of `slot_len` bytes pinned for the device (`cuMemHostRegister`), and
    /// copied there by the device's copy engine while the next reads are in flight.
    pub fn cuda(
        reg: &Registration,
        device: &peermem_cuda::Device,
        region: Arc<CudaRegion>,
        slot_len: u64,
        count: usize,
    ) -> Result<Dest, LoadError> {
        let gpu = Gpu::Cuda { device: device.clone(), region };
        let staging = Arc::new(Staging::new(&gpu, slot_len, count)?);
        Dest::cuda_staged(reg, gpu, staging)
    }
    /// As `cuda`, through `staging` (buffers pinned for the same device), which other CUDA
    /// destinations of that device may share: a batch locks each distinct staging once.
    pub(crate) fn cuda_staged(reg: &Registration, gpu: Gpu, staging: Arc<Staging>) -> Result<Dest, LoadError> {
        let Gpu::Cuda { region, .. } = &gpu else {
            return Err(LoadError::Layout("CUDA staging for a Vulkan destination".into()));
        };
        if !Arc::ptr_eq(reg.entry().region(), &(region.clone() as Arc<dyn PeerMemory>)) {
            return Err(LoadError::Layout("the registration is not the given CUDA region's".into()));
        }
        Ok(Dest { entry: reg.entry().clone(), gpu: Some(Arc::new(GpuStage { gpu, staging })) })
    }
    fn staged(reg: &Registration, gpu: Gpu, slot_len: u64, count: usize) -> Result<Dest, LoadError> {
        let staging = Arc::new(Staging::new(&gpu, slot_len, count)?);
        Ok(Dest { entry: reg.entry().clone(), gpu: Some(Arc::new(GpuStage { gpu, staging })) })
    }
    /// The CUDA memory this destination fills and its device, for a CUDA destination.
    pub fn cuda_target(&self) -> Option<(&peermem_cuda::Device, &Arc<CudaRegion>)> {
        match self.gpu.as_deref().map(|g| &g.gpu) {
            Some(Gpu::Cuda { device, region }) => Some((device, region)),
            _ => None,
        }
    }
    pub fn id(&self) -> RegionId {
        self.entry.id()
    }
    pub fn len(&self) -> u64 {
        self.entry.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entry.is_empty()
    }
}

impl From<&Registration> for Dest {
    fn from(r: &Registration) -> Dest {
        Dest::region(r)
    }
}

impl From<&Dest> for Dest {
    fn from(d: &Dest) -> Dest {
        d.clone()
    }
}

/// GPU memory without a CPU mapping: filled by GPU copies out of staging buffers.
pub(crate) struct GpuStage {
    pub gpu: Gpu,
    pub staging: Arc<Staging>,
}

/// Staging buffers made reachable for one GPU: a destination's own, or shared by the CUDA
/// destinations of one device (`Loader::cuda_dest`).
pub(crate) struct Staging {
    /// Locked by the batch using them, so two batches never share a buffer.
    slots: Mutex<Vec<Slot>>,
    /// Bytes per staging buffer.
    pub slot_len: u64,
    /// A batch gave up on reads still in flight into these buffers: they take no new reads.
    abandoned: AtomicBool,
}

impl Staging {
    /// `count` buffers of `slot_len` bytes for `gpu`'s device.
    pub fn new(gpu: &Gpu, slot_len: u64, count: usize) -> Result<Staging, LoadError> {
        let slots = stage::slots(count, slot_len, Some(gpu))?;
        Ok(Staging { slots: Mutex::new(slots), slot_len, abandoned: false.into() })
    }
    pub fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
    }
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

/// The destination as the CPU reaches it: its own mapping, or a fresh mapping of its BAR range.
pub(crate) fn cpu_window(reg: &Registry, dest: &Entry) -> Result<Arc<dyn PeerMemory>, LoadError> {
    if dest.region().cpu_mapping().is_some() {
        return Ok(dest.region().clone());
    }
    match dest.region().backing() {
        Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => {
            Ok(Arc::new(reg.topology().map_bar(bdf, bar, offset, dest.len())?))
        }
        _ => Err(LoadError::Unreachable("a driver-private region without a CPU mapping".into())),
    }
}
