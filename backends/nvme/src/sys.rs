//! The NVMe backend's only system-call and raw-memory layer: 32-bit MMIO on a mapped BAR, the
//! handful of VFIO ioctls the userspace driver needs, mlock, and volatile access to DMA memory.
//!
//! Owns every `unsafe` block of this crate. Must not: know NVMe (offsets and meanings live in
//! `regs`/`driver`) or decide anything: it checks bounds and alignment, calls, and returns
//! `io::Result`/`Result<_, String>` and owned fds.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use peermem::sys::Mapping;

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

/// A 32-bit volatile load from DMA memory at `va` (a completion-queue entry the device writes).
///
/// The caller passes an address inside a live mapping it owns; this checks alignment only.
pub fn dma_read32(map_start: u64, map_len: u64, offset: u64) -> Result<u32, String> {
    let off = check32(map_len, offset)?;
    let p = (map_start as usize + off) as *const u32;
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    // SAFETY: callers pass the start/length of a live mapping they hold (a HostRegion kept alive
    // by an Arc in the queue); bounds and alignment are checked above; the device may write the
    // bytes concurrently, which is why the load is volatile.
    let v = unsafe { std::ptr::read_volatile(p) };
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
    Ok(v)
}

/// Locks `len` bytes at `va` in memory (no swap, no migration: physical addresses stay valid
/// for a device in no-IOMMU mode).
pub fn mlock(va: u64, len: u64) -> io::Result<()> {
    // SAFETY: mlock only changes page residency; an unmapped range returns ENOMEM.
    if unsafe { libc::mlock(va as usize as *const libc::c_void, len as usize) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- VFIO (include/uapi/linux/vfio.h) -----------------------------------------------------------

const VFIO_TYPE: u64 = b';' as u64;
const fn vfio_io(nr: u64) -> u64 {
    (VFIO_TYPE << 8) | (100 + nr)
}
const VFIO_GET_API_VERSION: u64 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_DEVICE_RESET: u64 = vfio_io(11);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);

pub const VFIO_API_VERSION: i32 = 0;
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;
pub const VFIO_NOIOMMU_IOMMU: u32 = 8;
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 4;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn ret(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// VFIO_GET_API_VERSION on a container.
pub fn vfio_api_version(container: &File) -> io::Result<i32> {
    // SAFETY: an argument-less ioctl on a valid fd.
    ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION as _) })
}

/// VFIO_CHECK_EXTENSION: is IOMMU type `ext` available?
pub fn vfio_check_extension(container: &File, ext: u32) -> io::Result<bool> {
    // SAFETY: the argument is passed by value (an integer), no memory is shared.
    Ok(ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_CHECK_EXTENSION as _, ext as libc::c_ulong) })? > 0)
}

/// VFIO_SET_IOMMU.
pub fn vfio_set_iommu(container: &File, typ: u32) -> io::Result<()> {
    // SAFETY: the argument is passed by value.
    ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_SET_IOMMU as _, typ as libc::c_ulong) }).map(drop)
}

/// VFIO_GROUP_GET_STATUS: the group's flags.
pub fn vfio_group_flags(group: &File) -> io::Result<u32> {
    let mut s = GroupStatus { argsz: std::mem::size_of::<GroupStatus>() as u32, flags: 0 };
    // SAFETY: s is a live, correctly sized vfio_group_status the kernel fills in.
    ret(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_STATUS as _, &mut s as *mut GroupStatus) })?;
    Ok(s.flags)
}

/// VFIO_GROUP_SET_CONTAINER.
pub fn vfio_group_set_container(group: &File, container: &File) -> io::Result<()> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int through the pointer, which is live for the call.
    ret(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER as _, &fd as *const libc::c_int) }).map(drop)
}

/// VFIO_GROUP_GET_DEVICE_FD for the device named `name` (its BDF).
pub fn vfio_group_device(group: &File, name: &str) -> io::Result<File> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a NUL-terminated string live for the call; the kernel only reads it.
    let fd = ret(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD as _, c.as_ptr()) })?;
    // SAFETY: fd is a new descriptor returned by the kernel, owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// VFIO_DEVICE_GET_REGION_INFO for region `index`.
pub fn vfio_region_info(device: &File, index: u32) -> io::Result<RegionInfo> {
    let mut r = RegionInfo { argsz: std::mem::size_of::<RegionInfo>() as u32, index, ..Default::default() };
    // SAFETY: r is a live, correctly sized vfio_region_info; argsz tells the kernel its size.
    ret(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO as _, &mut r as *mut RegionInfo) })?;
    Ok(r)
}

/// VFIO_DEVICE_RESET (function-level or bus reset, as the kernel can).
pub fn vfio_device_reset(device: &File) -> io::Result<()> {
    // SAFETY: an argument-less ioctl on a valid fd.
    ret(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_RESET as _) }).map(drop)
}

/// VFIO_IOMMU_MAP_DMA: maps `size` bytes at process address `vaddr` to `iova`, read-write.
pub fn vfio_map_dma(container: &File, vaddr: u64, iova: u64, size: u64) -> io::Result<()> {
    let m = DmaMap { argsz: std::mem::size_of::<DmaMap>() as u32, flags: 3, vaddr, iova, size };
    // SAFETY: m is a live, correctly sized vfio_iommu_type1_dma_map; the kernel pins (or, for a
    // PFNMAP such as a BAR mapping, looks up) the pages itself and fails on a bad vaddr.
    ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_MAP_DMA as _, &m as *const DmaMap) }).map(drop)
}

/// VFIO_IOMMU_UNMAP_DMA.
pub fn vfio_unmap_dma(container: &File, iova: u64, size: u64) -> io::Result<()> {
    let mut m = DmaUnmap { argsz: std::mem::size_of::<DmaUnmap>() as u32, flags: 0, iova, size };
    // SAFETY: m is a live, correctly sized vfio_iommu_type1_dma_unmap the kernel updates.
    ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA as _, &mut m as *mut DmaUnmap) }).map(drop)
}

// ---- O_DIRECT targets -------------------------------------------------------------------------

/// `pread(2)` of `span.len()` bytes at `file_off` of `file` straight into the mapped bytes of
/// `span` (with O_DIRECT the device DMAs into those pages). Returns the bytes read.
pub fn pread_into(file: &File, file_off: u64, span: peermem::sys::MappedSpan<'_>) -> io::Result<usize> {
    let file_off = libc::off_t::try_from(file_off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let p = span.addr().raw() as usize as *mut libc::c_void;
    // SAFETY: the span is mapped for its lifetime (borrowed for this call) and covers
    // `span.len()` bytes; no Rust reference is created over them: the kernel writes them as a
    // device would (they are shared DMA memory).
    let n = unsafe { libc::pread(file.as_raw_fd(), p, span.len() as usize, file_off) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_ioctl_numbers_match_the_uapi_header() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<DmaMap>(), 32);
    }

    #[test]
    fn mmio_rejects_unaligned_and_out_of_window_offsets() {
        let fd = peermem::sys::sealed_memfd("mmio-test", 4096).unwrap();
        let m = MappedMmio::new(Mapping::shared(std::os::fd::AsFd::as_fd(&fd), 4096).unwrap());
        m.write32(8, 0xdead_beef).unwrap();
        assert_eq!(m.read32(8).unwrap(), 0xdead_beef);
        assert!(m.read32(2).is_err());
        assert!(m.read32(4096).is_err());
        assert!(m.write32(4094, 0).is_err());
        assert!(m.read32(u64::MAX - 1).is_err());
    }
}
