//! The core's only system layer: memfd (sealed to its size), mmap/munmap, page size, pagemap,
//! the kernel's uevent socket (`UeventSocket`), and `MappedSpan`, a borrowed view of mapped
//! bytes through which every CPU copy of the project goes.
//!
//! Private to the crate: `mem` gives the memory half its public names (backends reuse `Mapping`
//! for every shared mapping they make instead of calling mmap themselves); the uevent socket
//! serves `hotplug` alone. Owns every `unsafe` block of the core outside the span table's own
//! `spanmap::sys`. Must not: know what a region or a device is, or import from a module above
//! it (it uses only `addr`, the address types).
//! Everything it returns is owned (`OwnedFd`, `Mapping` unmapped on drop), borrowed with a
//! lifetime (`MappedSpan<'_>`), or an `io::Error`.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::addr::{CpuPhys, VirtAddr};

/// The system page size. From `sysconf`, not rustix's auxv reader: that one dereferences the
/// vDSO's ELF header, which valgrind does not map (memcheck then stops on a SIGSEGV).
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf takes no pointer and reads a constant of the process.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|&n| n > 0).expect("sysconf(_SC_PAGESIZE) is positive on Linux")
    })
}

/// A new anonymous memory file of `len` bytes (close-on-exec), sealed so that it can neither
/// shrink nor grow: a mapping of it can never turn into SIGBUS because someone truncated it.
pub fn sealed_memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// A shared read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through `MappedSpan`, which copies
// bytes, and concurrent writers race only on the bytes (as any DMA buffer does).
unsafe impl Send for Mapping {}
// SAFETY: see Send; no interior state besides the mapped bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, MAP_SHARED, read-write.
    pub fn shared(fd: BorrowedFd<'_>, len: u64) -> io::Result<Mapping> {
        Mapping::shared_at(fd, len, 0)
    }

    /// Maps `len` bytes of `fd` from byte `offset` (page-aligned), MAP_SHARED, read-write.
    pub fn shared_at(fd: BorrowedFd<'_>, len: u64, offset: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 || !offset.is_multiple_of(page_size()) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no Rust object; the
        // fd is valid for the call.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )?
        };
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// `len` bytes of private anonymous memory (zero-filled on first touch), read-write: not
    /// shared with any other process, and no fd names it.
    pub fn anonymous(len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh anonymous mapping chosen by the kernel (addr NULL) aliases no Rust
        // object.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )?
        };
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    pub fn addr(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.ptr.as_ptr())
    }
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: an empty mapping cannot be created.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// All the mapped bytes, borrowed from the mapping.
    pub fn span(&self) -> MappedSpan<'_> {
        MappedSpan { ptr: self.ptr, len: self.len, _life: PhantomData }
    }
    /// Exclusive access. There is deliberately no `&self -> &[u8]`: the bytes are shared memory
    /// that peers change, so shared access copies through `MappedSpan`.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is a live mapping owned by self; &mut self guarantees no other
        // access through this Mapping while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by mmap and not unmapped before; no
        // `MappedSpan` of it outlives `self` (they borrow it).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::error!(%e, len = self.len, "munmap failed");
        }
    }
}

/// Why a copy through mapped bytes did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("{n:#x} bytes at offset {offset:#x} run past the {len:#x}-byte mapping")]
    OutOfRange { offset: u64, n: u64, len: u64 },
}

/// `len` mapped bytes at a CPU address, borrowed for `'a` from whatever owns the mapping (a
/// `Mapping`, a backend's driver mapping). Every CPU copy of the project goes through this type:
/// the bytes are shared with devices, so there is no `&[u8]` over them, only copies in and out.
#[derive(Debug, Clone, Copy)]
pub struct MappedSpan<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _life: PhantomData<&'a Mapping>,
}

// SAFETY: a span only copies bytes in and out of shared memory (see `Mapping`).
unsafe impl Send for MappedSpan<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for MappedSpan<'_> {}

