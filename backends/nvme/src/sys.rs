//! The NVMe backend's only system-call and raw-memory layer: 32-bit MMIO on a mapped BAR, the
//! handful of VFIO ioctls the userspace driver needs (uapi structs and numbers from
//! vfio-bindings, calls through rustix), mlock, and volatile access to DMA memory.
//!
//! Owns every FFI call and raw-pointer access of this crate. The two calls that hand process
//! memory to a device (`vfio_map_dma`, `mlock`) are `unsafe fn`: whether the memory outlives the
//! device's use of it is the caller's contract, stated where `vfio` and `driver` call them.
//! Must not: know NVMe (offsets and meanings live in `regs`/`driver`) or decide anything: it
//! checks bounds and alignment, calls, and returns `io::Result`/`Result<_, String>` and owned fds.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use libc::c_void;
use peermem::mem::Mapping;
use peermem::{Iova, VirtAddr};
use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};

/// Aligned 32-bit register access to a device window.
pub trait Mmio {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read32(&self, offset: u64) -> Result<u32, String>;
    fn write32(&self, offset: u64, v: u32) -> Result<(), String>;
}

impl<T: Mmio + ?Sized> Mmio for Box<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read32(&self, offset: u64) -> Result<u32, String> {
        (**self).read32(offset)
    }
    fn write32(&self, offset: u64, v: u32) -> Result<(), String> {
        (**self).write32(offset, v)
    }
}

fn check32(len: u64, offset: u64) -> Result<usize, String> {
    if !offset.is_multiple_of(4) {
        return Err(format!("offset {offset:#x} is not 4-byte aligned"));
    }
    match offset.checked_add(4) {
        Some(end) if end <= len => Ok(offset as usize),
        _ => Err(format!("offset {offset:#x} past the {len:#x}-byte window")),
    }
}

/// MMIO through a shared mapping of the BAR (sysfs `resourceN`, or an mmappable VFIO region).
#[derive(Debug)]
pub struct MappedMmio {
    map: Mapping,
}

impl MappedMmio {
    pub fn new(map: Mapping) -> MappedMmio {
        MappedMmio { map }
    }
}

impl Mmio for MappedMmio {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn read32(&self, offset: u64) -> Result<u32, String> {
        let off = check32(self.len(), offset)?;
        let p = (self.map.addr().raw() as usize + off) as *const u32;
        // SAFETY: p is 4-byte aligned (offset checked, mmap returns page-aligned addresses) and
        // p..p+4 lies inside the live mapping owned by self.map. A volatile load is what a device
        // register needs: exactly one 32-bit access, never merged or elided.
        Ok(unsafe { std::ptr::read_volatile(p) })
    }
    fn write32(&self, offset: u64, v: u32) -> Result<(), String> {
        let off = check32(self.len(), offset)?;
        let p = (self.map.addr().raw() as usize + off) as *mut u32;
        // SAFETY: as in read32; the mapping is MAP_SHARED read-write and no Rust reference
        // borrows its bytes (Mapping hands out no shared slices).
        unsafe { std::ptr::write_volatile(p, v) };
        Ok(())
    }
}

/// MMIO through pread/pwrite on a VFIO device fd (when the region cannot be mmapped).
#[derive(Debug)]
pub struct FileMmio {
    file: File,
    base: u64,
    len: u64,
}

impl FileMmio {
    pub fn new(file: File, base: u64, len: u64) -> FileMmio {
        FileMmio { file, base, len }
    }
}

impl Mmio for FileMmio {
    fn len(&self) -> u64 {
        self.len
    }
    fn read32(&self, offset: u64) -> Result<u32, String> {
        check32(self.len, offset)?;
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, self.base + offset).map_err(|e| e.to_string())?;
        Ok(u32::from_le_bytes(b))
    }
    fn write32(&self, offset: u64, v: u32) -> Result<(), String> {
        check32(self.len, offset)?;
        self.file.write_all_at(&v.to_le_bytes(), self.base + offset).map_err(|e| e.to_string())
    }
}

/// A 32-bit volatile load of byte `offset` of `region`'s CPU mapping (a completion-queue entry
/// the device writes). The borrow of `region` keeps the mapping alive; bounds and alignment are
/// checked here.
pub fn dma_read32(region: &dyn peermem::PeerMemory, offset: u64) -> Result<u32, String> {
    let span = region.cpu_mapping().ok_or("the region has no CPU mapping")?;
    let off = check32(span.len().min(region.len()), offset)?;
    let p = (span.addr().raw() as usize + off) as *const u32;
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    // SAFETY: p..p+4 lies inside the region's live CPU mapping (bounds checked above, the borrow
    // keeps it mapped) and is 4-byte aligned (mappings are page aligned, offset checked). The
    // device may write the bytes concurrently, which is why the load is volatile and no Rust
    // reference is made over them.
    let v = unsafe { std::ptr::read_volatile(p) };
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    Ok(v)
}

