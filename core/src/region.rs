//! Peer-memory regions: the one trait every exportable memory implements, and the two regions the
//! core provides itself (host pages, and a range of a PCI BAR).
//!
//! Owns: `PeerMemory`, `Provider`, `Backing`, `HostRegion`, `BarRegion`. Must not: compute
//! addresses a peer programs (the registry does, from the topology) or know any device type.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::addr::{AddrRange, VirtAddr};
use crate::pci::Bdf;
use crate::sys;

/// Who owns the memory physically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Device memory of a PCI function (a BAR: GPU VRAM window, NVMe CMB, NIC memory).
    Pci(Bdf),
    /// System memory, on a NUMA node when known.
    Host { numa: Option<i32> },
}

/// What the memory is, as far as a peer is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'a> {
    /// `len` bytes at byte `offset` of memory BAR `bar` of `bdf`.
    Bar { bdf: Bdf, bar: u8, offset: u64 },
    /// Pages of the kernel's P2PDMA pool of `bdf` (sysfs `p2pmem/allocate`), at `offset` of `bar`.
    P2pmem { bdf: Bdf, bar: u8, offset: u64 },
    /// Pageable or pinned system memory reachable through the CPU mapping.
    HostPages,
    /// A dma-buf the peer's kernel driver can import.
    DmaBuf(BorrowedFd<'a>),
    /// A driver-private fd (Vulkan opaque fd): only the same driver can import it.
    OpaqueFd(BorrowedFd<'a>),
}

/// Errors from regions themselves.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region of {len} bytes: {why}")]
    Invalid { len: u64, why: String },
    #[error("this region cannot be exported to an fd: {0}")]
    NotExportable(&'static str),
    #[error("{what}: {source}")]
    Os { what: &'static str, source: std::io::Error },
    /// A backend's own error (Vulkan, verbs, VFIO), kept whole.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// A contiguous range of memory that peers may reach. Everything else derives from these.
///
/// `Any` is a supertrait so a registry entry's `&dyn PeerMemory` can be upcast to `&dyn Any` and
/// downcast to the backend's concrete type (a mover finding out that a region is a Vulkan buffer).
///
/// # Safety
/// Backends hand a region's CPU mapping to the kernel and to drivers (O_DIRECT buffers,
/// `ibv_reg_mr`, Vulkan host-pointer imports, CPU copies). An implementer promises: when
/// `cpu_mapping()` returns `Some(va)`, the `len()` bytes at `va` are mapped readable and writable
/// in this process for as long as the object lives, and `cpu_mapping()` and `len()` always
/// return the same values.
pub unsafe trait PeerMemory: std::any::Any + Send + Sync + 'static {
    /// Length in bytes (never 0).
    fn len(&self) -> u64;
    fn provider(&self) -> Provider;
    fn backing(&self) -> Backing<'_>;
    /// Start of a CPU mapping of all `len()` bytes, when the region has one.
    fn cpu_mapping(&self) -> Option<VirtAddr> {
        None
    }
    /// An fd another process or driver can import, when the backing allows.
    fn export_fd(&self) -> Result<OwnedFd, RegionError> {
        Err(RegionError::NotExportable("the backing has no exportable fd"))
    }

    /// Always false for a valid region (kept for the `len`/`is_empty` pair).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The CPU mapping as a range.
    fn cpu_range(&self) -> Option<AddrRange<VirtAddr>> {
        AddrRange::new(self.cpu_mapping()?, self.len()).ok()
    }
}

/// Page-aligned system memory backed by a memfd, mapped shared: usable by the CPU, exportable as
/// an fd (another process, or a Vulkan driver, can map or import the same pages).
#[derive(Debug)]
pub struct HostRegion {
    map: sys::Mapping,
    fd: OwnedFd,
    numa: Option<i32>,
}

impl HostRegion {
    /// Allocates `len` bytes rounded up to the page size, zero-filled.
    pub fn new(len: u64) -> Result<HostRegion, RegionError> {
        if len == 0 {
            return Err(RegionError::Invalid { len, why: "zero length".into() });
        }
        let page = sys::page_size();
        let rounded = len
            .div_ceil(page)
            .checked_mul(page)
            .ok_or(RegionError::Invalid { len, why: "rounding to the page size overflows".into() })?;
        let fd = sys::memfd("peermem-host").map_err(|source| RegionError::Os { what: "memfd_create", source })?;
        sys::set_len(&fd, rounded).map_err(|source| RegionError::Os { what: "ftruncate", source })?;
        let map =
            sys::Mapping::shared(fd.as_fd(), rounded).map_err(|source| RegionError::Os { what: "mmap", source })?;
        Ok(HostRegion { map, fd, numa: None })
    }

    /// Mutable access while this is the only handle (before registration, or via `Arc::get_mut`).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }

    /// Writes `data` at `offset` through the shared mapping. Concurrent peers may observe a
    /// partial write, as with any DMA buffer.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RegionError> {
        self.map.write_at(offset, data).map_err(|why| RegionError::Invalid { len: self.len(), why })
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RegionError> {
        self.map.read_at(offset, buf).map_err(|why| RegionError::Invalid { len: self.len(), why })
    }
}

// SAFETY: the mapping is owned by the region and unmapped only when it drops; len is its size.
unsafe impl PeerMemory for HostRegion {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn provider(&self) -> Provider {
        Provider::Host { numa: self.numa }
    }
    fn backing(&self) -> Backing<'_> {
        Backing::HostPages
    }
    fn cpu_mapping(&self) -> Option<VirtAddr> {
        Some(self.map.addr())
    }
    fn export_fd(&self) -> Result<OwnedFd, RegionError> {
        self.fd.try_clone().map_err(|source| RegionError::Os { what: "dup", source })
    }
}

/// A sub-range of a shared `HostRegion`, registered on its own (one buffer of a pool).
#[derive(Debug, Clone)]
pub struct HostSlice {
    pool: std::sync::Arc<HostRegion>,
    offset: u64,
    len: u64,
}

impl HostSlice {
    /// `len` bytes at `offset` of `pool`; the range must lie inside the pool.
    pub fn new(pool: std::sync::Arc<HostRegion>, offset: u64, len: u64) -> Result<HostSlice, RegionError> {
        let plen = pool.len();
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= plen => Ok(HostSlice { pool, offset, len }),
            _ => Err(RegionError::Invalid {
                len,
                why: format!("slice at offset {offset:#x} does not fit the {plen:#x}-byte pool"),
            }),
        }
    }
    pub fn pool(&self) -> &std::sync::Arc<HostRegion> {
        &self.pool
    }
}

