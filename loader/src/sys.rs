//! The loader's one FFI edge: an io_uring submission ring (the `io-uring` crate) reading file
//! bytes straight into mapped memory, optionally through registered ("fixed") buffers, the
//! plain `pread` the thread pool and one-off reads use (core's `MappedSpan::pread_from`), and
//! the page-cache calls the Auto I/O mode measures and acts with (`cachestat`, `mincore`,
//! `posix_fadvise`, clearing O_DIRECT).
//!
//! Owns: the system calls, buffer registration, pushing reads, bounded waits for completions,
//! and holding every region and file a read uses until its completion is reaped. Must not:
//! decide where bytes go (the I/O stage does) or how a file is read (`pagecache` does). Imports
//! nothing from the rest of the crate.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use peermem::{AccessError, PeerMemory, Side};

/// One read: `len` bytes of `file` at `off` into `mem` at `mem_off`. Holding it keeps the memory
/// and the open file alive.
#[derive(Clone)]
pub(crate) struct Read {
    pub file: Arc<File>,
    pub off: u64,
    pub mem: Arc<dyn PeerMemory>,
    pub mem_off: u64,
    pub len: u64,
    /// Index of the fixed buffer holding `mem` (io_uring); used only when it names `mem`.
    pub fixed: Option<u16>,
}

/// A completion: the read's tag, and the bytes read or the OS error.
pub(crate) type Done = (u64, io::Result<usize>);

/// `pread(2)` of at most `len` bytes at `off` of `file` straight into byte `mem_off` of `mem`'s
/// CPU mapping (with O_DIRECT the device DMAs into those pages). Returns the bytes read.
pub(crate) fn pread_into(file: &File, off: u64, mem: &dyn PeerMemory, mem_off: u64, len: u64) -> io::Result<usize> {
    mem.span_at(Side::Destination, mem_off, len).map_err(io::Error::other)?.pread_from(file, off)
}

/// `cachestat(2)`'s system call number (Linux 6.5; the same on x86_64 and aarch64).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of the kernel's uapi: `len` 0 means to the end of the file.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of the kernel's uapi (counts of pages).
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Pages of `file` in the page cache, by `cachestat(2)` over the whole file (ENOSYS before
/// Linux 6.5, Unsupported on other architectures).
pub(crate) fn cachestat_pages(file: &File) -> io::Result<u64> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let range = CachestatRange { off: 0, len: 0 };
        let mut cs = Cachestat::default();
        // SAFETY: the fd is open for the call (borrowed from `file`); `range` and `cs` are live,
        // properly laid-out uapi structures the kernel reads and writes only during the call.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut cs as *mut Cachestat,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cs.nr_cache)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = file;
        Err(io::Error::new(io::ErrorKind::Unsupported, "cachestat is wired up for x86_64 and aarch64 only"))
    }
}

