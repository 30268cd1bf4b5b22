//! nvme_to_gpu: load a byte range of a file or NVMe namespace into a destination region (the
//! stand-in GPU BAR, a p2pmem region, host memory), direct when the route allows, otherwise a
//! pipelined bounce; prints the route, why, throughput and a checksum verified against the source.
//!
//! ```text
//! nvme_to_gpu (--file PATH | --namespace BDF [--vfio]) [--offset N] [--len N]
//!             [--dest host | ivshmem | bar:BDF:BAR | p2pmem:BDF] [--chunk N] [--depth N]
//!             [--no-verify] [--compare-read] [--repeat N]
//! ```
//! `--vfio` binds the controller to vfio-pci for the run (the userspace driver reads) and gives it
//! back after. `--compare-read` times a plain buffered read() of the same range into a host buffer
//! (page cache dropped first) and prints loader/read as a ratio; `--repeat N` alternates N loads
//! and N reads and compares the medians (only the first load is verified). Sizes take K/M/G suffixes.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use peermem::{BarRegion, Bdf, HostRegion, PeerMemory, Registry, Topology};
use peermem_examples::size;
use peermem_loader::{load, Checksum, KernelSource, LoadOptions, Source};
use peermem_nvme::{Binding, Controller, P2pmemRegion};

