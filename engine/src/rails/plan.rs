//! One request's slices and their states, a pure state machine: each slice is posted on a rail,
//! then acknowledged, or failed with its rail and posted again on another. Only the rail a slice
//! is posted on can acknowledge it, so a late completion from a failed rail counts for nothing.
//!
//! Owns: `Plan`, `Slice`, `SliceId`, `SliceState`, `Repost`, `PlanError`. Must not: pick a rail
//! itself (`Rails` deals them) or read the clock.

use std::time::Duration;

use super::{RailError, RailId, Rails};

/// Index of a slice in its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceId(pub usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceState {
    Posted,
    Acked,
    /// Its rail failed and no rail took it yet.
    Failed,
}

/// Bytes `offset..offset + len` of the request, on `rail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub offset: u64,
    pub len: u64,
    pub rail: RailId,
    pub state: SliceState,
    /// How many times it was posted again after a failure.
    pub retries: u32,
}

/// A slice moved off a failed rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repost {
    pub slice: SliceId,
    pub from: RailId,
    pub to: RailId,
}

/// A completion that does not fit the plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0:?} is not a slice of this plan ({1} slices)")]
    UnknownSlice(SliceId, usize),
    #[error("{slice:?} is {state:?} on {on:?}: an acknowledgement from {from:?} does not count")]
    NotPosted { slice: SliceId, state: SliceState, on: RailId, from: RailId },
}

/// The slices of one request of `len` bytes.
#[derive(Debug, Clone)]
pub struct Plan {
    len: u64,
    slices: Vec<Slice>,
}

impl Plan {
    /// Slices of `slice` bytes (the last one shorter) on the rails `dealt`, one per slice.
    pub(super) fn new(len: u64, slice: u64, dealt: Vec<RailId>) -> Plan {
        let slices = dealt
            .into_iter()
            .enumerate()
            .map(|(i, rail)| {
                let offset = i as u64 * slice;
                Slice { offset, len: slice.min(len - offset), rail, state: SliceState::Posted, retries: 0 }
            })
            .collect();
        Plan { len, slices }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    pub fn slices(&self) -> &[Slice] {
        &self.slices
    }

    /// True when every slice is acknowledged.
    pub fn done(&self) -> bool {
        self.slices.iter().all(|s| s.state == SliceState::Acked)
    }

    /// Bytes of the request placed on each rail (acknowledged or not), for the report.
    pub fn bytes_on(&self, rail: RailId) -> u64 {
        self.slices.iter().filter(|s| s.rail == rail).map(|s| s.len).sum()
    }

    /// `rail` acknowledged `slice`; only the rail it is posted on may.
    pub fn ack(&mut self, slice: SliceId, rail: RailId) -> Result<(), PlanError> {
        let n = self.slices.len();
        let s = self.slices.get_mut(slice.0).ok_or(PlanError::UnknownSlice(slice, n))?;
        if s.state != SliceState::Posted || s.rail != rail {
            return Err(PlanError::NotPosted { slice, state: s.state, on: s.rail, from: rail });
        }
        s.state = SliceState::Acked;
        Ok(())
    }

    /// `rail` failed at `now`: it goes down in `rails`, its unacknowledged slices fail and are
    /// dealt to the rails still up. Returns what to post again and where; when no rail is up the
    /// slices stay failed (`repost` takes them once a rail returns) and the error says so.
    pub fn fail_rail(&mut self, rails: &mut Rails, rail: RailId, now: Duration) -> Result<Vec<Repost>, RailError> {
        rails.fail(rail, now)?;
        for s in self.slices.iter_mut().filter(|s| s.rail == rail && s.state == SliceState::Posted) {
            s.state = SliceState::Failed;
        }
        self.repost(rails, now)
    }

    /// Deal every failed slice to the rails up at `now`.
    pub fn repost(&mut self, rails: &mut Rails, now: Duration) -> Result<Vec<Repost>, RailError> {
        let failed: Vec<usize> =
            (0..self.slices.len()).filter(|&i| self.slices[i].state == SliceState::Failed).collect();
        if failed.is_empty() {
            return Ok(Vec::new());
        }
        let Some(to) = rails.redeal(failed.len(), now) else {
            let unsent = failed.iter().map(|&i| self.slices[i].len).sum();
            return Err(RailError::NoRailLeft { slices: failed.len(), unsent });
        };
        let mut out = Vec::with_capacity(failed.len());
        for (i, to) in failed.into_iter().zip(to) {
            let s = &mut self.slices[i];
            out.push(Repost { slice: SliceId(i), from: s.rail, to });
            *s = Slice { rail: to, state: SliceState::Posted, retries: s.retries + 1, ..*s };
        }
        Ok(out)
    }
}
