//! The data path: one reliable-connected queue pair per connection, set up either by rdma_cm
//! (see `cm`: the standard connection manager, address and route resolution, disconnect events)
//! or by exchanging QP attributes over a TCP stream (kept for a peer without an IP address on
//! the RDMA device: rxe on a link with only a link-local IPv6 GID, where rdma_cm needs a scope;
//! the stream stays open for small messages such as a `RemoteBuf`), RDMA WRITE / READ /
//! SEND-RECV, and completion polling with bounded waits.
//!
//! Owns: `Connection`, `ConnectOpts`, `Endpoint`. Must not: wait without a deadline, or leave a
//! QP behind (the QP is destroyed before its CQs when the connection drops).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::Nic;
use crate::error::{RdmaError, WcError};
use crate::event::Wc;
use crate::mr::{NicMr, RemoteBuf};
use crate::sys::{self, SendOp};

/// A completion: its work request id, and the request's result.
pub type Outcome = (u64, Result<Wc, WcError>);

/// READs in flight per queue pair as (responder, initiator) this side offers: `opts.rd_atomic`
/// within what the device takes (1 when it cannot be asked).
pub(crate) fn rd_atomic(nic: &Nic, opts: &ConnectOpts) -> (u8, u8) {
    let want = opts.rd_atomic.max(1);
    match nic.pd.context().rd_atom() {
        Ok((resp, init)) => (want.min(resp.max(1)), want.min(init.max(1))),
        Err(_) => (1, 1),
    }
}

/// The READ depths a side sets once it knows the peer's offer, both as (responder resources,
/// initiator depth): no more READs served than the peer issues, none issued beyond what the
/// peer serves, neither beyond this side's own offer.
pub(crate) fn negotiate(own: (u8, u8), peer: (u8, u8)) -> (u8, u8) {
    (own.0.min(peer.1), own.1.min(peer.0))
}

/// Connection parameters.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOpts {
    /// Bound on every wait: the exchange, each completion, each out-of-band message.
    pub timeout: Duration,
    /// Local GID index (rxe: 0 is the link-local IPv6 GID).
    pub gid_index: u8,
    /// Local ACK timeout exponent (4.096 us * 2^n) and transport retries: how soon a vanished
    /// peer turns into a `retry exceeded` completion.
    pub ack_timeout: u8,
    pub retry_cnt: u8,
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// RDMA READs (and atomics) in flight per queue pair, as initiator and as responder, capped
    /// by the device (with one, each READ waits for the previous one's response). This is an
    /// offer: the connection serves no more than the peer issues and issues no more than the
    /// peer serves (`Connection::rd_atomic` says what was agreed).
    pub rd_atomic: u8,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            timeout: Duration::from_secs(10),
            gid_index: 0,
            ack_timeout: 14,
            retry_cnt: 7,
            max_send_wr: 128,
            max_recv_wr: 128,
            rd_atomic: 16,
        }
    }
}

/// What one side tells the other to connect its QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
    pub mtu: u32,
    /// The READ depths the side offers, as (responder resources, initiator depth).
    pub rd_atomic: (u8, u8),
}

const MAGIC: &[u8; 4] = b"PMR2";

/// Bytes of an endpoint on the wire.
pub const ENDPOINT_LEN: usize = 36;

impl Endpoint {
    pub fn to_bytes(self) -> [u8; ENDPOINT_LEN] {
        let mut b = [0u8; ENDPOINT_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.qpn.to_le_bytes());
        b[8..12].copy_from_slice(&self.psn.to_le_bytes());
        b[12..28].copy_from_slice(&self.gid);
        b[28..30].copy_from_slice(&self.lid.to_le_bytes());
        b[30..34].copy_from_slice(&self.mtu.to_le_bytes());
        b[34] = self.rd_atomic.0;
        b[35] = self.rd_atomic.1;
        b
    }

