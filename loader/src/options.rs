//! What a user can state about loads: strictness, verification, chunk size, queue depth, the I/O
//! engine, how files are read (O_DIRECT or through the page cache) and the bound of every wait;
//! each settable by a `PEERMEM_*` environment variable.
//!
//! Owns: the defaults and their parsing. Must not: silently replace a malformed setting with a
//! default (a bad value is a typed error naming the variable).

use std::time::Duration;

use crate::error::LoadError;

/// O_DIRECT alignment the loader uses for files and block devices (file offsets, lengths and
/// memory addresses); requests are whole multiples of it.
pub const ALIGN: u64 = 4096;
/// Bytes per read request: large enough that a request's own cost vanishes beside its transfer,
/// small enough that staging buffers stay small (`bench/loader-vs-fio.sh` sweeps it; the figures
/// are in bench/RESULTS.md).
pub const DEFAULT_CHUNK: u64 = 1 << 20;
/// Requests in flight: deep enough for a fast NVMe drive's parallelism (swept as above).
pub const DEFAULT_DEPTH: usize = 32;
/// Bound of any wait for progress (one completion, a GPU copy, a ticket's `wait` without a byte
/// landing).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How (and whether) a load checks the bytes it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// No check (the default: a check costs a pass over the bytes).
    #[default]
    Off,
    /// xxh3 of each read's destination bytes, reported, and compared with the read's expected
    /// hash where the caller gave one. No second read of the source.
    Hash,
    /// As `Hash`, and the source range is read a second time through the page cache and its
    /// xxh3 compared (the slow check, only when asked).
    Reread,
}

impl std::str::FromStr for Verify {
    type Err = String;
    fn from_str(s: &str) -> Result<Verify, String> {
        match s {
            "0" | "off" | "false" | "no" => Ok(Verify::Off),
            "1" | "on" | "hash" | "true" | "yes" => Ok(Verify::Hash),
            "reread" => Ok(Verify::Reread),
            _ => Err(format!("{s:?}: expected off, hash or reread")),
        }
    }
}

/// Which I/O engine moves file bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// io_uring when the kernel offers it, else the `preadv` thread pool (reported with why).
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// The thread pool of `preadv` readers, `depth` threads.
    Pool,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "auto" => Ok(Engine::Auto),
            "uring" | "io_uring" => Ok(Engine::Uring),
            "pool" | "preadv" => Ok(Engine::Pool),
            _ => Err(format!("{s:?}: expected auto, uring or pool")),
        }
    }
}

/// How files and block devices are read: straight from the device (O_DIRECT) or through the
/// kernel's page cache (buffered: the kernel copies cached bytes into the destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Judged at open from measurements (`pagecache`): through the page cache when the file is
    /// mostly cached already or the data set fits comfortably in memory, else O_DIRECT. Under
    /// `strict`, O_DIRECT.
    #[default]
    Auto,
    /// O_DIRECT (through the page cache only where the filesystem refuses it).
    Direct,
    /// Through the page cache.
    Buffered,
}

impl IoMode {
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Auto => "auto",
            IoMode::Direct => "direct",
            IoMode::Buffered => "buffered",
        }
    }
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<IoMode, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "direct" | "o_direct" => Ok(IoMode::Direct),
            "buffered" => Ok(IoMode::Buffered),
            _ => Err(format!("{s:?}: expected auto, direct or buffered")),
        }
    }
}

/// How the files opened together are read, for the Auto I/O mode (`Loader::open_many`,
/// `Loader::open_stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Records, scattered, epoch after epoch (a `ShardReader`): a data set that fits is read
    /// through the page cache, read ahead.
    #[default]
    Records,
    /// Whole files, once, in large requests (`peermem load`): O_DIRECT unless already cached.
    Stream,
}

