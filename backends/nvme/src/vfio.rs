//! VFIO plumbing for the userspace driver: binding a function to vfio-pci and back, the
//! container/group/device fds, BAR access, bus mastering and DMA address spaces.
//!
//! Owns: `Binding` (driver_override + unbind + drivers_probe, restored on drop), `Vfio` (type1 or
//! no-IOMMU container), IOVA allocation and the table of what this process mapped for its device:
//! the driver's own memory for the `Vfio`'s life, and, kept between transfers (`mapcache`), the
//! pages of registered regions and peer BAR ranges, each let go by `release` once its
//! registration ended or it is the least recently used beyond the caller's bound.
//! Must not: decide which addresses a device may use (the registry's routes do), know NVMe, or
//! decide when a device is done with a mapping (the driver calls `release` when it knows).
//!
//! No-IOMMU mode (no IOMMU group before binding): DMA addresses are CPU physical addresses, found
//! through `/proc/self/pagemap` for locked host pages. Type1: everything the device reaches is
//! mapped with VFIO_IOMMU_MAP_DMA at an IOVA chosen here.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use peermem::{
    AddrRange, Address, Backing, BarMapping, Bdf, DmaAddr, Entry, Hit, Iova, PeerMemory, RegionId, Registry, VirtAddr,
};

use crate::mapcache::{IovaSpace, MapCache};
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
/// the IOMMU mapping when it is dropped or unmapped.
#[derive(Debug)]
struct DmaMapping {
    va: VirtAddr,
    len: u64,
    /// Where the range starts in the IOMMU domain (type1); None in no-IOMMU mode (locked pages).
    iova: Option<Iova>,
    pin: sys::DmaPin,
}

impl DmaMapping {
    fn end(&self) -> u64 {
        self.va.raw() + self.len
    }
    fn contains(&self, va: VirtAddr, len: u64) -> bool {
        va >= self.va && va.raw().checked_add(len).is_some_and(|e| e <= self.end())
    }
    /// The IOVA of `va`, a byte of the mapping (type1); None in no-IOMMU mode.
    fn iova_of(&self, va: VirtAddr) -> Result<Option<Iova>, VfioError> {
        let Some(iova) = self.iova else { return Ok(None) };
        let off = va
            .checked_offset_from(self.va)
            .filter(|&o| o < self.len)
            .ok_or(VfioError::NoDmaAddress { va, why: "not in its mapping".into() })?;
        iova.checked_add(off).map(Some).map_err(|source| VfioError::Addr { what: "IOVA", source })
    }
}

/// What a mapping kept between transfers is kept under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKey {
    /// The pages of registered region `id` (its CPU mapping).
    Region(RegionId),
    /// `len` bytes at `offset` of memory BAR `bar` of peer `bdf`: mapped for the CPU, and that
    /// mapping into the IOMMU domain.
    PeerBar { bdf: Bdf, bar: u8, offset: u64, len: u64 },
}

/// The registration a kept mapping serves (the latest one, for a peer BAR range several
/// registrations in turn may use): once it has ended (unregistered, or its device removed) the
/// next `Vfio::release` lets the mapping go.
#[derive(Debug, Clone)]
pub struct Owner {
    id: RegionId,
    entry: Weak<Entry>,
}

impl Owner {
    /// `entry`'s registration in `reg`, found through the registry's lookup tables (by the
    /// region's CPU address, else by its bus address). One the tables no longer hold (it ended
    /// meanwhile) gives an owner that has already ended.
    pub fn of(reg: &Registry, entry: &Entry) -> Owner {
        let snap = reg.snapshot();
        let this =
            |h: Hit<'_>| (h.offset == 0 && std::ptr::eq(Arc::as_ptr(h.entry), entry)).then(|| Arc::downgrade(h.entry));
        let by_va = || snap.lookup_va(entry.cpu_range()?.start()).and_then(this);
        let by_bus = || {
            let (Backing::Bar { bdf, .. } | Backing::P2pmem { bdf, .. }) = entry.region().backing() else {
                return None;
            };
            let hierarchy = reg.hierarchy_of(reg.topology().idx(bdf).ok()?).ok()?;
            snap.lookup_bus(hierarchy, entry.bus_addr()?).and_then(this)
        };
        Owner { id: entry.id(), entry: by_va().or_else(by_bus).unwrap_or_default() }
    }