    pub fn from_bytes(b: &[u8; ENDPOINT_LEN]) -> Result<Endpoint, RdmaError> {
        if &b[..4] != MAGIC {
            return Err(RdmaError::Invalid(format!("peer sent {:02x?} instead of a peermem endpoint", &b[..4])));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[12..28]);
        let ep = Endpoint {
            qpn: u32_at(4),
            psn: u32_at(8),
            gid,
            lid: u16::from_le_bytes([b[28], b[29]]),
            mtu: u32_at(30),
            rd_atomic: (b[34], b[35]),
        };
        if ep.qpn == 0 || ep.qpn > 0xff_ffff || ep.psn > 0xff_ffff || !(1..=5).contains(&ep.mtu) {
            return Err(RdmaError::Invalid(format!("peer endpoint out of range: {ep:?}")));
        }
        Ok(ep)
    }
}

/// A local buffer for a work request: `len` bytes at `offset` of a registered region.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    pub mr: &'a NicMr,
    pub offset: u64,
    pub len: u32,
}

impl<'a> Local<'a> {
    pub fn new(mr: &'a NicMr, offset: u64, len: u32) -> Result<Local<'a>, RdmaError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= mr.len() => Ok(Local { mr, offset, len }),
            _ => Err(RdmaError::Invalid(format!(
                "{len} bytes at {offset:#x} do not fit the {:#x}-byte registration",
                mr.len()
            ))),
        }
    }
    /// All of `mr`, when it fits one work request.
    pub fn all(mr: &'a NicMr) -> Result<Local<'a>, RdmaError> {
        let len =
            u32::try_from(mr.len()).map_err(|_| RdmaError::Invalid("region too large for one work request".into()))?;
        Local::new(mr, 0, len)
    }
}

/// How a connection was set up, and what carries its control traffic.
pub(crate) enum Ctrl {
    /// QP attributes exchanged over TCP; the stream stays open for out-of-band messages.
    Tcp(TcpStream),
    /// Connected by rdma_cm: `id` reports the peer's disconnect; `offer` is the private data
    /// the other side sent (with its accept on the active side, with its request on the
    /// passive side).
    Cm { id: sys::CmId, offer: Vec<u8>, disconnected: bool },
}

/// One RC connection. Dropping it destroys the QP, then the CQs (and, for an rdma_cm
/// connection, the id, which tells the peer).
pub struct Connection {
    qp: sys::Qp,
    scq: Arc<sys::Cq>,
    rcq: Arc<sys::Cq>,
    ctrl: Ctrl,
    peer: String,
    dev: String,
    opts: ConnectOpts,
    next_wr: u64,
    pending: HashMap<u64, &'static str>,
    remote: Endpoint,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("dev", &self.dev)
            .field("qpn", &self.qp.qpn)
            .field("peer", &self.peer)
            .finish()
    }
}

fn psn() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(7);
    (t ^ std::process::id().rotate_left(8)) & 0xff_ffff
}

impl Connection {
    /// Connects to a peer listening at `addr` (the out-of-band channel).
    pub fn connect(nic: &Nic, addr: impl ToSocketAddrs, opts: ConnectOpts) -> Result<Connection, RdmaError> {
        let ex = |source| RdmaError::Exchange { peer: "connect".into(), source };
        let mut last = None;
        for a in addr.to_socket_addrs().map_err(ex)? {
            match TcpStream::connect_timeout(&a, opts.timeout) {
                Ok(s) => return Self::establish(nic, s, opts, true),
                Err(e) => last = Some(e),
            }
        }
        Err(ex(last.unwrap_or_else(|| std::io::Error::other("no address to connect to"))))
    }

