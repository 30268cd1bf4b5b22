//! Discovers a sysroot a number of times, for profiling discovery (e.g. under
//! `valgrind --tool=callgrind`): `discover [ROOT] [TIMES]`, ROOT defaulting to the largest
//! fixture and TIMES to 1. Prints the function count and the time per discovery.

use std::path::PathBuf;
use std::time::Instant;

use peermem::Topology;

fn main() {
    let mut args = std::env::args().skip(1);
    let arg = args.next();
    let tmp = std::env::temp_dir().join(format!("peermem-discover-{}", std::process::id()));
    let root = match arg.as_deref() {
        None => peermem_bench::largest_fixture(),
        Some("synthetic") => {
            peermem_bench::synthetic_wide(&tmp);
            tmp.clone()
        }
        Some(p) if p.starts_with("synthetic=") => {
            // Built once and kept, so that repeated runs (strace, perf) read the same tree.
            let keep = PathBuf::from(&p["synthetic=".len()..]);
            if !keep.exists() {
                peermem_bench::synthetic_wide(&keep);
            }
            keep
        }
        Some(p) => PathBuf::from(p),
    };
    let times: u32 = args.next().map_or(1, |s| s.parse().expect("TIMES is a count"));
    let start = Instant::now();
    let mut n = 0;
    for _ in 0..times {
        n = Topology::discover(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display())).len();
    }
    let per = start.elapsed() / times.max(1);
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{}: {n} functions, {per:?} per discovery, {:?} per function", root.display(), per / n.max(1) as u32);
}
