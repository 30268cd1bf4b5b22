//! Receive rings and the messages on them: each accepted connection keeps `SLOTS` receives posted
//! into a registered host buffer for the peer's notifications and staging requests; each link
//! keeps `ACK_SLOTS` for the answers to its staging requests. A completed receive is one message,
//! and its slot is posted again. On the wire a message is its batch's ticket (8 bytes,
//! little-endian), a kind byte (`stage::Kind`), then its body: with the sender's token, the
//! ticket names a notification, so one sent again after a failover is known.
//!
//! Owns: `Ring`, `Message`, `Incoming`, `Received`, `SLOTS`, `WIRE`. Must not: post anything but
//! receives, and the answers an `Incoming` was given to send.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry};
use peermem_rdma::{Access, Connection, Local, Nic, NicMr, RdmaError};

use super::stage::{Kind, ACK_SLOTS, ACK_WIRE, PREFIX};
use super::{Notification, NOTIFY_MAX};

/// Receives kept posted per accepted connection.
pub const SLOTS: usize = 16;
/// The most bytes of one message on the wire.
pub const WIRE: usize = NOTIFY_MAX + PREFIX;

/// One message as it arrived.
pub struct Message {
    pub ticket: u64,
    pub kind: Kind,
    pub body: Vec<u8>,
}

/// Receive buffers registered with one NIC and posted on one connection.
pub struct Ring {
    mr: NicMr,
    wire: usize,
    /// The slot of each posted receive, by work request id.
    slots: HashMap<u64, usize>,
}

impl Ring {
    /// Registers `count` buffers of `wire` bytes with `nic` and posts them all on `conn`.
    pub fn new(
        nic: &Nic,
        registry: &Registry,
        conn: &mut Connection,
        count: usize,
        wire: usize,
    ) -> Result<Ring, RdmaError> {
        let host = Arc::new(HostRegion::new((count * wire) as u64)?) as Arc<dyn PeerMemory>;
        let mr = nic.register(registry, host, Access::LOCAL_WRITE)?;
        let mut ring = Ring { mr, wire, slots: HashMap::new() };
        for slot in 0..count {
            ring.post(conn, slot)?;
        }
        Ok(ring)
    }

    fn post(&mut self, conn: &mut Connection, slot: usize) -> Result<(), RdmaError> {
        let wr = conn.post_recv(Local::new(&self.mr, (slot * self.wire) as u64, self.wire as u32)?)?;
        self.slots.insert(wr, slot);
        Ok(())
    }