/// Knobs of a `Loader`.
#[derive(Debug, Clone)]
pub struct Options {
    /// A read that cannot go direct (route, alignment, staging) is an error naming why.
    pub strict: bool,
    pub verify: Verify,
    /// Bytes per request and per staging buffer (rounded up to a multiple of 4096).
    pub chunk: u64,
    /// Requests in flight (and staging buffers per pool).
    pub depth: usize,
    pub engine: Engine,
    /// How files and block devices are opened (`Loader::open`, `Loader::open_many`).
    pub io: IoMode,
    /// Register host destinations' pages with io_uring as fixed buffers.
    pub fixed_buffers: bool,
    /// Read into CUDA memory through GPUDirect Storage (cuFile) where the library, its driver,
    /// the file and the route allow; off: always through pinned staging.
    pub gds: bool,
    /// Bound of every wait for progress.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strict: false,
            verify: Verify::Off,
            chunk: DEFAULT_CHUNK,
            depth: DEFAULT_DEPTH,
            engine: Engine::Auto,
            io: IoMode::Auto,
            fixed_buffers: true,
            gds: true,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

fn parse<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, LoadError>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse::<T>().map_err(|e| LoadError::BadSetting { var, value: v.to_string(), why: e.to_string() })
}

/// A size with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n = match num.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => num.parse::<u64>(),
    }
    .map_err(|_| format!("{s:?} is not a size (bytes, or with a K/M/G suffix)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} overflows"))
}

/// The environment variable of a setting `check` names.
fn variable(setting: &'static str) -> &'static str {
    match setting {
        "chunk" => "PEERMEM_CHUNK",
        "depth" => "PEERMEM_DEPTH",
        "timeout" => "PEERMEM_TIMEOUT_MS",
        other => other,
    }
}

fn flag(var: &'static str, v: &str) -> Result<bool, LoadError> {
    match v.trim() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(LoadError::BadSetting { var, value: v.into(), why: "expected 1/0, true/false, on/off".into() }),
    }
}

impl Options {
    /// The defaults overridden by `PEERMEM_STRICT`, `PEERMEM_VERIFY` (off|hash|reread),
    /// `PEERMEM_CHUNK` (bytes, K/M/G suffixes), `PEERMEM_DEPTH`, `PEERMEM_ENGINE`
    /// (auto|uring|pool), `PEERMEM_IO` (auto|direct|buffered), `PEERMEM_FIXED_BUFFERS`,
    /// `PEERMEM_GDS`, `PEERMEM_TIMEOUT_MS`.
    pub fn from_env() -> Result<Options, LoadError> {
        Options::from_vars(|k| std::env::var(k).ok())
    }