    pub fn id(&self) -> RegionId {
        self.id
    }

    /// Whether the registration is still live.
    pub fn is_live(&self) -> bool {
        self.entry.upgrade().is_some_and(|e| e.is_live())
    }
}

/// A mapping kept between transfers: the registration it serves and its region's first byte.
#[derive(Debug)]
struct Kept {
    map: DmaMapping,
    owner: Owner,
    start: VirtAddr,
}

/// What a `Vfio` has mapped for its device (`Vfio::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Mappings kept between transfers (registered regions' pages, peer BAR ranges).
    pub kept: usize,
    /// Bytes the kept mappings cover (whole pages).
    pub kept_bytes: u64,
    /// Mappings for the life of the `Vfio` (the driver's own DMA pool).
    pub fixed: usize,
    /// Mappings let go whose IOVA range the kernel did not unmap: held, and their range never
    /// handed out again, until the container closes. 0 unless something went wrong.
    pub stuck: usize,
    /// IOVA bytes reserved now: every mapping and its guard page (0 without an IOMMU).
    pub iova_reserved: u64,
    /// How far above its base the IOVA space has ever been used: ranges are reused, so it stays
    /// near the most ever reserved at once.
    pub iova_high_water: u64,
    /// Mappings made so far (a kept one that is used again is not made again).
    pub made: u64,
    /// Mappings let go so far (unmapped, their memory released).
    pub released: u64,
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
    /// Mapped for the life of this `Vfio`: the driver's own memory.
    fixed: Vec<DmaMapping>,
    /// Mapped for registrations and peer BARs, kept between transfers until `release`.
    kept: MapCache<MapKey, Kept>,
    /// Let go, but the kernel did not unmap their IOVA range: held until the container closes.
    stuck: Vec<DmaMapping>,
    container: Arc<File>,
    bdf: Bdf,
    mode: IommuMode,
    iova: IovaSpace,
    made: u64,
    released: u64,
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
            container: Arc::new(container),
            _group: group_f,
            device,
            fixed: Vec::new(),
            kept: MapCache::default(),
            stuck: Vec::new(),
            iova: IovaSpace::new(IOVA_BASE, IOVA_LIMIT, peermem::mem::page_size()),
            made: 0,
            released: 0,
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

    /// Makes all of `region`'s CPU-mapped pages reachable by the device for as long as this
    /// `Vfio` lives: an IOMMU mapping in type1 mode, locked pages in no-IOMMU mode. For the
    /// driver's own memory (queues, PRP lists); a registered region goes through `map_owned`,
    /// whose mapping ends with its registration. Idempotent.
    pub fn map(&mut self, region: Arc<dyn PeerMemory>) -> Result<(), VfioError> {
        let r = cpu_range(&*region)?;
        if !self.fixed.iter().any(|m| m.contains(r.start(), r.len())) {
            let m = self.pin(region)?;
            self.fixed.push(m);
        }
        Ok(())
    }

    /// Makes the pages of `region`, the memory of registration `owner`, reachable by the
    /// device, and keeps the mapping between transfers: a later call for the same registration
    /// maps nothing. It stays until `release` lets it go. Returns the IOVA of the region's first
    /// byte in type1 mode (the pages are mapped in one run), None in no-IOMMU mode (each page's
    /// physical address comes from `dma_address`).
    pub fn map_owned(&mut self, owner: Owner, region: Arc<dyn PeerMemory>) -> Result<Option<Iova>, VfioError> {
        let key = MapKey::Region(owner.id);
        if let Some(k) = self.kept.get_mut(&key) {
            k.owner = owner;
            return k.map.iova_of(k.start);
        }
        let start = cpu_range(&*region)?.start();
        let map = self.pin(region)?;
        let iova = map.iova_of(start)?;
        self.keep(key, Kept { map, owner, start });
        Ok(iova)
    }

    /// The IOVA of peer BAR range `key` (a `MapKey::PeerBar`) for registration `owner`: the
    /// kept mapping of that range, or, when none is kept, the BAR mapping `make` returns,
    /// mapped into the device's IOMMU domain and kept (the IOMMU entry holds the BAR mapping,
    /// so it never outlives the pages behind it). Type1 mode only.
    pub fn map_peer<E: From<VfioError>>(
        &mut self,
        owner: Owner,
        key: MapKey,
        make: impl FnOnce() -> Result<BarMapping, E>,
    ) -> Result<Iova, E> {
        let no_iova = |va| VfioError::NoDmaAddress { va, why: "no IOMMU: a peer BAR is not mapped".into() };
        if self.mode != IommuMode::Type1 {
            return Err(no_iova(VirtAddr::new(0)).into());
        }
        if let Some(k) = self.kept.get_mut(&key) {
            k.owner = owner;
            return Ok(k.map.iova_of(k.start)?.ok_or(no_iova(k.start))?);
        }
        let region: Arc<dyn PeerMemory> = Arc::new(make()?);
        let start = cpu_range(&*region)?.start();
        let map = self.pin(region)?;
        let iova = map.iova_of(start)?.ok_or(no_iova(start))?;
        self.keep(key, Kept { map, owner, start });
        Ok(iova)
    }

    fn keep(&mut self, key: MapKey, kept: Kept) {
        if let Some(old) = self.kept.insert(key, kept) {
            // Not reached (callers look the key up first); never unmapped behind a transfer.
            self.stuck.push(old.map);
        }
    }

    /// Pins `region`'s pages: at an IOVA range of its own (type1), or locked (no-IOMMU).
    fn pin(&mut self, region: Arc<dyn PeerMemory>) -> Result<DmaMapping, VfioError> {
        let r = cpu_range(&*region)?;
        let page = peermem::mem::page_size();
        let addr = |source| VfioError::Addr { what: "DMA mapping range", source };
        let end = r.start().checked_add(r.len()).map_err(addr)?.raw().div_ceil(page) * page;
        let va = VirtAddr::new(r.start().raw() / page * page);
        let len = end - va.raw();
        let iova = match self.mode {
            IommuMode::Type1 => Some(self.iova.alloc(len).ok_or(VfioError::IovaExhausted { len })?),
            IommuMode::NoIommu => None,
        };
        let what = if iova.is_some() { "VFIO_IOMMU_MAP_DMA" } else { "mlock" };
        let pin = sys::DmaPin::new(region, iova.map(|i| (self.container.clone(), i))).map_err(|source| {
            // Nothing was mapped: the range is free again.
            if let Some(Err(e)) = iova.map(|i| self.iova.free(i, len)) {
                tracing::warn!(bdf = %self.bdf, "{e}");
            }
            VfioError::Ioctl { what, source }
        })?;
        debug_assert_eq!(pin.iova(), iova);
        self.made += 1;
        tracing::debug!(bdf = %self.bdf, %va, len, ?iova, "DMA mapped");
        Ok(DmaMapping { va, len, iova, pin })
    }

    /// Lets go of the kept mappings whose registration ended, then of the least recently used
    /// beyond `keep`, never of the one kept under `current` (what the transfer being prepared
    /// uses). Each is unmapped and its region (or BAR mapping) let go; its IOVA range is handed
    /// out again once the kernel confirmed the unmap. Returns how many were let go.
    ///
    /// Call it only when the device is known to be done with them: no command in flight, or
    /// the function disabled. Earlier, a late DMA could reach memory released here (no IOMMU)
    /// or another mapping given the same IOVA range.
    pub fn release(&mut self, keep: usize, current: Option<&MapKey>) -> usize {
        let gone = self.kept.sweep(keep, current, |k| !k.owner.is_live());
        let n = gone.len();
        for k in gone {
            tracing::debug!(bdf = %self.bdf, owner = %k.owner.id, live = k.owner.is_live(), "DMA mapping let go");
            self.unmap(k.map);
        }
        n
    }

    fn unmap(&mut self, mut m: DmaMapping) {
        if let Err(e) = m.pin.unmap() {
            tracing::warn!(bdf = %self.bdf, va = %m.va, len = m.len, "unmap: {e}; its IOVA range stays out of use");
            self.stuck.push(m);
            return;
        }
        if let Some(Err(e)) = m.iova.map(|i| self.iova.free(i, m.len)) {
            tracing::warn!(bdf = %self.bdf, "{e}");
        }
        self.released += 1;
    }

    /// What is mapped for the device now, and how much of the IOVA space has been used.
    pub fn stats(&self) -> MapStats {
        MapStats {
            kept: self.kept.len(),
            kept_bytes: self.kept.values().map(|k| k.map.len).sum(),
            fixed: self.fixed.len(),
            stuck: self.stuck.len(),
            iova_reserved: self.iova.reserved(),
            iova_high_water: self.iova.high_water(),
            made: self.made,
            released: self.released,
        }
    }

    /// A mapping holding `va`. Several may, while a registration that ended and a new one over
    /// the same pages are both kept: in no-IOMMU mode any of them gives the same physical
    /// address; in type1 mode a registered region's pages are reached through the IOVA
    /// `map_owned` returned, not through this lookup.
    fn mapping_of(&self, va: VirtAddr) -> Result<&DmaMapping, VfioError> {
        self.fixed
            .iter()
            .chain(self.kept.values().map(|k| &k.map))
            .find(|m| m.contains(va, 1))
            .ok_or(VfioError::NoDmaAddress { va, why: "not mapped for this device".into() })
    }

    /// The address the device programs to reach process address `va` (mapped with `map`, or,
    /// in no-IOMMU mode, with `map_owned`): its IOVA (type1) or its CPU physical address
    /// (no-IOMMU). Valid up to the end of va's page.
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

