//! Peer-memory regions: the one trait every exportable memory implements, and the regions the
//! core provides itself (host pages here; ranges of a PCI BAR in `bar`; a device's memory as its
//! driver would export it, for plans made away from the device, in `planned`).
//!
//! Owns: `PeerMemory`, `Provider`, `Backing`, `HostRegion`, `HostSlice`. Must not: compute
//! addresses a peer programs (the registry does, from the topology) or know any device type.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::addr::{AddrRange, VirtAddr};
use crate::mem::{self, MappedSpan};
use crate::pci::Bdf;

mod bar;
mod planned;

pub use bar::{BarMapping, BarRegion};
pub use planned::PlannedDmaBuf;

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
    /// The memory of PCI function `bdf` as its driver exports it to a peer (a GPU's memory as a
    /// dma-buf), described without the fd: routes resolve as for `DmaBuf`, but nothing can
    /// import it. What a plan for a machine read from a sysroot ranks.
    PlannedDmaBuf { bdf: Bdf },
    /// A driver-private fd (Vulkan opaque fd): only the same driver can import it.
    OpaqueFd(BorrowedFd<'a>),
    /// Device memory without an fd that only its own driver reaches (CUDA memory the driver
    /// would not export as a dma-buf): peers go through the driver's copies and host staging.
    DriverPrivate,
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

/// Which side of an access a region was on, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Why a CPU access to a region's bytes did not happen. Nothing was copied in any case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("{n:#x} bytes at offset {offset:#x} run past the {region_len:#x}-byte {side} region")]
    OutOfRange { side: Side, offset: u64, n: u64, region_len: u64 },
    #[error("the {side} region has no CPU mapping (only a device can reach it)")]
    NoCpuMapping { side: Side },
    #[error("the {side} region's CPU mapping covers {completed:#x} of the {expected:#x} bytes asked")]
    PartialBuffer { side: Side, expected: u64, completed: u64 },
}

/// A contiguous range of memory that peers may reach. Everything else derives from these.
///
/// CPU access lives on the region (`read_at`, `write_at`, `copy_to`): they copy through the
/// mapping `cpu_mapping()` lends, which is borrowed from the region, so it cannot outlive it.
/// Backends hand that span's address to the kernel and to drivers (O_DIRECT buffers,
/// `ibv_reg_mr`, Vulkan host-pointer imports) only while they hold the region.
pub trait PeerMemory: Send + Sync + 'static {
    /// Length in bytes (never 0).
    fn len(&self) -> u64;
    fn provider(&self) -> Provider;
    fn backing(&self) -> Backing<'_>;
    /// A CPU mapping of all `len()` bytes, when the region has one.
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
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
    /// The CPU mapping as a range of addresses.
    fn cpu_range(&self) -> Option<AddrRange<VirtAddr>> {
        let s = self.cpu_mapping()?;
        AddrRange::new(s.addr(), s.len().min(self.len())).ok()
    }
    /// The mapped bytes `offset..offset+n`, checked against the region and its mapping.
    fn span_at(&self, side: Side, offset: u64, n: u64) -> Result<MappedSpan<'_>, AccessError> {
        let region_len = self.len();
        if offset.checked_add(n).is_none_or(|end| end > region_len) {
            return Err(AccessError::OutOfRange { side, offset, n, region_len });
        }
        let span = self.cpu_mapping().ok_or(AccessError::NoCpuMapping { side })?;
        span.sub(offset, n).map_err(|_| AccessError::PartialBuffer {
            side,
            expected: n,
            completed: span.len().saturating_sub(offset).min(n),
        })
    }
    /// Copies bytes at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let s = self.span_at(Side::Source, offset, buf.len() as u64)?;
        s.read_at(0, buf).expect("span sized to the buffer");
        Ok(())
    }
    /// Copies `data` into the region at `offset`. Concurrent peers may observe a partial write,
    /// as with any DMA buffer.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let s = self.span_at(Side::Destination, offset, data.len() as u64)?;
        s.write_at(0, data).expect("span sized to the data");
        Ok(())
    }
    /// Copies `n` bytes at `offset` of this region to `dst` at `dst_offset`, CPU to CPU mapping.
    fn copy_to(&self, offset: u64, dst: &dyn PeerMemory, dst_offset: u64, n: u64) -> Result<(), AccessError> {
        let s = self.span_at(Side::Source, offset, n)?;
        let d = dst.span_at(Side::Destination, dst_offset, n)?;
        s.copy_to(0, &d, 0, n).expect("spans sized to the copy");
        Ok(())
    }
}