// SAFETY: the slice holds an Arc of its pool, whose mapping covers offset..offset+len
// (checked in `new`) for the pool's life.
unsafe impl PeerMemory for HostSlice {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        self.pool.provider()
    }
    fn backing(&self) -> Backing<'_> {
        Backing::HostPages
    }
    fn cpu_mapping(&self) -> Option<VirtAddr> {
        // In range by construction: offset < pool length, and the pool's mapping is valid.
        Some(VirtAddr::new(self.pool.map.addr().raw() + self.offset))
    }
}

/// `len` bytes at `offset` of a PCI memory BAR, without a CPU mapping of its own. The registry
/// checks the BAR exists, is a memory BAR and holds the range when it is registered.
#[derive(Debug, Clone)]
pub struct BarRegion {
    pub bdf: Bdf,
    pub bar: u8,
    pub offset: u64,
    pub len: u64,
}

// SAFETY: no CPU mapping is claimed.
unsafe impl PeerMemory for BarRegion {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        Provider::Pci(self.bdf)
    }
    fn backing(&self) -> Backing<'_> {
        Backing::Bar { bdf: self.bdf, bar: self.bar, offset: self.offset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_region_is_page_aligned_zeroed_and_exportable() {
        let mut r = HostRegion::new(10_000).unwrap();
        assert_eq!(r.len() % sys::page_size(), 0);
        assert!(r.len() >= 10_000);
        assert_eq!(r.cpu_mapping().unwrap().raw() % sys::page_size(), 0);
        assert!(r.as_mut_slice().iter().all(|&b| b == 0));
        r.as_mut_slice()[..4].copy_from_slice(b"peer");
        let fd = r.export_fd().unwrap();
        // The exported fd maps the same pages.
        let other = sys::Mapping::shared(fd.as_fd(), r.len()).unwrap();
        let mut head = [0u8; 4];
        other.read_at(0, &mut head).unwrap();
        assert_eq!(&head, b"peer");
        other.write_at(4, b"mem").unwrap();
        let mut buf = [0u8; 7];
        r.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"peermem");
    }

    #[test]
    fn a_registered_region_downcasts_to_its_concrete_type() {
        let r: std::sync::Arc<dyn PeerMemory> = std::sync::Arc::new(HostRegion::new(4096).unwrap());
        let any: &dyn std::any::Any = r.as_ref();
        assert!(any.downcast_ref::<HostRegion>().is_some());
        assert!(any.downcast_ref::<BarRegion>().is_none());
    }

    #[test]
    fn mapped_copies_check_both_ranges_and_need_mappings() {
        let a = HostRegion::new(8192).unwrap();
        let b = HostRegion::new(4096).unwrap();
        a.write_at(100, b"peer").unwrap();
        sys::copy_mapped(&a, 100, &b, 4092, 4).unwrap();
        let mut got = [0u8; 4];
        sys::read_mapped(&b, 4092, &mut got).unwrap();
        assert_eq!(&got, b"peer");
        sys::write_mapped(&a, 0, b"mem").unwrap();
        let mut got = [0u8; 3];
        a.read_at(0, &mut got).unwrap();
        assert_eq!(&got, b"mem");
        assert!(sys::copy_mapped(&a, 8190, &b, 0, 4).unwrap_err().contains("source"));
        assert!(sys::copy_mapped(&a, 0, &b, 4093, 4).unwrap_err().contains("destination"));
        assert!(sys::copy_mapped(&a, u64::MAX, &b, 0, 2).is_err());
        let bar = BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 };
        assert!(sys::copy_mapped(&bar, 0, &b, 0, 4).unwrap_err().contains("no CPU mapping"));
        assert!(sys::read_mapped(&b, 4095, &mut [0u8; 2]).is_err());
    }

    #[test]
    fn host_slices_must_fit_their_pool() {
        let pool = std::sync::Arc::new(HostRegion::new(8192).unwrap());
        let s = HostSlice::new(pool.clone(), 4096, 4096).unwrap();
        assert_eq!(s.cpu_mapping().unwrap().raw(), pool.cpu_mapping().unwrap().raw() + 4096);
        assert!(HostSlice::new(pool.clone(), 4096, 4097).is_err());
        assert!(HostSlice::new(pool.clone(), 0, 0).is_err());
        assert!(HostSlice::new(pool, u64::MAX, 2).is_err());
    }

    #[test]
    fn host_region_rejects_bad_sizes_and_offsets() {
        assert!(matches!(HostRegion::new(0), Err(RegionError::Invalid { .. })));
        assert!(HostRegion::new(u64::MAX).is_err());
        let r = HostRegion::new(4096).unwrap();
        assert!(r.write_at(4090, &[0u8; 7]).is_err());
        assert!(r.write_at(u64::MAX, &[0u8; 1]).is_err());
        let mut b = [0u8; 2];
        assert!(r.read_at(4095, &mut b).is_err());
    }
}
