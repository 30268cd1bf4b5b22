//! The Auto I/O mode's judgement: whether the files of a data set are read through the page
//! cache or with O_DIRECT, from measurements taken when they are opened together: how much of
//! each file the page cache holds (`cachestat(2)`, else `mincore(2)` over a read-only mapping,
//! else unknown) and how much memory the data set may take (`MemAvailable` of /proc/meminfo,
//! lowered to the memory limit of this process's cgroup, v2 `memory.max` or v1
//! `memory.limit_in_bytes`, where one is set).
//!
//! Owns: the measurements, the rule (`choose`, a pure function of them) and the read-ahead it
//! asks for (`read_ahead`). Must not: open or read sources, or decide direct or bounce (the
//! mover does, for whichever way a file is read).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Weak;

use crate::options::Access;

/// Bytes advised per `WILLNEED` call. The kernel reads at most its read-ahead window (or its
/// largest request, if larger) per call, from the call's offset: 128 KiB on a block device left
/// at the default, so larger steps would leave holes there.
const READ_AHEAD_STEP: u64 = 128 << 10;
/// Files larger than this are not mapped to count resident pages when `cachestat` is missing
/// (`mincore` needs a byte per page in memory): their residency is unknown instead.
const MINCORE_MAX: u64 = 64 << 30;
/// A cgroup limit at or above this is the kernel's "no limit" (v1 reports about 2^63).
const NO_LIMIT: u64 = 1 << 60;

/// The memory a data set read through the page cache may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Room {
    /// `MemAvailable` in bytes (or why it is unknown).
    pub available: Result<u64, String>,
    /// The lowest memory limit on this process's cgroup and its ancestors, when one is set.
    pub cgroup: Option<u64>,
}

impl Room {
    /// The bound a data set is held against, and what it is in words; `Err`: none is known.
    fn bound(&self) -> Result<(u64, &'static str), String> {
        const CGROUP: &str = "cgroup memory limit";
        match (&self.available, self.cgroup) {
            (Ok(a), Some(c)) if c < *a => Ok((c, CGROUP)),
            (Ok(a), _) => Ok((*a, "of available memory")),
            (Err(_), Some(c)) => Ok((c, CGROUP)),
            (Err(why), None) => Err(why.clone()),
        }
    }
}

/// What Auto knows about one file of a data set.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    /// Bytes of the file.
    pub file: u64,
    /// Bytes of it in the page cache, or why that is unknown.
    pub resident: Result<u64, String>,
    /// Bytes of the whole data set opened together (this file included).
    pub set: u64,
    pub room: Room,
}

/// How Auto reads one file, and why in words (for the report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Choice {
    pub buffered: bool,
    /// Advise the kernel to read the file ahead (`POSIX_FADV_WILLNEED`) now.
    pub willneed: bool,
    pub why: String,
}

/// The Auto rule, in order:
/// 1. A file mostly in the page cache already (at least half of its bytes) is read through it:
///    its reads are copies out of memory, which no device read beats, and it needs no read-ahead.
/// 2. A data set that fits comfortably (at most half of the memory bound: `MemAvailable`, or the
///    cgroup's limit where that is lower) is read through the page cache, and each file not yet
///    cached is advised `WILLNEED`: the kernel reads it ahead in large sequential requests in the
///    background, so scattered record reads (a shuffled epoch) mostly find their pages in memory,
///    and every later epoch reads from memory only. The other half is left to everything else.
/// 3. Otherwise O_DIRECT: a data set larger than that would evict itself (and others' pages)
///    from the page cache as it is read, each byte read from the device and copied once more.
///
/// Unknown memory counts as not fitting; unknown residency as not cached.
pub(crate) fn choose(f: &Facts) -> Choice {
    let resident = f.resident.as_ref().ok().copied().unwrap_or(0).min(f.file);
    if f.file > 0 && resident * 2 >= f.file {
        let why = format!("{} of this {} file already in the page cache", size(resident), size(f.file));
        return Choice { buffered: true, willneed: false, why };
    }
    let cached = match &f.resident {
        Ok(r) => format!("{} of this {} file was in the page cache", size(*r), size(f.file)),
        Err(why) => format!("page-cache residency unknown: {why}"),
    };
    match f.room.bound() {
        Ok((bound, what)) if f.set <= bound / 2 => Choice {
            buffered: true,
            willneed: resident < f.file,
            why: format!(
                "the {} data set fits in half of the {} {what}; read ahead ({cached})",
                size(f.set),
                size(bound)
            ),
        },
        Ok((bound, what)) => Choice {
            buffered: false,
            willneed: false,
            why: format!("the {} data set exceeds half of the {} {what} ({cached})", size(f.set), size(bound)),
        },
        Err(why) => Choice {
            buffered: false,
            willneed: false,
            why: format!("the memory the data set may take is unknown: {why} ({cached})"),
        },
    }
}

