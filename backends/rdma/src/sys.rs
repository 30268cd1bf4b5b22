//! Raw verbs, and the few other system calls this backend needs (memfd seals, udmabuf).
//!
//! Owns: every `unsafe` block of the crate. Each verbs object here owns its handle and releases
//! it on `Drop` (MR before PD, QP before its CQs, everything before the device context: each
//! holds an `Arc` of what it was created from). Errors come back as `io::Error` carrying the
//! errno the library set. Must not: choose routes, retry, log at more than debug level, or panic.
//!
//! libibverbs is reached through `rdma-mummy-sys`, which `dlopen`s `libibverbs.so.1` when the
//! process starts: without the library every call fails with an errno instead of the binary not
//! starting, and `library_present` tells the two cases apart.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::Arc;

use peermem::PeerMemory;
use rdma_mummy_sys as ffi;

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
    pub gid_tbl_len: i32,
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

    pub fn name(&self) -> &str {
        &self.name
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
            gid_tbl_len: a.gid_tbl_len,
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

/// An asynchronous event of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncEvent {
    pub kind: u32,
    pub name: String,
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

    /// `ibv_reg_mr` on `len` bytes of this process's address space at `addr`. The kernel pins
    /// the pages until the MR is deregistered, so a stale VA can never make the NIC reach pages
    /// reused elsewhere; the caller keeps the mapping alive to see the data.
    pub fn reg_mr(self: &Arc<Self>, region: &Arc<dyn PeerMemory>, access: u32) -> io::Result<Mr> {
        let span = region.cpu_mapping().ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let len =
            usize::try_from(region.len().min(span.len())).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let addr = span.addr().raw() as usize as *mut libc::c_void;
        // SAFETY: `addr..addr+len` is the region's CPU mapping (borrowed above); the MR keeps an
        // Arc of the region, so the mapping outlives the registration; the kernel validates the
        // range (EFAULT when it cannot pin it); the PD is live.
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
    pub len: usize,
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
        let (lkey, rkey, addr, len) = unsafe { ((*mr).lkey, (*mr).rkey, (*mr).addr as u64, (*mr).length) };
        Ok(Mr { mr, lkey, rkey, addr, len, _pd: pd.clone(), _dm: dm, _region: None })
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

/// One work completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wc {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub qp_num: u32,
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

    /// Moves the QP to the error state: outstanding work requests complete flushed.
    pub fn to_error(&self) -> io::Result<()> {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ffi::ibv_qp_attr_mask::IBV_QP_STATE)
    }

    /// Current state (`ibv_qp_state` value).
    pub fn state(&self) -> io::Result<u32> {
        // SAFETY: all-zero structs are valid out-parameters; the QP is live.
        let mut a: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        rc(unsafe { ffi::ibv_query_qp(self.qp, &mut a, ffi::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32, &mut init) })?;
        Ok(a.qp_state)
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

/// Access flag bits, as libibverbs defines them.
pub mod access {
    use super::ffi::ibv_access_flags as A;
    pub const LOCAL_WRITE: u32 = A::IBV_ACCESS_LOCAL_WRITE.0;
    pub const REMOTE_WRITE: u32 = A::IBV_ACCESS_REMOTE_WRITE.0;
    pub const REMOTE_READ: u32 = A::IBV_ACCESS_REMOTE_READ.0;
    pub const ZERO_BASED: u32 = A::IBV_ACCESS_ZERO_BASED.0;
}

/// QP state values.
pub mod qp_state {
    use super::ffi::ibv_qp_state as S;
    pub const RTS: u32 = S::IBV_QPS_RTS;
    pub const ERR: u32 = S::IBV_QPS_ERR;
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