/// Locks `len` bytes at `va` in memory (no swap, no migration: physical addresses stay valid
/// for a device in no-IOMMU mode).
///
/// # Safety
/// `va..va+len` must be a mapping the caller owns and keeps mapped for as long as a device may
/// use the physical addresses of its pages: a device is about to be given those addresses, and
/// unmapping the range frees the pages under it (the lock ends with the mapping).
unsafe fn mlock(va: VirtAddr, len: u64) -> io::Result<()> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: mlock only changes the residency of pages; an unmapped range is ENOMEM. What the
    // pages are used for afterwards is the caller's contract above.
    unsafe { rustix::mm::mlock(va.raw() as usize as *mut c_void, len) }.map_err(io::Error::from)
}

/// The pages of a region made reachable by a device: mapped into a VFIO container's IOMMU domain
/// at an IOVA (type1), or locked in memory so their physical addresses stay valid (no-IOMMU).
/// The pin holds the region, so its pages stay mapped for as long as the device may use them;
/// dropping the pin unmaps the IOVA range first, then lets the region go. Drop a pin only when
/// the device is known to be done with it (no command in flight, or the controller disabled).
pub struct DmaPin {
    start: VirtAddr,
    len: u64,
    iommu: Option<(std::sync::Arc<File>, Iova)>,
    /// Held, never read: keeps the pages mapped until the IOVA range is unmapped.
    _region: std::sync::Arc<dyn peermem::PeerMemory>,
}

impl std::fmt::Debug for DmaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let iova = self.iommu.as_ref().map(|(_, i)| *i);
        f.debug_struct("DmaPin").field("start", &self.start).field("len", &self.len).field("iova", &iova).finish()
    }
}

impl DmaPin {
    /// Pins all pages of `region`'s CPU mapping: at `iova` of `container`'s IOMMU domain, or
    /// (no container) locked in memory. Returns the pin and the page-rounded range it covers.
    pub fn new(
        region: std::sync::Arc<dyn peermem::PeerMemory>,
        iommu: Option<(std::sync::Arc<File>, Iova)>,
    ) -> io::Result<DmaPin> {
        let r = region.cpu_range().ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let page = peermem::mem::page_size();
        let start = VirtAddr::new(r.start().raw() / page * page);
        let end = r.end_exclusive().div_ceil(page as u128) * page as u128;
        let len = u64::try_from(end - start.raw() as u128).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        match &iommu {
            // SAFETY: start..start+len covers exactly the pages of the region's CPU mapping,
            // which the pin holds (an Arc of the region) until it unmaps the IOVA range in Drop.
            Some((c, iova)) => unsafe { vfio_map_dma(c, start, *iova, len) }?,
            // SAFETY: as above: the locked pages belong to the region the pin holds.
            None => unsafe { mlock(start, len) }?,
        }
        Ok(DmaPin { start, len, iommu, _region: region })
    }
    /// Where the range starts in the IOMMU domain (type1, until `unmap`).
    pub fn iova(&self) -> Option<Iova> {
        self.iommu.as_ref().map(|(_, i)| *i)
    }

    /// Unmaps the IOVA range now (type1) and says whether the kernel unmapped all of it: a range
    /// it did not may still reach these pages, so it must never be handed out again. Without an
    /// IOMMU there is nothing to undo here: the lock ends with the region's mapping, and a lock
    /// is not counted, so unlocking could undo the owner's own. Afterwards the pin only holds the
    /// region. Like dropping the pin, only once the device is known to be done with the range.
    pub fn unmap(&mut self) -> io::Result<()> {
        let Some((c, iova)) = &self.iommu else { return Ok(()) };
        let unmapped = vfio_unmap_dma(c, *iova, self.len)?;
        if unmapped != self.len {
            return Err(io::Error::other(format!("{unmapped:#x} of {:#x} bytes at {iova} unmapped", self.len)));
        }
        self.iommu = None;
        Ok(())
    }
}