/// Page-aligned system memory: backed by a sealed memfd and mapped shared (`new`: usable by the
/// CPU, exportable as an fd that another process, or a Vulkan driver, can map or import), or
/// private anonymous memory (`anonymous`: for large buffers that only this process and its
/// devices fill, where first touches dominate: the kernel faults anonymous pages in with less
/// work than a memory file's shared pages).
#[derive(Debug)]
pub struct HostRegion {
    map: mem::Mapping,
    /// The memfd (`new`); none for anonymous memory (`anonymous`).
    fd: Option<OwnedFd>,
    numa: Option<i32>,
}

/// `len` rounded up to whole pages, or why it cannot be a region's length.
fn page_rounded(len: u64) -> Result<u64, RegionError> {
    if len == 0 {
        return Err(RegionError::Invalid { len, why: "zero length".into() });
    }
    let page = mem::page_size();
    len.div_ceil(page)
        .checked_mul(page)
        .ok_or(RegionError::Invalid { len, why: "rounding to the page size overflows".into() })
}

impl HostRegion {
    /// Allocates `len` bytes rounded up to the page size, zero-filled, in an exportable memfd.
    pub fn new(len: u64) -> Result<HostRegion, RegionError> {
        let rounded = page_rounded(len)?;
        let fd = mem::sealed_memfd("peermem-host", rounded)
            .map_err(|source| RegionError::Os { what: "memfd_create", source })?;
        let map =
            mem::Mapping::shared(fd.as_fd(), rounded).map_err(|source| RegionError::Os { what: "mmap", source })?;
        Ok(HostRegion { map, fd: Some(fd), numa: None })
    }

    /// Allocates `len` bytes rounded up to the page size, zero-filled, as private anonymous
    /// memory. Not exportable (`export_fd` says so), and a child process after `fork` sees a
    /// copy, not these pages.
    pub fn anonymous(len: u64) -> Result<HostRegion, RegionError> {
        let rounded = page_rounded(len)?;
        let map = mem::Mapping::anonymous(rounded).map_err(|source| RegionError::Os { what: "mmap", source })?;
        Ok(HostRegion { map, fd: None, numa: None })
    }

    /// The same pages, recorded as placed on NUMA node `numa` (the caller placed them there, or
    /// asks about memory it will place there: ranking NICs for a node's host memory). Nothing is
    /// moved.
    pub fn on_node(mut self, numa: Option<i32>) -> HostRegion {
        self.numa = numa;
        self
    }

    /// Mutable access while this is the only handle (before registration, or via `Arc::get_mut`).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }

    /// The memfd behind the pages (sealed against resizing); `None` for anonymous memory.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

impl PeerMemory for HostRegion {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }
    fn provider(&self) -> Provider {
        Provider::Host { numa: self.numa }
    }
    fn backing(&self) -> Backing<'_> {
        Backing::HostPages
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        Some(self.map.span())
    }
    fn export_fd(&self) -> Result<OwnedFd, RegionError> {
        let Some(fd) = &self.fd else {
            return Err(RegionError::NotExportable("anonymous host memory has no fd to export"));
        };
        fd.try_clone().map_err(|source| RegionError::Os { what: "dup", source })
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

impl PeerMemory for HostSlice {
    fn len(&self) -> u64 {
        self.len
    }
    fn provider(&self) -> Provider {
        self.pool.provider()
    }
    fn backing(&self) -> Backing<'_> {
        Backing::HostPages
    }
    fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
        // In range by construction (`new` checked offset + len against the pool).
        self.pool.map.span().sub(self.offset, self.len).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_host_memory_is_zeroed_and_writable_but_not_exportable() {
        let mut r = HostRegion::anonymous(10_000).unwrap();
        assert_eq!(r.len() % mem::page_size(), 0);
        assert!(r.as_mut_slice().iter().all(|&b| b == 0));
        r.write_at(8190, b"peer").unwrap();
        let mut back = [0u8; 4];
        r.read_at(8190, &mut back).unwrap();
        assert_eq!(&back, b"peer");
        assert!(r.memfd().is_none());
        assert!(matches!(r.export_fd(), Err(RegionError::NotExportable(_))));
        assert!(matches!(HostRegion::anonymous(0), Err(RegionError::Invalid { .. })));
    }

    #[test]
    fn host_region_is_page_aligned_zeroed_and_exportable() {
        let mut r = HostRegion::new(10_000).unwrap();
        assert_eq!(r.len() % mem::page_size(), 0);
        assert!(r.len() >= 10_000);
        assert_eq!(r.cpu_range().unwrap().start().raw() % mem::page_size(), 0);
        assert!(r.as_mut_slice().iter().all(|&b| b == 0));
        r.as_mut_slice()[..4].copy_from_slice(b"peer");
        let fd = r.export_fd().unwrap();
        // The exported fd maps the same pages.
        let other = mem::Mapping::shared(fd.as_fd(), r.len()).unwrap();
        let mut head = [0u8; 4];
        other.span().read_at(0, &mut head).unwrap();
        assert_eq!(&head, b"peer");
        other.span().write_at(4, b"mem").unwrap();
        let mut buf = [0u8; 7];
        r.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"peermem");
    }

    #[test]
    fn region_copies_check_both_ranges_and_need_mappings() {
        let a = HostRegion::new(8192).unwrap();
        let b = HostRegion::new(4096).unwrap();
        a.write_at(100, b"peer").unwrap();
        a.copy_to(100, &b, 4092, 4).unwrap();
        let mut got = [0u8; 4];
        b.read_at(4092, &mut got).unwrap();
        assert_eq!(&got, b"peer");
        assert_eq!(
            a.copy_to(8190, &b, 0, 4),
            Err(AccessError::OutOfRange { side: Side::Source, offset: 8190, n: 4, region_len: 8192 })
        );
        assert_eq!(
            a.copy_to(0, &b, 4093, 4),
            Err(AccessError::OutOfRange { side: Side::Destination, offset: 4093, n: 4, region_len: 4096 })
        );
        assert!(matches!(a.copy_to(u64::MAX, &b, 0, 2), Err(AccessError::OutOfRange { .. })));
        let bar = BarRegion { bdf: "0000:03:00.0".parse().unwrap(), bar: 2, offset: 0, len: 4096 };
        assert_eq!(bar.copy_to(0, &b, 0, 4), Err(AccessError::NoCpuMapping { side: Side::Source }));
        assert_eq!(b.copy_to(0, &bar, 0, 4), Err(AccessError::NoCpuMapping { side: Side::Destination }));
        assert!(b.read_at(4095, &mut [0u8; 2]).is_err());
        let e = a.copy_to(8190, &b, 0, 4).unwrap_err().to_string();
        assert!(e.contains("source") && e.contains("0x2000"), "{e}");
    }

    /// A region whose mapping is shorter than it claims: accesses past the mapping are refused.
    #[test]
    fn a_mapping_shorter_than_the_region_is_a_partial_buffer() {
        struct Short(HostRegion);
        impl PeerMemory for Short {
            fn len(&self) -> u64 {
                self.0.len() * 2
            }
            fn provider(&self) -> Provider {
                self.0.provider()
            }
            fn backing(&self) -> Backing<'_> {
                Backing::HostPages
            }
            fn cpu_mapping(&self) -> Option<MappedSpan<'_>> {
                self.0.cpu_mapping()
            }
        }
        let s = Short(HostRegion::new(4096).unwrap());
        assert_eq!(
            s.write_at(4000, &[1u8; 200]),
            Err(AccessError::PartialBuffer { side: Side::Destination, expected: 200, completed: 96 })
        );
        s.write_at(0, &[1u8; 200]).unwrap();
        assert_eq!(s.cpu_range().unwrap().len(), 4096);
    }

    #[test]
    fn host_slices_must_fit_their_pool() {
        let pool = std::sync::Arc::new(HostRegion::new(8192).unwrap());
        let s = HostSlice::new(pool.clone(), 4096, 4096).unwrap();
        assert_eq!(s.cpu_range().unwrap().start().raw(), pool.cpu_range().unwrap().start().raw() + 4096);
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
