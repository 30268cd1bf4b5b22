//! Receive rings for notifications: each accepted connection keeps `SLOTS` receives posted into a
//! registered host buffer; a completed receive is one notification, and its slot is posted again.
//! On the wire a notification is its batch's ticket (8 bytes, little-endian), then the message:
//! with the sender's token, the ticket names it, so one sent again after a failover is known.
//!
//! Owns: `Incoming`, `Received`, `SLOTS`, `HEADER`, `WIRE`. Must not: post anything but
//! receives.

use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry};
use peermem_rdma::{Access, Connection, Local, Nic, NicMr, RdmaError};

use super::{Notification, NOTIFY_MAX};

/// Receives kept posted per connection.
pub const SLOTS: usize = 16;
/// The ticket before each message.
pub const HEADER: usize = 8;
/// The most bytes of one notification on the wire.
pub const WIRE: usize = NOTIFY_MAX + HEADER;

/// A notification as it arrived: the sender's token and ticket, and what the application sees.
pub struct Received {
    pub key: (u64, u64),
    pub note: Notification,
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

/// An accepted connection: a peer's rail towards us, over which its notifications arrive.
pub struct Incoming {
    pub conn: Connection,
    pub from: String,
    /// The sending engine's token, from its connect request.
    token: u64,
    ring: NicMr,
    /// The slot of each posted receive, by work request id.
    slots: std::collections::HashMap<u64, usize>,
    /// Set when the connection failed or the peer left: nothing more is polled.
    pub closed: bool,
}

impl Incoming {
    /// Registers a ring of `SLOTS` receive buffers with `nic` and posts them all.
    pub fn new(
        nic: &Nic,
        registry: &Registry,
        mut conn: Connection,
        from: String,
        token: u64,
    ) -> Result<Incoming, RdmaError> {
        let host = Arc::new(HostRegion::new((SLOTS * WIRE) as u64)?) as Arc<dyn PeerMemory>;
        let ring = nic.register(registry, host, Access::LOCAL_WRITE)?;
        let mut slots = std::collections::HashMap::new();
        for slot in 0..SLOTS {
            slots.insert(Self::post_slot(&mut conn, &ring, slot)?, slot);
        }
        Ok(Incoming { conn, from, token, ring, slots, closed: false })
    }

    fn post_slot(conn: &mut Connection, ring: &NicMr, slot: usize) -> Result<u64, RdmaError> {
        conn.post_recv(Local::new(ring, (slot * WIRE) as u64, WIRE as u32)?)
    }

    /// Notifications that arrived, each slot posted again. A failed receive closes the ring.
    pub fn poll(&mut self, out: &mut Vec<Received>) {
        if self.closed {
            return;
        }
        let got = match self.conn.poll_outcomes(true, SLOTS) {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(from = %self.from, "notification ring closed: {e}");
                self.closed = true;
                return;
            }
        };
        for (_, outcome) in got {
            let wc = match outcome {
                Ok(wc) => wc,
                Err(e) => {
                    tracing::debug!(from = %self.from, "notification ring closed: {e}");
                    self.closed = true;
                    return;
                }
            };
            let Some(slot) = self.slots.remove(&wc.wr_id) else { continue };
            let mut wire = vec![0u8; (wc.byte_len as usize).min(WIRE)];
            let read = self.ring.region().read_at((slot * WIRE) as u64, &mut wire);
            match (read, wire.split_first_chunk::<HEADER>()) {
                (Ok(()), Some((ticket, message))) => out.push(Received {
                    key: (self.token, u64::from_le_bytes(*ticket)),
                    note: Notification { from: self.from.clone(), message: message.to_vec() },
                }),
                _ => tracing::debug!(from = %self.from, "a notification of {} bytes: no ticket", wc.byte_len),
            }
            match Self::post_slot(&mut self.conn, &self.ring, slot) {
                Ok(wr) => {
                    self.slots.insert(wr, slot);
                }
                Err(_) => {
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
