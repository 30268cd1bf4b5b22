//! Connection management with rdma_cm (librdmacm): the client resolves the peer's IP address
//! and route to an RDMA device and port, the server listens on a port and accepts; each side
//! creates its own RC queue pair on its `Nic` and moves it through the states with the
//! attributes the connection manager computes (no QP details cross a side channel). The
//! server's accept carries an offer (a `RemoteBuf`) in its private data. A peer's disconnect
//! (or the end of its process, which closes its ids) arrives as an event and becomes
//! `RdmaError::PeerDisconnected` in the connection's waits.
//!
//! Owns: `CmListener`, `Connection::connect_cm` (the private-data bytes are `offer`'s). Must
//! not: wait without a deadline, or accept a request that arrived on a device other than the
//! caller's `Nic`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{ConnectOpts, Connection, Ctrl, Endpoint};
use crate::device::Nic;
use crate::error::RdmaError;
use crate::mr::RemoteBuf;
use crate::offer::offer_bytes;
pub use crate::offer::REFUSAL;
use crate::sys::{self, cm_event, qp_state, CmChannel, CmConnParam, CmEvent, CmId};

fn ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1)
}

/// Waits until `deadline` for the next event on `ch`.
fn next(ch: &Arc<CmChannel>, peer: &str, deadline: Instant, waiting_for: &str) -> Result<CmEvent, RdmaError> {
    let left = deadline.saturating_duration_since(Instant::now());
    match ch.next_event(left) {
        Ok(Some(ev)) => {
            tracing::debug!(%peer, event = %ev.name, status = ev.status, "rdma_cm event");
            Ok(ev)
        }
        Ok(None) => Err(RdmaError::Timeout { what: format!("{waiting_for} from {peer}"), ms: left.as_millis() }),
        Err(source) => Err(RdmaError::Cm { peer: peer.into(), what: "rdma_get_cm_event", source }),
    }
}

/// Turns an event that is not `want` into the error it means.
fn expect(ev: CmEvent, want: u32, peer: &str) -> Result<CmEvent, RdmaError> {
    if ev.kind == want {
        return Ok(ev);
    }
    Err(match ev.kind {
        cm_event::REJECTED => RdmaError::Rejected { peer: peer.into(), status: ev.status },
        cm_event::DISCONNECTED | cm_event::DEVICE_REMOVAL => RdmaError::PeerDisconnected { peer: peer.into() },
        _ => RdmaError::Unreachable { peer: peer.into(), event: ev.name, status: ev.status },
    })
}

fn same_device(id: &CmId, nic: &Nic, peer: &str) -> Result<(), RdmaError> {
    match id.device_name() {
        Some(d) if d == nic.name() => Ok(()),
        Some(d) => Err(RdmaError::OtherDevice { peer: peer.into(), via: d.to_string(), wanted: nic.name().into() }),
        None => Err(RdmaError::Invalid(format!("rdma_cm bound {peer} to no RDMA device"))),
    }
}

/// Send CQ, receive CQ and an RC QP on `nic`.
fn new_qp(nic: &Nic, opts: &ConnectOpts) -> Result<(sys::Qp, Arc<sys::Cq>, Arc<sys::Cq>), RdmaError> {
    let ctx = nic.pd.context();
    let scq = sys::Cq::create(ctx, opts.max_send_wr as i32).map_err(nic.verbs_err("ibv_create_cq"))?;
    let rcq = sys::Cq::create(ctx, opts.max_recv_wr as i32).map_err(nic.verbs_err("ibv_create_cq"))?;
    let qp = sys::Qp::create_rc(&nic.pd, &scq, &rcq, opts.max_send_wr, opts.max_recv_wr)
        .map_err(nic.verbs_err("ibv_create_qp"))?;
    Ok((qp, scq, rcq))
}

/// The QP allows every remote operation: each MR's own access flags decide.
const QP_ACCESS: u32 = sys::access::REMOTE_WRITE | sys::access::REMOTE_READ | sys::access::LOCAL_WRITE;

/// Moves `qp` to `state` with the attributes the CM gives, its READ depths capped by `depth`.
fn to_state(
    qp: &sys::Qp,
    id: &CmId,
    nic: &Nic,
    state: u32,
    opts: &ConnectOpts,
    depth: (u8, u8),
) -> Result<Endpoint, RdmaError> {
    let what = match state {
        qp_state::INIT => "ibv_modify_qp(INIT) by rdma_cm",
        qp_state::RTR => "ibv_modify_qp(RTR) by rdma_cm",
        _ => "ibv_modify_qp(RTS) by rdma_cm",
    };
    let r = qp.modify_by_cm(id, state, QP_ACCESS, Some(opts.ack_timeout), depth).map_err(nic.verbs_err(what))?;
    Ok(Endpoint { qpn: r.qpn, psn: r.psn, gid: r.gid, lid: r.lid, mtu: r.mtu, rd_atomic: (0, 0) })
}

