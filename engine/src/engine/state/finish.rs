//! The end of a batch: its notification, links connected again, its bound, its report.

use super::*;

impl Inner {
    /// Posts the notification of each batch whose bytes have all landed.
    pub(super) fn send_notifies(&mut self) {
        let ready: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.error.is_none() && b.notify_state == NotifyState::Pending)
            .filter(|(_, b)| b.reqs.iter().all(|r| r.plan.done()) && b.stage.done())
            .map(|(t, _)| *t)
            .collect();
        for ticket in ready {
            let pid = self.batches[&ticket].peer;
            let Some(p) = self.peers.get_mut(&pid) else { continue };
            let Some(li) = p.links.iter().position(|l| l.is_up()) else { continue };
            let link = &mut p.links[li];
            let bufs = &mut self.notify_bufs[link.local];
            let slot = (ticket as usize) % NOTIFY_SLOTS;
            if bufs.busy[slot] {
                continue;
            }
            // The ticket and the kind, then the message (see `notify`).
            let mut wire = crate::engine::stage::prefix(ticket, crate::engine::stage::Kind::Note);
            wire.extend_from_slice(self.batches[&ticket].notify.as_deref().unwrap_or_default());
            let off = (slot * WIRE) as u64;
            if bufs.mr.region().write_at(off, &wire).is_err() {
                continue;
            }
            let posted = Local::new(&bufs.mr, off, wire.len() as u32).map_err(|e| e.to_string()).and_then(|l| {
                link.conn.as_mut().ok_or_else(|| "link down".to_string())?.post_send(l).map_err(|e| e.to_string())
            });
            match posted {
                Ok(id) => {
                    bufs.busy[slot] = true;
                    link.inflight.insert(id, (Wr::Notify { ticket }, Instant::now()));
                    if let Some(b) = self.batches.get_mut(&ticket) {
                        b.notify_state = NotifyState::Posted;
                    }
                }
                Err(why) => {
                    let now = self.now();
                    self.fail_link(pid, li, now, why);
                }
            }
        }
    }

    pub(super) fn free_notify_slot(&mut self, nic: usize, ticket: u64) {
        if let Some(b) = self.notify_bufs.get_mut(nic) {
            b.busy[(ticket as usize) % NOTIFY_SLOTS] = false;
        }
    }

    /// Deregisters the registrations the range caches retired, on each NIC with no work request
    /// in flight (a retired key may still be in a posted one until then).
    pub(super) fn release_retired(&mut self) {
        for (nic, cache) in self.caches.iter_mut().enumerate().filter(|(_, c)| c.has_retired()) {
            let busy = self.peers.values().flat_map(|p| &p.links).any(|l| l.local == nic && !l.inflight.is_empty());
            if !busy {
                cache.release_retired();
            }
        }
    }

    /// Connects again each link of `pid` whose cool-down has passed and whose NIC's port is
    /// active.
    pub(super) fn revive(&mut self, pid: PeerId, now: Duration) {
        let cooldown = self.options.rails.cooldown;
        let n = self.peers.get(&pid).map_or(0, |p| p.links.len());
        for li in 0..n {
            let (local, addr) = {
                let l = &self.peers[&pid].links[li];
                match &l.state {
                    LinkState::Down { retry_at, .. } if *retry_at <= now => (l.local, l.addr),
                    _ => continue,
                }
            };
            let active = self.nics[local].nic.port_active().unwrap_or(false);
            let result = if active {
                self.dial(addr, Duration::from_secs(1).min(self.options.connect.timeout)).and_then(|(i, c)| {
                    if i == local {
                        self.with_ring(i, c).map_err(DialError::new)
                    } else {
                        Err(DialError::new(format!("{addr} is now reached through {}", self.nics[i].nic.name())))
                    }
                })
            } else {
                Err(DialError::new(format!("{} port is not active", self.nics[local].nic.name())))
            };
            let now = self.now();
            let Some(p) = self.peers.get_mut(&pid) else { return };
            let link = &mut p.links[li];
            match result {
                Ok((conn, ring)) => {
                    tracing::info!(nic = %link.local_name, remote = %link.remote, "rail back up");
                    link.conn = Some(conn);
                    link.ring = Some(ring);
                    link.state = LinkState::Up;
                    link.last_done = None;
                    link.closed_by_peer = false;
                    p.gone = None;
                }
                Err(e) => {
                    let since = match &link.state {
                        LinkState::Down { since, .. } => *since,
                        LinkState::Up => now,
                    };
                    let first = link.failures.first().cloned().unwrap_or_default();
                    tracing::debug!(nic = %link.local_name, "still down: {}", e.why);
                    let why = format!("{first}; then {}", e.why);
                    // Nothing listens where the peer's engine did, or the peer closed this
                    // connection and cannot be reached again: its engine is gone.
                    if e.nothing_listens || link.closed_by_peer {
                        p.gone.get_or_insert_with(|| why.clone());
                    }
                    link.state = LinkState::Down { since, retry_at: now + cooldown, why };
                }
            }
        }
    }

    /// Ends a batch with `error` (its slices are no longer posted; it ends once none is in
    /// flight).
    pub(super) fn fail_batch(&mut self, ticket: u64, error: EngineError) {
        if let Some(b) = self.batches.get_mut(&ticket) {
            b.error.get_or_insert(error);
        }
    }

    fn inflight_of(&self, ticket: u64) -> usize {
        let Some(b) = self.batches.get(&ticket) else { return 0 };
        self.peers.get(&b.peer).map_or(0, |p| {
            p.links.iter().flat_map(|l| l.inflight.values()).filter(|(w, _)| w.ticket() == ticket).count()
        })
    }

    /// Bounds, and the end of each batch: done, or failed with nothing of it in flight.
    pub(super) fn check_batches(&mut self) {
        let now = Instant::now();
        let open: Vec<u64> = self.batches.iter().filter(|(_, b)| b.result.is_none()).map(|(t, _)| *t).collect();
        for ticket in open {
            let b = &self.batches[&ticket];
            let pid = b.peer;
            if b.error.is_none() {
                if let Some(error) = self.gone_error(pid) {
                    self.fail_batch(ticket, error);
                }
            }
            let b = &self.batches[&ticket];
            if b.error.is_none() && now >= b.deadline {
                let error = self.bound_error(ticket);
                self.fail_batch(ticket, error);
                // Stop every link with work of this batch in flight: once its queue pair is
                // destroyed, no NIC touches the batch's buffers.
                let links: Vec<usize> = self.peers.get(&pid).map_or(Vec::new(), |p| {
                    (0..p.links.len())
                        .filter(|&li| p.links[li].inflight.values().any(|(w, _)| w.ticket() == ticket))
                        .collect()
                });
                let t = self.now();
                for li in links {
                    self.fail_link(pid, li, t, format!("stopped: batch {ticket} ran past its bound"));
                }
            }
            let b = &self.batches[&ticket];
            let done = b.reqs.iter().all(|r| r.plan.done())
                && b.stage.done()
                && matches!(b.notify_state, NotifyState::None | NotifyState::Done);
            if b.error.is_some() && self.inflight_of(ticket) == 0 {
                self.end(ticket, false);
            } else if b.error.is_none() && done {
                self.end(ticket, true);
            }
        }
    }

    /// `PeerGone` once every link to `pid` is down and the peer is marked gone (see `Peer::gone`).
    pub(super) fn gone_error(&self, pid: PeerId) -> Option<EngineError> {
        let p = self.peers.get(&pid)?;
        let why = p.gone.as_ref()?;
        if p.links.iter().any(|l| l.is_up()) {
            return None;
        }
        Some(EngineError::PeerGone { host: p.meta.host.clone(), why: why.clone() })
    }

    /// The error for a batch past its bound: no rail left, or a plain timeout.
    fn bound_error(&self, ticket: u64) -> EngineError {
        let b = &self.batches[&ticket];
        let p = &self.peers[&b.peer];
        if p.links.iter().all(|l| !l.is_up()) {
            // Each link's first failure, and what its last reconnect met.
            let failures = p
                .links
                .iter()
                .map(|l| {
                    let why = match &l.state {
                        LinkState::Down { why, .. } => why.clone(),
                        LinkState::Up => l.failures.join("; "),
                    };
                    format!("{} -> {}: {why}", l.local_name, l.remote)
                })
                .collect();
            return EngineError::NoRailLeft { host: p.meta.host.clone(), failures };
        }
        EngineError::Timeout { ms: self.options.timeout.as_millis() }
    }

    /// Ends `ticket`: its regions are free again and its result is kept for the ticket.
    fn end(&mut self, ticket: u64, ok: bool) {
        let Some(b) = self.batches.get_mut(&ticket) else { return };
        for r in &b.reqs {
            if let Some(l) = self.local.get_mut(&r.req.local) {
                l.in_use = l.in_use.saturating_sub(1);
            }
        }
        let result = if ok {
            let p = &self.peers[&b.peer];
            let rails = p
                .links
                .iter()
                .enumerate()
                .map(|(li, l)| {
                    let (bytes, slices) = b.per_link.get(&li).copied().unwrap_or_default();
                    rail_report(l, bytes, slices)
                })
                .collect();
            Ok(Report {
                bytes: b.reqs.iter().map(|r| r.req.len).sum(),
                requests: b.reqs.len(),
                seconds: b.started.elapsed().as_secs_f64(),
                rails,
                retries: b.retries,
                routes: b.routes.clone(),
                notified: b.notify_state == NotifyState::Done,
            })
        } else {
            Err(b.error.take().unwrap_or(EngineError::Timeout { ms: 0 }))
        };
        if b.forgotten {
            self.batches.remove(&ticket);
        } else {
            b.result = Some(result);
        }
    }

    /// The result of `ticket` once it ended (taken: asked once).
    pub fn finished(&mut self, ticket: u64) -> Option<Result<Report, EngineError>> {
        let r = self.batches.get_mut(&ticket)?.result.take()?;
        self.batches.remove(&ticket);
        Some(r)
    }

    /// The ticket was dropped: its batch goes on, its result is dropped when it ends.
    pub fn forget(&mut self, ticket: u64) {
        if let Some(b) = self.batches.get_mut(&ticket) {
            if b.result.is_some() {
                self.batches.remove(&ticket);
            } else {
                b.forgotten = true;
            }
        }
    }
}