    /// Accepts one peer on `listener`, waiting at most `opts.timeout`.
    pub fn accept(nic: &Nic, listener: &TcpListener, opts: ConnectOpts) -> Result<Connection, RdmaError> {
        let ex = |source| RdmaError::Exchange { peer: "accept".into(), source };
        listener.set_nonblocking(true).map_err(ex)?;
        let deadline = Instant::now() + opts.timeout;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(RdmaError::Timeout {
                            what: "a peer to connect".into(),
                            ms: opts.timeout.as_millis(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(ex(e)),
            }
        };
        stream.set_nonblocking(false).map_err(ex)?;
        Self::establish(nic, stream, opts, false)
    }

    fn establish(nic: &Nic, mut stream: TcpStream, opts: ConnectOpts, client: bool) -> Result<Connection, RdmaError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let ex = |source| RdmaError::Exchange { peer: peer.clone(), source };
        stream.set_read_timeout(Some(opts.timeout)).map_err(ex)?;
        stream.set_write_timeout(Some(opts.timeout)).map_err(ex)?;
        stream.set_nodelay(true).map_err(ex)?;
        let ctx = nic.pd.context();
        let scq = sys::Cq::create(ctx, opts.max_send_wr as i32).map_err(nic.verbs_err("ibv_create_cq"))?;
        let rcq = sys::Cq::create(ctx, opts.max_recv_wr as i32).map_err(nic.verbs_err("ibv_create_cq"))?;
        let qp = sys::Qp::create_rc(&nic.pd, &scq, &rcq, opts.max_send_wr, opts.max_recv_wr)
            .map_err(nic.verbs_err("ibv_create_qp"))?;
        let port = nic.port;
        // The QP allows every remote operation: each MR's own access flags decide.
        qp.to_init(port.port, sys::access::REMOTE_WRITE | sys::access::REMOTE_READ | sys::access::LOCAL_WRITE)
            .map_err(nic.verbs_err("ibv_modify_qp(INIT)"))?;
        let local = Endpoint {
            qpn: qp.qpn,
            psn: psn(),
            gid: nic.gid(opts.gid_index as i32)?,
            lid: port.lid,
            mtu: port.active_mtu,
            rd_atomic: rd_atomic(nic, &opts),
        };
        let mut buf = [0u8; ENDPOINT_LEN];
        if client {
            stream.write_all(&local.to_bytes()).map_err(ex)?;
            stream.read_exact(&mut buf).map_err(ex)?;
        } else {
            stream.read_exact(&mut buf).map_err(ex)?;
            stream.write_all(&local.to_bytes()).map_err(ex)?;
        }
        let remote = Endpoint::from_bytes(&buf)?;
        let depth = negotiate(local.rd_atomic, remote.rd_atomic);
        qp.to_rtr(&sys::RtrAttr {
            port: port.port,
            sgid_index: opts.gid_index,
            mtu: local.mtu.min(remote.mtu),
            dest_qpn: remote.qpn,
            rq_psn: remote.psn,
            dgid: remote.gid,
            dlid: remote.lid,
            max_dest_rd_atomic: depth.0,
            min_rnr_timer: 12,
        })
        .map_err(nic.verbs_err("ibv_modify_qp(RTR)"))?;
        qp.to_rts(&sys::RtsAttr {
            sq_psn: local.psn,
            timeout: opts.ack_timeout,
            retry_cnt: opts.retry_cnt,
            rnr_retry: 7,
            max_rd_atomic: depth.1,
        })
        .map_err(nic.verbs_err("ibv_modify_qp(RTS)"))?;
        let mut conn = Connection {
            qp,
            scq,
            rcq,
            ctrl: Ctrl::Tcp(stream),
            peer: peer.clone(),
            dev: nic.name().to_string(),
            opts,
            next_wr: 1,
            pending: HashMap::new(),
            remote,
        };
        // Both sides are in RTS before either posts.
        conn.send_oob(b"R")?;
        let mut ack = [0u8; 1];
        conn.recv_oob(&mut ack)?;
        tracing::debug!(dev = %conn.dev, qpn = conn.qp.qpn, remote_qpn = remote.qpn, %peer, "RC connection up");
        Ok(conn)
    }