impl Drop for DmaPin {
    fn drop(&mut self) {
        if let Some((c, iova)) = &self.iommu {
            if let Err(e) = vfio_unmap_dma(c, *iova, self.len) {
                tracing::warn!(%iova, len = self.len, "VFIO_IOMMU_UNMAP_DMA: {e}");
            }
        }
    }
}

// ---- VFIO (uapi structs and numbers from vfio-bindings, calls through rustix) ------------------

use vfio_bindings::bindings::vfio as uapi;

pub use uapi::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU, VFIO_REGION_INFO_FLAG_MMAP,
};
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = uapi::VFIO_PCI_CONFIG_REGION_INDEX;

/// Every VFIO ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`: the argument's size is not encoded.
const fn vfio_op(n: u32) -> Opcode {
    opcode::none(uapi::VFIO_TYPE, (uapi::VFIO_BASE + n) as u8)
}
const VFIO_GET_API_VERSION: Opcode = vfio_op(0);
const VFIO_CHECK_EXTENSION: Opcode = vfio_op(1);
const VFIO_SET_IOMMU: Opcode = vfio_op(2);
const VFIO_GROUP_GET_STATUS: Opcode = vfio_op(3);
const VFIO_GROUP_SET_CONTAINER: Opcode = vfio_op(4);
const VFIO_GROUP_GET_DEVICE_FD: Opcode = vfio_op(6);
const VFIO_DEVICE_GET_REGION_INFO: Opcode = vfio_op(8);
const VFIO_DEVICE_SET_IRQS: Opcode = vfio_op(10);
const VFIO_DEVICE_RESET: Opcode = vfio_op(11);
const VFIO_IOMMU_MAP_DMA: Opcode = vfio_op(13);
const VFIO_IOMMU_UNMAP_DMA: Opcode = vfio_op(14);

/// One VFIO ioctl whose argument is a pointer or an integer and whose result is the ioctl's
/// return value (an API version, a boolean, a new fd), which rustix's fixed patterns drop.
struct VfioCall {
    op: Opcode,
    arg: *mut c_void,
}

// SAFETY: `arg` is what the kernel documents for `op` (`vfio_call`'s contract), and the output
// is the raw return value, read from nothing but the call's result.
unsafe impl Ioctl for VfioCall {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        self.op
    }
    fn as_ptr(&mut self) -> *mut c_void {
        self.arg
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Issues `op` on `fd` with `arg`.
///
/// # Safety
/// `arg` must be what the kernel expects for `op`: an integer passed by value, or a pointer to a
/// live, correctly sized (argsz set) struct the kernel may read and write during the call.
unsafe fn vfio_call(fd: &File, op: Opcode, arg: *mut c_void) -> io::Result<IoctlOutput> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { rustix::ioctl::ioctl(fd, VfioCall { op, arg }) }.map_err(io::Error::from)
}

fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// VFIO_GET_API_VERSION on a container.
pub fn vfio_api_version(container: &File) -> io::Result<u32> {
    // SAFETY: an argument-less ioctl on a valid fd.
    unsafe { vfio_call(container, VFIO_GET_API_VERSION, std::ptr::null_mut()) }.map(|v| v as u32)
}

/// VFIO_CHECK_EXTENSION: is IOMMU type `ext` available?
pub fn vfio_check_extension(container: &File, ext: u32) -> io::Result<bool> {
    // SAFETY: the argument is an integer passed by value; no memory is shared.
    Ok(unsafe { vfio_call(container, VFIO_CHECK_EXTENSION, ext as usize as *mut c_void) }? > 0)
}

/// VFIO_SET_IOMMU.
pub fn vfio_set_iommu(container: &File, typ: u32) -> io::Result<()> {
    // SAFETY: the argument is an integer passed by value.
    unsafe { vfio_call(container, VFIO_SET_IOMMU, typ as usize as *mut c_void) }.map(drop)
}

/// VFIO_GROUP_GET_STATUS: the group's flags.
pub fn vfio_group_flags(group: &File) -> io::Result<u32> {
    let mut s = uapi::vfio_group_status { argsz: argsz::<uapi::vfio_group_status>(), flags: 0 };
    // SAFETY: s is a live, correctly sized vfio_group_status the kernel fills in.
    unsafe { vfio_call(group, VFIO_GROUP_GET_STATUS, (&mut s as *mut uapi::vfio_group_status).cast()) }?;
    Ok(s.flags)
}

/// VFIO_GROUP_SET_CONTAINER.
pub fn vfio_group_set_container(group: &File, container: &File) -> io::Result<()> {
    let mut fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int through the pointer, which is live for the call.
    unsafe { vfio_call(group, VFIO_GROUP_SET_CONTAINER, (&mut fd as *mut libc::c_int).cast()) }.map(drop)
}

