//! One connection from a local NIC to one NIC of a peer (a rail's transport), the work requests
//! in flight on it, and its state: up, or down since a failure until it is connected again.
//!
//! Owns: `Link`, `LinkState`, `Wr`. Must not: decide which slices it carries (the rails do).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peermem_rdma::Connection;

use super::notify::Ring;
use crate::rails::SliceId;

/// A work request the engine posted, and what it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wr {
    /// A slice of a request of a batch.
    Slice { ticket: u64, request: usize, slice: SliceId },
    /// A batch's notification.
    Notify { ticket: u64 },
    /// Part `part` of a batch's staging request to the peer (`commit`: bounce to region after
    /// writes; else region to bounce before reads), sent from notification buffer `slot`.
    Control { ticket: u64, commit: bool, part: u16, slot: u16 },
}

impl Wr {
    /// The batch it belongs to.
    pub fn ticket(&self) -> u64 {
        match *self {
            Wr::Slice { ticket, .. } | Wr::Notify { ticket } | Wr::Control { ticket, .. } => ticket,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum LinkState {
    Up,
    /// Failed at `since` for `why`; connected again no sooner than `retry_at`.
    Down {
        since: Duration,
        retry_at: Duration,
        why: String,
    },
}

/// A connection to one NIC of a peer.
pub struct Link {
    /// Index of the local NIC.
    pub local: usize,
    pub local_name: String,
    pub remote: String,
    pub addr: SocketAddr,
    pub conn: Option<Connection>,
    /// Receives for the peer's answers to staging requests, posted on `conn`.
    pub ring: Option<Ring>,
    pub state: LinkState,
    /// Work requests posted and not completed, by work request id, with when they were posted.
    pub inflight: HashMap<u64, (Wr, Instant)>,
    /// Slices dealt to this link and not posted yet.
    pub queue: VecDeque<Wr>,
    /// When the link last completed something (the start of the busy time of the next).
    pub last_done: Option<Instant>,
    /// Every failure seen, for reports.
    pub failures: Vec<String>,
    /// Progress rounds since the link last completed something.
    pub idle_rounds: u32,
    /// The peer closed the connection (rdma_cm's disconnect): its process ended or let go of
    /// it, unlike a link fault, which ends in failed work requests.
    pub closed_by_peer: bool,
}

impl Link {
    pub fn new(local: usize, local_name: String, remote: String, addr: SocketAddr, conn: (Connection, Ring)) -> Link {
        Link {
            local,
            local_name,
            remote,
            addr,
            conn: Some(conn.0),
            ring: Some(conn.1),
            state: LinkState::Up,
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            last_done: None,
            failures: Vec::new(),
            idle_rounds: 0,
            closed_by_peer: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.state == LinkState::Up && self.conn.is_some()
    }

    /// Takes the link down: its queue pair is destroyed (so the NIC touches none of its buffers
    /// again) and every work request it held is returned, to be posted elsewhere.
    pub fn fail(&mut self, now: Duration, cooldown: Duration, why: String) -> Vec<Wr> {
        tracing::warn!(nic = %self.local_name, remote = %self.remote, "rail down: {why}");
        self.conn = None;
        self.ring = None;
        self.failures.push(why.clone());
        self.state = LinkState::Down { since: now, retry_at: now + cooldown, why };
        let mut out: Vec<Wr> = self.inflight.drain().map(|(_, (w, _))| w).collect();
        out.extend(self.queue.drain(..));
        out
    }
}