/// Bytes of the first `len` bytes of `file` in the page cache, or why that is unknown.
pub(crate) fn resident(file: &File, len: u64) -> Result<u64, String> {
    let page = peermem::mem::page_size();
    let cs = match crate::sys::cachestat_pages(file) {
        Ok(pages) => return Ok((pages * page).min(len)),
        Err(e) => e,
    };
    if len > MINCORE_MAX {
        return Err(format!("cachestat: {cs}; too large to count with mincore"));
    }
    crate::sys::mincore_pages(file, len, page)
        .map(|pages| (pages * page).min(len))
        .map_err(|mc| format!("cachestat: {cs}; mincore: {mc}"))
}

/// The memory this process's data sets may take, read now.
pub(crate) fn room() -> Room {
    let available = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("/proc/meminfo: {e}"))
        .and_then(|t| mem_available(&t).ok_or_else(|| "/proc/meminfo: no MemAvailable line".to_string()));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| {
        limit_files(&t, Path::new("/sys/fs/cgroup"))
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|t| parse_limit(&t))
            .min()
    });
    Room { available, cgroup }
}

/// Auto's choice for each file of a data set opened together: `(file, bytes)` in order.
pub(crate) fn judge(files: &[(&File, u64)], access: Access) -> Vec<Choice> {
    let room = room();
    let set = files.iter().map(|f| f.1).sum();
    files
        .iter()
        .map(|&(f, file)| {
            for_access(choose(&Facts { file, resident: resident(f, file), set, room: room.clone() }), access)
        })
        .collect()
}

/// `c` for files read as `access` says. Read whole, once, in large requests (`Access::Stream`),
/// a file that `choose` would read ahead into the page cache (rule 2: it fits, but is not
/// cached) is read with O_DIRECT instead: one sequential pass gains nothing from the cache but
/// a second copy, and reading ahead would read the file twice. A cached file stays buffered.
pub(crate) fn for_access(c: Choice, access: Access) -> Choice {
    match access {
        Access::Stream if c.buffered && c.willneed => Choice {
            buffered: false,
            willneed: false,
            why: format!("read whole, once, and not in the page cache: O_DIRECT ({})", c.why),
        },
        _ => c,
    }
}

