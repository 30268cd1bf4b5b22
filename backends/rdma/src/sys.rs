//! Raw verbs and rdma_cm, and the few other system calls this backend needs (memfd seals, udmabuf).
//!
//! Owns: every `unsafe` block of the crate. Each verbs object here owns its handle and releases
//! it on `Drop` (MR before PD, QP before its CQs, everything before the device context: each
//! holds an `Arc` of what it was created from). Errors come back as `io::Error` carrying the
//! errno the library set. Must not: choose routes, retry, log at more than debug level, or panic.
//!
//! libibverbs and librdmacm are reached through `rdma-mummy-sys`, which `dlopen`s
//! `libibverbs.so.1` and `librdmacm.so.1` when the
//! process starts: without the library every call fails with an errno instead of the binary not
//! starting, and `library_present` tells the two cases apart.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::Arc;

use peermem::PeerMemory;
use rdma_mummy_sys as ffi;

use crate::event::{AsyncEvent, Wc};

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// A return code that is either 0 or an errno (some verbs return it, some set `errno`).
fn rc(ret: libc::c_int) -> io::Result<()> {
    match ret {
        0 => Ok(()),
        e if e > 0 => Err(io::Error::from_raw_os_error(e)),
        _ => Err(errno()),
    }
}

/// True when `libibverbs.so.1` can be loaded by this process.
pub fn library_present() -> bool {
    let name = c"libibverbs.so.1";
    // SAFETY: `name` is a valid C string; dlopen returns a handle we close at once (it only
    // bumps and drops a reference count of a library the verbs shim already loaded, or fails).
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
    }
    true
}

/// The device list, freed on drop.
struct DeviceList {
    list: *mut *mut ffi::ibv_device,
    n: usize,
}