impl<'a> MappedSpan<'a> {
    /// A span over memory that some other owner mapped (a driver's mapping).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped readable and writable in this process for all of `'a`, and
    /// must not be covered by a live Rust reference (`&`/`&mut [u8]`) during `'a`.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> MappedSpan<'a> {
        MappedSpan { ptr, len, _life: PhantomData }
    }

    pub fn addr(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.ptr.as_ptr())
    }
    pub fn len(&self) -> u64 {
        self.len as u64
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `offset..offset+n` of this span.
    pub fn sub(&self, offset: u64, n: u64) -> Result<MappedSpan<'a>, SpanError> {
        let off = self.check(offset, n)?;
        // SAFETY: off+n <= len (checked), so the pointer stays inside the same mapping.
        let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) };
        Ok(MappedSpan { ptr, len: n as usize, _life: PhantomData })
    }

    fn check(&self, offset: u64, n: u64) -> Result<usize, SpanError> {
        let err = SpanError::OutOfRange { offset, n, len: self.len as u64 };
        match offset.checked_add(n) {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(err),
        }
    }

    /// Copies `data` into the span at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), SpanError> {
        let off = self.check(offset, data.len() as u64)?;
        // SAFETY: bounds checked; the destination is mapped for 'a (constructor contract) and
        // `data` is a distinct borrow. `copy` is a plain memmove: concurrent DMA can tear the
        // bytes, never the access.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// Copies bytes at `offset` into `buf`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SpanError> {
        let off = self.check(offset, buf.len() as u64)?;
        // SAFETY: bounds checked; the source is mapped for 'a; `buf` is a distinct &mut borrow.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `n` bytes from `self` at `src_off` to `dst` at `dst_off` (the spans may overlap).
    pub fn copy_to(&self, src_off: u64, dst: &MappedSpan<'_>, dst_off: u64, n: u64) -> Result<(), SpanError> {
        let s = self.check(src_off, n)?;
        let d = dst.check(dst_off, n)?;
        // SAFETY: both ranges checked against their spans, which are mapped for their
        // lifetimes; `copy` tolerates overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(s), dst.ptr.as_ptr().add(d), n as usize) };
        Ok(())
    }

    /// Fills `n` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, n: u64, byte: u8) -> Result<(), SpanError> {
        let off = self.check(offset, n)?;
        // SAFETY: bounds checked; mapped for 'a.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), byte, n as usize) };
        Ok(())
    }

    /// `pread(2)` of at most the span's length at `file_off` of `file` straight into the span
    /// (with O_DIRECT the device DMAs into its pages). Returns the bytes read.
    pub fn pread_from(&self, file: &std::fs::File, file_off: u64) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let off = libc::off_t::try_from(file_off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the span is mapped for 'a and covers `len` bytes; no Rust reference is made
        // over them: the kernel writes them as a device would (they are shared DMA memory).
        let n = unsafe { libc::pread(file.as_raw_fd(), self.ptr.as_ptr().cast(), self.len, off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Why a virtual address has no known physical address.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    #[error("/proc/self/pagemap: {0}")]
    Io(#[from] io::Error),
    #[error("{va} is not present in memory (touch or lock the page first)")]
    NotPresent { va: VirtAddr },
    #[error("/proc/self/pagemap hides physical addresses (PFN 0): CAP_SYS_ADMIN is needed")]
    Hidden,
}

/// The CPU physical address behind `va`, from `/proc/self/pagemap` (root: other users read PFN 0).
pub fn virt_to_phys(va: VirtAddr) -> Result<CpuPhys, PagemapError> {
    Ok(virt_to_phys_many(&[va])?[0])
}

/// Most pages `virt_to_phys_many` reads the pagemap for at once (4 MiB of 4 KiB pages).
pub const PAGEMAP_SPAN: u64 = 1024;

/// The CPU physical addresses behind `vas`, from one read of `/proc/self/pagemap` covering the
/// pages from the lowest to the highest (at most `PAGEMAP_SPAN` pages apart).
pub fn virt_to_phys_many(vas: &[VirtAddr]) -> Result<Vec<CpuPhys>, PagemapError> {
    use std::os::unix::fs::FileExt;
    let page = page_size();
    let (Some(lo), Some(hi)) = (vas.iter().map(|v| v.raw() / page).min(), vas.iter().map(|v| v.raw() / page).max())
    else {
        return Ok(Vec::new());
    };
    if hi - lo >= PAGEMAP_SPAN {
        return Err(PagemapError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} pages apart: more than {PAGEMAP_SPAN} in one read", hi - lo + 1),
        )));
    }
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut e = vec![0u8; ((hi - lo + 1) * 8) as usize];
    f.read_exact_at(&mut e, lo * 8)?;
    vas.iter()
        .map(|&va| {
            let i = ((va.raw() / page - lo) * 8) as usize;
            let entry = u64::from_le_bytes(e[i..i + 8].try_into().expect("8 bytes"));
            if entry & (1 << 63) == 0 {
                return Err(PagemapError::NotPresent { va });
            }
            let pfn = entry & ((1 << 55) - 1);
            if pfn == 0 {
                return Err(PagemapError::Hidden);
            }
            Ok(CpuPhys::new(pfn * page + va.raw() % page))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// One pagemap read answers for many addresses exactly as one read per address does, and a
    /// range wider than the cap is refused rather than read.
    #[test]
    fn pagemap_lookups_in_one_read_match_one_read_each() {
        let page = page_size() as usize;
        let buf = vec![7u8; 8 * page];
        let base = buf.as_ptr() as u64;
        let vas: Vec<VirtAddr> =
            [0, 1, page + 5, 3 * page, 7 * page + page - 1].iter().map(|&o| VirtAddr::new(base + o as u64)).collect();
        let one: Vec<_> = vas.iter().map(|&v| virt_to_phys(v).map_err(|e| e.to_string())).collect();
        match virt_to_phys_many(&vas) {
            Ok(many) => assert_eq!(one, many.into_iter().map(Ok).collect::<Vec<_>>()),
            // Unprivileged: PFNs hidden, both ways alike.
            Err(e) => assert!(one.iter().any(|r| r.as_ref().err() == Some(&e.to_string())), "{e}"),
        }
        assert!(virt_to_phys_many(&[]).unwrap().is_empty());
        let far = [VirtAddr::new(base), VirtAddr::new(base + PAGEMAP_SPAN * page as u64)];
        assert!(matches!(virt_to_phys_many(&far), Err(PagemapError::Io(_))));
    }

    #[test]
    fn sealed_memfds_cannot_change_size() {
        let fd = sealed_memfd("t", 8192).unwrap();
        assert!(rustix::fs::ftruncate(&fd, 4096).is_err());
        assert!(rustix::fs::ftruncate(&fd, 1 << 20).is_err());
        let m = Mapping::shared(fd.as_fd(), 8192).unwrap();
        m.span().write_at(8188, b"ok!!").unwrap();
        let mut b = [0u8; 4];
        m.span().read_at(8188, &mut b).unwrap();
        assert_eq!(&b, b"ok!!");
    }

    #[test]
    fn spans_check_every_range() {
        let fd = sealed_memfd("t", 4096).unwrap();
        let m = Mapping::shared(fd.as_fd(), 4096).unwrap();
        let s = m.span();
        assert!(s.write_at(4090, &[0; 7]).is_err());
        assert!(s.write_at(u64::MAX, &[0; 1]).is_err());
        assert!(s.sub(4000, 97).is_err());
        let sub = s.sub(4000, 96).unwrap();
        assert_eq!(sub.addr().raw(), s.addr().raw() + 4000);
        sub.fill(0, 96, 0xab).unwrap();
        let mut b = [0u8; 2];
        s.read_at(4094, &mut b).unwrap();
        assert_eq!(b, [0xab, 0xab]);
        s.copy_to(4000, &s, 0, 96).unwrap();
        s.read_at(95, &mut b[..1]).unwrap();
        assert_eq!(b[0], 0xab);
        assert_eq!(s.copy_to(0, &sub, 1, 96), Err(SpanError::OutOfRange { offset: 1, n: 96, len: 96 }));
    }

    #[test]
    fn mappings_need_a_page_aligned_offset_and_a_length() {
        let fd = sealed_memfd("t", 8192).unwrap();
        assert!(Mapping::shared_at(fd.as_fd(), 4096, 100).is_err());
        assert!(Mapping::shared(fd.as_fd(), 0).is_err());
    }
}

/// The kernel's device events (netlink `NETLINK_KOBJECT_UEVENT`, multicast group 1: what
/// `udevadm monitor --kernel` reads; no privilege needed). Close-on-exec; each receive waits at
/// most the timeout given to `open`.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

/// One uevent datagram is at most the kernel's `UEVENT_BUFFER_SIZE` (2048 bytes) plus header.
pub const UEVENT_MAX: usize = 8192;

impl UeventSocket {
    pub fn open(recv_timeout: std::time::Duration) -> io::Result<UeventSocket> {
        use rustix::net::netlink::{self, SocketAddrNetlink};
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 1))?;
        rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(recv_timeout))?;
        // Room for a burst (a removed switch sends one event per function and class device);
        // an overflow still shows up as ENOBUFS, which the caller answers with a full check.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 1 << 20);
        Ok(UeventSocket { fd })
    }

    /// The next datagram sent by the kernel into `buf` (its length), `Ok(None)` when the timeout
    /// passed without one. Datagrams from user space (a process's port id is never 0) are
    /// dropped. `ENOBUFS` (events were lost) comes back as an error of that kind.
    pub fn recv(&self, buf: &mut [u8; UEVENT_MAX]) -> io::Result<Option<usize>> {
        use rustix::net::netlink::SocketAddrNetlink;
        use rustix::net::RecvFlags;
        match rustix::net::recvfrom(&self.fd, &mut buf[..], RecvFlags::empty()) {
            Ok((n, _, Some(from))) => match SocketAddrNetlink::try_from(from) {
                Ok(a) if a.pid() == 0 => Ok(Some(n.min(UEVENT_MAX))),
                _ => Ok(Some(0)),
            },
            Ok((_, _, None)) => Ok(Some(0)),
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
