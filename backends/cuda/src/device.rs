//! Opening the driver and a device; the opened `Device` allocates, adopts foreign memory, pins
//! host memory and copies between them with bounded waits.
//!
//! Owns: the policy of the backend: which allocation (VMM where the device has it), whether to
//! export a dma-buf (always tried, the reason kept when refused), the copy timeout, the scratch
//! buffer of `read`/`write`. Must not: call the driver except through `sys`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peermem::{HostRegion, PeerMemory};

use crate::error::CudaError;
use crate::info::{DeviceInfo, DmaBufRefusal, DriverVersion, KernelModule};
use crate::region::{CudaRegion, OpaqueFd, Origin, PinnedHost};
use crate::sys::{self, Dir, Foreign, RawDevice, RawMemory};

/// The default bound on one copy's wait.
pub const DEFAULT_COPY_TIMEOUT: Duration = Duration::from_secs(30);

/// The bytes of the scratch buffer `Device::read` and `Device::write` copy through.
const SCRATCH: u64 = 8 << 20;

/// The CUDA driver of this process (libcuda, loaded on first use).
#[derive(Debug, Clone, Copy)]
pub struct Cuda;

impl Cuda {
    /// The CUDA version the driver supports; `CudaError::NoDriver` without an NVIDIA driver.
    pub fn driver_version() -> Result<DriverVersion, CudaError> {
        sys::load()
    }
    /// Every device the driver sees, by ordinal.
    pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
        let v = sys::load()?;
        (0..sys::device_count()?).map(|i| sys::describe(i, v)).collect()
    }
    /// Opens device `ordinal` (`cuda:N`) on its primary context, the one PyTorch and CuPy use.
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        let v = sys::load()?;
        let count = sys::device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        let raw = RawDevice::open(sys::describe(ordinal, v)?)?;
        tracing::info!(ordinal, name = %raw.info.name, pci = %raw.info.pci_text, "CUDA device opened");
        Ok(Device {
            raw,
            shared: Arc::new(Shared {
                timeout_ns: AtomicU64::new(DEFAULT_COPY_TIMEOUT.as_nanos() as u64),
                scratch: Mutex::new(None),
            }),
        })
    }
}

/// What the clones of a `Device` share.
struct Shared {
    timeout_ns: AtomicU64,
    /// The pinned buffer of `read` and `write`; given up after a copy through it timed out.
    scratch: Mutex<Option<PinnedHost>>,
}

/// An opened CUDA device. Cheap to clone; regions and pinned buffers keep its context alive.
#[derive(Clone)]
pub struct Device {
    raw: Arc<RawDevice>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("cuda::Device").field("info", &self.raw.info).finish()
    }
}

/// Which allocation `Device::allocate_as` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// VMM where the device has it, else `cuMemAlloc`.
    Best,
    Vmm,
    Plain,
}

impl Device {
    pub fn info(&self) -> &DeviceInfo {
        &self.raw.info
    }