/// Resident pages of the first `len` bytes of `file`, by `mincore(2)` over a read-only shared
/// mapping made and unmapped here (touches no page).
pub(crate) fn mincore_pages(file: &File, len: u64, page: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let n = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
    let mut vec = vec![0u8; len.div_ceil(page) as usize];
    // SAFETY: a fresh read-only shared mapping of the open fd; nothing else knows its address.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), n, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr..addr+n` is the mapping just made; `vec` holds one byte per page of it.
    let r = unsafe { libc::mincore(addr, n, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above; no reference into it exists.
    unsafe { libc::munmap(addr, n) };
    if r != 0 {
        return Err(err);
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)` over `len` bytes of `file` at `off`: the kernel starts
/// reading them into the page cache (at most its read-ahead window per call) and returns once the
/// reads are submitted.
pub(crate) fn will_need(file: &File, off: u64, len: u64) -> io::Result<()> {
    let (off, len) = (off as libc::off_t, len as libc::off_t);
    // SAFETY: the fd is open for the call; the advice touches no memory of this process.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Clears O_DIRECT on an open file: its reads go through the page cache from now on.
pub(crate) fn clear_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd open for the call; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with the same flags less O_DIRECT, on the same open fd; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An io_uring instance sized for `depth` reads in flight. It holds every `Read` (an Arc of the
/// memory and of the open file) until that read's completion is reaped, and the fixed-buffer set
/// while it is registered, so no memory the kernel may write is ever freed first.
pub(crate) struct Ring {
    ring: IoUring,
    fixed: Vec<Arc<dyn PeerMemory>>,
    inflight: HashMap<u64, Read>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("fixed", &self.fixed.len()).field("inflight", &self.inflight.len()).finish()
    }
}

/// Largest buffer the kernel accepts as one fixed buffer (1 GiB).
pub(crate) const MAX_FIXED: u64 = 1 << 30;

impl Ring {
    /// A ring with room for `depth` submissions (the kernel rounds up to a power of two).
    pub(crate) fn new(depth: u32) -> io::Result<Ring> {
        let ring = IoUring::new(depth.max(1))?;
        if !ring.params().is_feature_ext_arg() {
            // Without EXT_ARG a wait cannot carry a timeout: every wait must be bounded.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring lacks timed waits (EXT_ARG)",
            ));
        }
        Ok(Ring { ring, fixed: Vec::new(), inflight: HashMap::new() })
    }

    /// The registered set, in index order.
    pub(crate) fn fixed(&self) -> &[Arc<dyn PeerMemory>] {
        &self.fixed
    }

    /// Whether exactly `bufs` (the same regions, in order) are the registered set.
    pub(crate) fn is_registered(&self, bufs: &[Arc<dyn PeerMemory>]) -> bool {
        self.fixed.len() == bufs.len() && self.fixed.iter().zip(bufs).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// Registers whole regions as fixed buffers (index = position), replacing the earlier set.
    /// Only with no read in flight; the ring holds the regions until `unregister`.
    pub(crate) fn register(&mut self, bufs: Vec<Arc<dyn PeerMemory>>) -> io::Result<()> {
        self.unregister()?;
        let mut iov = Vec::with_capacity(bufs.len());
        for b in &bufs {
            let s = b.span_at(Side::Destination, 0, b.len()).map_err(io::Error::other)?;
            iov.push(libc::iovec { iov_base: s.addr().raw() as usize as *mut libc::c_void, iov_len: s.len() as usize });
        }
        // SAFETY: the iovecs describe the regions' CPU mappings, which `self.fixed` keeps alive
        // until the set is unregistered (below, or in drop); the kernel pins the pages and copies
        // the array.
        unsafe { self.ring.submitter().register_buffers(&iov)? };
        self.fixed = bufs;
        Ok(())
    }

    /// Drops the fixed-buffer set (the kernel unpins the pages). Refused with reads in flight.
    pub(crate) fn unregister(&mut self) -> io::Result<()> {
        if self.fixed.is_empty() {
            return Ok(());
        }
        if !self.inflight.is_empty() {
            return Err(io::Error::new(io::ErrorKind::ResourceBusy, "reads in flight"));
        }
        self.ring.submitter().unregister_buffers()?;
        self.fixed.clear();
        Ok(())
    }

    /// Queues `req` tagged `tag` (through its fixed buffer when it names one and that buffer is
    /// `req.mem`). `Ok(false)`: the submission queue is full, nothing queued.
    pub(crate) fn push(&mut self, tag: u64, req: Read) -> Result<bool, AccessError> {
        let span = req.mem.span_at(Side::Destination, req.mem_off, req.len)?;
        let fixed = req.fixed.filter(|&i| self.fixed.get(i as usize).is_some_and(|f| Arc::ptr_eq(f, &req.mem)));
        let ptr = span.addr().raw() as usize as *mut u8;
        let len = u32::try_from(span.len()).unwrap_or(u32::MAX);
        let fd = types::Fd(req.file.as_fd().as_raw_fd());
        let sqe = match fixed {
            Some(i) => opcode::ReadFixed::new(fd, ptr, len, i).offset(req.off).build(),
            None => opcode::Read::new(fd, ptr, len).offset(req.off).build(),
        }
        .user_data(tag);
        // SAFETY: `req` (an Arc of the memory and of the open file) moves into `self.inflight`
        // and leaves it only when this tag's completion is reaped (or is leaked in drop), so the
        // span stays mapped and the fd open for the whole read; a fixed index is used only when
        // it names this very region. No Rust reference covers the bytes (shared DMA memory).
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return Ok(false);
        }
        self.inflight.insert(tag, req);
        Ok(true)
    }

    /// Submits what was queued and waits at most `timeout` for at least `want` completions,
    /// then moves every completion into `out` as (tag, bytes read or the OS error). A timeout is
    /// not an error here: `out` gets nothing and the caller decides.
    pub(crate) fn wait(&mut self, want: usize, timeout: Duration, out: &mut Vec<Done>) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        for c in self.ring.completion() {
            let tag = c.user_data();
            // The read is over: the kernel no longer touches its memory.
            self.inflight.remove(&tag);
            let r = c.result();
            out.push((tag, if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(r as usize) }));
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Reap what is still in flight (bounded); what never completes is leaked, never freed
        // under the device.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while !self.inflight.is_empty() && std::time::Instant::now() < deadline {
            if self.wait(1, Duration::from_millis(100), &mut out).is_err() {
                break;
            }
        }
        if !self.inflight.is_empty() {
            tracing::error!(
                reads = self.inflight.len(),
                "io_uring closing with reads in flight: leaking their buffers"
            );
            for (_, r) in self.inflight.drain() {
                std::mem::forget(r);
            }
            for f in self.fixed.drain(..) {
                std::mem::forget(f);
            }
            return;
        }
        if let Err(e) = self.unregister() {
            tracing::warn!(%e, "io_uring: unregistering fixed buffers failed");
        }
    }
}