/// The CPU mapping of a region to hand to the device.
fn cpu_range(region: &dyn PeerMemory) -> Result<AddrRange<VirtAddr>, VfioError> {
    region
        .cpu_range()
        .ok_or(VfioError::NoDmaAddress { va: VirtAddr::new(0), why: "the region has no CPU mapping".into() })
}

#[cfg(test)]
mod tests {
    use peermem::{BarRegion, HostRegion, Topology};

    use super::*;

    fn registry() -> Registry {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qemu-switch");
        Registry::new(Arc::new(Topology::discover(root).unwrap()))
    }

    #[test]
    fn an_owner_is_live_exactly_while_its_registration_is() {
        let reg = registry();
        let host = reg.register(Arc::new(HostRegion::new(8192).unwrap())).unwrap();
        let owner = Owner::of(&reg, &host);
        assert_eq!(owner.id(), host.id());
        assert!(owner.is_live());
        drop(host);
        assert!(!owner.is_live());
        // A BAR range without a CPU mapping is found through its bus address.
        let cmb = BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 8192, len: 4096 };
        let bar = reg.register(Arc::new(cmb)).unwrap();
        assert!(bar.bus_addr().is_some());
        let owner = Owner::of(&reg, &bar);
        assert!(owner.is_live());
        drop(bar);
        assert!(!owner.is_live());
    }

    #[test]
    fn an_entry_the_registry_does_not_hold_gives_an_owner_that_has_ended() {
        let (reg, other) = (registry(), registry());
        let region: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(4096).unwrap());
        let elsewhere = other.register(region).unwrap();
        assert!(!Owner::of(&reg, &elsewhere).is_live());
    }
}
