//! Staging buffers: the loader's one bounce. Bytes that cannot go straight into their
//! destination are read into a page-aligned host buffer, then copied on by the CPU, or by the GPU
//! for GPU memory (the buffer is then also imported into the Vulkan device, or pinned for the
//! CUDA device).
//!
//! Owns: the buffers, the copy engines that drain them into GPU memory (`Gpu`), their
//! registration (made only when a namespace is read into them: the VFIO driver reaches memory
//! only through the registry), their import into a Vulkan device or pinning for a CUDA device,
//! and the copy out of a buffer into a destination. Must not: read a source (the I/O stage does)
//! or free a buffer a read may still fill (a pool whose reads were abandoned is dropped by its
//! user only after they complete: the I/O engines hold each buffer until its read is reaped).

use std::sync::Arc;

use peermem::{Entry, HostRegion, PeerMemory, Registration, Registry};
use peermem_cuda::{CudaRegion, PinnedHost};
use peermem_vulkan::{Device, VulkanRegion};

use crate::error::LoadError;

/// A GPU destination and the device whose copies fill it.
pub(crate) enum Gpu {
    /// Device-local Vulkan memory: `vkCmdCopyBuffer` from staging imported into the device.
    Vulkan { device: Device, region: Arc<VulkanRegion> },
    /// CUDA device memory: CUDA copies from staging pinned for the device.
    Cuda { device: peermem_cuda::Device, region: Arc<CudaRegion> },
}

impl Gpu {
    /// Bounds each GPU copy's wait.
    pub fn set_copy_timeout(&self, t: std::time::Duration) {
        match self {
            Gpu::Vulkan { device, .. } => device.set_copy_timeout(t),
            Gpu::Cuda { device, .. } => device.set_copy_timeout(t),
        }
    }
    /// How the destination is filled, for the plan's reasons and the report.
    pub fn describe(&self) -> &'static str {
        match self {
            Gpu::Vulkan { .. } => "device-local Vulkan memory, filled by GPU copies from pinned staging",
            Gpu::Cuda { .. } => {
                "CUDA device memory, filled by CUDA copies (cuMemcpyHtoDAsync) from staging pinned with cuMemHostRegister"
            }
        }
    }
}

/// A staging buffer as a GPU sees it.
pub(crate) enum Import {
    /// Imported into a Vulkan device (VK_EXT_external_memory_host).
    Vulkan(VulkanRegion),
    /// Pinned for a CUDA device (`cuMemHostRegister`).
    Cuda(PinnedHost),
}

/// One staging buffer: host pages, their registration once a namespace was read into them, and
/// for GPU staging their import into (or pinning for) the device.
pub(crate) struct Slot {
    pub host: Arc<HostRegion>,
    /// The same pages as a `PeerMemory` (what a file read targets).
    pub region: Arc<dyn PeerMemory>,
    reg: Option<Registration>,
    pub gpu: Option<Import>,
}

impl Slot {
    /// A buffer of `len` bytes, made reachable for `gpu`'s device when given.
    pub fn new(len: u64, gpu: Option<&Gpu>) -> Result<Slot, LoadError> {
        let host = Arc::new(match gpu {
            // Private pages: only this process and the GPU touch them (pinning takes them whole).
            Some(Gpu::Cuda { .. }) => HostRegion::anonymous(len)?,
            _ => HostRegion::new(len)?,
        });
        let region = host.clone() as Arc<dyn PeerMemory>;
        let gpu = match gpu {
            None => None,
            Some(Gpu::Vulkan { device, .. }) => Some(Import::Vulkan(device.import_host(region.clone())?)),
            Some(Gpu::Cuda { device, .. }) => Some(Import::Cuda(device.pin(region.clone())?)),
        };
        Ok(Slot { host, region, reg: None, gpu })
    }
    /// The registry's entry for the buffer, once registered.
    pub fn entry(&self) -> Option<&Arc<Entry>> {
        self.reg.as_ref().map(Registration::entry)
    }
    /// Registers the buffer in `registry` (once) and gives its entry.
    pub fn register(&mut self, registry: &Registry) -> Result<&Arc<Entry>, LoadError> {
        if self.reg.is_none() {
            self.reg = Some(registry.register(self.region.clone())?);
        }
        Ok(self.reg.as_ref().expect("just registered").entry())
    }
    pub fn len(&self) -> u64 {
        self.host.len()
    }
}