    pub fn qpn(&self) -> u32 {
        self.qp.qpn
    }
    pub fn remote_endpoint(&self) -> Endpoint {
        self.remote
    }
    /// The READs the QP serves and issues at once, as (responder resources, initiator depth):
    /// what the two sides agreed, within each device's limits.
    pub fn rd_atomic(&self) -> Result<(u8, u8), RdmaError> {
        self.qp.rd_atomic().map_err(|source| RdmaError::Verbs { dev: self.dev.clone(), what: "ibv_query_qp", source })
    }

    /// True while the QP can send (not moved to the error state by a failed completion).
    pub fn is_ready(&self) -> bool {
        matches!(self.qp.state(), Ok(s) if s == sys::qp_state::RTS)
    }

    pub(crate) fn from_parts(
        nic: &Nic,
        (qp, scq, rcq): (sys::Qp, Arc<sys::Cq>, Arc<sys::Cq>),
        ctrl: Ctrl,
        peer: String,
        opts: ConnectOpts,
        remote: Endpoint,
    ) -> Connection {
        Connection {
            qp,
            scq,
            rcq,
            ctrl,
            peer,
            dev: nic.name().to_string(),
            opts,
            next_wr: 1,
            pending: HashMap::new(),
            remote,
        }
    }

    /// The peer: its TCP address, or the address given to rdma_cm.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The private data the other side sent with its rdma_cm request (passive side) or accept
    /// (active side); empty for a TCP-connected peer.
    pub fn private_data(&self) -> &[u8] {
        match &self.ctrl {
            Ctrl::Cm { offer, .. } => offer,
            Ctrl::Tcp(_) => &[],
        }
    }

    /// True when rdma_cm set the connection up.
    pub fn is_cm(&self) -> bool {
        matches!(self.ctrl, Ctrl::Cm { .. })
    }

    fn stream(&mut self) -> Result<&mut TcpStream, RdmaError> {
        match &mut self.ctrl {
            Ctrl::Tcp(s) => Ok(s),
            Ctrl::Cm { .. } => Err(RdmaError::Invalid(format!(
                "the rdma_cm connection to {} has no out-of-band stream: use SEND/RECV on the queue pair",
                self.peer
            ))),
        }
    }

    /// Sends a small message on the out-of-band channel (TCP-connected only).
    pub fn send_oob(&mut self, data: &[u8]) -> Result<(), RdmaError> {
        let len = u32::try_from(data.len()).map_err(|_| RdmaError::Invalid("out-of-band message too long".into()))?;
        let peer = self.peer.clone();
        let ex = |source| RdmaError::Exchange { peer: peer.clone(), source };
        let stream = self.stream()?;
        stream.write_all(&len.to_le_bytes()).map_err(ex)?;
        stream.write_all(data).map_err(ex)
    }

