//! The rail scheduler. A rail is a (local NIC, remote NIC) pair with the bottleneck bandwidth the
//! fabric gives it; a request of N bytes is cut into slices (never across the request's end, each
//! byte once) dealt to the rails that are up in proportion to each rail's weight: the bottleneck
//! bandwidth, capped by the throughput the rail delivers (a moving average fed by completions).
//! Equal weights take turns (smooth weighted round-robin, its state kept across requests). A rail
//! that fails is down for a cool-down; time is passed in, never read from a clock.
//!
//! - [`plan`]: one request's slices and their states; a failed rail's slices moved to the others.
//! - [`fabric`]: which rails exist for a pair of memories, from the core's NIC ranking.
//!
//! Owns: `Rails`, `Rail`, `RailId`, `RailState`, `RailOptions`, `RailError`. Must not: decide
//! whether a NIC reaches a memory (`fabric` takes the core's answer), or post a work request.

pub mod fabric;
pub mod plan;

pub use fabric::{choose, Choice, NicReach, RailSpec};
pub use plan::{Plan, PlanError, Repost, Slice, SliceId, SliceState};

use std::time::Duration;

/// Index of a rail in its `Rails`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RailId(pub usize);

/// Whether a rail takes slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RailState {
    Up,
    /// Failed at `since`; takes slices again from `until` on.
    Down {
        since: Duration,
        until: Duration,
    },
}

/// One rail and what the scheduler knows of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rail {
    pub spec: RailSpec,
    pub state: RailState,
    /// Delivered throughput, bytes per second (moving average), once a completion was fed.
    pub delivered: Option<f64>,
}

/// The scheduler's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RailOptions {
    /// Bytes per slice (the last slice of a request may be shorter).
    pub slice: u64,
    /// Weight of the newest completion in the moving average, in (0, 1].
    pub alpha: f64,
    /// How long a failed rail stays out.
    pub cooldown: Duration,
}

impl Default for RailOptions {
    fn default() -> Self {
        RailOptions { slice: 64 << 10, alpha: 0.25, cooldown: Duration::from_secs(1) }
    }
}

/// Why the scheduler refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RailError {
    #[error("no rail given")]
    NoRails,
    #[error("slice size 0: a slice carries at least one byte")]
    ZeroSlice,
    #[error("moving-average weight {0} is not in (0, 1]")]
    BadAlpha(f64),
    #[error("a request of 0 bytes")]
    EmptyRequest,
    #[error("{0:?} is not a rail here ({1} rails)")]
    UnknownRail(RailId, usize),
    #[error("a request of {len} bytes in slices of {slice} needs more than {max} slices")]
    TooManySlices { len: u64, slice: u64, max: usize },
    #[error("no rail is up: {unsent} bytes in {slices} slices wait for a rail to return")]
    NoRailLeft { slices: usize, unsent: u64 },
}

/// The rails between two memories and the scheduler's state over them.
#[derive(Debug, Clone)]
pub struct Rails {
    rails: Vec<Rail>,
    options: RailOptions,
    /// Smooth weighted round-robin credit per rail, kept across requests.
    credit: Vec<i64>,
}

/// The most slices one request is cut into (a bound on the plan's memory).
pub const MAX_SLICES: usize = 1 << 24;

/// Gb/s to bytes/s.
fn bytes_per_s(gbs: f64) -> f64 {
    gbs * 1e9 / 8.0
}

impl Rails {
    pub fn new(specs: Vec<RailSpec>, options: RailOptions) -> Result<Rails, RailError> {
        if specs.is_empty() {
            return Err(RailError::NoRails);
        }
        if options.slice == 0 {
            return Err(RailError::ZeroSlice);
        }
        if !(options.alpha > 0.0 && options.alpha <= 1.0) {
            return Err(RailError::BadAlpha(options.alpha));
        }
        let credit = vec![0; specs.len()];
        let rails = specs.into_iter().map(|spec| Rail { spec, state: RailState::Up, delivered: None }).collect();
        Ok(Rails { rails, options, credit })
    }

    pub fn options(&self) -> &RailOptions {
        &self.options
    }

    pub fn rails(&self) -> &[Rail] {
        &self.rails
    }

    pub fn rail(&self, id: RailId) -> Result<&Rail, RailError> {
        self.rails.get(id.0).ok_or(RailError::UnknownRail(id, self.rails.len()))
    }

    /// True when `id` takes slices at time `now` (up, or its cool-down is over).
    pub fn is_up(&self, id: RailId, now: Duration) -> bool {
        match self.rails.get(id.0).map(|r| r.state) {
            Some(RailState::Up) => true,
            Some(RailState::Down { until, .. }) => now >= until,
            None => false,
        }
    }