/// `n` staging buffers of `len` bytes each (see `Slot::new`).
pub(crate) fn slots(n: usize, len: u64, gpu: Option<&Gpu>) -> Result<Vec<Slot>, LoadError> {
    (0..n).map(|_| Slot::new(len, gpu)).collect()
}

/// Registers every buffer of `slots` in `registry` (once each).
pub(crate) fn register_all(slots: &mut [Slot], registry: &Registry) -> Result<(), LoadError> {
    slots.iter_mut().try_for_each(|s| s.register(registry).map(drop))
}

/// Where the CPU or the GPU copies staged bytes to.
pub(crate) enum Sink<'a> {
    /// The destination as the CPU reaches it (its own mapping, or a mapping of its BAR range).
    Cpu(&'a dyn PeerMemory),
    /// Device-local Vulkan memory, copied into by `device` from the slot's import.
    Vulkan { device: &'a Device, region: &'a VulkanRegion },
    /// CUDA memory, copied into by `device` from the slot's pinned pages.
    Cuda { device: &'a peermem_cuda::Device, region: &'a CudaRegion },
}

impl<'a> Sink<'a> {
    /// The GPU sink of `gpu`.
    pub fn gpu(gpu: &'a Gpu) -> Sink<'a> {
        match gpu {
            Gpu::Vulkan { device, region } => Sink::Vulkan { device, region },
            Gpu::Cuda { device, region } => Sink::Cuda { device, region },
        }
    }
}

/// Copies bytes `skip..skip+n` of `slot` to `sink` at `doff`.
pub(crate) fn drain(slot: &Slot, skip: u64, sink: &Sink<'_>, doff: u64, n: u64) -> Result<(), LoadError> {
    let foreign = || LoadError::Engine("a GPU copy from a staging buffer not made for that GPU".into());
    match (sink, &slot.gpu) {
        (Sink::Cpu(w), _) => Ok(slot.host.copy_to(skip, *w, doff, n)?),
        (Sink::Vulkan { device, region }, Some(Import::Vulkan(vk))) => Ok(device.copy(vk, skip, region, doff, n)?),
        (Sink::Cuda { device, region }, Some(Import::Cuda(p))) => Ok(device.copy_to_device(p, skip, region, doff, n)?),
        _ => Err(foreign()),
    }
}

/// The loader's host staging buffers for CPU copies: `count` buffers of `len` bytes, made on
/// first use and kept.
pub(crate) struct Pool {
    slots: Vec<Slot>,
    count: usize,
    len: u64,
}

impl Pool {
    pub fn new(count: usize, len: u64) -> Pool {
        Pool { slots: Vec::new(), count: count.max(1), len }
    }
    pub fn slot_len(&self) -> u64 {
        self.len
    }
    /// The buffers, made on first use.
    pub fn ensure(&mut self) -> Result<&mut [Slot], LoadError> {
        if self.slots.is_empty() {
            self.slots = slots(self.count, self.len, None)?;
        }
        Ok(&mut self.slots)
    }
    /// The buffers made so far (none before the first `ensure`).
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }
    /// The first buffer (for one-off reads: probes, re-reads).
    pub fn first(&mut self) -> Result<&mut Slot, LoadError> {
        Ok(&mut self.ensure()?[0])
    }
    /// Lets go of the buffers (a batch abandoned reads into them: the engine holds each until
    /// its read completes); the next use makes new ones.
    pub fn abandon(&mut self) {
        self.slots = Vec::new();
    }
}