    /// The bound on each copy's wait (default `DEFAULT_COPY_TIMEOUT`); shared by every clone.
    pub fn set_copy_timeout(&self, t: Duration) {
        self.shared.timeout_ns.store(t.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }
    pub fn copy_timeout(&self) -> Duration {
        Duration::from_nanos(self.shared.timeout_ns.load(Ordering::Relaxed))
    }

    /// `len` bytes of device memory (VMM where the device has it), exported as a dma-buf where
    /// the driver allows (`CudaRegion::dma_buf_refusal` says why not).
    pub fn allocate(&self, len: u64) -> Result<CudaRegion, CudaError> {
        self.allocate_as(len, Alloc::Best)
    }

    pub fn allocate_as(&self, len: u64, how: Alloc) -> Result<CudaRegion, CudaError> {
        if len == 0 {
            return Err(CudaError::BadLength { len, why: "zero length" });
        }
        let i = &self.raw.info;
        let vmm = match how {
            Alloc::Best => i.vmm,
            Alloc::Vmm if !i.vmm => {
                return Err(CudaError::Unsupported { ordinal: i.ordinal, what: "virtual memory management".into() })
            }
            Alloc::Vmm => true,
            Alloc::Plain => false,
        };
        let (mem, origin, fallback) = match (vmm, how) {
            (true, Alloc::Best) => self.vmm_or_plain(len)?,
            (true, _) => (sys::alloc_vmm(&self.raw, len, i.gpu_direct_rdma_vmm)?, Origin::Vmm, None),
            (false, _) => (sys::alloc_plain(&self.raw, len)?, Origin::Alloc, None),
        };
        let dma_buf = self.export(&mem);
        Ok(CudaRegion::new(mem, origin, dma_buf).with_fallback(fallback))
    }

    /// A VMM allocation (GPUDirect RDMA capable where the device says so; without that flag if
    /// the driver refuses it), else `cuMemAlloc`; with why the first choice was not taken.
    fn vmm_or_plain(&self, len: u64) -> Result<(RawMemory, Origin, Option<String>), CudaError> {
        let rdma = self.raw.info.gpu_direct_rdma_vmm;
        let first = match sys::alloc_vmm(&self.raw, len, rdma) {
            Ok(m) => return Ok((m, Origin::Vmm, None)),
            Err(e @ CudaError::OutOfMemory(_)) => return Err(e),
            Err(e) => e,
        };
        if rdma {
            if let Ok(m) = sys::alloc_vmm(&self.raw, len, false) {
                return Ok((m, Origin::Vmm, Some(format!("VMM memory without GPUDirect RDMA: {first}"))));
            }
        }
        tracing::warn!(%first, "CUDA VMM allocation refused: cuMemAlloc instead");
        let m = sys::alloc_plain(&self.raw, len)?;
        Ok((m, Origin::Alloc, Some(format!("cuMemAlloc, the VMM allocation was refused: {first}"))))
    }

    /// Memory someone else allocated on this device, as a region: the driver checks that it is
    /// device memory of this device inside one allocation; it is exported as a dma-buf when its
    /// range is page-aligned and the driver allows. The region holds the owner `f` came with.
    pub fn adopt(&self, f: Foreign) -> Result<CudaRegion, CudaError> {
        let mem = sys::foreign(&self.raw, f)?;
        let page = peermem::mem::page_size();
        let dma_buf = if !mem.ptr.raw().is_multiple_of(page) || !mem.len.is_multiple_of(page) {
            Err(DmaBufRefusal::Range(format!(
                "{:#x} bytes at {} are not aligned to the host page size {page:#x}, as a dma-buf must be",
                mem.len, mem.ptr
            )))
        } else {
            self.export(&mem)
        };
        Ok(CudaRegion::new(mem, Origin::Foreign, dma_buf))
    }

    /// Memory another API allocated on this GPU and exported as an opaque fd (a Vulkan
    /// allocation), as a region with the same bytes: the exporter's PCI function must be this
    /// device's and its UUID equal where given (`CudaError::DifferentGpu` otherwise, before the
    /// driver sees the fd). The driver owns the fd once imported; the region unmaps and
    /// destroys the import when dropped (the exporter's memory lives on with its own owner).
    pub fn import_opaque_fd(&self, m: OpaqueFd) -> Result<CudaRegion, CudaError> {
        let OpaqueFd { fd, len, alloc_size, dedicated, provider, device_uuid, exporter } = m;
        let i = &self.raw.info;
        i.same_gpu(provider, device_uuid).map_err(|why| CudaError::DifferentGpu {
            ordinal: i.ordinal,
            cuda: i.pci_text.clone(),
            exporter,
            why,
        })?;
        let mem = sys::external::import_opaque_fd(&self.raw, fd, alloc_size, dedicated, len)?;
        let dma_buf = self.export(&mem);
        Ok(CudaRegion::new(mem, Origin::Imported, dma_buf))
    }

    /// The memory as a dma-buf, or why not.
    fn export(&self, mem: &RawMemory) -> Result<std::os::fd::OwnedFd, DmaBufRefusal> {
        if let Some(why) = self.raw.info.dma_buf_refusal(KernelModule::detect) {
            return Err(why);
        }
        if !sys::has_dma_buf_export() {
            return Err(DmaBufRefusal::DriverTooOld { version: self.raw.info.driver });
        }
        sys::export_dma_buf(mem).map_err(|e| {
            let call = e.driver_call().map_or_else(|| e.to_string(), ToString::to_string);
            let kind = if mem.is_vmm() { "" } else { " (not a VMM allocation)" };
            DmaBufRefusal::Driver { call: format!("{call}{kind}") }
        })
    }

    /// Registers `region`'s CPU mapping with the driver so copies to and from it run as DMA.
    pub fn pin(&self, region: Arc<dyn PeerMemory>) -> Result<PinnedHost, CudaError> {
        Ok(PinnedHost { raw: Arc::new(sys::pin(&self.raw, region)?) })
    }

    /// Copies `n` bytes at `hoff` of `src` to `dst` at `doff`, waiting at most the copy timeout.
    pub fn copy_to_device(
        &self,
        src: &PinnedHost,
        hoff: u64,
        dst: &CudaRegion,
        doff: u64,
        n: u64,
    ) -> Result<(), CudaError> {
        self.mine(dst)?;
        sys::copy(Dir::ToDevice, &src.raw, hoff, &dst.mem, doff, n, self.copy_timeout())
    }

    /// Copies `n` bytes at `soff` of `src` to `dst` at `hoff`, waiting at most the copy timeout.
    pub fn copy_to_host(
        &self,
        src: &CudaRegion,
        soff: u64,
        dst: &PinnedHost,
        hoff: u64,
        n: u64,
    ) -> Result<(), CudaError> {
        self.mine(src)?;
        sys::copy(Dir::ToHost, &dst.raw, hoff, &src.mem, soff, n, self.copy_timeout())
    }

    fn mine(&self, r: &CudaRegion) -> Result<(), CudaError> {
        // Every `Device` of an ordinal shares its primary context.
        if r.mem.dev.info.ordinal == self.raw.info.ordinal {
            return Ok(());
        }
        Err(CudaError::ForeignDevice { which: "region", ours: self.raw.info.ordinal, theirs: r.device_info().ordinal })
    }

    /// Writes `data` into `dst` at `off`, through a pinned scratch buffer.
    pub fn write(&self, dst: &CudaRegion, off: u64, data: &[u8]) -> Result<(), CudaError> {
        self.through_scratch(data.len() as u64, |s, at, n| {
            s.region().write_at(0, &data[at as usize..(at + n) as usize])?;
            self.copy_to_device(s, 0, dst, off + at, n)
        })
    }

    /// Reads `buf.len()` bytes of `src` at `off`, through a pinned scratch buffer.
    pub fn read(&self, src: &CudaRegion, off: u64, buf: &mut [u8]) -> Result<(), CudaError> {
        self.through_scratch(buf.len() as u64, |s, at, n| {
            self.copy_to_host(src, off + at, s, 0, n)?;
            s.region().read_at(0, &mut buf[at as usize..(at + n) as usize])?;
            Ok(())
        })
    }

    /// Runs `step(scratch, at, n)` over `len` bytes in scratch-sized pieces.
    fn through_scratch(
        &self,
        len: u64,
        mut step: impl FnMut(&PinnedHost, u64, u64) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let mut guard = self.shared.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let host = Arc::new(HostRegion::anonymous(SCRATCH)?) as Arc<dyn PeerMemory>;
            *guard = Some(self.pin(host)?);
        }
        let s = guard.clone().expect("made above");
        let mut at = 0;
        while at < len {
            let n = (len - at).min(s.len());
            if let Err(e) = step(&s, at, n) {
                if matches!(e, CudaError::Timeout(_)) {
                    // The late copy keeps the buffer; the next call pins a new one.
                    *guard = None;
                }
                return Err(e);
            }
            at += n;
        }
        Ok(())
    }

    /// Forgets copies that outlived their deadline and have completed since; returns how many
    /// still run (their memory stays alive until they complete).
    pub fn settle(&self) -> usize {
        self.raw.reap()
    }
}