    /// The rails that take slices at `now`.
    pub fn up(&self, now: Duration) -> Vec<RailId> {
        (0..self.rails.len()).map(RailId).filter(|&r| self.is_up(r, now)).collect()
    }

    /// Take `id` out from `now` until the cool-down has passed.
    pub fn fail(&mut self, id: RailId, now: Duration) -> Result<(), RailError> {
        let cooldown = self.options.cooldown;
        let n = self.rails.len();
        let rail = self.rails.get_mut(id.0).ok_or(RailError::UnknownRail(id, n))?;
        rail.state = RailState::Down { since: now, until: now.saturating_add(cooldown) };
        Ok(())
    }

    /// `id` is back (its transport was connected again): it takes slices from now on.
    pub fn revive(&mut self, id: RailId) -> Result<(), RailError> {
        let n = self.rails.len();
        let rail = self.rails.get_mut(id.0).ok_or(RailError::UnknownRail(id, n))?;
        rail.state = RailState::Up;
        Ok(())
    }

    /// Feed a completion: `bytes` delivered by `id` while it was busy for `busy`.
    pub fn delivered(&mut self, id: RailId, bytes: u64, busy: Duration) -> Result<(), RailError> {
        let alpha = self.options.alpha;
        let n = self.rails.len();
        let rail = self.rails.get_mut(id.0).ok_or(RailError::UnknownRail(id, n))?;
        if busy.is_zero() || bytes == 0 {
            return Ok(());
        }
        let rate = bytes as f64 / busy.as_secs_f64();
        rail.delivered = Some(rail.delivered.map_or(rate, |avg| avg + alpha * (rate - avg)));
        Ok(())
    }

    /// A rail's weight in bytes/s: its bottleneck bandwidth, capped by what it delivers. A rail
    /// whose bandwidth nobody knows counts as the mean of those known (1 byte/s when none is),
    /// until its completions say better.
    pub fn weight(&self, id: RailId) -> f64 {
        let known: Vec<f64> = self.rails.iter().filter_map(|r| r.spec.bandwidth_gbs).map(bytes_per_s).collect();
        let unknown = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        let rail = &self.rails[id.0];
        let bound = rail.spec.bandwidth_gbs.map_or(unknown, bytes_per_s);
        match rail.delivered {
            Some(d) if rail.spec.bandwidth_gbs.is_some() => d.min(bound),
            Some(d) => d,
            None => bound,
        }
    }

    /// The next rail among `up` (smooth weighted round-robin: each gains its weight, the richest
    /// takes the slice and pays the total; the lowest id wins a tie). Integer credits, so equal
    /// weights tie exactly.
    fn next(&mut self, up: &[RailId], weights: &[i64]) -> RailId {
        let total: i64 = weights.iter().sum();
        let mut best = 0;
        for (i, (&r, &w)) in up.iter().zip(weights).enumerate() {
            self.credit[r.0] += w;
            if self.credit[r.0] > self.credit[up[best].0] {
                best = i;
            }
        }
        self.credit[up[best].0] -= total;
        up[best]
    }

    /// The rail for each of `count` slices, among the rails up at `now`.
    fn deal(&mut self, count: usize, now: Duration) -> Result<Vec<RailId>, RailError> {
        let up = self.up(now);
        if up.is_empty() {
            return Err(RailError::NoRailLeft { slices: count, unsent: 0 });
        }
        let weights: Vec<f64> = up.iter().map(|&r| self.weight(r)).collect();
        let max = weights.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
        // Parts per million of the widest rail, at least one: every rail up gets a turn.
        let weights: Vec<i64> = weights.iter().map(|w| ((w / max * 1e6).round() as i64).max(1)).collect();
        Ok((0..count).map(|_| self.next(&up, &weights)).collect())
    }

    /// Cut a request of `len` bytes into slices dealt to the rails up at `now`: every slice
    /// posted.
    pub fn split(&mut self, len: u64, now: Duration) -> Result<Plan, RailError> {
        if len == 0 {
            return Err(RailError::EmptyRequest);
        }
        let slice = self.options.slice;
        let count = usize::try_from(len.div_ceil(slice))
            .ok()
            .filter(|&c| c <= MAX_SLICES)
            .ok_or(RailError::TooManySlices { len, slice, max: MAX_SLICES })?;
        let dealt = self.deal(count, now).map_err(|_| RailError::NoRailLeft { slices: count, unsent: len })?;
        Ok(Plan::new(len, slice, dealt))
    }

    /// A rail for each of `count` slices to post again at `now`, or `None` when no rail is up.
    fn redeal(&mut self, count: usize, now: Duration) -> Option<Vec<RailId>> {
        self.deal(count, now).ok()
    }
}

#[cfg(test)]
mod tests;
