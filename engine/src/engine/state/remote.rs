//! Staging on the peer (see `stage`): what a batch asks the peer's engine to copy before its
//! reads and after its writes, the answers, and, on the accepting side, the copies asked for.

use super::*;
use crate::engine::notify::{Message, Received};
use crate::engine::stage::{self, Entry, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PartState {
    Pending,
    Posted,
    Acked,
}

/// One part of a staging request: its message and where it stands.
pub(super) struct Part {
    wire: Vec<u8>,
    state: PartState,
}

/// A batch's staging on the peer.
#[derive(Default)]
pub(super) struct Staging {
    /// Region to bounce before the reads: the batch's slices wait for every part's answer.
    out: Vec<Part>,
    /// The batch writes memory that bounces on the peer: a commit once every slice landed.
    writes: bool,
    /// Bounce to region, built once every slice landed.
    commit: Option<Vec<Part>>,
}

impl Staging {
    /// The slices wait for the peer's stage-out.
    pub fn holds(&self) -> bool {
        self.out.iter().any(|p| p.state != PartState::Acked)
    }

    /// The peer has copied everything the batch asked for.
    pub fn done(&self) -> bool {
        !self.holds()
            && (!self.writes || self.commit.as_ref().is_some_and(|c| c.iter().all(|p| p.state == PartState::Acked)))
    }

    fn parts(&self, commit: bool) -> &[Part] {
        if commit {
            self.commit.as_deref().unwrap_or_default()
        } else {
            &self.out
        }
    }

    fn part_mut(&mut self, commit: bool, part: u16) -> Option<&mut Part> {
        let parts = if commit { self.commit.as_mut()? } else { &mut self.out };
        parts.get_mut(part as usize)
    }

    /// A part's message was lost with its link: it is sent again.
    pub fn resend(&mut self, commit: bool, part: u16) {
        if let Some(p) = self.part_mut(commit, part).filter(|p| p.state == PartState::Posted) {
            p.state = PartState::Pending;
        }
    }
}

fn parts(ticket: u64, kind: Kind, entries: Vec<Entry>) -> Vec<Part> {
    stage::pack(entries, WIRE)
        .into_iter()
        .enumerate()
        .map(|(i, e)| Part { wire: stage::encode_control(ticket, kind, i as u16, &e), state: PartState::Pending })
        .collect()
}

impl Inner {
    /// The staging of batch `ticket` about to be posted: each read of memory that bounces on the
    /// peer is staged out on every NIC of its rails (a slice moved to another rail finds its bytes
    /// there too).
    pub(super) fn staging_for(&self, peer: PeerId, ticket: u64, reqs: &[Req]) -> Staging {
        let Some(p) = self.peers.get(&peer) else { return Staging::default() };
        let mut out = Vec::new();
        let mut writes = false;
        for r in reqs {
            let Some(set) = p.rails.get(&(r.req.local, r.req.remote)).filter(|s| s.staged) else { continue };
            if r.req.op == Op::Write {
                writes = true;
                continue;
            }
            for &li in &set.links {
                let e = Entry {
                    nic: p.links[li].remote.clone(),
                    region: r.req.remote,
                    offset: r.req.remote_offset,
                    len: r.req.len,
                };
                if !out.contains(&e) {
                    out.push(e);
                }
            }
        }
        Staging { out: parts(ticket, Kind::StageOut, out), writes, commit: None }
    }

    /// What batch `ticket`, every slice landed, asks the peer to commit: each slice of a write
    /// into memory that bounces there, on the NIC it landed through, adjacent ones merged.
    fn commit_entries(&self, ticket: u64) -> Vec<Entry> {
        let b = &self.batches[&ticket];
        let Some(p) = self.peers.get(&b.peer) else { return Vec::new() };
        let mut out: Vec<Entry> = Vec::new();
        for r in b.reqs.iter().filter(|r| r.req.op == Op::Write) {
            let Some(set) = p.rails.get(&(r.req.local, r.req.remote)).filter(|s| s.staged) else { continue };
            for s in r.plan.slices() {
                let nic = &p.links[set.links[s.rail.0]].remote;
                let offset = r.req.remote_offset + s.offset;
                match out.last_mut() {
                    Some(e) if e.nic == *nic && e.region == r.req.remote && e.offset + e.len == offset => {
                        e.len += s.len
                    }
                    _ => out.push(Entry { nic: nic.clone(), region: r.req.remote, offset, len: s.len }),
                }
            }
        }
        out
    }

    /// Posts the staging requests due: stage-outs at once, a commit once every slice landed.
    pub(super) fn send_staging(&mut self) {
        let due: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.error.is_none() && b.result.is_none() && !b.stage.done())
            .map(|(t, _)| *t)
            .collect();
        for ticket in due {
            let b = &self.batches[&ticket];
            if b.stage.writes && b.stage.commit.is_none() && !b.stage.holds() && b.reqs.iter().all(|r| r.plan.done()) {
                let commit = parts(ticket, Kind::Commit, self.commit_entries(ticket));
                if let Some(b) = self.batches.get_mut(&ticket) {
                    b.stage.commit = Some(commit);
                }
            }
            for commit in [false, true] {
                for part in 0..self.batches[&ticket].stage.parts(commit).len() {
                    if self.batches[&ticket].stage.parts(commit)[part].state == PartState::Pending
                        && !self.post_part(ticket, commit, part as u16)
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Sends one part on the first link up with a free send buffer; false when there is none
    /// this round.
    fn post_part(&mut self, ticket: u64, commit: bool, part: u16) -> bool {
        let pid = self.batches[&ticket].peer;
        let Some(p) = self.peers.get_mut(&pid) else { return false };
        let Some(li) = p.links.iter().position(|l| l.is_up()) else { return false };
        let link = &mut p.links[li];
        let bufs = &mut self.notify_bufs[link.local];
        let Some(slot) = bufs.busy.iter().position(|b| !b) else { return false };
        let Some(b) = self.batches.get_mut(&ticket) else { return false };
        let Some(pt) = b.stage.part_mut(commit, part) else { return false };
        let off = (slot * WIRE) as u64;
        let posted = bufs
            .mr
            .region()
            .write_at(off, &pt.wire)
            .map_err(|e| e.to_string())
            .and_then(|()| Local::new(&bufs.mr, off, pt.wire.len() as u32).map_err(|e| e.to_string()))
            .and_then(|l| link.conn.as_mut().ok_or("link down".to_string())?.post_send(l).map_err(|e| e.to_string()));
        match posted {
            Ok(id) => {
                bufs.busy[slot] = true;
                pt.state = PartState::Posted;
                let wr = Wr::Control { ticket, commit, part, slot: slot as u16 };
                link.inflight.insert(id, (wr, Instant::now()));
                true
            }
            Err(why) => {
                let now = self.now();
                self.fail_link(pid, li, now, why);
                false
            }
        }
    }

    /// The peer's answers that arrived on link `li` of `pid`.
    pub(super) fn poll_answers(&mut self, pid: PeerId, li: usize, now: Duration) {
        let Some(link) = self.peers.get_mut(&pid).map(|p| &mut p.links[li]) else { return };
        let (Some(conn), Some(ring)) = (link.conn.as_mut(), link.ring.as_mut()) else { return };
        let mut got = Vec::new();
        if let Err(why) = ring.poll(conn, &mut got) {
            // With work requests in flight, their completions name the cause (a receive is
            // only flushed by it); with none, this is the first sign.
            if link.inflight.is_empty() {
                self.fail_link(pid, li, now, why);
            } else {
                tracing::debug!(nic = %link.local_name, "answers' ring: {why}");
            }
        }
        for m in got.into_iter().filter(|m| m.kind == Kind::Ack) {
            match stage::decode_ack(&m.body) {
                Ok((of, part, result)) => self.answered(m.ticket, of == Kind::Commit, part, result),
                Err(e) => tracing::debug!("an answer this engine cannot read: {e}"),
            }
        }
    }

    fn answered(&mut self, ticket: u64, commit: bool, part: u16, result: Result<(), String>) {
        let Some(b) = self.batches.get_mut(&ticket) else { return };
        if let Err(error) = result {
            b.error.get_or_insert(EngineError::RemoteStaging { error });
            return;
        }
        if let Some(p) = b.stage.part_mut(commit, part) {
            p.state = PartState::Acked;
        }
        if !commit && !b.stage.holds() {
            let pid = b.peer;
            self.requeue(pid);
        }
    }

    /// On the accepting side: does the copies a staging request asks for, and gives the answer
    /// to send back.
    pub(super) fn serve_staging(&self, m: &Message) -> Vec<u8> {
        let commit = m.kind == Kind::Commit;
        let (part, result) = match stage::decode_control(&m.body) {
            Ok((part, entries)) => (part, entries.iter().try_for_each(|e| self.stage_copy(e, commit))),
            Err(e) => (0, Err(format!("a staging request this engine cannot read: {e}"))),
        };
        if let Err(e) = &result {
            tracing::warn!("staging for a peer failed: {e}");
        }
        stage::encode_ack(m.ticket, m.kind, part, &result)
    }

    fn stage_copy(&self, e: &Entry, commit: bool) -> Result<(), String> {
        let nic =
            self.nics.iter().position(|n| n.nic.name() == e.nic).ok_or_else(|| format!("no NIC {} here", e.nic))?;
        let span = Span::new(e.region, e.offset, e.len).map_err(|x| x.to_string())?;
        let mr = self.mr(nic, &span).ok_or_else(|| format!("{span} is not registered on {}", e.nic))?;
        let off = e.offset - mr.offset();
        let copied = if commit { mr.bounce_to_region(off, e.len) } else { mr.region_to_bounce(off, e.len) };
        copied.map_err(|x| format!("{span} on {}: {x}", e.nic))
    }

    /// Messages that arrived on accepted connections: notifications, each once (a peer that
    /// left closes its ring), and staging requests, each answered. `Engine::notifications`
    /// polls only this.
    pub(in crate::engine) fn poll_incoming(&mut self) {
        let mut got: Vec<(usize, Received)> = Vec::new();
        for (i, inc) in self.incoming.iter_mut().enumerate() {
            let mut g = Vec::new();
            inc.poll(&mut g);
            got.extend(g.into_iter().map(|r| (i, r)));
            inc.send_answers();
            if !inc.closed && inc.conn.check_peer().is_err() {
                inc.closed = true;
            }
        }
        for (i, r) in got {
            match r.message.kind {
                Kind::Note => {
                    if self.seen.first((r.token, r.message.ticket)) {
                        self.notes.push(r.note());
                    }
                }
                Kind::StageOut | Kind::Commit => {
                    let answer = self.serve_staging(&r.message);
                    self.incoming[i].answer(answer);
                }
                Kind::Ack => {}
            }
        }
        self.incoming.retain(|i| !i.closed);
    }
}
