//! The loader's one FFI edge: an io_uring submission ring (the `io-uring` crate) reading file
//! bytes straight into mapped memory, optionally through registered ("fixed") buffers, and the
//! plain `pread` the thread pool and one-off reads use (core's `MappedSpan::pread_from`).
//!
//! Owns: the system calls, buffer registration, pushing reads, bounded waits for completions,
//! and holding every region and file a read uses until its completion is reaped. Must not:
//! decide where bytes go (the I/O stage does). Imports nothing from the rest of the crate.

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