fn param<'a>(qp: &sys::Qp, opts: &ConnectOpts, depth: (u8, u8), private_data: &'a [u8]) -> CmConnParam<'a> {
    let (responder_resources, initiator_depth) = depth;
    CmConnParam {
        qpn: qp.qpn,
        private_data,
        responder_resources,
        initiator_depth,
        retry_count: opts.retry_cnt.min(7),
        rnr_retry_count: 7,
    }
}

impl Connection {
    /// Connects to a server listening at `addr` (an IP address of the peer's RDMA device) with
    /// rdma_cm. Every step (address, route, the server's answer) is bounded by `opts.timeout`.
    /// Errors: `Unreachable` (no route, no answer), `Rejected` (nobody listens, or the server
    /// refused), `OtherDevice` (`addr` is reached through another device than `nic`), `Timeout`.
    pub fn connect_cm(nic: &Nic, addr: SocketAddr, opts: ConnectOpts) -> Result<Connection, RdmaError> {
        Self::connect_cm_with(nic, addr, opts, &[])
    }

    /// As `connect_cm`, sending `private` (at most `MAX_PRIVATE` bytes) with the request: the
    /// server's `Connection::private_data`.
    pub fn connect_cm_with(
        nic: &Nic,
        addr: SocketAddr,
        opts: ConnectOpts,
        private: &[u8],
    ) -> Result<Connection, RdmaError> {
        if private.len() > MAX_PRIVATE {
            return Err(RdmaError::Invalid(format!(
                "{} bytes of private data: a connect request carries at most {MAX_PRIVATE}",
                private.len()
            )));
        }
        let peer = addr.to_string();
        let cm = |what| {
            let peer = peer.clone();
            move |source| RdmaError::Cm { peer, what, source }
        };
        let deadline = Instant::now() + opts.timeout;
        let ch = CmChannel::create().map_err(cm("rdma_create_event_channel"))?;
        let id = CmId::create(&ch).map_err(cm("rdma_create_id"))?;
        // The CM's own resolution limit ends before ours, so an address nobody answers for is
        // reported as the CM saw it (ADDR_ERROR: Unreachable) rather than as our timeout.
        id.resolve_addr(&addr, ms(opts.timeout * 3 / 4)).map_err(cm("rdma_resolve_addr"))?;
        expect(next(&ch, &peer, deadline, "address resolution")?, cm_event::ADDR_RESOLVED, &peer)?;
        same_device(&id, nic, &peer)?;
        let left = deadline.saturating_duration_since(Instant::now());
        id.resolve_route(ms(left * 3 / 4)).map_err(cm("rdma_resolve_route"))?;
        expect(next(&ch, &peer, deadline, "route resolution")?, cm_event::ROUTE_RESOLVED, &peer)?;

        let (qp, scq, rcq) = new_qp(nic, &opts)?;
        let depth = crate::conn::rd_atomic(nic, &opts);
        to_state(&qp, &id, nic, qp_state::INIT, &opts, depth)?;
        id.connect(&param(&qp, &opts, depth, private)).map_err(cm("rdma_connect"))?;
        let ev = expect(next(&ch, &peer, deadline, "the server's answer")?, cm_event::CONNECT_RESPONSE, &peer)?;
        // The server's answer sets the depths; a server that ignored the request's is held
        // to it here.
        let remote = Endpoint { rd_atomic: ev.rd_atomic, ..to_state(&qp, &id, nic, qp_state::RTR, &opts, depth)? };
        to_state(&qp, &id, nic, qp_state::RTS, &opts, depth)?;
        id.establish().map_err(cm("rdma_establish"))?;
        tracing::debug!(dev = nic.name(), qpn = qp.qpn, %peer, "rdma_cm connection up (active side)");
        Ok(Connection::from_parts(
            nic,
            (qp, scq, rcq),
            Ctrl::Cm { id, offer: ev.private_data, disconnected: false },
            peer,
            opts,
            remote,
        ))
    }
}

/// A connect request: its id, its private data and its READ depths.
struct Request {
    id: CmId,
    private: Vec<u8>,
    rd_atomic: (u8, u8),
}

/// The most private data a connect request carries (RoCE and InfiniBand: 56 bytes).
pub const MAX_PRIVATE: usize = 56;

