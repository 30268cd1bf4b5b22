//! Batches: checking and posting them, the progress loop (completions, failover, posting what is
//! queued, notifications, links connected again, bounds), and their reports.

use super::*;

/// How often a link's rdma_cm events are read (a peer's disconnect), in progress rounds.
const PEER_CHECK_EVERY: u32 = 64;

impl Inner {
    /// Checks `batch` against the regions on both sides and posts it.
    pub fn post(&mut self, peer: PeerId, batch: &[Request], notify: Option<&[u8]>) -> Result<u64, EngineError> {
        if let Some(gone) = self.gone_error(peer) {
            return Err(gone);
        }
        let p = self.peers.get(&peer).ok_or(EngineError::UnknownPeer(peer))?;
        for (index, r) in batch.iter().enumerate() {
            let bad = |why: String| EngineError::BadRequest { index, why };
            let l = self.local.get(&r.local).ok_or(EngineError::UnknownRegion(r.local))?;
            let rm = p.meta.region(r.remote).ok_or(EngineError::UnknownRemoteRegion(r.remote))?;
            if r.len == 0 {
                return Err(bad("0 bytes".into()));
            }
            if r.local_offset.checked_add(r.len).is_none_or(|e| e > l.region.len()) {
                return Err(bad(format!("{} bytes at {} run past local {}", r.len, r.local_offset, r.local)));
            }
            if r.remote_offset.checked_add(r.len).is_none_or(|e| e > rm.len) {
                return Err(bad(format!("{} bytes at {} run past the peer's {}", r.len, r.remote_offset, r.remote)));
            }
        }
        let now = self.now();
        let mut reqs = Vec::with_capacity(batch.len());
        let mut routes = Vec::new();
        for (index, r) in batch.iter().enumerate() {
            let key = (r.local, r.remote);
            if !self.peers[&peer].rails.contains_key(&key) {
                let set = self.rail_set(peer, r, index)?;
                routes.extend(set.routes.iter().cloned());
                self.peer_mut(peer)?.rails.insert(key, set);
            }
            let p = self.peer_mut(peer)?;
            let set = p.rails.get_mut(&key).ok_or(EngineError::UnknownPeer(peer))?;
            sync_rails(set, &p.links, now);
            let plan = set
                .rails
                .split(r.len, now)
                .map_err(|e| EngineError::NoRailLeft { host: p.meta.host.clone(), failures: vec![e.to_string()] })?;
            reqs.push(Req { req: *r, plan });
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        for r in &reqs {
            if let Some(l) = self.local.get_mut(&r.req.local) {
                l.in_use += 1;
            }
        }
        // Reads of memory that bounces on the peer wait for its stage-out.
        let stage = self.staging_for(peer, ticket, &reqs);
        let p = self.peer_mut(peer)?;
        for (ri, r) in reqs.iter().enumerate().filter(|_| !stage.holds()) {
            let set = &p.rails[&(r.req.local, r.req.remote)];
            for (si, s) in r.plan.slices().iter().enumerate() {
                p.links[set.links[s.rail.0]].queue.push_back(Wr::Slice { ticket, request: ri, slice: SliceId(si) });
            }
        }
        let started = Instant::now();
        self.batches.insert(
            ticket,
            Batch {
                peer,
                reqs,
                notify: notify.map(<[u8]>::to_vec),
                notify_state: if notify.is_some() { NotifyState::Pending } else { NotifyState::None },
                started,
                deadline: started + self.options.timeout,
                error: None,
                per_link: HashMap::new(),
                retries: 0,
                routes,
                result: None,
                forgotten: false,
                stage,
            },
        );
        self.progress();
        Ok(ticket)
    }

    fn peer_mut(&mut self, peer: PeerId) -> Result<&mut Peer, EngineError> {
        self.peers.get_mut(&peer).ok_or(EngineError::UnknownPeer(peer))
    }

    /// The rails for request `r`'s two memories: the pairs of linked NICs that each reach their
    /// memory directly (the fabric's choice); when none, every link, the bounces reported.
    fn rail_set(&self, peer: PeerId, r: &Request, index: usize) -> Result<RailSet, EngineError> {
        let p = &self.peers[&peer];
        let l = &self.local[&r.local];
        let rm = p.meta.region(r.remote).ok_or(EngineError::UnknownRemoteRegion(r.remote))?;
        let remote: Vec<NicReach> = rm
            .keys
            .iter()
            .map(|k| NicReach {
                nic: k.nic.clone(),
                direct: k.direct,
                bandwidth_gbs: k.bandwidth_gbs,
                why: if k.direct { "direct".into() } else { "bounces on the peer".into() },
            })
            .collect();
        let linked =
            |local: &str, remote: &str| p.links.iter().position(|k| k.local_name == local && k.remote == remote);
        let mut routes = Vec::new();
        let specs = match choose(&l.reach, &remote) {
            Choice::Rails(specs) => specs.into_iter().filter(|s| linked(&s.local, &s.remote).is_some()).collect(),
            Choice::Stage { reasons } => {
                routes.extend(reasons.iter().map(|r| format!("staged: {r}")));
                Vec::new()
            }
        };
        // Staging: the peer's side must take the memory itself; this side's NIC may bounce.
        let specs = if specs.is_empty() {
            let mut all = Vec::new();
            for k in p.links.iter() {
                let direct_remote = remote.iter().any(|n| n.nic == k.remote && n.direct);
                if direct_remote
                    && !all.iter().any(|s: &crate::rails::RailSpec| s.local == k.local_name && s.remote == k.remote)
                {
                    all.push(crate::rails::RailSpec {
                        local: k.local_name.clone(),
                        remote: k.remote.clone(),
                        bandwidth_gbs: None,
                    });
                }
            }
            all
        } else {
            specs
        };
        // None takes the peer's memory directly: it bounces there, and the peer's engine copies.
        let (specs, staged) = if specs.is_empty() {
            let keyed: Vec<crate::rails::RailSpec> = p
                .links
                .iter()
                .filter(|k| remote.iter().any(|n| n.nic == k.remote))
                .map(|k| crate::rails::RailSpec {
                    local: k.local_name.clone(),
                    remote: k.remote.clone(),
                    bandwidth_gbs: None,
                })
                .fold(Vec::new(), |mut all, s| {
                    if !all.iter().any(|a: &crate::rails::RailSpec| a.local == s.local && a.remote == s.remote) {
                        all.push(s);
                    }
                    all
                });
            routes.extend(keyed.iter().map(|s| {
                format!(
                    "staged on the peer: {} bounces {}; its engine copies before reads and after writes",
                    s.remote, r.remote
                )
            }));
            (keyed, true)
        } else {
            (specs, false)
        };
        if specs.is_empty() {
            routes.push("the peer gave no key for its memory on any linked NIC".into());
            return Err(EngineError::NoRail { index, reasons: routes });
        }
        let links: Vec<usize> = specs.iter().filter_map(|s| linked(&s.local, &s.remote)).collect();
        for s in &specs {
            let why = l.reach.iter().find(|n| n.nic == s.local).map_or(String::new(), |n| n.why.clone());
            routes.push(format!(
                "{} -> {}: {} ({})",
                s.local,
                s.remote,
                s.bandwidth_gbs.map_or("bandwidth unknown".into(), |b| format!("{b} Gb/s")),
                why
            ));
        }
        let rails = Rails::new(specs, self.options.rails)
            .map_err(|e| EngineError::NoRail { index, reasons: vec![e.to_string()] })?;
        Ok(RailSet { rails, links, routes, staged })
    }

    /// One round: completions, queued work, notifications, links connected again, bounds.
    pub fn progress(&mut self) {
        let now = self.now();
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for pid in &peers {
            self.poll_links(*pid, now);
        }
        for pid in &peers {
            self.repost_failed(*pid, now);
            self.post_queued(*pid);
        }
        self.send_staging();
        self.send_notifies();
        self.poll_incoming();
        for pid in &peers {
            self.revive(*pid, now);
        }
        self.check_batches();
        self.release_retired();
    }

    fn poll_links(&mut self, pid: PeerId, now: Duration) {
        let n = self.peers.get(&pid).map_or(0, |p| p.links.len());
        for li in 0..n {
            self.poll_answers(pid, li, now);
            let Some(link) = self.peers.get_mut(&pid).map(|p| &mut p.links[li]) else { return };
            let Some(conn) = link.conn.as_mut() else { continue };
            let got = match conn.poll_outcomes(false, 64) {
                Ok(g) => g,
                Err(e) => {
                    link.closed_by_peer |= matches!(e, RdmaError::PeerDisconnected { .. });
                    self.fail_link(pid, li, now, e.to_string());
                    continue;
                }
            };
            if got.is_empty() {
                link.idle_rounds += 1;
                if link.idle_rounds % PEER_CHECK_EVERY == 0 {
                    if let Err(e) = conn.check_peer() {
                        link.closed_by_peer |= matches!(e, RdmaError::PeerDisconnected { .. });
                        self.fail_link(pid, li, now, e.to_string());
                    }
                }
                continue;
            }
            link.idle_rounds = 0;
            for (wr_id, outcome) in got {
                let Some(link) = self.peers.get_mut(&pid).map(|p| &mut p.links[li]) else { return };
                let Some((wr, posted)) = link.inflight.remove(&wr_id) else { continue };
                match outcome {
                    Ok(_) => self.done(pid, li, wr, posted),
                    Err(e) => {
                        if e.is_remote_access() {
                            if let Wr::Slice { ticket, .. } = wr {
                                self.fail_batch(ticket, EngineError::RemoteAccess { error: e.to_string() });
                            }
                        }
                        self.fail_link(pid, li, now, e.to_string());
                        break;
                    }
                }
            }
        }
    }

    /// A work request of link `li` completed.
    fn done(&mut self, pid: PeerId, li: usize, wr: Wr, posted: Instant) {
        let Some(p) = self.peers.get_mut(&pid) else { return };
        let at = Instant::now();
        let busy_from = p.links[li].last_done.map_or(posted, |d| d.max(posted));
        p.links[li].last_done = Some(at);
        match wr {
            Wr::Notify { ticket } => {
                if let Some(b) = self.batches.get_mut(&ticket) {
                    b.notify_state = NotifyState::Done;
                }
                let nic = p.links[li].local;
                self.free_notify_slot(nic, ticket);
            }
            // Sent; the part stands until the peer's answer.
            Wr::Control { slot, .. } => {
                if let Some(b) = self.notify_bufs.get_mut(p.links[li].local) {
                    b.busy[slot as usize] = false;
                }
            }
            Wr::Slice { ticket, request, slice } => {
                let Some(b) = self.batches.get_mut(&ticket) else { return };
                let Some(r) = b.reqs.get_mut(request) else { return };
                let Some(set) = p.rails.get_mut(&(r.req.local, r.req.remote)) else { return };
                let Some(rid) = set.links.iter().position(|&l| l == li).map(RailId) else { return };
                if r.plan.ack(slice, rid).is_err() {
                    return;
                }
                let s = r.plan.slices()[slice.0];
                let _ = set.rails.delivered(rid, s.len, at.saturating_duration_since(busy_from));
                let e = b.per_link.entry(li).or_default();
                e.0 += s.len;
                e.1 += 1;
                if r.req.op == Op::Read {
                    let span = Span::new(r.req.local, r.req.local_offset + s.offset, s.len).ok();
                    let local = p.links[li].local;
                    if let Some(mr) = span.and_then(|sp| self.caches.get(local)?.lookup(&sp)) {
                        let off = r.req.local_offset + s.offset - mr.offset();
                        if let Err(e) = mr.bounce_to_region(off, s.len) {
                            b.error.get_or_insert(EngineError::Rdma(e));
                        }
                    }
                }
            }
        }
    }

    /// Link `li` of `pid` failed: its queue pair is destroyed, and every slice it held is dealt
    /// to the rails still up (or waits for one to return).
    pub(super) fn fail_link(&mut self, pid: PeerId, li: usize, now: Duration, why: String) {
        let cooldown = self.options.rails.cooldown;
        let Some(p) = self.peers.get_mut(&pid) else { return };
        let returned = p.links[li].fail(now, cooldown, why);
        for wr in returned {
            if let Wr::Control { ticket, commit, part, slot } = wr {
                if let Some(b) = self.notify_bufs.get_mut(p.links[li].local) {
                    b.busy[slot as usize] = false;
                }
                if let Some(b) = self.batches.get_mut(&ticket) {
                    b.stage.resend(commit, part);
                }
            }
            if let Wr::Notify { ticket } = wr {
                let local = p.links[li].local;
                if let Some(b) = self.batches.get_mut(&ticket) {
                    if b.notify_state == NotifyState::Posted {
                        b.notify_state = NotifyState::Pending;
                    }
                }
                if let Some(bufs) = self.notify_bufs.get_mut(local) {
                    bufs.busy[(ticket as usize) % NOTIFY_SLOTS] = false;
                }
            }
        }
        for b in self.batches.values_mut().filter(|b| b.peer == pid && b.result.is_none()) {
            for r in &mut b.reqs {
                let Some(set) = p.rails.get_mut(&(r.req.local, r.req.remote)) else { continue };
                let Some(rid) = set.links.iter().position(|&l| l == li).map(RailId) else { continue };
                let moved = match r.plan.fail_rail(&mut set.rails, rid, now) {
                    Ok(m) => m,
                    Err(_) => continue,
                };
                b.retries += moved.len() as u64;
            }
        }
        self.requeue(pid);
    }

    /// Rebuilds every link's queue of `pid` from the plans: each posted slice not in flight is
    /// queued on its rail's link.
    pub(super) fn requeue(&mut self, pid: PeerId) {
        let Some(p) = self.peers.get_mut(&pid) else { return };
        let mut inflight = std::collections::HashSet::new();
        for l in &mut p.links {
            l.queue.clear();
            for (w, _) in l.inflight.values() {
                inflight.insert(*w);
            }
        }
        let mut tickets: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.peer == pid && b.error.is_none() && !b.stage.holds())
            .map(|(t, _)| *t)
            .collect();
        tickets.sort_unstable();
        for ticket in tickets {
            let b = &self.batches[&ticket];
            for (ri, r) in b.reqs.iter().enumerate() {
                let set = &p.rails[&(r.req.local, r.req.remote)];
                for (si, s) in r.plan.slices().iter().enumerate() {
                    let w = Wr::Slice { ticket, request: ri, slice: SliceId(si) };
                    if s.state == SliceState::Posted && !inflight.contains(&w) {
                        p.links[set.links[s.rail.0]].queue.push_back(w);
                    }
                }
            }
        }
    }