/// VFIO_GROUP_GET_DEVICE_FD for the device named `name` (its BDF).
pub fn vfio_group_device(group: &File, name: &str) -> io::Result<File> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a NUL-terminated string live for the call; the kernel only reads it.
    let fd = unsafe { vfio_call(group, VFIO_GROUP_GET_DEVICE_FD, c.as_ptr() as *mut c_void) }?;
    // SAFETY: a successful call returns a new descriptor owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `struct vfio_region_info` as the kernel returned it.
pub type RegionInfo = uapi::vfio_region_info;

/// VFIO_DEVICE_GET_REGION_INFO for region `index`.
pub fn vfio_region_info(device: &File, index: u32) -> io::Result<RegionInfo> {
    let mut r = RegionInfo { argsz: argsz::<RegionInfo>(), index, ..Default::default() };
    // SAFETY: r is a live, correctly sized vfio_region_info; argsz tells the kernel its size.
    unsafe { vfio_call(device, VFIO_DEVICE_GET_REGION_INFO, (&mut r as *mut RegionInfo).cast()) }?;
    Ok(r)
}

/// `struct vfio_irq_set` with one eventfd as its flexible `data`.
#[repr(C)]
struct IrqSetOneFd {
    head: uapi::vfio_irq_set,
    fd: libc::c_int,
}

/// VFIO_DEVICE_SET_IRQS on the PCI request IRQ: the kernel signals `eventfd` when it wants the
/// device back (it is being removed: vfio-pci's remove waits for the user to close the device).
pub fn vfio_set_req_eventfd(device: &File, eventfd: &OwnedFd) -> io::Result<()> {
    let mut s = IrqSetOneFd {
        head: uapi::vfio_irq_set {
            argsz: argsz::<IrqSetOneFd>(),
            flags: uapi::VFIO_IRQ_SET_DATA_EVENTFD | uapi::VFIO_IRQ_SET_ACTION_TRIGGER,
            index: uapi::VFIO_PCI_REQ_IRQ_INDEX,
            start: 0,
            count: 1,
            data: uapi::__IncompleteArrayField::new(),
        },
        fd: eventfd.as_raw_fd(),
    };
    // SAFETY: s is a live vfio_irq_set followed by exactly `count` (1) eventfd, argsz covers both;
    // the kernel only reads it and takes its own reference to the eventfd.
    unsafe { vfio_call(device, VFIO_DEVICE_SET_IRQS, (&mut s as *mut IrqSetOneFd).cast()) }.map(drop)
}

/// A new non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)?)
}