    /// As `from_env`, reading variables through `get` (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Options, LoadError> {
        let mut o = Options::default();
        if let Some(v) = get("PEERMEM_STRICT") {
            o.strict = flag("PEERMEM_STRICT", &v)?;
        }
        if let Some(v) = get("PEERMEM_VERIFY") {
            o.verify = parse("PEERMEM_VERIFY", &v)?;
        }
        if let Some(v) = get("PEERMEM_CHUNK") {
            o.chunk =
                parse_size(&v).map_err(|why| LoadError::BadSetting { var: "PEERMEM_CHUNK", value: v.clone(), why })?;
        }
        if let Some(v) = get("PEERMEM_DEPTH") {
            o.depth = parse("PEERMEM_DEPTH", &v)?;
        }
        if let Some(v) = get("PEERMEM_ENGINE") {
            o.engine = parse("PEERMEM_ENGINE", &v)?;
        }
        if let Some(v) = get("PEERMEM_IO") {
            o.io = parse("PEERMEM_IO", &v)?;
        }
        if let Some(v) = get("PEERMEM_FIXED_BUFFERS") {
            o.fixed_buffers = flag("PEERMEM_FIXED_BUFFERS", &v)?;
        }
        if let Some(v) = get("PEERMEM_GDS") {
            o.gds = flag("PEERMEM_GDS", &v)?;
        }
        if let Some(v) = get("PEERMEM_TIMEOUT_MS") {
            o.timeout = Duration::from_millis(parse("PEERMEM_TIMEOUT_MS", &v)?);
        }
        // Every setting was valid by default, so a setting `check` refuses came from its variable.
        o.check().map_err(|e| match e {
            LoadError::BadSetting { var, value, why } => LoadError::BadSetting { var: variable(var), value, why },
            e => e,
        })?;
        Ok(o)
    }

    /// Rejects settings no load can run with.
    pub fn check(&self) -> Result<(), LoadError> {
        let bad = |var, value: String, why: &str| Err(LoadError::BadSetting { var, value, why: why.into() });
        if self.chunk == 0 || self.chunk > crate::sys::MAX_FIXED {
            return bad("chunk", self.chunk.to_string(), "must be 1 byte .. 1 GiB");
        }
        if self.depth == 0 || self.depth > 4096 {
            return bad("depth", self.depth.to_string(), "must be 1..=4096");
        }
        if self.timeout.is_zero() {
            return bad("timeout", "0".into(), "must be positive");
        }
        Ok(())
    }

    /// The chunk rounded up to whole 4096-byte blocks (O_DIRECT granularity).
    pub(crate) fn block_chunk(&self) -> u64 {
        self.chunk.div_ceil(ALIGN) * ALIGN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn every_setting_comes_from_its_environment_variable() {
        let o = Options::from_vars(vars(&[
            ("PEERMEM_STRICT", "1"),
            ("PEERMEM_VERIFY", "reread"),
            ("PEERMEM_CHUNK", "256K"),
            ("PEERMEM_DEPTH", "8"),
            ("PEERMEM_ENGINE", "pool"),
            ("PEERMEM_IO", "buffered"),
            ("PEERMEM_FIXED_BUFFERS", "off"),
            ("PEERMEM_GDS", "0"),
            ("PEERMEM_TIMEOUT_MS", "1500"),
        ]))
        .unwrap();
        assert!(!o.gds);
        assert!(o.strict);
        assert_eq!(o.verify, Verify::Reread);
        assert_eq!((o.chunk, o.depth, o.engine), (256 << 10, 8, Engine::Pool));
        assert_eq!(o.io, IoMode::Buffered);
        assert!(!o.fixed_buffers);
        assert_eq!(o.timeout, Duration::from_millis(1500));
        let d = Options::from_vars(vars(&[])).unwrap();
        assert_eq!((d.strict, d.verify, d.chunk, d.depth), (false, Verify::Off, DEFAULT_CHUNK, DEFAULT_DEPTH));
        assert_eq!(d.io, IoMode::Auto);
        assert!(d.gds, "GPUDirect Storage is tried by default");
        for (v, want) in [("auto", IoMode::Auto), ("direct", IoMode::Direct), (" buffered ", IoMode::Buffered)] {
            assert_eq!(Options::from_vars(vars(&[("PEERMEM_IO", v)])).unwrap().io, want, "{v:?}");
        }
    }

    #[test]
    fn a_malformed_setting_is_an_error_naming_the_variable() {
        for (k, v) in [
            ("PEERMEM_DEPTH", "many"),
            ("PEERMEM_DEPTH", "0"),
            ("PEERMEM_CHUNK", "1Q"),
            ("PEERMEM_CHUNK", "99999999999G"),
            ("PEERMEM_VERIFY", "maybe"),
            ("PEERMEM_STRICT", "2"),
            ("PEERMEM_GDS", "maybe"),
            ("PEERMEM_ENGINE", "dpdk"),
            ("PEERMEM_IO", "bogus"),
            ("PEERMEM_IO", ""),
            ("PEERMEM_TIMEOUT_MS", "0"),
        ] {
            let e = Options::from_vars(vars(&[(k, v)])).unwrap_err();
            assert!(matches!(e, LoadError::BadSetting { .. }), "{k}={v}: {e}");
        }
        for (k, v) in [("PEERMEM_DEPTH", "0"), ("PEERMEM_CHUNK", "0"), ("PEERMEM_TIMEOUT_MS", "0")] {
            let e = Options::from_vars(vars(&[(k, v)])).unwrap_err();
            assert!(matches!(&e, LoadError::BadSetting { var, .. } if *var == k), "{k}={v}: {e}");
        }
        let e = Options::from_vars(vars(&[("PEERMEM_IO", "bogus")])).unwrap_err();
        assert!(matches!(e, LoadError::BadSetting { var: "PEERMEM_IO", .. }), "{e}");
        assert!(e.to_string().contains("expected auto, direct or buffered"), "{e}");
    }

    #[test]
    fn sizes_take_suffixes_and_hex() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("128k").unwrap(), 128 << 10);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
    }
}
