//! The core's only system-call layer: memfd, ftruncate, mmap/munmap, page size. Backends reuse
//! `Mapping` for every shared mapping they make (sysfs `p2pmem/allocate`, `resourceN`, VFIO
//! regions) instead of calling mmap themselves.
//!
//! Owns every `unsafe` block of the core crate. Must not: know what a region or a device is.
//! Everything it returns is owned (`OwnedFd`, `Mapping` unmapped on drop) or an `io::Error`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::addr::VirtAddr;
use crate::region::PeerMemory;

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// A new anonymous memory file (close-on-exec).
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: cname is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets a file's length.
pub fn set_len(fd: &OwnedFd, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: ftruncate on a valid fd has no memory-safety preconditions.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A shared read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; access goes through &self/&mut self methods that
// copy bytes, and concurrent writers race only on the bytes (as any DMA buffer does).
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
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no Rust object; the
        // fd is valid for the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    pub fn addr(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.ptr)
    }
    pub fn len(&self) -> usize {
        self.len
    }
    /// Always false: an empty mapping cannot be created.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Exclusive access. There is deliberately no `&self -> &[u8]`: the bytes are shared memory
    /// that `write_at` (and peers) change, so shared access copies through `read_at`/`write_at`.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is a live mapping owned by self; &mut self guarantees no other
        // access through this Mapping while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn check(&self, offset: u64, n: usize) -> Result<usize, String> {
        let off = usize::try_from(offset).map_err(|_| format!("offset {offset:#x} out of range"))?;
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(off),
            _ => Err(format!("{n} bytes at offset {offset:#x} exceed the {}-byte mapping", self.len)),
        }
    }

    /// Copies `data` into the mapping at `offset` (bounds-checked).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        let off = self.check(offset, data.len())?;
        // SAFETY: bounds checked above; the destination is shared memory that no Rust reference
        // borrows mutably (only `as_mut_slice(&mut self)` hands one out), and data cannot alias
        // it mutably.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Copies from the mapping at `offset` into `buf` (bounds-checked).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let off = self.check(offset, buf.len())?;
        // SAFETY: bounds checked above; buf is a distinct &mut borrow.
        unsafe { std::ptr::copy(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping created by mmap and not unmapped before.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ---- CPU access to any region through its CPU mapping (the one copy every backend uses) -------

/// Start of bytes `off..off+len` of `r`'s CPU mapping, bounds-checked.
fn mapped_span(what: &str, r: &dyn PeerMemory, off: u64, len: u64) -> Result<*mut u8, String> {
    let va = r.cpu_mapping().ok_or_else(|| format!("the {what} region has no CPU mapping"))?;
    match off.checked_add(len) {
        Some(end) if end <= r.len() => {}
        _ => return Err(format!("{len:#x} bytes at offset {off:#x} exceed the {:#x}-byte {what} region", r.len())),
    }
    usize::try_from(len).map_err(|_| format!("length {len:#x} does not fit this address space"))?;
    Ok((va.raw() + off) as usize as *mut u8)
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` through their CPU mappings.
pub fn copy_mapped(
    src: &dyn PeerMemory,
    src_off: u64,
    dst: &dyn PeerMemory,
    dst_off: u64,
    len: u64,
) -> Result<(), String> {
    let s = mapped_span("source", src, src_off, len)?;
    let d = mapped_span("destination", dst, dst_off, len)?;
    // SAFETY: `PeerMemory` is an unsafe trait whose implementers promise the CPU mapping covers
    // all `len()` bytes while the region lives (borrowed here); both ranges were checked to lie
    // inside. `copy` tolerates overlap. Concurrent DMA can tear the bytes, never the access.
    unsafe { std::ptr::copy(s as *const u8, d, len as usize) };
    Ok(())
}

/// Copies bytes `off..off+buf.len()` of `r` into `buf`.
pub fn read_mapped(r: &dyn PeerMemory, off: u64, buf: &mut [u8]) -> Result<(), String> {
    let s = mapped_span("source", r, off, buf.len() as u64)?;
    // SAFETY: as in `copy_mapped`; `buf` is a distinct &mut borrow.
    unsafe { std::ptr::copy(s as *const u8, buf.as_mut_ptr(), buf.len()) };
    Ok(())
}

/// Copies `data` into `r` at `off`.
pub fn write_mapped(r: &dyn PeerMemory, off: u64, data: &[u8]) -> Result<(), String> {
    let d = mapped_span("destination", r, off, data.len() as u64)?;
    // SAFETY: as in `copy_mapped`; `data` cannot alias the mapping mutably.
    unsafe { std::ptr::copy(data.as_ptr(), d, data.len()) };
    Ok(())
}