/// An rdma_cm listener on one IP address and port.
#[derive(Debug)]
pub struct CmListener {
    id: CmId,
    addr: SocketAddr,
}

impl CmListener {
    /// Listens on `addr` (port 0: the CM picks one, see `port`).
    pub fn bind(addr: SocketAddr) -> Result<CmListener, RdmaError> {
        let cm = |what| move |source| RdmaError::Cm { peer: addr.to_string(), what, source };
        let ch = CmChannel::create().map_err(cm("rdma_create_event_channel"))?;
        let id = CmId::create(&ch).map_err(cm("rdma_create_id"))?;
        id.bind(&addr).map_err(cm("rdma_bind_addr"))?;
        id.listen(8).map_err(cm("rdma_listen"))?;
        let addr = SocketAddr::new(addr.ip(), id.src_port());
        Ok(CmListener { id, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next connect request and its private data, waiting until `deadline`; other events
    /// are logged and skipped.
    fn request(&self, deadline: Instant) -> Result<Request, RdmaError> {
        let me = self.addr.to_string();
        loop {
            let ev = next(self.id.channel(), &me, deadline, "a connect request")?;
            if let Some(id) = ev.new_id {
                return Ok(Request { id, private: ev.private_data, rd_atomic: ev.rd_atomic });
            }
        }
    }

    /// Accepts one client within `opts.timeout`, offering it `offer` (what it may RDMA
    /// READ/WRITE: the client's `expect_remote`). A request that came in on another device than
    /// `nic` is rejected and reported as `OtherDevice`.
    pub fn accept(&self, nic: &Nic, opts: ConnectOpts, offer: Option<RemoteBuf>) -> Result<Connection, RdmaError> {
        self.accept_within(nic, opts, offer, opts.timeout)
    }

    /// As `accept`, waiting at most `wait` for the request (then `opts.timeout` for each step
    /// after it): a server polls its listener with a short `wait`. The request's private data
    /// is the connection's `private_data`.
    pub fn accept_within(
        &self,
        nic: &Nic,
        opts: ConnectOpts,
        offer: Option<RemoteBuf>,
        wait: Duration,
    ) -> Result<Connection, RdmaError> {
        let Request { mut id, private, rd_atomic: asked } = self.request(Instant::now() + wait)?;
        let deadline = Instant::now() + opts.timeout;
        let peer = match id.peer_addr() {
            Some(a) => format!("{a} (client of {})", self.addr),
            None => format!("client of {}", self.addr),
        };
        let cm = |what| {
            let peer = peer.clone();
            move |source| RdmaError::Cm { peer, what, source }
        };
        if let Err(e) = same_device(&id, nic, &peer) {
            let _ = id.reject(REFUSAL);
            return Err(e);
        }
        // The connection's events on a channel of its own, apart from further requests.
        let ch = CmChannel::create().map_err(cm("rdma_create_event_channel"))?;
        id.migrate(&ch).map_err(cm("rdma_migrate_id"))?;
        let (qp, scq, rcq) = new_qp(nic, &opts)?;
        let depth = crate::conn::negotiate(crate::conn::rd_atomic(nic, &opts), asked);
        to_state(&qp, &id, nic, qp_state::INIT, &opts, depth)?;
        let remote = Endpoint { rd_atomic: asked, ..to_state(&qp, &id, nic, qp_state::RTR, &opts, depth)? };
        to_state(&qp, &id, nic, qp_state::RTS, &opts, depth)?;
        let data = offer.map(offer_bytes);
        let p = param(&qp, &opts, depth, data.as_ref().map_or(&[][..], |d| &d[..]));
        id.accept(&p).map_err(cm("rdma_accept"))?;
        expect(next(&ch, &peer, deadline, "the connection to be established")?, cm_event::ESTABLISHED, &peer)?;
        tracing::debug!(dev = nic.name(), qpn = qp.qpn, %peer, "rdma_cm connection up (passive side)");
        Ok(Connection::from_parts(
            nic,
            (qp, scq, rcq),
            Ctrl::Cm { id, offer: private, disconnected: false },
            peer,
            opts,
            remote,
        ))
    }

    /// Refuses the next connect request (within `timeout`): the client gets `Rejected`.
    pub fn reject_next(&self, timeout: Duration) -> Result<(), RdmaError> {
        let Request { id, .. } = self.request(Instant::now() + timeout)?;
        id.reject(REFUSAL).map_err(|source| RdmaError::Cm { peer: self.addr.to_string(), what: "rdma_reject", source })
    }
}