    /// Slices whose rail failed while no other was up: dealt again once one is.
    fn repost_failed(&mut self, pid: PeerId, now: Duration) {
        let Some(p) = self.peers.get_mut(&pid) else { return };
        let mut moved = false;
        for b in self.batches.values_mut().filter(|b| b.peer == pid && b.error.is_none()) {
            for r in &mut b.reqs {
                if !r.plan.slices().iter().any(|s| s.state == SliceState::Failed) {
                    continue;
                }
                let Some(set) = p.rails.get_mut(&(r.req.local, r.req.remote)) else { continue };
                sync_rails(set, &p.links, now);
                if let Ok(m) = r.plan.repost(&mut set.rails, now) {
                    b.retries += m.len() as u64;
                    moved |= !m.is_empty();
                }
            }
        }
        if moved {
            self.requeue(pid);
        }
    }

    /// Posts what each up link has queued, up to the depth.
    fn post_queued(&mut self, pid: PeerId) {
        let depth = self.options.depth.max(1);
        let n = self.peers.get(&pid).map_or(0, |p| p.links.len());
        for li in 0..n {
            loop {
                let Some(p) = self.peers.get_mut(&pid) else { return };
                let link = &mut p.links[li];
                if !link.is_up() || link.inflight.len() >= depth {
                    break;
                }
                let Some(wr) = link.queue.pop_front() else { break };
                if let Err(why) = self.post_one(pid, li, wr) {
                    let now = self.now();
                    self.fail_link(pid, li, now, why);
                    break;
                }
            }
        }
    }