impl DeviceList {
    fn get() -> io::Result<DeviceList> {
        let mut n: libc::c_int = 0;
        // SAFETY: `n` is a valid out-pointer; a non-null result is freed in Drop.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(errno());
        }
        Ok(DeviceList { list, n: n.max(0) as usize })
    }

    fn devices(&self) -> impl Iterator<Item = *mut ffi::ibv_device> + '_ {
        // SAFETY: the list holds `n` valid device pointers until it is freed (in Drop).
        (0..self.n).map(move |i| unsafe { *self.list.add(i) })
    }

    fn name(dev: *mut ffi::ibv_device) -> String {
        // SAFETY: `dev` comes from a live device list; the name is a NUL-terminated string
        // owned by the device (or null, handled).
        unsafe {
            let p = ffi::ibv_get_device_name(dev);
            if p.is_null() {
                return String::new();
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: `list` came from ibv_get_device_list and is freed once.
        unsafe { ffi::ibv_free_device_list(self.list) }
    }
}

/// Names of the devices libibverbs sees (empty list or ENOSYS when there are none).
pub fn device_names() -> io::Result<Vec<String>> {
    let l = DeviceList::get()?;
    Ok(l.devices().map(DeviceList::name).collect())
}

/// Port attributes we use.
#[derive(Debug, Clone, Copy)]
pub struct PortAttr {
    pub active: bool,
    pub state: u32,
    /// `ibv_mtu` enum value (1 = 256 ... 5 = 4096).
    pub active_mtu: u32,
    pub lid: u16,
    /// 1 = InfiniBand, 2 = Ethernet (RoCE).
    pub link_layer: u8,
}

/// An open device context.
#[derive(Debug)]
pub struct Context {
    ctx: *mut ffi::ibv_context,
    name: String,
}

// SAFETY: libibverbs contexts are thread-safe (the library locks internally); the pointer is
// only freed in Drop, when no other reference exists.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// Opens the device called `name`.
    pub fn open(name: &str) -> io::Result<Arc<Context>> {
        let l = DeviceList::get()?;
        let dev = l
            .devices()
            .find(|&d| DeviceList::name(d) == name)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        // SAFETY: `dev` is valid while the list lives; the context outlives the list by design
        // (libibverbs keeps the device alive while a context is open).
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(errno());
        }
        Ok(Arc::new(Context { ctx, name: name.to_string() }))
    }

    pub fn query_port(&self, port: u8) -> io::Result<PortAttr> {
        // SAFETY: all-zero is a valid ibv_port_attr; ctx is live; the out-pointer is valid.
        let mut a: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
        rc(unsafe { ffi::ibv_query_port(self.ctx, port, &mut a) })?;
        Ok(PortAttr {
            active: a.state == ffi::ibv_port_state::IBV_PORT_ACTIVE,
            state: a.state,
            active_mtu: a.active_mtu,
            lid: a.lid,
            link_layer: a.link_layer,
        })
    }

    pub fn query_gid(&self, port: u8, index: i32) -> io::Result<[u8; 16]> {
        let mut g = ffi::ibv_gid { raw: [0; 16] };
        // SAFETY: ctx is live; `g` is a valid out-pointer.
        rc(unsafe { ffi::ibv_query_gid(self.ctx, port, index, &mut g) })?;
        // SAFETY: every bit pattern of the union is a valid `raw` array.
        Ok(unsafe { g.raw })
    }

    /// Bytes of on-NIC memory `alloc_dm` can hand out (0 when the device has none).
    pub fn max_dm_size(&self) -> io::Result<u64> {
        // SAFETY: all-zero structs are valid inputs/outputs; ctx is live.
        let mut attr: ffi::ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        rc(unsafe { ffi::ibv_query_device_ex(self.ctx, ptr::null(), &mut attr) })?;
        Ok(attr.max_dm_size)
    }

    /// The most RDMA READs (and atomics) in flight per queue pair the device takes as responder
    /// and as initiator (`max_qp_rd_atom`, `max_qp_init_rd_atom`).
    pub fn rd_atom(&self) -> io::Result<(u8, u8)> {
        // SAFETY: all-zero structs are valid inputs/outputs; ctx is live.
        let mut attr: ffi::ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        rc(unsafe { ffi::ibv_query_device_ex(self.ctx, ptr::null(), &mut attr) })?;
        let clamp = |n: i32| n.clamp(0, u8::MAX as i32) as u8;
        Ok((clamp(attr.orig_attr.max_qp_rd_atom), clamp(attr.orig_attr.max_qp_init_rd_atom)))
    }

    /// The command fd of the context (driver-private: only this device's driver understands it).
    pub fn cmd_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: cmd_fd stays open until ibv_close_device, which runs only in Drop (after every
        // borrow of `self` has ended).
        unsafe { BorrowedFd::borrow_raw((*self.ctx).cmd_fd) }
    }

    /// The next pending asynchronous event (port change, QP fatal, ...), without blocking.
    pub fn poll_async_event(&self) -> io::Result<Option<AsyncEvent>> {
        // SAFETY: async_fd is owned by the live context; we only poll it.
        let fd = unsafe { (*self.ctx).async_fd };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n < 0 {
            return Err(errno());
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: all-zero is a valid ibv_async_event; the fd is readable so this does not block;
        // the event is acknowledged before returning (it holds no reference we keep).
        unsafe {
            let mut ev: ffi::ibv_async_event = std::mem::zeroed();
            rc(ffi::ibv_get_async_event(self.ctx, &mut ev))?;
            let kind = ev.event_type as u32;
            let name = CStr::from_ptr(ffi::ibv_event_type_str(ev.event_type)).to_string_lossy().into_owned();
            ffi::ibv_ack_async_event(&mut ev);
            Ok(Some(AsyncEvent { kind, name }))
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc of this context, so none is alive now.
        let r = unsafe { ffi::ibv_close_device(self.ctx) };
        if r != 0 {
            tracing::debug!(dev = %self.name, "ibv_close_device failed: {}", errno());
        }
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: *mut ffi::ibv_pd,
    ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe; freed only in Drop.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn alloc(ctx: &Arc<Context>) -> io::Result<Arc<Pd>> {
        // SAFETY: ctx is live.
        let pd = unsafe { ffi::ibv_alloc_pd(ctx.ctx) };
        if pd.is_null() {
            return Err(errno());
        }
        Ok(Arc::new(Pd { pd, ctx: ctx.clone() }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// `ibv_reg_mr` on `len` bytes at `offset` of the region's CPU mapping. The kernel pins the
    /// pages until the MR is deregistered, so a stale VA can never make the NIC reach pages
    /// reused elsewhere; the MR keeps the region alive, so the mapping outlives it.
    pub fn reg_mr(
        self: &Arc<Self>,
        region: &Arc<dyn PeerMemory>,
        offset: u64,
        len: u64,
        access: u32,
    ) -> io::Result<Mr> {
        let span = region.cpu_mapping().ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let span = span.sub(offset, len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = usize::try_from(span.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let addr = span.addr().raw() as usize as *mut libc::c_void;
        // SAFETY: `addr..addr+len` lies in the region's CPU mapping (`sub` checked the range);
        // the MR keeps an Arc of the region, so the mapping outlives the registration; the
        // kernel validates the range (EFAULT when it cannot pin it); the PD is live.
        let mr = unsafe { ffi::ibv_reg_mr(self.pd, addr, len, access as libc::c_int) };
        let mut mr = Mr::wrap(mr, self, None)?;
        mr._region = Some(KeepAlive(region.clone()));
        Ok(mr)
    }

    /// `ibv_reg_dmabuf_mr`: the NIC's kernel driver imports `fd` and maps `len` bytes at
    /// `offset`; the MR's address space starts at `iova`.
    pub fn reg_dmabuf_mr(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: peermem::Iova,
        access: u32,
    ) -> io::Result<Mr> {
        // SAFETY: the fd is borrowed for the call (the kernel takes its own reference).
        let mr =
            unsafe { ffi::ibv_reg_dmabuf_mr(self.pd, offset, len, iova.raw(), fd.as_raw_fd(), access as libc::c_int) };
        Mr::wrap(mr, self, None)
    }

    /// `ibv_reg_dm_mr` on `len` bytes at `offset` of device memory `dm`.
    pub fn reg_dm_mr(self: &Arc<Self>, dm: &Arc<Dm>, offset: u64, len: usize, access: u32) -> io::Result<Mr> {
        // SAFETY: dm and pd are live; the MR keeps an Arc of dm so it is freed after the MR.
        let mr = unsafe { ffi::ibv_reg_dm_mr(self.pd, dm.dm, offset, len, access) };
        Mr::wrap(mr, self, Some(dm.clone()))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every MR/QP of this PD holds an Arc of it, so none is alive now.
        let r = unsafe { ffi::ibv_dealloc_pd(self.pd) };
        if r != 0 {
            tracing::debug!("ibv_dealloc_pd failed: {}", io::Error::from_raw_os_error(r));
        }
    }
}

/// A memory registration; deregistered on drop.
#[derive(Debug)]
pub struct Mr {
    mr: *mut ffi::ibv_mr,
    pub lkey: u32,
    pub rkey: u32,
    pub addr: u64,
    _pd: Arc<Pd>,
    _dm: Option<Arc<Dm>>,
    /// The region whose CPU pages an `ibv_reg_mr` pinned: dropped after the MR is deregistered.
    _region: Option<KeepAlive>,
}

// SAFETY: verbs objects are thread-safe; freed only in Drop.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

/// A region kept alive by an MR that pinned its pages.
pub struct KeepAlive(Arc<dyn PeerMemory>);

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeepAlive({} bytes)", self.0.len())
    }
}

impl Mr {
    fn wrap(mr: *mut ffi::ibv_mr, pd: &Arc<Pd>, dm: Option<Arc<Dm>>) -> io::Result<Mr> {
        if mr.is_null() {
            return Err(errno());
        }
        // SAFETY: a non-null MR returned by libibverbs is valid until dereg.
        let (lkey, rkey, addr) = unsafe { ((*mr).lkey, (*mr).rkey, (*mr).addr as u64) };
        Ok(Mr { mr, lkey, rkey, addr, _pd: pd.clone(), _dm: dm, _region: None })
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once.
        let r = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if r != 0 {
            tracing::debug!(rkey = self.rkey, "ibv_dereg_mr failed: {}", io::Error::from_raw_os_error(r));
        }
    }
}

/// On-device memory (`ibv_alloc_dm`).
#[derive(Debug)]
pub struct Dm {
    dm: *mut ffi::ibv_dm,
    pub len: u64,
    ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe; freed only in Drop.
unsafe impl Send for Dm {}
// SAFETY: as above.
unsafe impl Sync for Dm {}

impl Dm {
    pub fn alloc(ctx: &Arc<Context>, len: u64) -> io::Result<Arc<Dm>> {
        let mut attr = ffi::ibv_alloc_dm_attr { length: len as usize, log_align_req: 0, comp_mask: 0 };
        // SAFETY: ctx is live; the shim returns null with errno EOPNOTSUPP when the driver
        // has no alloc_dm.
        let dm = unsafe { ffi::ibv_alloc_dm(ctx.ctx, &mut attr) };
        if dm.is_null() {
            return Err(errno());
        }
        Ok(Arc::new(Dm { dm, len, ctx: ctx.clone() }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Copies `data` to byte `offset` of the device memory (bounds checked by the caller).
    pub fn copy_to(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // SAFETY: `data` is valid for its length; the driver checks the device-side range.
        rc(unsafe { ffi::ibv_memcpy_to_dm(self.dm, offset, data.as_ptr().cast(), data.len()) })
    }

    pub fn copy_from(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // SAFETY: `buf` is valid for writes of its length.
        rc(unsafe { ffi::ibv_memcpy_from_dm(buf.as_mut_ptr().cast(), self.dm, offset, buf.len()) })
    }
}

impl Drop for Dm {
    fn drop(&mut self) {
        // SAFETY: every MR on this DM holds an Arc of it, so none is alive now.
        let r = unsafe { ffi::ibv_free_dm(self.dm) };
        if r != 0 {
            tracing::debug!("ibv_free_dm failed: {}", io::Error::from_raw_os_error(r));
        }
    }
}

/// The library's name for a work-completion status.
pub fn wc_status_str(status: u32) -> String {
    // SAFETY: returns a static string for any value ("unknown" for out-of-range ones).
    unsafe {
        let p = ffi::ibv_wc_status_str(status);
        if p.is_null() {
            return format!("status {status}");
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    cq: *mut ffi::ibv_cq,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe; freed only in Drop.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    pub fn create(ctx: &Arc<Context>, entries: i32) -> io::Result<Arc<Cq>> {
        // SAFETY: ctx is live; no channel, no context pointer.
        let cq = unsafe { ffi::ibv_create_cq(ctx.ctx, entries, ptr::null_mut(), ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(errno());
        }
        Ok(Arc::new(Cq { cq, _ctx: ctx.clone() }))
    }

    /// Polls up to `out.len()` completions without blocking.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> io::Result<usize> {
        const BATCH: usize = 16;
        // SAFETY: all-zero ibv_wc values are valid; the CQ is live; poll_cq writes at most
        // `n` entries.
        let mut wcs: [ffi::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let n = max.min(BATCH) as i32;
        let got = unsafe { ffi::ibv_poll_cq(self.cq, n, wcs.as_mut_ptr()) };
        if got < 0 {
            return Err(io::Error::other(format!("ibv_poll_cq returned {got}")));
        }
        for w in &wcs[..got as usize] {
            out.push(Wc {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                vendor_err: w.vendor_err,
                byte_len: w.byte_len,
                qp_num: w.qp_num,
            });
        }
        Ok(got as usize)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an Arc of it, so none is alive now.
        let r = unsafe { ffi::ibv_destroy_cq(self.cq) };
        if r != 0 {
            tracing::debug!("ibv_destroy_cq failed: {}", io::Error::from_raw_os_error(r));
        }
    }
}

/// What a send work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    Send,
    Write { remote_addr: u64, rkey: u32 },
    Read { remote_addr: u64, rkey: u32 },
}

/// Attributes of the remote end of an RC connection, for RTR.
#[derive(Debug, Clone, Copy)]
pub struct RtrAttr {
    pub port: u8,
    pub sgid_index: u8,
    pub mtu: u32,
    pub dest_qpn: u32,
    pub rq_psn: u32,
    pub dgid: [u8; 16],
    pub dlid: u16,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
}

/// Attributes for RTS.
#[derive(Debug, Clone, Copy)]
pub struct RtsAttr {
    pub sq_psn: u32,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub max_rd_atomic: u8,
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub struct Qp {
    qp: *mut ffi::ibv_qp,
    pub qpn: u32,
    _pd: Arc<Pd>,
    _scq: Arc<Cq>,
    _rcq: Arc<Cq>,
}

// SAFETY: verbs objects are thread-safe; freed only in Drop.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl Qp {
    pub fn create_rc(pd: &Arc<Pd>, scq: &Arc<Cq>, rcq: &Arc<Cq>, max_send: u32, max_recv: u32) -> io::Result<Qp> {
        // SAFETY: all-zero ibv_qp_init_attr is valid; we fill what RC needs.
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = scq.cq;
        init.recv_cq = rcq.cq;
        init.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = max_send;
        init.cap.max_recv_wr = max_recv;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and CQs are live and outlive the QP (Arcs held).
        let qp = unsafe { ffi::ibv_create_qp(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(errno());
        }
        // SAFETY: valid QP.
        let qpn = unsafe { (*qp).qp_num };
        Ok(Qp { qp, qpn, _pd: pd.clone(), _scq: scq.clone(), _rcq: rcq.clone() })
    }

    fn modify(&self, attr: &mut ffi::ibv_qp_attr, mask: ffi::ibv_qp_attr_mask) -> io::Result<()> {
        // SAFETY: the QP is live; attr is a valid, fully initialised struct.
        rc(unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0 as libc::c_int) })
    }

    pub fn to_init(&self, port: u8, access: u32) -> io::Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
        a.port_num = port;
        a.pkey_index = 0;
        a.qp_access_flags = access;
        self.modify(&mut a, M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS)
    }

    pub fn to_rtr(&self, r: &RtrAttr) -> io::Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = r.mtu;
        a.dest_qp_num = r.dest_qpn;
        a.rq_psn = r.rq_psn;
        a.max_dest_rd_atomic = r.max_dest_rd_atomic;
        a.min_rnr_timer = r.min_rnr_timer;
        a.ah_attr.is_global = 1;
        a.ah_attr.dlid = r.dlid;
        a.ah_attr.port_num = r.port;
        a.ah_attr.grh.dgid = ffi::ibv_gid { raw: r.dgid };
        a.ah_attr.grh.sgid_index = r.sgid_index;
        a.ah_attr.grh.hop_limit = 1;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
        )
    }

    pub fn to_rts(&self, r: &RtsAttr) -> io::Result<()> {
        use ffi::ibv_qp_attr_mask as M;
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = r.sq_psn;
        a.timeout = r.timeout;
        a.retry_cnt = r.retry_cnt;
        a.rnr_retry = r.rnr_retry;
        a.max_rd_atomic = r.max_rd_atomic;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// The QP's attributes named by `mask` (`ibv_qp_attr_mask` bits).
    fn query(&self, mask: u32) -> io::Result<ffi::ibv_qp_attr> {
        // SAFETY: all-zero structs are valid out-parameters; the QP is live.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        rc(unsafe { ffi::ibv_query_qp(self.qp, &mut a, mask as i32, &mut init) })?;
        Ok(a)
    }

    /// Current state (`ibv_qp_state` value).
    pub fn state(&self) -> io::Result<u32> {
        Ok(self.query(ffi::ibv_qp_attr_mask::IBV_QP_STATE.0)?.qp_state)
    }

    /// READ depths the QP was given, as (responder resources, initiator depth).
    pub fn rd_atomic(&self) -> io::Result<(u8, u8)> {
        use ffi::ibv_qp_attr_mask as M;
        let a = self.query(M::IBV_QP_MAX_DEST_RD_ATOMIC.0 | M::IBV_QP_MAX_QP_RD_ATOMIC.0)?;
        Ok((a.max_dest_rd_atomic, a.max_rd_atomic))
    }

    /// Posts one signaled send work request with one scatter/gather entry.
    pub fn post_send(&self, wr_id: u64, op: SendOp, addr: u64, len: u32, lkey: u32) -> io::Result<()> {
        let mut sge = ffi::ibv_sge { addr, length: len, lkey };
        // SAFETY: all-zero is a valid ibv_send_wr (null next, no inline data).
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        match op {
            SendOp::Send => wr.opcode = ffi::ibv_wr_opcode::IBV_WR_SEND,
            SendOp::Write { remote_addr, rkey } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = ffi::rdma_t { remote_addr, rkey };
            }
            SendOp::Read { remote_addr, rkey } => {
                wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = ffi::rdma_t { remote_addr, rkey };
            }
        }
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; wr and sge live across the call (the provider copies them
        // into its queue before returning).
        rc(unsafe { ffi::ibv_post_send(self.qp, &mut wr, &mut bad) })
    }

    /// Posts one receive work request with one scatter/gather entry.
    pub fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> io::Result<()> {
        let mut sge = ffi::ibv_sge { addr, length: len, lkey };
        let mut wr = ffi::ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        // SAFETY: as for post_send.
        rc(unsafe { ffi::ibv_post_recv(self.qp, &mut wr, &mut bad) })
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let r = unsafe { ffi::ibv_destroy_qp(self.qp) };
        if r != 0 {
            tracing::debug!(qpn = self.qpn, "ibv_destroy_qp failed: {}", io::Error::from_raw_os_error(r));
        }
    }
}

/// An rdma_cm event channel: the fd on which connection-manager events arrive (non-blocking;
/// `next_event` polls it with a deadline).
#[derive(Debug)]
pub struct CmChannel {
    ch: *mut ffi::rdma_event_channel,
}

// SAFETY: librdmacm channels are thread-safe (the library locks internally); freed only in Drop,
// after every id on the channel (each holds an Arc of it).
unsafe impl Send for CmChannel {}
// SAFETY: as above.
unsafe impl Sync for CmChannel {}

/// One rdma_cm event, copied out of the library's and acknowledged.
#[derive(Debug)]
pub struct CmEvent {
    /// `rdma_cm_event_type` value (see [`cm_event`]).
    pub kind: u32,
    /// The library's name for it (`RDMA_CM_EVENT_ESTABLISHED`, ...).
    pub name: String,
    /// The event's status: an errno for address/route errors, the CM reject reason for
    /// `REJECTED`.
    pub status: i32,
    /// The peer's private data (connect request, accept, reject), as delivered.
    pub private_data: Vec<u8>,
    /// A connect request's new id (on the listener's channel).
    pub new_id: Option<CmId>,
    /// The READ depths a connect request or response offers, as the peer's (responder
    /// resources, initiator depth): the READs it serves and issues at once. Zero for other
    /// events.
    pub rd_atomic: (u8, u8),
}

impl CmChannel {
    pub fn create() -> io::Result<Arc<CmChannel>> {
        // SAFETY: no arguments; a non-null result is destroyed in Drop.
        let ch = unsafe { ffi::rdma_create_event_channel() };
        if ch.is_null() {
            return Err(errno());
        }
        let c = CmChannel { ch };
        // SAFETY: `fd` is the channel's own open fd; only its O_NONBLOCK flag changes.
        let fd = unsafe { (*ch).fd };
        let r = unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(errno());
        }
        Ok(Arc::new(c))
    }

    /// The next event, waiting at most `timeout`; `None` when none came.
    pub fn next_event(self: &Arc<Self>, timeout: std::time::Duration) -> io::Result<Option<CmEvent>> {
        // SAFETY: the channel is live; we only poll its fd.
        let fd = unsafe { (*self.ch).fd };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = errno();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        if n == 0 {
            return Ok(None);
        }
        let mut ev: *mut ffi::rdma_cm_event = ptr::null_mut();
        // SAFETY: the channel is live and non-blocking; `ev` is a valid out-pointer.
        if unsafe { ffi::rdma_get_cm_event(self.ch, &mut ev) } != 0 {
            let e = errno();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        // SAFETY: `ev` is a valid event until acknowledged below; the private data pointer (when
        // non-null) covers `private_data_len` bytes owned by the event; a connect request's
        // `id` is a new id that becomes ours (destroyed by `CmId`'s Drop, after this ack).
        unsafe {
            let e = &*ev;
            let kind = e.event;
            let name = CStr::from_ptr(ffi::rdma_event_str(kind)).to_string_lossy().into_owned();
            let conn = e.param.conn;
            // Only connection events carry a peer's private data.
            let carries = matches!(
                kind,
                cm_event::CONNECT_REQUEST | cm_event::CONNECT_RESPONSE | cm_event::ESTABLISHED | cm_event::REJECTED
            );
            let private_data = if conn.private_data.is_null() || !carries {
                Vec::new()
            } else {
                std::slice::from_raw_parts(conn.private_data.cast::<u8>(), conn.private_data_len as usize).to_vec()
            };
            let new_id = (kind == cm_event::CONNECT_REQUEST).then(|| CmId { id: e.id, ch: self.clone() });
            // The kernel's CM hands them over from the receiver's side (its responder resources
            // are the peer's initiator depth, and the reverse): turned back to the peer's.
            let rd_atomic = match kind {
                cm_event::CONNECT_REQUEST | cm_event::CONNECT_RESPONSE => {
                    (conn.initiator_depth, conn.responder_resources)
                }
                _ => (0, 0),
            };
            let status = e.status;
            ffi::rdma_ack_cm_event(ev);
            Ok(Some(CmEvent { kind, name, status, private_data, new_id, rd_atomic }))
        }
    }
}

impl Drop for CmChannel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel holds an Arc of it, so none is alive now.
        unsafe { ffi::rdma_destroy_event_channel(self.ch) }
    }
}

/// The `sockaddr` form of a socket address, for librdmacm.
fn sockaddr(a: &std::net::SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage, and it is large enough and aligned for both
    // sockaddr_in and sockaddr_in6.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        std::net::SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: see above.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        std::net::SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: see above.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

/// What `connect`/`accept` tell the peer's connection manager.
#[derive(Debug, Clone, Copy)]
pub struct CmConnParam<'a> {
    pub qpn: u32,
    pub private_data: &'a [u8],
    /// RDMA READs this side serves / issues at once.
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
}

/// An rdma_cm identifier (TCP port space: reliable connected); destroyed on drop.
#[derive(Debug)]
pub struct CmId {
    id: *mut ffi::rdma_cm_id,
    ch: Arc<CmChannel>,
}

// SAFETY: librdmacm ids are thread-safe; freed only in Drop.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

impl CmId {
    pub fn create(ch: &Arc<CmChannel>) -> io::Result<CmId> {
        let mut id: *mut ffi::rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live; `id` is a valid out-pointer; a created id is destroyed
        // in Drop.
        let r = unsafe { ffi::rdma_create_id(ch.ch, &mut id, ptr::null_mut(), ffi::rdma_port_space::RDMA_PS_TCP) };
        if r != 0 || id.is_null() {
            return Err(errno());
        }
        Ok(CmId { id, ch: ch.clone() })
    }

    pub fn channel(&self) -> &Arc<CmChannel> {
        &self.ch
    }

    /// Moves the id's events to `ch` (a connection gets its own channel, apart from its
    /// listener's).
    pub fn migrate(&mut self, ch: &Arc<CmChannel>) -> io::Result<()> {
        // SAFETY: both the id and the channel are live.
        rc(unsafe { ffi::rdma_migrate_id(self.id, ch.ch) })?;
        self.ch = ch.clone();
        Ok(())
    }

    pub fn bind(&self, addr: &std::net::SocketAddr) -> io::Result<()> {
        let mut ss = sockaddr(addr);
        // SAFETY: the id is live; `ss` holds a valid sockaddr of its family for the call.
        rc(unsafe { ffi::rdma_bind_addr(self.id, (&mut ss as *mut libc::sockaddr_storage).cast()) })
    }

    pub fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: the id is live and bound.
        rc(unsafe { ffi::rdma_listen(self.id, backlog) })
    }

    /// The port the id is bound to (host order; 0 before it is bound). Read from the id's
    /// source address (the loader shim lacks `rdma_get_src_port`, which does the same).
    pub fn src_port(&self) -> u16 {
        // SAFETY: the id is live; its source address is a sockaddr of the family it names
        // (sin_port and sin6_port sit at the same offset, as rdma_get_src_port relies on).
        unsafe {
            let a = &(*self.id).route.addr.src_addr_union;
            match a.src_addr.sa_family as libc::c_int {
                libc::AF_INET => u16::from_be(a.src_sin.sin_port),
                libc::AF_INET6 => u16::from_be(a.src_sin6.sin6_port),
                _ => 0,
            }
        }
    }

    /// The peer's address (a connect request's source, a resolved destination).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        // SAFETY: the id is live; its destination address is a sockaddr of the family it names.
        unsafe {
            let a = &(*self.id).route.addr.dst_addr_union;
            match a.dst_addr.sa_family as libc::c_int {
                libc::AF_INET => {
                    let sin = a.dst_sin;
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    Some((ip, u16::from_be(sin.sin_port)).into())
                }
                libc::AF_INET6 => {
                    let sin6 = a.dst_sin6;
                    let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    Some(std::net::SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, sin6.sin6_scope_id).into())
                }
                _ => None,
            }
        }
    }

    pub fn resolve_addr(&self, dst: &std::net::SocketAddr, timeout_ms: i32) -> io::Result<()> {
        let mut ss = sockaddr(dst);
        // SAFETY: the id is live; `ss` is valid for the call; no source address.
        rc(unsafe {
            ffi::rdma_resolve_addr(
                self.id,
                ptr::null_mut(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                timeout_ms,
            )
        })
    }

    pub fn resolve_route(&self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: the id is live.
        rc(unsafe { ffi::rdma_resolve_route(self.id, timeout_ms) })
    }

    /// Name of the RDMA device the id is bound to (after address resolution or a connect
    /// request).
    pub fn device_name(&self) -> Option<String> {
        // SAFETY: the id is live; `verbs` is null or a context owned by librdmacm for the id's
        // life, whose device name is a NUL-terminated string.
        unsafe {
            let ctx = (*self.id).verbs;
            if ctx.is_null() {
                return None;
            }
            let p = ffi::ibv_get_device_name((*ctx).device);
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    fn param(p: &CmConnParam<'_>) -> io::Result<ffi::rdma_conn_param> {
        let len = u8::try_from(p.private_data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(ffi::rdma_conn_param {
            private_data: p.private_data.as_ptr().cast(),
            private_data_len: len,
            responder_resources: p.responder_resources,
            initiator_depth: p.initiator_depth,
            flow_control: 1,
            retry_count: p.retry_count,
            rnr_retry_count: p.rnr_retry_count,
            srq: 0,
            qp_num: p.qpn,
        })
    }

    /// Sends a connect request for the QP `p.qpn` (created and moved to INIT by the caller).
    pub fn connect(&self, p: &CmConnParam<'_>) -> io::Result<()> {
        let mut param = Self::param(p)?;
        // SAFETY: the id is live and route-resolved; `param` and its private data outlive the
        // call (the library copies them).
        rc(unsafe { ffi::rdma_connect(self.id, &mut param) })
    }

    /// Accepts a connect request for the QP `p.qpn` (moved to RTS by the caller).
    pub fn accept(&self, p: &CmConnParam<'_>) -> io::Result<()> {
        let mut param = Self::param(p)?;
        // SAFETY: as for connect.
        rc(unsafe { ffi::rdma_accept(self.id, &mut param) })
    }

    pub fn reject(&self, private_data: &[u8]) -> io::Result<()> {
        let len = u8::try_from(private_data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the id is live; the data outlives the call.
        rc(unsafe { ffi::rdma_reject(self.id, private_data.as_ptr().cast(), len) })
    }

    /// Tells the passive side's CM that the active side is ready (after a connect response,
    /// with the QP in RTS).
    pub fn establish(&self) -> io::Result<()> {
        // SAFETY: the id is live.
        rc(unsafe { ffi::rdma_establish(self.id) })
    }

    pub fn disconnect(&self) -> io::Result<()> {
        // SAFETY: the id is live.
        rc(unsafe { ffi::rdma_disconnect(self.id) })
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once; every event of the id was acknowledged when it
        // was read (`next_event`), so the call does not wait.
        let r = unsafe { ffi::rdma_destroy_id(self.id) };
        if r != 0 {
            tracing::debug!("rdma_destroy_id failed: {}", errno());
        }
    }
}

impl Qp {
    /// Moves the QP to `state` with the attributes the connection manager computed for `id`
    /// (path, GIDs, PSNs, remote QPN); `access` is ORed into the INIT access flags, and
    /// `ack_timeout` replaces the RTS local ACK timeout when given. Returns the remote end as
    /// the attributes name it (meaningful from RTR on).
    /// `rd_atomic` caps the READ depths the CM sets, as (responder resources, initiator depth):
    /// the CM takes them from the peer's request or answer, which need not fit this device or
    /// what this side agreed to.
    pub fn modify_by_cm(
        &self,
        id: &CmId,
        state: u32,
        access: u32,
        ack_timeout: Option<u8>,
        rd_atomic: (u8, u8),
    ) -> io::Result<CmRemote> {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = state;
        let mut mask: libc::c_int = 0;
        // SAFETY: the id is live and connected far enough for `state`; `a` and `mask` are valid
        // out-pointers.
        rc(unsafe { ffi::rdma_init_qp_attr(id.id, &mut a, &mut mask) })?;
        if state == ffi::ibv_qp_state::IBV_QPS_INIT {
            a.qp_access_flags |= access;
        }
        if let (Some(t), true) = (ack_timeout, state == ffi::ibv_qp_state::IBV_QPS_RTS) {
            a.timeout = t;
            mask |= ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT.0 as libc::c_int;
        }
        let has = |m: ffi::ibv_qp_attr_mask| mask & m.0 as libc::c_int != 0;
        if has(ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC) {
            a.max_dest_rd_atomic = a.max_dest_rd_atomic.min(rd_atomic.0);
        }
        if has(ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC) {
            a.max_rd_atomic = a.max_rd_atomic.min(rd_atomic.1);
        }
        // SAFETY: the QP is live; `a` and `mask` come from the CM for this state.
        rc(unsafe { ffi::ibv_modify_qp(self.qp, &mut a, mask) })?;
        Ok(CmRemote {
            qpn: a.dest_qp_num,
            psn: a.rq_psn,
            // SAFETY: every bit pattern of the union is a valid `raw` array.
            gid: unsafe { a.ah_attr.grh.dgid.raw },
            lid: a.ah_attr.dlid,
            mtu: a.path_mtu,
        })
    }
}

/// The remote end of a QP connected by rdma_cm, as its RTR attributes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmRemote {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
    pub mtu: u32,
}

/// The rdma_cm event kinds the crate waits for.
pub mod cm_event {
    use super::ffi::rdma_cm_event_type as E;
    pub const ADDR_RESOLVED: u32 = E::RDMA_CM_EVENT_ADDR_RESOLVED;
    pub const ROUTE_RESOLVED: u32 = E::RDMA_CM_EVENT_ROUTE_RESOLVED;
    pub const CONNECT_REQUEST: u32 = E::RDMA_CM_EVENT_CONNECT_REQUEST;
    pub const CONNECT_RESPONSE: u32 = E::RDMA_CM_EVENT_CONNECT_RESPONSE;
    pub const REJECTED: u32 = E::RDMA_CM_EVENT_REJECTED;
    pub const ESTABLISHED: u32 = E::RDMA_CM_EVENT_ESTABLISHED;
    pub const DISCONNECTED: u32 = E::RDMA_CM_EVENT_DISCONNECTED;
    pub const DEVICE_REMOVAL: u32 = E::RDMA_CM_EVENT_DEVICE_REMOVAL;
}

/// Access flag bits, as libibverbs defines them.
pub mod access {
    use super::ffi::ibv_access_flags as A;
    pub const LOCAL_WRITE: u32 = A::IBV_ACCESS_LOCAL_WRITE.0;
    pub const REMOTE_WRITE: u32 = A::IBV_ACCESS_REMOTE_WRITE.0;
    pub const REMOTE_READ: u32 = A::IBV_ACCESS_REMOTE_READ.0;
    pub const ZERO_BASED: u32 = A::IBV_ACCESS_ZERO_BASED.0;
}

/// The QP state values the crate moves through.
pub mod qp_state {
    use super::ffi::ibv_qp_state as S;
    pub const INIT: u32 = S::IBV_QPS_INIT;
    pub const RTR: u32 = S::IBV_QPS_RTR;
    pub const RTS: u32 = S::IBV_QPS_RTS;
}

#[repr(C)]
struct UdmabufCreate {
    memfd: u32,
    flags: u32,
    offset: u64,
    size: u64,
}
/// `_IOW('u', 0x42, struct udmabuf_create)`.
const UDMABUF_CREATE: rustix::ioctl::Opcode = rustix::ioctl::opcode::write::<UdmabufCreate>(b'u', 0x42);
const UDMABUF_FLAGS_CLOEXEC: u32 = 1;

/// A dma-buf over `size` bytes at `offset` of `memfd`, from `/dev/udmabuf`.
pub fn udmabuf_create(memfd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/udmabuf")?;
    let arg = UdmabufCreate { memfd: memfd.as_raw_fd() as u32, flags: UDMABUF_FLAGS_CLOEXEC, offset, size };
    // SAFETY: the ioctl reads a valid udmabuf_create struct; a non-negative return is a new
    // dma-buf fd we own.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE as _, &arg) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udmabuf_ioctl_number_matches_the_kernel_uapi() {
        // _IOW('u', 0x42, struct udmabuf_create) with a 24-byte struct.
        assert_eq!(std::mem::size_of::<UdmabufCreate>(), 24);
        assert_eq!(UDMABUF_CREATE as u64, 0x4018_7542);
    }
}
