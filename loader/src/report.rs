//! What a load was asked to do and what it did.

use peermem::mover::RouteHealth;

/// How the bytes moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `pread` straight into the destination's CPU mapping: with O_DIRECT the device DMAs into
    /// those pages (host pages, or p2pmem pages through the kernel's P2PDMA path).
    KernelDirect,
    /// The userspace VFIO driver DMAs straight into the destination at the routed address.
    VfioDirect,
    /// Staged through `depth` host buffers in flight, then copied by the CPU.
    Bounce { why: String },
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::KernelDirect => write!(f, "direct: pread straight into the destination's pages"),
            Method::VfioDirect => write!(f, "direct: the VFIO driver DMAs into the destination"),
            Method::Bounce { why } => write!(f, "bounce through host staging buffers: {why}"),
        }
    }
}

/// Knobs of a load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Bytes per request / per staging buffer (a multiple of 4096).
    pub chunk: u64,
    /// Requests (direct) or staging buffers (bounce) in flight.
    pub depth: usize,
    /// Byte offset in the destination.
    pub dest_offset: u64,
    /// Re-read the source through host memory and compare checksums (not timed).
    pub verify: bool,
    /// Routes probed broken stay broken across loads that share this.
    pub health: RouteHealth,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { chunk: 1 << 20, depth: 4, dest_offset: 0, verify: true, health: RouteHealth::new() }
    }
}

/// What a load did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub source: String,
    /// The registry's route kind for (destination, the device reading the source).
    pub route: &'static str,
    pub method: Method,
    /// Why: the route's reasons, then the loader's.
    pub reasons: Vec<String>,
    pub bytes: u64,
    /// Wall time of the copy (verification excluded).
    pub seconds: f64,
    /// Checksum of the destination bytes after the load.
    pub checksum: u64,
    /// Checksum of the source range read again through host memory (when verified).
    pub source_checksum: Option<u64>,
}

impl LoadReport {
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e6
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "source:     {}", self.source)?;
        writeln!(f, "route:      {}", self.route)?;
        writeln!(f, "method:     {}", self.method)?;
        for r in &self.reasons {
            writeln!(f, "  why:      {r}")?;
        }
        writeln!(f, "moved:      {} bytes in {:.3} s = {:.1} MB/s", self.bytes, self.seconds, self.mb_per_s())?;
        match self.source_checksum {
            Some(s) => write!(f, "checksum:   {:#018x} (source {s:#018x}: verified)", self.checksum),
            None => write!(f, "checksum:   {:#018x} (not verified)", self.checksum),
        }
    }
}
