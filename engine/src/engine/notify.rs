//! Receive rings for notifications: each accepted connection keeps `SLOTS` receives posted into a
//! registered host buffer; a completed receive is one notification, and its slot is posted again.
//!
//! Owns: `Incoming`, `SLOTS`. Must not: post anything but receives.

use std::sync::Arc;

use peermem::{HostRegion, PeerMemory, Registry};
use peermem_rdma::{Access, Connection, Local, Nic, NicMr, RdmaError};

use super::{Notification, NOTIFY_MAX};

/// Receives kept posted per connection.
pub const SLOTS: usize = 16;

/// An accepted connection: a peer's rail towards us, over which its notifications arrive.
pub struct Incoming {
    pub conn: Connection,
    pub from: String,
    ring: NicMr,
    /// The slot of each posted receive, by work request id.
    slots: std::collections::HashMap<u64, usize>,
    /// Set when the connection failed or the peer left: nothing more is polled.
    pub closed: bool,
}

impl Incoming {
    /// Registers a ring of `SLOTS` receive buffers with `nic` and posts them all.
    pub fn new(nic: &Nic, registry: &Registry, mut conn: Connection, from: String) -> Result<Incoming, RdmaError> {
        let host = Arc::new(HostRegion::new((SLOTS * NOTIFY_MAX) as u64)?) as Arc<dyn PeerMemory>;
        let ring = nic.register(registry, host, Access::LOCAL_WRITE)?;
        let mut slots = std::collections::HashMap::new();
        for slot in 0..SLOTS {
            slots.insert(Self::post_slot(&mut conn, &ring, slot)?, slot);
        }
        Ok(Incoming { conn, from, ring, slots, closed: false })
    }

    fn post_slot(conn: &mut Connection, ring: &NicMr, slot: usize) -> Result<u64, RdmaError> {
        conn.post_recv(Local::new(ring, (slot * NOTIFY_MAX) as u64, NOTIFY_MAX as u32)?)
    }

    /// Notifications that arrived, each slot posted again. A failed receive closes the ring.
    pub fn poll(&mut self, out: &mut Vec<Notification>) {
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
            let mut message = vec![0u8; (wc.byte_len as usize).min(NOTIFY_MAX)];
            if self.ring.region().read_at((slot * NOTIFY_MAX) as u64, &mut message).is_err() {
                message.clear();
            }
            out.push(Notification { from: self.from.clone(), message });
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