/// Whether `fd` (an eventfd) was signalled since the last call; consumes the count.
pub fn eventfd_fired(fd: &OwnedFd) -> io::Result<bool> {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(n) => Ok(n == 8 && u64::from_ne_bytes(buf) > 0),
        Err(rustix::io::Errno::AGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// VFIO_DEVICE_RESET (function-level or bus reset, as the kernel can).
pub fn vfio_device_reset(device: &File) -> io::Result<()> {
    // SAFETY: an argument-less ioctl on a valid fd.
    unsafe { vfio_call(device, VFIO_DEVICE_RESET, std::ptr::null_mut()) }.map(drop)
}

/// VFIO_IOMMU_MAP_DMA: maps `size` bytes at process address `va` to `iova`, read-write.
///
/// # Safety
/// `va..va+size` must be memory the caller owns and keeps (the kernel pins its pages, or for a
/// PFNMAP such as a BAR mapping looks them up) until `vfio_unmap_dma` of the same IOVA range,
/// and that unmap must come only after the device is known to be done with it: from this call
/// on, the device may write those pages at any time.
unsafe fn vfio_map_dma(container: &File, va: VirtAddr, iova: Iova, size: u64) -> io::Result<()> {
    let mut m = uapi::vfio_iommu_type1_dma_map {
        argsz: argsz::<uapi::vfio_iommu_type1_dma_map>(),
        flags: uapi::VFIO_DMA_MAP_FLAG_READ | uapi::VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: va.raw(),
        iova: iova.raw(),
        size,
    };
    // SAFETY: m is a live, correctly sized vfio_iommu_type1_dma_map; a bad vaddr fails in the
    // kernel. What the device may reach afterwards is the caller's contract above.
    unsafe { vfio_call(container, VFIO_IOMMU_MAP_DMA, (&mut m as *mut uapi::vfio_iommu_type1_dma_map).cast()) }
        .map(drop)
}

/// VFIO_IOMMU_UNMAP_DMA of `size` bytes at `iova` (the device faults on them afterwards).
/// Returns how many bytes the kernel unmapped.
pub fn vfio_unmap_dma(container: &File, iova: Iova, size: u64) -> io::Result<u64> {
    let mut m = uapi::vfio_iommu_type1_dma_unmap {
        argsz: argsz::<uapi::vfio_iommu_type1_dma_unmap>(),
        flags: 0,
        iova: iova.raw(),
        size,
        data: Default::default(),
    };
    // SAFETY: m is a live vfio_iommu_type1_dma_unmap whose argsz excludes the empty trailing
    // array; the kernel reads it and writes back the unmapped size.
    unsafe { vfio_call(container, VFIO_IOMMU_UNMAP_DMA, (&mut m as *mut uapi::vfio_iommu_type1_dma_unmap).cast()) }?;
    Ok(m.size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermem::PeerMemory;

    /// The numbers `_IO(';', 100 + n)` of include/uapi/linux/vfio.h, written out by hand.
    #[test]
    fn vfio_ioctl_numbers_match_the_uapi_header() {
        let pinned = [
            (VFIO_GET_API_VERSION, 0x3b64),
            (VFIO_CHECK_EXTENSION, 0x3b65),
            (VFIO_SET_IOMMU, 0x3b66),
            (VFIO_GROUP_GET_STATUS, 0x3b67),
            (VFIO_GROUP_SET_CONTAINER, 0x3b68),
            (VFIO_GROUP_GET_DEVICE_FD, 0x3b6a),
            (VFIO_DEVICE_GET_REGION_INFO, 0x3b6c),
            (VFIO_DEVICE_SET_IRQS, 0x3b6e),
            (VFIO_DEVICE_RESET, 0x3b6f),
            (VFIO_IOMMU_MAP_DMA, 0x3b71),
            (VFIO_IOMMU_UNMAP_DMA, 0x3b72),
        ];
        for (op, want) in pinned {
            assert_eq!(op as u64, want, "opcode {op:#x}");
        }
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<uapi::vfio_iommu_type1_dma_map>(), 32);
        assert_eq!(std::mem::size_of::<uapi::vfio_iommu_type1_dma_unmap>(), 24);
        assert_eq!(std::mem::size_of::<uapi::vfio_group_status>(), 8);
        assert_eq!((std::mem::size_of::<IrqSetOneFd>(), std::mem::offset_of!(IrqSetOneFd, fd)), (24, 20));
        assert_eq!(
            (uapi::VFIO_PCI_REQ_IRQ_INDEX, uapi::VFIO_IRQ_SET_DATA_EVENTFD, uapi::VFIO_IRQ_SET_ACTION_TRIGGER),
            (4, 4, 32)
        );
        assert_eq!((VFIO_API_VERSION, VFIO_TYPE1v2_IOMMU, VFIO_NOIOMMU_IOMMU), (0, 3, 8));
        assert_eq!((VFIO_GROUP_FLAGS_VIABLE, VFIO_REGION_INFO_FLAG_MMAP, VFIO_PCI_CONFIG_REGION_INDEX), (1, 4, 7));
    }

    #[test]
    fn dma_reads_are_bounds_checked_on_the_region() {
        let r = peermem::HostRegion::new(4096).unwrap();
        r.write_at(8, &0x1234_5678u32.to_le_bytes()).unwrap();
        assert_eq!(dma_read32(&r, 8).unwrap(), 0x1234_5678);
        assert!(dma_read32(&r, 6).is_err());
        assert!(dma_read32(&r, 4096).is_err());
        assert!(dma_read32(&r, u64::MAX - 3).is_err());
    }

    #[test]
    fn mmio_rejects_unaligned_and_out_of_window_offsets() {
        let fd = peermem::mem::sealed_memfd("mmio-test", 4096).unwrap();
        let m = MappedMmio::new(Mapping::shared(std::os::fd::AsFd::as_fd(&fd), 4096).unwrap());
        m.write32(8, 0xdead_beef).unwrap();
        assert_eq!(m.read32(8).unwrap(), 0xdead_beef);
        assert!(m.read32(2).is_err());
        assert!(m.read32(4096).is_err());
        assert!(m.write32(4094, 0).is_err());
        assert!(m.read32(u64::MAX - 1).is_err());
    }
}