    /// Posts one slice on link `li`. A slice of a failed batch is dropped.
    fn post_one(&mut self, pid: PeerId, li: usize, wr: Wr) -> Result<(), String> {
        let Wr::Slice { ticket, request, slice } = wr else { return Ok(()) };
        let Some(b) = self.batches.get(&ticket) else { return Ok(()) };
        if b.error.is_some() {
            return Ok(());
        }
        let r = &b.reqs[request];
        let s = r.plan.slices()[slice.0];
        let p = &self.peers[&pid];
        let link = &p.links[li];
        let span = Span::new(r.req.local, r.req.local_offset + s.offset, s.len).map_err(|e| e.to_string())?;
        let mr =
            self.mr(link.local, &span).ok_or_else(|| format!("no registration of {span} on {}", link.local_name))?;
        let key = p
            .meta
            .region(r.req.remote)
            .and_then(|m| m.keys.iter().find(|k| k.nic == link.remote))
            .ok_or_else(|| format!("the peer gave no key for {} on {}", r.req.remote, link.remote))?;
        let remote =
            RemoteBuf { addr: key.addr.wrapping_add(r.req.remote_offset + s.offset), rkey: key.rkey, len: s.len };
        let off = span.start() - mr.offset();
        let len = u32::try_from(s.len).map_err(|_| format!("a slice of {} bytes", s.len))?;
        let local = Local::new(&mr, off, len).map_err(|e| e.to_string())?;
        let op = r.req.op;
        if op == Op::Write {
            mr.region_to_bounce(off, s.len).map_err(|e| e.to_string())?;
        }
        let p = self.peers.get_mut(&pid).ok_or("peer gone")?;
        let link = &mut p.links[li];
        let conn = link.conn.as_mut().ok_or("link down")?;
        let id = match op {
            Op::Write => conn.post_write(local, remote),
            Op::Read => conn.post_read(local, remote),
        }
        .map_err(|e| e.to_string())?;
        link.inflight.insert(id, (wr, Instant::now()));
        Ok(())
    }
}

/// Keeps `set`'s rail states in step with its links: a link down is a rail down, a link up
/// again is a rail up.
fn sync_rails(set: &mut RailSet, links: &[Link], now: Duration) {
    for (i, &li) in set.links.iter().enumerate() {
        let id = RailId(i);
        if links[li].is_up() {
            if !set.rails.is_up(id, now) {
                let _ = set.rails.revive(id);
            }
        } else if set.rails.is_up(id, now) {
            let _ = set.rails.fail(id, now);
        }
    }
}