    /// The messages that arrived on `conn`, each slot posted again. An error: the connection
    /// failed (or its peer left), and nothing more arrives.
    pub fn poll(&mut self, conn: &mut Connection, out: &mut Vec<Message>) -> Result<(), String> {
        let got = conn.poll_outcomes(true, self.slots.len().max(1)).map_err(|e| e.to_string())?;
        for (_, outcome) in got {
            let wc = outcome.map_err(|e| e.to_string())?;
            let Some(slot) = self.slots.remove(&wc.wr_id) else { continue };
            let mut wire = vec![0u8; (wc.byte_len as usize).min(self.wire)];
            let read = self.mr.region().read_at((slot * self.wire) as u64, &mut wire);
            match (read, wire.split_first_chunk::<8>()) {
                (Ok(()), Some((ticket, rest))) => {
                    match rest.split_first().and_then(|(k, b)| Some((Kind::from_byte(*k)?, b))) {
                        Some((kind, body)) => {
                            out.push(Message { ticket: u64::from_le_bytes(*ticket), kind, body: body.to_vec() })
                        }
                        None => tracing::debug!("a message of {} bytes of no known kind", wc.byte_len),
                    }
                }
                _ => tracing::debug!("a message of {} bytes: no ticket", wc.byte_len),
            }
            self.post(conn, slot).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// A message from a peer's engine: its token, and the message.
pub struct Received {
    pub token: u64,
    pub from: String,
    pub message: Message,
}

impl Received {
    /// The notification it carries, for the application.
    pub fn note(&self) -> Notification {
        Notification { from: self.from.clone(), message: self.message.body.clone() }
    }
}

/// The notifications seen lately, by (sender token, ticket): a notification sent again after its
/// first link failed may arrive twice, on two links. Holds the last `SEEN_MAX` keys.
#[derive(Default)]
pub struct Seen {
    set: std::collections::HashSet<(u64, u64)>,
    order: std::collections::VecDeque<(u64, u64)>,
}

/// How many notification keys `Seen` remembers.
pub const SEEN_MAX: usize = 4096;

impl Seen {
    /// Whether `key` is new (and remembers it).
    pub fn first(&mut self, key: (u64, u64)) -> bool {
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEEN_MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Answers waiting for a send buffer, and the buffers: `ACK_SLOTS` of `ACK_WIRE` bytes.
struct Answers {
    mr: NicMr,
    free: Vec<usize>,
    /// The slot of each posted send, by work request id.
    sending: HashMap<u64, usize>,
    waiting: VecDeque<Vec<u8>>,
}

/// An accepted connection: a peer's rail towards us, over which its notifications and staging
/// requests arrive, and the answers to them leave.
pub struct Incoming {
    pub conn: Connection,
    pub from: String,
    /// The sending engine's token, from its connect request.
    token: u64,
    ring: Ring,
    answers: Answers,
    /// Set when the connection failed or the peer left: nothing more is polled.
    pub closed: bool,
}

impl Incoming {
    /// Registers a ring of `SLOTS` receive buffers with `nic` and posts them all, and the send
    /// buffers for answers.
    pub fn new(
        nic: &Nic,
        registry: &Registry,
        mut conn: Connection,
        from: String,
        token: u64,
    ) -> Result<Incoming, RdmaError> {
        let ring = Ring::new(nic, registry, &mut conn, SLOTS, WIRE)?;
        let host = Arc::new(HostRegion::new((ACK_SLOTS * ACK_WIRE) as u64)?) as Arc<dyn PeerMemory>;
        let mr = nic.register(registry, host, Access::LOCAL_READ)?;
        let answers = Answers { mr, free: (0..ACK_SLOTS).collect(), sending: HashMap::new(), waiting: VecDeque::new() };
        Ok(Incoming { conn, from, token, ring, answers, closed: false })
    }

    /// Messages that arrived. A failed receive closes the connection's ring.
    pub fn poll(&mut self, out: &mut Vec<Received>) {
        if self.closed {
            return;
        }
        let mut got = Vec::new();
        if let Err(e) = self.ring.poll(&mut self.conn, &mut got) {
            tracing::debug!(from = %self.from, "connection closed: {e}");
            self.closed = true;
        }
        out.extend(got.into_iter().map(|message| Received { token: self.token, from: self.from.clone(), message }));
    }

    /// Queues `answer` (a whole message, at most `ACK_WIRE` bytes) to be sent back.
    pub fn answer(&mut self, answer: Vec<u8>) {
        self.answers.waiting.push_back(answer);
        self.send_answers();
    }

    /// Frees the buffers of answers sent, and posts waiting ones into free buffers.
    pub fn send_answers(&mut self) {
        if self.closed || (self.answers.sending.is_empty() && self.answers.waiting.is_empty()) {
            return;
        }
        let a = &mut self.answers;
        match self.conn.poll_outcomes(false, ACK_SLOTS) {
            Ok(done) => {
                for (wr, outcome) in done {
                    if let Some(slot) = a.sending.remove(&wr) {
                        a.free.push(slot);
                    }
                    if let Err(e) = outcome {
                        tracing::debug!(from = %self.from, "an answer failed: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(from = %self.from, "connection closed: {e}");
                self.closed = true;
                return;
            }
        }
        while let (Some(slot), Some(msg)) = (a.free.last().copied(), a.waiting.front()) {
            let len = msg.len().min(ACK_WIRE);
            let off = (slot * ACK_WIRE) as u64;
            let posted =
                a.mr.region()
                    .write_at(off, &msg[..len])
                    .map_err(|e| e.to_string())
                    .and_then(|()| Local::new(&a.mr, off, len as u32).map_err(|e| e.to_string()))
                    .and_then(|l| self.conn.post_send(l).map_err(|e| e.to_string()));
            match posted {
                Ok(wr) => {
                    a.free.pop();
                    a.waiting.pop_front();
                    a.sending.insert(wr, slot);
                }
                Err(e) => {
                    tracing::debug!(from = %self.from, "cannot answer: {e}");
                    self.closed = true;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_seen_again_is_dropped_and_the_memory_is_bounded() {
        let mut seen = Seen::default();
        assert!(seen.first((1, 7)));
        assert!(!seen.first((1, 7)), "the same batch from the same engine, sent again");
        assert!(seen.first((2, 7)), "another engine's ticket 7");
        for t in 100..100 + SEEN_MAX as u64 {
            assert!(seen.first((1, t)));
        }
        assert_eq!(seen.set.len(), SEEN_MAX);
        assert!(seen.first((1, 7)), "forgotten once SEEN_MAX newer keys came");
    }
}
