//! The report stage: what a batch did, built once per batch from its plan and what its reads
//! moved, with one `DestReport` per destination (and reading device). The CLI prints it and
//! the Python package returns it; nobody merges reports.
//!
//! Owns: `Report`, `DestReport`, `Via`, and the words for them. Must not: decide or move anything.

use peermem::{RegionId, RouteKind};

/// How the bytes of one destination moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The reader wrote the destination itself: a device (O_DIRECT into its pages, or NVMe
    /// commands aimed at its routed address), or the CPU (a buffered read: the kernel's copy out
    /// of the page cache through the destination's CPU mapping). No staging buffer.
    Direct,
    /// Read into host staging buffers, copied on by the CPU.
    Bounce,
    /// Read into pinned host staging buffers, copied on by the GPU (device-local memory).
    GpuStaged,
    /// GPUDirect Storage: cuFile has the storage device write the CUDA memory itself.
    Gds,
}

impl Via {
    /// The reading device wrote the destination itself (no staging buffer of the loader's).
    pub fn is_direct(self) -> bool {
        matches!(self, Via::Direct | Via::Gds)
    }
    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Bounce => "bounce",
            Via::GpuStaged => "staged-gpu-copy",
            Via::Gds => "gds",
        }
    }
}

/// What happened for one destination of a batch, as read by one device.
#[derive(Debug, Clone)]
pub struct DestReport {
    pub region: RegionId,
    /// The source that named the reading device, as opened.
    pub source: String,
    /// How that source was read and why: `O_DIRECT: ...` or `buffered: ...` (`Source::io`).
    pub io: String,
    /// The registry's route for (destination, reading device); `None` when it had none.
    pub route: Option<RouteKind>,
    pub via: Via,
    /// How, in words (engine, fixed buffers, staging).
    pub method: String,
    /// The route's reasons, then the planner's and the loader's.
    pub reasons: Vec<String>,
    /// Bytes that went direct, and through staging.
    pub bytes_direct: u64,
    pub bytes_staged: u64,
}

impl DestReport {
    /// The route's CLI/JSON name (`unresolved` when there is none).
    pub fn route_name(&self) -> &'static str {
        RouteKind::name_of(self.route.as_ref())
    }
}

/// What a batch did.
#[derive(Debug, Clone)]
pub struct Report {
    pub bytes: u64,
    /// Wall time from the start of the batch's I/O to its last completion (verification excluded).
    pub seconds: f64,
    /// The I/O engines that ran, and why when one is a fallback.
    pub engine: String,
    /// Read requests the batch ran (direct requests that continue each other merged).
    pub requests: usize,
    /// How each source of the batch was read and why, once per source: `path: mode: why`.
    pub io: Vec<String>,
    pub dests: Vec<DestReport>,
    /// Every fallback taken (engine, fixed buffers, misaligned pieces staged, O_DIRECT refused).
    pub fallbacks: Vec<String>,
    /// xxh3-64 of each read's destination bytes, in batch order (verification on).
    pub checksums: Vec<u64>,
    /// xxh3-64 of each read's source range read a second time, in batch order (`Verify::Reread`).
    pub source_checksums: Vec<u64>,
    /// `Some(true)` when every check asked for passed (a failed one is an error instead);
    /// `None` when verification was off or something could not be checked.
    pub verified: Option<bool>,
}

impl Report {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e6
    }
    /// The route of the first destination (`none` for an empty batch).
    pub fn route(&self) -> &'static str {
        self.dests.first().map_or("none", DestReport::route_name)
    }
    /// How the first destination was filled (`none` for an empty batch).
    pub fn via(&self) -> &'static str {
        self.dests.first().map_or("none", |d| d.via.name())
    }
    /// Whether every destination was planned direct: the reader (a device, or the CPU for a
    /// buffered read) wrote it itself (only pieces its alignment rules out were staged, as
    /// `bytes_staged` says), GPUDirect Storage included.
    pub fn direct(&self) -> bool {
        !self.dests.is_empty() && self.dests.iter().all(|d| d.via.is_direct())
    }
    pub fn bytes_direct(&self) -> u64 {
        self.dests.iter().map(|d| d.bytes_direct).sum()
    }
    pub fn bytes_staged(&self) -> u64 {
        self.dests.iter().map(|d| d.bytes_staged).sum()
    }
    /// The first destination's reasons, then every fallback.
    pub fn reasons(&self) -> Vec<String> {
        let mut r = self.dests.first().map(|d| d.reasons.clone()).unwrap_or_default();
        r.extend(self.fallbacks.iter().cloned());
        r
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "engine:     {} ({} requests)", self.engine, self.requests)?;
        if self.io.len() > 1 {
            for s in &self.io {
                writeln!(f, "io:         {s}")?;
            }
        }
        for d in &self.dests {
            writeln!(f, "{}:", d.region)?;
            writeln!(f, "  source:   {}", d.source)?;
            writeln!(f, "  io:       {}", d.io)?;
            writeln!(f, "  route:    {}", d.route_name())?;
            writeln!(f, "  method:   {} ({})", d.via.name(), d.method)?;
            writeln!(f, "  moved:    {} bytes direct, {} staged", d.bytes_direct, d.bytes_staged)?;
            for r in &d.reasons {
                writeln!(f, "  why:      {r}")?;
            }
        }
        for fb in &self.fallbacks {
            writeln!(f, "fallback:   {fb}")?;
        }
        let v = match self.verified {
            Some(true) => "verified (xxh3)",
            Some(false) => "NOT verified",
            None => "not verified",
        };
        write!(f, "moved:      {} bytes in {:.3} s = {:.1} MB/s, {v}", self.bytes, self.seconds, self.mb_per_s())
    }
}