    /// Receives one out-of-band message into `buf` (its length must match exactly; TCP-connected
    /// only).
    pub fn recv_oob(&mut self, buf: &mut [u8]) -> Result<(), RdmaError> {
        let peer = self.peer.clone();
        let ex = |source| RdmaError::Exchange { peer: peer.clone(), source };
        let stream = self.stream()?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).map_err(ex)?;
        let len = u32::from_le_bytes(len) as usize;
        if len != buf.len() {
            return Err(RdmaError::Invalid(format!("out-of-band message of {len} bytes, expected {}", buf.len())));
        }
        stream.read_exact(buf).map_err(ex)
    }

    /// Tells the peer where it may RDMA READ/WRITE (TCP-connected only: an rdma_cm server
    /// offers its buffer with the accept, see `CmListener::accept`).
    pub fn advertise(&mut self, buf: RemoteBuf) -> Result<(), RdmaError> {
        self.send_oob(&buf.to_bytes())
    }

    /// The peer's buffer: its `advertise` (TCP), or the offer that came with the accept
    /// (rdma_cm).
    pub fn expect_remote(&mut self) -> Result<RemoteBuf, RdmaError> {
        if let Ctrl::Cm { offer, .. } = &self.ctrl {
            return crate::offer::parse_offer(offer).ok_or_else(|| {
                RdmaError::Invalid(format!(
                    "{} accepted without offering a buffer ({} bytes of private data)",
                    self.peer,
                    offer.len()
                ))
            });
        }
        let mut b = [0u8; 20];
        self.recv_oob(&mut b)?;
        Ok(RemoteBuf::from_bytes(b))
    }

    /// Reads pending rdma_cm events without blocking: the peer's disconnect becomes
    /// `PeerDisconnected` (now and on every later call). A TCP-connected peer has no such events.
    pub fn check_peer(&mut self) -> Result<(), RdmaError> {
        let Ctrl::Cm { id, disconnected, .. } = &mut self.ctrl else { return Ok(()) };
        while !*disconnected {
            let ev = id.channel().next_event(Duration::ZERO).map_err(|source| RdmaError::Cm {
                peer: self.peer.clone(),
                what: "rdma_get_cm_event",
                source,
            })?;
            let Some(ev) = ev else { break };
            tracing::debug!(peer = %self.peer, event = %ev.name, status = ev.status, "rdma_cm event");
            if ev.kind == sys::cm_event::DISCONNECTED || ev.kind == sys::cm_event::DEVICE_REMOVAL {
                *disconnected = true;
            }
        }
        if *disconnected {
            return Err(RdmaError::PeerDisconnected { peer: self.peer.clone() });
        }
        Ok(())
    }

    /// Ends an rdma_cm connection: the peer sees `PeerDisconnected`. (Dropping the connection
    /// does the same.) Nothing to do for a TCP-connected one.
    pub fn disconnect(&mut self) -> Result<(), RdmaError> {
        if let Ctrl::Cm { id, disconnected, .. } = &mut self.ctrl {
            if !*disconnected {
                id.disconnect().map_err(|source| RdmaError::Cm {
                    peer: self.peer.clone(),
                    what: "rdma_disconnect",
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn post(&mut self, op: SendOp, name: &'static str, local: Local<'_>) -> Result<u64, RdmaError> {
        let wr = self.next_wr;
        self.next_wr += 1;
        self.qp
            .post_send(wr, op, local.mr.addr() + local.offset, local.len, local.mr.lkey())
            .map_err(|source| RdmaError::Verbs { dev: self.dev.clone(), what: "ibv_post_send", source })?;
        self.pending.insert(wr, name);
        Ok(wr)
    }

    fn check_remote(remote: RemoteBuf, len: u32) -> Result<(), RdmaError> {
        if (len as u64) > remote.len {
            return Err(RdmaError::Invalid(format!("{len} bytes do not fit the remote buffer of {}", remote.len)));
        }
        Ok(())
    }

    /// Posts an RDMA WRITE of `local` to `remote` (its first `local.len` bytes); returns the wr id.
    pub fn post_write(&mut self, local: Local<'_>, remote: RemoteBuf) -> Result<u64, RdmaError> {
        Self::check_remote(remote, local.len)?;
        self.post(SendOp::Write { remote_addr: remote.addr, rkey: remote.rkey }, "RDMA WRITE", local)
    }

    /// Posts an RDMA READ of `remote` into `local`.
    pub fn post_read(&mut self, local: Local<'_>, remote: RemoteBuf) -> Result<u64, RdmaError> {
        Self::check_remote(remote, local.len)?;
        self.post(SendOp::Read { remote_addr: remote.addr, rkey: remote.rkey }, "RDMA READ", local)
    }

    /// Posts a SEND of `local`.
    pub fn post_send(&mut self, local: Local<'_>) -> Result<u64, RdmaError> {
        self.post(SendOp::Send, "SEND", local)
    }

    /// Posts a receive into `local`.
    pub fn post_recv(&mut self, local: Local<'_>) -> Result<u64, RdmaError> {
        let wr = self.next_wr;
        self.next_wr += 1;
        self.qp
            .post_recv(wr, local.mr.addr() + local.offset, local.len, local.mr.lkey())
            .map_err(|source| RdmaError::Verbs { dev: self.dev.clone(), what: "ibv_post_recv", source })?;
        self.pending.insert(wr, "RECV");
        Ok(wr)
    }

    fn decode(&mut self, w: Wc) -> Result<Wc, RdmaError> {
        self.outcome(w).map_err(RdmaError::Completion)
    }

    fn outcome(&mut self, w: Wc) -> Result<Wc, WcError> {
        let op = self.pending.remove(&w.wr_id).unwrap_or("work request");
        if w.status == 0 {
            return Ok(w);
        }
        Err(WcError {
            wr_id: w.wr_id,
            status: w.status,
            name: sys::wc_status_str(w.status),
            vendor_err: w.vendor_err,
            op,
        })
    }

    fn wait_cq(&mut self, recv: bool, n: usize, timeout: Duration) -> Result<Vec<Wc>, RdmaError> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        let mut spins = 0u32;
        while got.len() < n {
            let cq = if recv { &self.rcq } else { &self.scq };
            let before = got.len();
            cq.poll(&mut got, n - before).map_err(|source| RdmaError::Verbs {
                dev: self.dev.clone(),
                what: "ibv_poll_cq",
                source,
            })?;
            if got.len() > before {
                spins = 0;
                // Report the first failure (later ones are usually flushes it caused).
                let fresh: Vec<Wc> = got.drain(before..).collect();
                for w in fresh {
                    let w = self.decode(w)?;
                    got.push(w);
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(RdmaError::Timeout {
                    what: format!("{} of {n} {} completions", n - got.len(), if recv { "receive" } else { "send" }),
                    ms: timeout.as_millis(),
                });
            }
            spins += 1;
            if spins > 64 {
                // Idle: a peer that disconnected will complete nothing more (its completions,
                // if any, were queued before its disconnect and are polled again first).
                if spins.is_multiple_of(64) && self.check_peer().is_err() {
                    let before = got.len();
                    let cq = if recv { &self.rcq } else { &self.scq };
                    cq.poll(&mut got, n - before).map_err(|source| RdmaError::Verbs {
                        dev: self.dev.clone(),
                        what: "ibv_poll_cq",
                        source,
                    })?;
                    if got.len() == before {
                        return Err(RdmaError::PeerDisconnected { peer: self.peer.clone() });
                    }
                    let fresh: Vec<Wc> = got.drain(before..).collect();
                    for w in fresh {
                        let w = self.decode(w)?;
                        got.push(w);
                    }
                    continue;
                }
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(got)
    }

    /// The completions ready now on the send (`recv == false`) or receive queue, at most `max`,
    /// each with its work request id and outcome (a failed one does not stop the others: after
    /// a QP error every outstanding request completes, flushed). Never waits.
    pub fn poll_outcomes(&mut self, recv: bool, max: usize) -> Result<Vec<Outcome>, RdmaError> {
        let mut got = Vec::with_capacity(max.min(256));
        let cq = if recv { &self.rcq } else { &self.scq };
        cq.poll(&mut got, max).map_err(|source| RdmaError::Verbs {
            dev: self.dev.clone(),
            what: "ibv_poll_cq",
            source,
        })?;
        Ok(got.into_iter().map(|w| (w.wr_id, self.outcome(w))).collect())
    }

    /// Waits for `n` send-side completions (WRITE, READ, SEND), bounded by the timeout.
    pub fn wait_send(&mut self, n: usize) -> Result<Vec<Wc>, RdmaError> {
        self.wait_cq(false, n, self.opts.timeout)
    }

    /// Waits for one receive completion; returns its byte count.
    pub fn wait_recv(&mut self) -> Result<u32, RdmaError> {
        Ok(self.wait_cq(true, 1, self.opts.timeout)?[0].byte_len)
    }

    /// RDMA WRITE and wait for its completion.
    pub fn write(&mut self, local: Local<'_>, remote: RemoteBuf) -> Result<(), RdmaError> {
        self.post_write(local, remote)?;
        self.wait_send(1).map(|_| ())
    }

    /// RDMA READ and wait for its completion.
    pub fn read(&mut self, local: Local<'_>, remote: RemoteBuf) -> Result<(), RdmaError> {
        self.post_read(local, remote)?;
        self.wait_send(1).map(|_| ())
    }

    /// SEND and wait for its completion.
    pub fn send(&mut self, local: Local<'_>) -> Result<(), RdmaError> {
        self.post_send(local)?;
        self.wait_send(1).map(|_| ())
    }

    /// `count` RDMA WRITEs of `msg` bytes from `local` (offset 0) to `remote`, `depth` in flight;
    /// returns the elapsed time from first post to last completion.
    pub fn write_stream(
        &mut self,
        local: &NicMr,
        remote: RemoteBuf,
        msg: u32,
        count: usize,
        depth: usize,
    ) -> Result<Duration, RdmaError> {
        let l = Local::new(local, 0, msg)?;
        Self::check_remote(remote, msg)?;
        let depth = depth.clamp(1, self.opts.max_send_wr as usize);
        let start = Instant::now();
        let (mut posted, mut done) = (0usize, 0usize);
        while done < count {
            while posted < count && posted - done < depth {
                self.post_write(l, remote)?;
                posted += 1;
            }
            let mut got = Vec::new();
            let deadline = Instant::now() + self.opts.timeout;
            while got.is_empty() {
                self.scq.poll(&mut got, depth).map_err(|source| RdmaError::Verbs {
                    dev: self.dev.clone(),
                    what: "ibv_poll_cq",
                    source,
                })?;
                if got.is_empty() {
                    self.check_peer()?;
                }
                if got.is_empty() && Instant::now() >= deadline {
                    return Err(RdmaError::Timeout {
                        what: "RDMA WRITE completions".into(),
                        ms: self.opts.timeout.as_millis(),
                    });
                }
            }
            for w in got {
                self.decode(w)?;
                done += 1;
            }
        }
        Ok(start.elapsed())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The QP field drops before the CQ Arcs (declaration order), so it is destroyed first.
        tracing::debug!(dev = %self.dev, qpn = self.qp.qpn, "closing RC connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_and_garbage_is_rejected() {
        let ep = Endpoint { qpn: 17, psn: 0x123456, gid: [0xfe; 16], lid: 0, mtu: 3, rd_atomic: (16, 4) };
        assert_eq!(Endpoint::from_bytes(&ep.to_bytes()).unwrap(), ep);
        assert!(Endpoint::from_bytes(&[0u8; ENDPOINT_LEN]).is_err());
        let mut bad = ep.to_bytes();
        bad[30] = 9; // mtu 9 does not exist
        assert!(Endpoint::from_bytes(&bad).is_err());
        let mut bad = ep.to_bytes();
        bad[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(Endpoint::from_bytes(&bad).is_err());
    }

    #[test]
    fn each_side_serves_what_the_other_issues_and_issues_what_it_serves() {
        // (responder resources, initiator depth) on each side.
        assert_eq!(negotiate((16, 16), (16, 16)), (16, 16));
        assert_eq!(negotiate((16, 16), (4, 1)), (1, 4), "a peer issuing 1 READ is served 1; it serves 4");
        assert_eq!(negotiate((2, 8), (128, 128)), (2, 8), "never beyond this device");
        assert_eq!(negotiate((16, 16), (0, 0)), (0, 0), "a peer that takes no READs gets none");
    }
}