struct Args {
    file: Option<String>,
    namespace: Option<Bdf>,
    vfio: bool,
    offset: u64,
    len: Option<u64>,
    dest: String,
    chunk: u64,
    depth: usize,
    verify: bool,
    compare_read: bool,
    repeat: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        file: None,
        namespace: None,
        vfio: false,
        offset: 0,
        len: None,
        dest: "host".into(),
        chunk: 1 << 20,
        depth: 4,
        verify: true,
        compare_read: false,
        repeat: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--file" => a.file = Some(v()?),
            "--namespace" => a.namespace = Some(v()?.parse().map_err(|e| format!("--namespace: {e}"))?),
            "--vfio" => a.vfio = true,
            "--offset" => a.offset = size(&v()?)?,
            "--len" => a.len = Some(size(&v()?)?),
            "--dest" => a.dest = v()?,
            "--chunk" => a.chunk = size(&v()?)?,
            "--depth" => a.depth = v()?.parse().map_err(|e| format!("--depth: {e}"))?,
            "--no-verify" => a.verify = false,
            "--compare-read" => a.compare_read = true,
            "--repeat" => a.repeat = v()?.parse::<usize>().map_err(|e| format!("--repeat: {e}"))?.max(1),
            "-h" | "--help" => return Err("usage: see the header of examples/nvme_to_gpu.rs".into()),
            _ => return Err(format!("unknown argument '{k}'")),
        }
    }
    if a.file.is_some() == a.namespace.is_some() {
        return Err("give exactly one of --file PATH or --namespace BDF".into());
    }
    if a.vfio && a.namespace.is_none() {
        return Err("--vfio needs --namespace BDF".into());
    }
    Ok(a)
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let topo = Arc::new(Topology::discover("/")?);
    let reg = Registry::new(topo.clone());
    // Keep the destination's own handle alive for the registration's lifetime.
    let len_hint = a.len.unwrap_or(64 << 20);
    let region: Arc<dyn PeerMemory> = match a.dest.as_str() {
        "host" => Arc::new(HostRegion::new(len_hint)?),
        "ivshmem" => {
            let d = topo
                .devices()
                .iter()
                .find(|d| d.vendor == 0x1af4 && d.device == 0x1110)
                .ok_or("no ivshmem device (1af4:1110)")?;
            let bar = d.bar(2).ok_or("ivshmem has no BAR2")?.cpu.len();
            Arc::new(BarRegion { bdf: d.bdf, bar: 2, offset: 0, len: bar })
        }
        s if s.starts_with("bar:") => {
            let mut p = s[4..].rsplitn(2, ':');
            let bar: u8 = p.next().ok_or("bar:BDF:BAR")?.parse()?;
            let bdf: Bdf = p.next().ok_or("bar:BDF:BAR")?.parse()?;
            let blen = topo.by_bdf(bdf)?.bar(bar).ok_or("no such BAR")?.cpu.len();
            Arc::new(BarRegion { bdf, bar, offset: 0, len: blen })
        }
        s if s.starts_with("p2pmem:") => Arc::new(P2pmemRegion::allocate(&topo, s[7..].parse()?, len_hint)?),
        other => return Err(format!("unknown --dest '{other}'").into()),
    };
    let dest = reg.register(region)?;

    let binding;
    let mut ctrl;
    let mut source = match (&a.file, a.namespace, a.vfio) {
        (Some(f), _, _) => Source::Kernel(KernelSource::open(f)?),
        (None, Some(b), false) => Source::Kernel(KernelSource::namespace(&topo, b)?),
        (None, Some(b), true) => {
            binding = Binding::to_vfio(b)?;
            ctrl = Controller::open(&binding, &reg, 1)?;
            Source::Vfio(&mut ctrl)
        }
        _ => unreachable!("checked by parse"),
    };
    let len = a.len.unwrap_or(source.len().saturating_sub(a.offset)).min(dest.len());
    let range = a.offset..a.offset + len;
    let opts = LoadOptions { chunk: a.chunk, depth: a.depth, verify: a.verify, ..Default::default() };
    let report = load(&mut source, range.clone(), &dest, &reg, &opts)?;
    println!("nvme_to_gpu: {} bytes {:#x}..{:#x} -> {} ({})", len, range.start, range.end, a.dest, dest.id());
    println!("{report}");
    if !a.compare_read {
        return Ok(());
    }
    let path = match &source {
        Source::Kernel(k) => k.path().to_path_buf(),
        Source::Vfio(_) => return Err("--compare-read needs a kernel source (not --vfio)".into()),
    };
    let quiet = LoadOptions { verify: false, ..opts.clone() };
    let (mut loads, mut reads) = (Vec::new(), Vec::new());
    for i in 0..a.repeat {
        let l = if i == 0 {
            report.mb_per_s()
        } else {
            // Unverified against the source, but the destination must hold the same bytes.
            let r = load(&mut source, range.clone(), &dest, &reg, &quiet)?;
            if r.checksum != report.checksum {
                return Err(format!("run {i}: destination checksum {:#018x} differs", r.checksum).into());
            }
            r.mb_per_s()
        };
        let (r, sum) = plain_read(&path, range.clone(), a.chunk)?;
        if sum != report.checksum {
            return Err("plain read() and the loader disagree on the checksum".into());
        }
        println!("  run {i}: loader {l:.1} MB/s, plain read() {r:.1} MB/s");
        loads.push(l);
        reads.push(r);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (l, r) = (median(&mut loads), median(&mut reads));
    println!("median of {}: loader {l:.1} MB/s, plain read() into a host buffer {r:.1} MB/s", a.repeat);
    println!("ratio loader/read = {:.2}", l / r);
    Ok(())
}

/// A plain buffered read() of `range` into a host buffer, page cache dropped first (root), like
/// an application would: returns MB/s and the checksum of what it read.
fn plain_read(
    path: &std::path::Path,
    range: std::ops::Range<u64>,
    chunk: u64,
) -> Result<(f64, u64), Box<dyn std::error::Error>> {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let len = (range.end - range.start) as usize;
    let mut f = std::fs::File::open(path)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(range.start))?;
    let mut host = vec![0u8; len];
    host.iter_mut().step_by(4096).for_each(|b| *b = 1); // fault the buffer in before timing
    let t = Instant::now();
    let mut done = 0usize;
    while done < len {
        let n = (chunk as usize).min(len - done);
        let r = f.read(&mut host[done..done + n])?;
        if r == 0 {
            return Err("short read".into());
        }
        done += r;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((len as f64 / secs / 1e6, Checksum::of(&host)))
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nvme_to_gpu: {e}");
            return ExitCode::from(2);
        }
    };
    match run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvme_to_gpu: {e}");
            ExitCode::FAILURE
        }
    }
}