/// Has the kernel read `files` (`(file, bytes)`) into the page cache ahead of their reads: a
/// background thread advises `WILLNEED` over each in turn, a step at a time, so the reads
/// become large sequential ones while the caller's scattered reads run. The thread holds the
/// files weakly: it ends once they are all advised or all dropped. One advice waits at most for
/// the submission of one step's reads.
pub(crate) fn read_ahead(files: Vec<(Weak<File>, u64)>) {
    if files.is_empty() {
        return;
    }
    let run = move || {
        for (file, len) in files {
            let mut off = 0;
            while off < len {
                let Some(f) = file.upgrade() else { break };
                if let Err(e) = crate::sys::will_need(&f, off, READ_AHEAD_STEP.min(len - off)) {
                    tracing::debug!(%e, "read-ahead advice refused: the file is read as it is asked for");
                    break;
                }
                off += READ_AHEAD_STEP;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("peermem-readahead".into()).spawn(run) {
        tracing::debug!(%e, "no read-ahead thread: the files are read as they are asked for");
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The files that may hold a memory limit on this process's cgroup (from the text of
/// /proc/self/cgroup) and on each of its ancestors up to the hierarchy's root, below the cgroup
/// mount `fs`: v2 `memory.max` (in `fs`, or `fs/unified` on hybrid systems), v1
/// `memory.limit_in_bytes` (in `fs/memory`). The lowest limit found is the one that binds.
fn limit_files(self_cgroup: &str, fs: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let mounts: Vec<(PathBuf, &str)> = if controllers.is_empty() {
            vec![(fs.to_path_buf(), "memory.max"), (fs.join("unified"), "memory.max")]
        } else if controllers.split(',').any(|c| c == "memory") {
            vec![(fs.join("memory"), "memory.limit_in_bytes")]
        } else {
            continue;
        };
        let rel = Path::new(path.trim_start_matches('/'));
        for (mount, name) in mounts {
            let mut dir = Some(rel);
            while let Some(d) = dir {
                if d.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                    break;
                }
                out.push(mount.join(d).join(name));
                dir = d.parent();
            }
        }
    }
    out
}

/// A cgroup memory limit file's value in bytes; `None` for no limit (`max`, or the v1 huge value).
fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&n| n < NO_LIMIT)
}

/// Bytes in words with a binary unit: `64 MiB`, `11.8 GiB`, `512 B`.
pub(crate) fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let (mut v, mut u) = (n as f64 / 1024.0, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn facts(file: u64, resident: u64, set: u64, available: u64, cgroup: Option<u64>) -> Facts {
        Facts { file, resident: Ok(resident), set, room: Room { available: Ok(available), cgroup } }
    }

    #[test]
    fn a_mostly_cached_file_is_read_through_the_page_cache_without_read_ahead() {
        // Even when the data set is far larger than memory.
        let c = choose(&facts(3 * GIB, 2 * GIB, 24 * GIB, 8 * GIB, None));
        assert!(c.buffered && !c.willneed, "{c:?}");
        assert!(c.why.contains("already in the page cache"), "{}", c.why);
        assert!(choose(&facts(64 * MIB, 32 * MIB, 64 * MIB, 0, None)).buffered);
    }

    #[test]
    fn a_cold_data_set_within_half_of_memory_is_buffered_and_read_ahead() {
        let c = choose(&facts(64 * MIB, 0, 64 * MIB, 12 * GIB, None));
        assert_eq!((c.buffered, c.willneed), (true, true), "{c:?}");
        assert!(
            c.why.contains("64 MiB data set fits in half of the 12 GiB of available memory; read ahead"),
            "{}",
            c.why
        );
        // Exactly half still fits.
        assert!(choose(&facts(GIB, 0, 4 * GIB, 8 * GIB, None)).buffered);
    }

    #[test]
    fn a_data_set_over_half_of_memory_is_read_with_o_direct() {
        // Eight files of 3 GiB are judged together: each alone would fit, the set does not.
        let c = choose(&facts(3 * GIB, 0, 24 * GIB, 32 * GIB, None));
        assert!(!c.buffered && !c.willneed, "{c:?}");
        assert!(c.why.contains("24 GiB data set exceeds half of the 32 GiB of available memory"), "{}", c.why);
        assert!(choose(&facts(3 * GIB, 0, 3 * GIB, 32 * GIB, None)).buffered);
    }

    #[test]
    fn a_lower_cgroup_limit_bounds_the_data_set() {
        let c = choose(&facts(2 * GIB, 0, 2 * GIB, 64 * GIB, Some(3 * GIB)));
        assert!(!c.buffered, "{c:?}");
        assert!(c.why.contains("half of the 3 GiB cgroup memory limit"), "{}", c.why);
        // A cgroup limit above MemAvailable does not raise the bound.
        let c = choose(&facts(2 * GIB, 0, 2 * GIB, 3 * GIB, Some(64 * GIB)));
        assert!(!c.buffered && c.why.contains("the 3 GiB of available memory"), "{c:?}");
    }

    #[test]
    fn unknown_memory_or_residency_never_counts_as_room_or_cache() {
        let unknown = Room { available: Err("/proc/meminfo: gone".into()), cgroup: None };
        let c = choose(&Facts { file: MIB, resident: Ok(0), set: MIB, room: unknown.clone() });
        assert!(!c.buffered && c.why.contains("unknown: /proc/meminfo: gone"), "{c:?}");
        let c = choose(&Facts { file: MIB, resident: Err("ENOSYS".into()), set: MIB, room: unknown });
        assert!(!c.buffered && c.why.contains("residency unknown: ENOSYS"), "{c:?}");
        // Only a cgroup limit known: that is the bound.
        let cg = Room { available: Err("x".into()), cgroup: Some(8 * GIB) };
        assert!(choose(&Facts { file: MIB, resident: Ok(0), set: MIB, room: cg }).buffered);
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let t = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(mem_available(t), Some(12_345_678 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn cgroup_limits_are_looked_up_from_the_process_cgroup_to_the_root() {
        let fs = Path::new("/cg");
        let v2 = limit_files("0::/user.slice/app.scope\n", fs);
        assert_eq!(
            v2,
            [
                "/cg/user.slice/app.scope/memory.max",
                "/cg/user.slice/memory.max",
                "/cg/memory.max",
                "/cg/unified/user.slice/app.scope/memory.max",
                "/cg/unified/user.slice/memory.max",
                "/cg/unified/memory.max",
            ]
            .map(PathBuf::from)
        );
        let v1 = limit_files("12:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n", fs);
        assert_eq!(
            v1[..3],
            [
                "/cg/memory/docker/abc/memory.limit_in_bytes",
                "/cg/memory/docker/memory.limit_in_bytes",
                "/cg/memory/memory.limit_in_bytes"
            ]
            .map(PathBuf::from)
        );
        assert!(limit_files("4:memory:/../etc\n", fs).is_empty(), "no path escapes the mount");
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("2147483648\n"), Some(2 * GIB));
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(64 * MIB), "64 MiB");
        assert_eq!(size(12_670_000_000), "11.8 GiB");
        assert_eq!(size(4096), "4 KiB");
    }

    #[test]
    fn residency_of_a_file_just_written_is_measured() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let f = File::open(&p).unwrap();
        let r = resident(&f, 1 << 20).unwrap();
        assert_eq!(r, 1 << 20, "a file just written is in the page cache");
        let page = peermem::mem::page_size();
        assert_eq!(crate::sys::mincore_pages(&f, 1 << 20, page).unwrap() * page, 1 << 20);
    }

    #[test]
    fn a_stream_reads_a_cold_file_that_fits_with_o_direct_and_a_cached_one_through_the_cache() {
        let cold = choose(&facts(MIB, 0, MIB, 1 << 40, None));
        assert!(cold.buffered && cold.willneed, "{cold:?}");
        let s = for_access(cold.clone(), Access::Stream);
        assert!(!s.buffered && !s.willneed && s.why.contains("read whole, once"), "{s:?}");
        assert!(for_access(cold, Access::Records).buffered);
        let cached = choose(&facts(MIB, MIB, MIB, 1 << 40, None));
        assert!(for_access(cached, Access::Stream).buffered);
        let big = choose(&facts(MIB, 0, 1 << 41, 1 << 40, None));
        assert!(!for_access(big, Access::Stream).buffered);
    }
}
