//! VFIO plumbing for the userspace driver: binding a function to vfio-pci and back, the
//! container/group/device fds, BAR access, bus mastering and DMA address spaces.
//!
//! Owns: `Binding` (driver_override + unbind + drivers_probe, restored on drop), `Vfio` (type1 or
//! no-IOMMU container), IOVA allocation and the table of what this process mapped for its device.
//! Must not: decide which addresses a device may use (the registry's routes do), or know NVMe.
//!
//! No-IOMMU mode (no IOMMU group before binding): DMA addresses are CPU physical addresses, found
//! through `/proc/self/pagemap` for locked host pages. Type1: everything the device reaches is
//! mapped with VFIO_IOMMU_MAP_DMA at an IOVA chosen here.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{Address, BarMapping, Bdf, DmaAddr, Iova, PeerMemory, RegionId, VirtAddr};

use crate::sys::{self, FileMmio, MappedMmio, Mmio};

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Ioctl { what: &'static str, source: std::io::Error },
    #[error("{bdf}: {why}")]
    Bind { bdf: Bdf, why: String },
    #[error("VFIO API version {0}, expected 0")]
    ApiVersion(u32),
    #[error("{bdf}: IOMMU group {group} is not viable (another device in it is bound to a kernel driver)")]
    NotViable { bdf: Bdf, group: String },
    #[error("no DMA address for {va}: {why}")]
    NoDmaAddress { va: VirtAddr, why: String },
    #[error("IOVA space exhausted mapping {len:#x} bytes")]
    IovaExhausted { len: u64 },
    #[error("{what}: {source}")]
    Addr { what: &'static str, source: peermem::addr::AddrError },
}

fn write_attr(path: &Path, value: &str) -> Result<(), VfioError> {
    let mut f =
        OpenOptions::new().write(true).open(path).map_err(|source| VfioError::Io { path: path.into(), source })?;
    f.write_all(value.as_bytes()).map_err(|source| VfioError::Io { path: path.into(), source })
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const BIND_WAIT: Duration = Duration::from_secs(10);

/// A function bound to vfio-pci; dropping it gives the function back to its previous driver.
#[derive(Debug)]
pub struct Binding {
    bdf: Bdf,
    dir: PathBuf,
    previous: Option<String>,
    noiommu: bool,
    restored: bool,
}

impl Binding {
    /// Binds the live function `bdf` to vfio-pci (enabling no-IOMMU mode when it has no IOMMU
    /// group), remembering its current driver.
    ///
    /// The first binding starts a SIGINT/SIGTERM watcher: on a signal, waits on the device fail
    /// with an interrupt error so the owners unwind (quiescing the device, restoring the
    /// driver), then the process ends with the signal's default action.
    pub fn to_vfio(bdf: Bdf) -> Result<Binding, VfioError> {
        let dir = PathBuf::from("/sys/bus/pci/devices").join(bdf.to_string());
        if !dir.exists() {
            return Err(VfioError::Bind { bdf, why: format!("{} does not exist", dir.display()) });
        }
        let previous = link_name(&dir.join("driver"));
        let noiommu = !dir.join("iommu_group").exists();
        if noiommu {
            write_attr(Path::new("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"), "1")?;
        }
        crate::signals::register(bdf, dir.clone());
        let mut b = Binding { bdf, dir, previous: previous.clone(), noiommu, restored: false };
        if previous.as_deref() == Some("vfio-pci") {
            return Ok(b);
        }
        write_attr(&b.dir.join("driver_override"), "vfio-pci")?;
        if previous.is_some() {
            write_attr(&b.dir.join("driver/unbind"), &bdf.to_string())?;
        }
        // drivers_probe fails with an error when no driver takes it: check the outcome instead.
        let _ = write_attr(Path::new("/sys/bus/pci/drivers_probe"), &bdf.to_string());
        let dir = b.dir.clone();
        if !wait_until(BIND_WAIT, || link_name(&dir.join("driver")).as_deref() == Some("vfio-pci")) {
            let why =
                format!("not bound to vfio-pci after {BIND_WAIT:?} (driver {:?})", link_name(&dir.join("driver")));
            b.restore_inner();
            return Err(VfioError::Bind { bdf, why });
        }
        tracing::info!(%bdf, previous = ?b.previous, noiommu, "bound to vfio-pci");
        Ok(b)
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    pub fn noiommu(&self) -> bool {
        self.noiommu
    }
    pub fn sysfs_dir(&self) -> &Path {
        &self.dir
    }

    /// The IOMMU group name (a number) of the bound function.
    pub fn group(&self) -> Result<String, VfioError> {
        link_name(&self.dir.join("iommu_group"))
            .ok_or_else(|| VfioError::Bind { bdf: self.bdf, why: "no iommu_group after binding to vfio-pci".into() })
    }

    fn restore_inner(&mut self) -> Vec<String> {
        let mut errs = Vec::new();
        let bdf = self.bdf.to_string();
        if link_name(&self.dir.join("driver")).is_some() {
            if let Err(e) = write_attr(&self.dir.join("driver/unbind"), &bdf) {
                errs.push(e.to_string());
            }
        }
        if let Err(e) = write_attr(&self.dir.join("driver_override"), "\n") {
            errs.push(e.to_string());
        }
        if let Some(prev) = self.previous.clone() {
            let _ = write_attr(Path::new("/sys/bus/pci/drivers_probe"), &bdf);
            let dir = self.dir.clone();
            if !wait_until(BIND_WAIT, || link_name(&dir.join("driver")).as_deref() == Some(prev.as_str())) {
                errs.push(format!("not rebound to {prev} after {BIND_WAIT:?}"));
            }
        }
        self.restored = true;
        crate::signals::unregister(self.bdf);
        errs
    }

    /// Gives the function back to its previous driver and waits (bounded) until it is bound.
    pub fn restore(mut self) -> Result<(), VfioError> {
        let errs = self.restore_inner();
        if errs.is_empty() {
            tracing::info!(bdf = %self.bdf, previous = ?self.previous, "driver restored");
            Ok(())
        } else {
            Err(VfioError::Bind { bdf: self.bdf, why: errs.join("; ") })
        }
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if !self.restored {
            for e in self.restore_inner() {
                tracing::warn!(bdf = %self.bdf, "restoring driver: {e}");
            }
        }
    }
}

/// How the device's DMA is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuMode {
    /// VFIO type1 v2: DMA addresses are IOVAs this process maps.
    Type1,
    /// No IOMMU: DMA addresses are CPU physical addresses.
    NoIommu,
}

/// One range of this process's memory the device may reach. The pin holds the region and undoes
/// the IOMMU mapping when dropped.
#[derive(Debug)]
struct DmaMapping {
    va: VirtAddr,
    len: u64,
    /// Where the range starts in the IOMMU domain (type1); None in no-IOMMU mode (locked pages).
    iova: Option<Iova>,
    /// The registered region the mapping was made for (None: the driver's own pool, peer BARs).
    owner: Option<RegionId>,
    /// Held, never read: dropping it undoes the mapping.
    _pin: sys::DmaPin,
}

impl DmaMapping {
    fn end(&self) -> u64 {
        self.va.raw() + self.len
    }
    fn contains(&self, va: VirtAddr, len: u64) -> bool {
        va >= self.va && va.raw().checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// IOVAs handed out start here (clear of the low 4 GiB and its MSI window).
const IOVA_BASE: Iova = Iova::new(1 << 32);
/// And stay below 2^39 (the narrowest address width of QEMU's intel-iommu).
const IOVA_LIMIT: Iova = Iova::new(1 << 39);

/// An open VFIO device with its group and container.
///
/// Fields drop in this order: the device fd first (vfio-pci disables the function when it is
/// closed), then the group, then the DMA mappings (each pin unmaps its IOVA range, then lets its
/// region go), then the container (kept open by the pins until the last one is gone).
#[derive(Debug)]
pub struct Vfio {
    device: File,
    _group: File,
    maps: Vec<DmaMapping>,
    container: std::sync::Arc<File>,
    bdf: Bdf,
    mode: IommuMode,
    next_iova: Iova,
    /// Signalled by the kernel when the device is being removed (`None`: the kernel refused the
    /// request IRQ; removal then shows only as commands that fail or time out).
    req: Option<OwnedFd>,
    /// The kernel asked for the device back (sticky).
    removal: std::sync::atomic::AtomicBool,
}

impl Vfio {
    /// Opens the container, group and device of a function bound to vfio-pci.
    pub fn open(binding: &Binding) -> Result<Vfio, VfioError> {
        let bdf = binding.bdf();
        let group = binding.group()?;
        let mode = if binding.noiommu() { IommuMode::NoIommu } else { IommuMode::Type1 };
        let open = |p: PathBuf| {
            OpenOptions::new().read(true).write(true).open(&p).map_err(|source| VfioError::Io { path: p, source })
        };
        let container = open("/dev/vfio/vfio".into())?;
        let v = sys::vfio_api_version(&container)
            .map_err(|source| VfioError::Ioctl { what: "VFIO_GET_API_VERSION", source })?;
        if v != sys::VFIO_API_VERSION {
            return Err(VfioError::ApiVersion(v));
        }
        let typ = match mode {
            IommuMode::Type1 => sys::VFIO_TYPE1v2_IOMMU,
            IommuMode::NoIommu => sys::VFIO_NOIOMMU_IOMMU,
        };
        if !sys::vfio_check_extension(&container, typ)
            .map_err(|source| VfioError::Ioctl { what: "VFIO_CHECK_EXTENSION", source })?
        {
            return Err(VfioError::Bind { bdf, why: format!("the kernel's VFIO lacks IOMMU type {typ} ({mode:?})") });
        }
        let dev_node = match mode {
            IommuMode::Type1 => format!("/dev/vfio/{group}"),
            IommuMode::NoIommu => format!("/dev/vfio/noiommu-{group}"),
        };
        let path = PathBuf::from(&dev_node);
        if !wait_until(BIND_WAIT, || path.exists()) {
            return Err(VfioError::Bind { bdf, why: format!("{dev_node} did not appear") });
        }
        let group_f = open(path)?;
        let flags = sys::vfio_group_flags(&group_f)
            .map_err(|source| VfioError::Ioctl { what: "VFIO_GROUP_GET_STATUS", source })?;
        if flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable { bdf, group });
        }
        sys::vfio_group_set_container(&group_f, &container).map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => VfioError::NotViable { bdf, group: group.clone() },
            _ => VfioError::Ioctl { what: "VFIO_GROUP_SET_CONTAINER", source },
        })?;
        sys::vfio_set_iommu(&container, typ).map_err(|source| VfioError::Ioctl { what: "VFIO_SET_IOMMU", source })?;
        let device = sys::vfio_group_device(&group_f, &bdf.to_string())
            .map_err(|source| VfioError::Ioctl { what: "VFIO_GROUP_GET_DEVICE_FD", source })?;
        tracing::debug!(%bdf, ?mode, group, "VFIO device open");
        let req = match sys::eventfd().and_then(|fd| sys::vfio_set_req_eventfd(&device, &fd).map(|()| fd)) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(%bdf, "no removal notice (VFIO request IRQ): {e}");
                None
            }
        };
        Ok(Vfio {
            req,
            removal: std::sync::atomic::AtomicBool::new(false),
            bdf,
            mode,
            container: std::sync::Arc::new(container),
            _group: group_f,
            device,
            maps: Vec::new(),
            next_iova: IOVA_BASE,
        })
    }

    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Whether the kernel has asked for the device back because it is being removed (hot
    /// unplug): the owner must quiesce it and close it, or the removal waits. Sticky; one
    /// non-blocking read of the request eventfd.
    pub fn removal_requested(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.removal.load(Ordering::Relaxed) {
            return true;
        }
        if let Some(fd) = &self.req {
            if sys::eventfd_fired(fd).unwrap_or(false) {
                tracing::warn!(bdf = %self.bdf, "the kernel asks for the device back: it is being removed");
                self.removal.store(true, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    pub fn mode(&self) -> IommuMode {
        self.mode
    }

    /// Region `index` (a BAR) as an MMIO window: mmapped when VFIO allows, else pread/pwrite.
    pub fn bar(&self, index: u32) -> Result<Box<dyn Mmio + Send + Sync>, VfioError> {
        let info = sys::vfio_region_info(&self.device, index)
            .map_err(|source| VfioError::Ioctl { what: "VFIO_DEVICE_GET_REGION_INFO", source })?;
        if info.size == 0 {
            return Err(VfioError::Bind { bdf: self.bdf, why: format!("BAR{index} is empty") });
        }
        if info.flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0 {
            match peermem::mem::Mapping::shared_at(self.device.as_fd(), info.size, info.offset) {
                Ok(m) => return Ok(Box::new(MappedMmio::new(m))),
                Err(e) => {
                    tracing::debug!(bdf = %self.bdf, index, "mmap of the VFIO region failed ({e}); using pread/pwrite")
                }
            }
        }
        let f = self.device.try_clone().map_err(|source| VfioError::Ioctl { what: "dup", source })?;
        Ok(Box::new(FileMmio::new(f, info.offset, info.size)))
    }

    /// Sets memory-space and bus-master enable in the command register (vfio-pci leaves bus
    /// mastering off).
    pub fn enable_bus_master(&self) -> Result<(), VfioError> {
        self.update_command(|v| v | 0x6)
    }

    /// Clears bus-master enable: from the moment the write lands the function issues no memory
    /// request, so no DMA of any command still in flight can reach memory.
    pub fn disable_bus_master(&self) -> Result<(), VfioError> {
        self.update_command(|v| v & !0x4)
    }

    fn update_command(&self, f: impl FnOnce(u16) -> u16) -> Result<(), VfioError> {
        use std::os::unix::fs::FileExt;
        let info = sys::vfio_region_info(&self.device, sys::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|source| VfioError::Ioctl { what: "VFIO_DEVICE_GET_REGION_INFO(config)", source })?;
        let io = |source| VfioError::Ioctl { what: "config space command register", source };
        let mut cmd = [0u8; 2];
        self.device.read_exact_at(&mut cmd, info.offset + 4).map_err(io)?;
        let v = f(u16::from_le_bytes(cmd));
        self.device.write_all_at(&v.to_le_bytes(), info.offset + 4).map_err(io)
    }

    /// Function-level reset through VFIO (the device forgets its queues).
    pub fn reset(&self) -> Result<(), VfioError> {
        sys::vfio_device_reset(&self.device).map_err(|source| VfioError::Ioctl { what: "VFIO_DEVICE_RESET", source })
    }

    /// Makes all of `region`'s CPU-mapped pages reachable by the device: an IOMMU mapping in
    /// type1 mode, locked pages in no-IOMMU mode. The mapping holds the region (its pages stay
    /// mapped while the device may use them) until this `Vfio` is dropped (after the device fd
    /// is closed, so vfio-pci has disabled the function) or the same addresses are mapped for
    /// another region.
    /// Idempotent. Call it only while no command is in flight (a replaced mapping is unmapped).
    pub fn map(&mut self, region: Arc<dyn PeerMemory>) -> Result<(), VfioError> {
        self.map_owned(None, region)
    }

    /// Like `map`, for the pages of registered region `owner`. A mapping made for another region
    /// at the same addresses (two registrations aliasing the same pages) is replaced: unmapped,
    /// then the new one mapped.
    pub fn map_owned(&mut self, owner: Option<RegionId>, region: Arc<dyn PeerMemory>) -> Result<(), VfioError> {
        let r = region
            .cpu_range()
            .ok_or(VfioError::NoDmaAddress { va: VirtAddr::new(0), why: "the region has no CPU mapping".into() })?;
        let (va, len) = (r.start(), r.len());
        if self.maps.iter().any(|m| m.contains(va, len) && m.owner == owner) {
            return Ok(());
        }
        let page = peermem::mem::page_size();
        let addr = |source| VfioError::Addr { what: "DMA mapping range", source };
        let end = va.checked_add(len).map_err(addr)?.raw().div_ceil(page) * page;
        let start = VirtAddr::new(va.raw() / page * page);
        let len = end - start.raw();
        let (stale, keep): (Vec<DmaMapping>, Vec<DmaMapping>) =
            std::mem::take(&mut self.maps).into_iter().partition(|m| m.va.raw() < end && start.raw() < m.end());
        self.maps = keep;
        for m in stale {
            tracing::debug!(bdf = %self.bdf, va = %m.va, len = m.len, "replacing a DMA mapping of the same pages");
            drop(m);
        }
        let iommu = match self.mode {
            IommuMode::Type1 => {
                let iova = self.next_iova;
                let next = iova.checked_add(len).and_then(|e| e.checked_add(page)).map_err(addr)?;
                if next > IOVA_LIMIT {
                    return Err(VfioError::IovaExhausted { len });
                }
                // Leave a guard page between mappings.
                self.next_iova = next;
                Some((self.container.clone(), iova))
            }
            IommuMode::NoIommu => None,
        };
        let what = if iommu.is_some() { "VFIO_IOMMU_MAP_DMA" } else { "mlock" };
        let pin = sys::DmaPin::new(region, iommu).map_err(|source| VfioError::Ioctl { what, source })?;
        let iova = pin.iova();
        tracing::debug!(bdf = %self.bdf, va = %start, len, ?iova, "DMA mapped");
        self.maps.push(DmaMapping { va: start, len, iova, owner, _pin: pin });
        Ok(())
    }

    /// Maps a peer's BAR range (mapped into this process by `Topology::map_bar`) into the
    /// device's IOMMU domain; returns its IOVA. Only meaningful in type1 mode. The IOMMU entry
    /// holds the BAR mapping, so it never outlives the pages behind it.
    pub fn map_peer(&mut self, map: BarMapping) -> Result<Iova, VfioError> {
        let region: Arc<dyn PeerMemory> = Arc::new(map);
        let va = region.cpu_range().map(|r| r.start()).unwrap_or_default();
        self.map(region)?;
        match self.dma_address(va)? {
            DmaAddr::Iova(iova) => Ok(iova),
            other => Err(VfioError::NoDmaAddress { va, why: format!("{other} is not an IOVA (no-IOMMU mode)") }),
        }
    }

    fn mapping_of(&self, va: VirtAddr) -> Result<&DmaMapping, VfioError> {
        self.maps
            .iter()
            .find(|m| m.contains(va, 1))
            .ok_or(VfioError::NoDmaAddress { va, why: "not mapped for this device".into() })
    }

    /// The address the device programs to reach process address `va` (mapped with `map`):
    /// its IOVA (type1) or its CPU physical address (no-IOMMU). Valid up to the end of va's page.
    pub fn dma_address(&self, va: VirtAddr) -> Result<DmaAddr, VfioError> {
        let m = self.mapping_of(va)?;
        match m.iova {
            Some(iova) => {
                let off = va.checked_offset_from(m.va).expect("va lies in the mapping");
                iova.checked_add(off).map(DmaAddr::Iova).map_err(|source| VfioError::Addr { what: "IOVA", source })
            }
            None => peermem::mem::virt_to_phys(va)
                .map(DmaAddr::Phys)
                .map_err(|e| VfioError::NoDmaAddress { va, why: e.to_string() }),
        }
    }

    /// `dma_address` of each of `vas` (all inside one mapping), with one pagemap read in
    /// no-IOMMU mode (at most `peermem::mem::PAGEMAP_SPAN` pages apart).
    pub fn dma_addresses(&self, vas: &[VirtAddr]) -> Result<Vec<DmaAddr>, VfioError> {
        let Some(&first) = vas.first() else { return Ok(Vec::new()) };
        let m = self.mapping_of(first)?;
        if let Some(&va) = vas.iter().find(|&&v| !m.contains(v, 1)) {
            return Err(VfioError::NoDmaAddress { va, why: "not in the mapping of the transfer's first page".into() });
        }
        match m.iova {
            Some(_) => vas.iter().map(|&va| self.dma_address(va)).collect(),
            None => peermem::mem::virt_to_phys_many(vas)
                .map(|p| p.into_iter().map(DmaAddr::Phys).collect())
                .map_err(|e| VfioError::NoDmaAddress { va: first, why: e.to_string() }),
        }
    }
}
