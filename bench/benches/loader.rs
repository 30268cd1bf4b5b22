//! Loader benchmarks.
//!
//! `cargo bench -p peermem-bench --bench loader`: criterion throughput of the loader into host
//! memory (sequential 1 MiB requests, random 128 KiB reads) on files in `target/`.
//!
//! `PEERMEM_LOADER_VS_FIO=DIR cargo bench -p peermem-bench --bench loader` (what
//! `bench/loader-vs-fio.sh` runs): the loader against `fio` (io_uring engine, O_DIRECT, the same
//! block size, depth and files in DIR), and the loader into Vulkan buffers against the loader into
//! host memory, each pair interleaved round by round (other work on the machine hits both sides
//! alike) and compared as a ratio of medians; CPU seconds per GiB for each side. With
//! `PEERMEM_LOADER_SWEEP=1` it first sweeps chunk size and depth (how the defaults were chosen).
//!
//! `PEERMEM_LOADER_VS_FIO_VFIO=BDF` (root, in the testbed guest: `bench/loader-vs-fio-guest.sh`):
//! the loader reading NVMe controller BDF's raw namespace through the userspace VFIO driver
//! against fio on the same namespace's block device through the kernel driver. Each round gives
//! the controller to the kernel driver for fio, then to vfio-pci for the loader (the rebinding is
//! not timed), so both sides of a pair see the same load. With an ivshmem BAR on the machine, the
//! loader into it (peer to peer) is compared with the loader into host memory too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use peermem::Bdf;
use peermem::{HostRegion, PeerMemory, Registration, Registry, Topology};
use peermem_loader::{Batch, Dest, Loader, Options, Source};
use peermem_nvme::{Binding, BlockDevice, Controller};
use peermem_vulkan::{Device, Placement, Select};

const MIB: u64 = 1 << 20;

fn registry() -> Registry {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
    Registry::new(Arc::new(Topology::discover(root).unwrap()))
}

/// A file of `len` bytes of non-constant data (written once, kept between runs).
fn ensure_file(p: &Path, len: u64) {
    if std::fs::metadata(p).is_ok_and(|m| m.len() == len) {
        return;
    }
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let block: Vec<u8> = (0..MIB as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    let mut left = len;
    let mut k = 0u8;
    while left > 0 {
        let n = left.min(MIB) as usize;
        let mut b = block[..n].to_vec();
        b[0] = k;
        k = k.wrapping_add(1);
        f.write_all(&b).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn host(reg: &Registry, len: u64) -> (Arc<dyn PeerMemory>, Registration) {
    let r: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(len).unwrap());
    let g = reg.register(r.clone()).unwrap();
    (r, g)
}

/// A deterministic xorshift for offsets.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// `n` random `bs`-aligned reads over `files` into a `ring`-byte destination.
fn random_batch(files: &[Source], n: usize, bs: u64, dest: &Dest, ring: u64, seed: u64) -> Batch {
    let mut r = rng(seed);
    let mut b = Batch::new();
    for i in 0..n as u64 {
        let f = &files[(r() % files.len() as u64) as usize];
        let off = (r() % (f.len() / bs)) * bs;
        b.read(f, off, bs, dest, (i * bs) % ring);
    }
    b
}

fn criterion_benches(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/loader-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("seq.bin");
    ensure_file(&p, 256 * MIB);
    let reg = registry();
    let mut g = c.benchmark_group("loader_host");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let (_r, guard) = host(&reg, 256 * MIB);
    let dest = Dest::region(&guard);
    let l = Loader::new(&reg, Options { chunk: MIB, depth: 16, ..Options::default() }).unwrap();
    let f = l.open(&p).unwrap();
    g.throughput(Throughput::Bytes(256 * MIB));
    g.bench_function("sequential_1MiB_qd16_256MiB", |b| b.iter(|| l.read(&f, 0, 256 * MIB, &dest, 0).unwrap()));
    // The same read staged (a destination 1 byte past a page boundary rules O_DIRECT into it out):
    // the loader's one bounce beside the direct read, and memcpy of as many bytes as the anchor.
    let (_s, staged) = host(&reg, 256 * MIB + 4096);
    let staged = Dest::region(&staged);
    g.bench_function("staged_1MiB_qd16_256MiB", |b| b.iter(|| l.read(&f, 0, 256 * MIB, &staged, 1).unwrap()));
    let (src, mut dst) = (vec![1u8; 256 * MIB as usize], vec![0u8; 256 * MIB as usize]);
    g.bench_function("memcpy_256MiB", |b| b.iter(|| dst.copy_from_slice(std::hint::black_box(&src))));
    drop((src, dst));
    let l = Loader::new(&reg, Options { chunk: 128 << 10, depth: 32, ..Options::default() }).unwrap();
    let f = l.open(&p).unwrap();
    g.throughput(Throughput::Bytes(1024 * (128 << 10)));
    let mut seed = 1;
    g.bench_function("random_128KiB_qd32_x1024", |b| {
        b.iter(|| {
            seed += 1;
            l.run(random_batch(std::slice::from_ref(&f), 1024, 128 << 10, &dest, 64 * MIB, seed)).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, criterion_benches);

/// CPU seconds this process has used (all threads), from /proc/self/stat (USER_HZ = 100).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

#[derive(Clone, Copy, Debug)]
struct Run {
    mbps: f64,
    cpu_per_gib: f64,
}

/// Runs fio with `args` (plus the common io_uring/O_DIRECT/JSON options).
fn fio(args: &[String]) -> Run {
    let out = Command::new("fio")
        .args(["--ioengine=io_uring", "--direct=1", "--output-format=json", "--thread", "--group_reporting"])
        .args(args)
        .output()
        .expect("fio (apt-get install fio)");
    assert!(out.status.success(), "fio {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let j = &v["jobs"][0];
    let bytes = j["read"]["io_bytes"].as_f64().unwrap();
    let secs = j["read"]["runtime"].as_f64().unwrap() / 1000.0;
    let cpu = (j["usr_cpu"].as_f64().unwrap() + j["sys_cpu"].as_f64().unwrap()) / 100.0 * secs;
    Run { mbps: bytes / secs / 1e6, cpu_per_gib: cpu / (bytes / (1u64 << 30) as f64) }
}

fn timed(l: &Loader, b: Batch) -> Run {
    let bytes = b.bytes() as f64;
    let c0 = cpu_seconds();
    let t = Instant::now();
    l.run(b).unwrap();
    let secs = t.elapsed().as_secs_f64();
    Run { mbps: bytes / secs / 1e6, cpu_per_gib: (cpu_seconds() - c0) / (bytes / (1u64 << 30) as f64) }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `a` and `b` once untimed, then alternately `rounds` times; prints both medians and b/a.
fn pair(name: &str, rounds: usize, mut a: impl FnMut() -> Run, mut b: impl FnMut() -> Run, la: &str, lb: &str) {
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    // One untimed round first: page faults, fixed-buffer registration, file layout.
    a();
    b();
    for _ in 0..rounds {
        ra.push(a());
        rb.push(b());
    }
    let (ma, mb) = (median(ra.iter().map(|r| r.mbps).collect()), median(rb.iter().map(|r| r.mbps).collect()));
    let (ca, cb) =
        (median(ra.iter().map(|r| r.cpu_per_gib).collect()), median(rb.iter().map(|r| r.cpu_per_gib).collect()));
    println!(
        "| {name} | {la} {ma:.0} MB/s ({ca:.2} CPU s/GiB) | {lb} {mb:.0} MB/s ({cb:.2} CPU s/GiB) | {:.2} |",
        mb / ma
    );
    let each: Vec<String> = ra.iter().zip(&rb).map(|(x, y)| format!("{:.2}", y.mbps / x.mbps)).collect();
    println!("|   rounds (ratio per round) | | | {} |", each.join(" "));
}

/// What the loader-against-fio runs share: the registry, the files, host memory as the
/// destination, the sizes and how many rounds each pair runs.
struct Job {
    reg: Registry,
    seq: PathBuf,
    size: u64,
    rounds: usize,
    hdest: Dest,
    shard_dir: PathBuf,
    nfiles: u64,
    fsize: u64,
}

fn vs_fio(dir: PathBuf) {
    std::fs::create_dir_all(&dir).unwrap();
    let rounds: usize = std::env::var("PEERMEM_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    // PEERMEM_BENCH_MIB / PEERMEM_BENCH_SHARDS shrink the job for small disks (the testbed's
    // 256 MiB namespaces): defaults 512 MiB and 1000 shard files of 512 KiB.
    let env_u64 = |k: &str, d: u64| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
    let size = env_u64("PEERMEM_BENCH_MIB", 512) * MIB;
    let seq = dir.join("seq.bin");
    ensure_file(&seq, size);
    let shard_dir = dir.join("shards");
    std::fs::create_dir_all(&shard_dir).unwrap();
    let (nfiles, fsize) = (env_u64("PEERMEM_BENCH_SHARDS", 1000), 512 << 10);
    for i in 0..nfiles {
        ensure_file(&shard_dir.join(format!("shard.{i}")), fsize);
    }
    let reg = registry();
    let (_host, hg) = host(&reg, size);
    let hdest = Dest::region(&hg);
    let job = Job { reg, seq, size, rounds, hdest, shard_dir, nfiles, fsize };
    if std::env::var("PEERMEM_LOADER_SWEEP").as_deref() == Ok("1") {
        sweep(&job);
    }
    let (seq_l, sf) = host_rows(&job);
    vulkan_rows(&job, &seq_l, &sf);
    drop(hg);
}

/// Chunk size x depth, sequential and random, into host memory.
fn sweep(job: &Job) {
    let Job { reg, seq, hdest, .. } = job;
    println!("sweep (sequential 256 MiB, then random 128 KiB x 2048): MB/s");
    for chunk in [256 << 10, MIB, 4 * MIB] {
        for depth in [4usize, 16, 32] {
            let l = Loader::new(reg, Options { chunk, depth, ..Options::default() }).unwrap();
            let f = l.open(seq).unwrap();
            let mut b = Batch::new();
            b.read(&f, 0, 256 * MIB, hdest, 0);
            println!("  seq chunk {:>5} KiB depth {depth:>2}: {:.0}", chunk >> 10, timed(&l, b).mbps);
        }
    }
    for depth in [8usize, 16, 32, 64] {
        let l = Loader::new(reg, Options { depth, ..Options::default() }).unwrap();
        let f = l.open(seq).unwrap();
        let r = timed(&l, random_batch(std::slice::from_ref(&f), 2048, 128 << 10, hdest, 64 * MIB, 9));
        println!("  random 128 KiB depth {depth:>2}: {:.0}", r.mbps);
    }
}

/// The loader against fio into host memory: sequential, sequential with fio's fixed buffers,
/// random, random over many shard files. Returns the sequential loader and its file.
fn host_rows(job: &Job) -> (Loader, Source) {
    let Job { reg, seq, size, rounds, hdest, .. } = job;
    let (size, rounds) = (*size, *rounds);
    let s = seq.display().to_string();
    println!("| workload | fio / host side | loader / other side | ratio |");
    println!("|---|---|---|---|");
    let seq_l = Loader::new(reg, Options { chunk: MIB, depth: 16, ..Options::default() }).unwrap();
    let sf = seq_l.open(seq).unwrap();
    pair(
        &format!("sequential 1 MiB QD16, {} MiB, host memory", size / MIB),
        rounds,
        || {
            fio(&[
                "--name=seq".into(),
                format!("--filename={s}"),
                "--rw=read".into(),
                "--bs=1M".into(),
                "--iodepth=16".into(),
                format!("--size={size}"),
            ])
        },
        || {
            let mut b = Batch::new();
            b.read(&sf, 0, size, hdest, 0);
            timed(&seq_l, b)
        },
        "fio",
        "loader",
    );
    // fio with its buffers and file registered too (what the loader does by default).
    pair(
        &format!("sequential 1 MiB QD16, {} MiB, host memory; fio --fixedbufs --registerfiles", size / MIB),
        rounds,
        || {
            fio(&[
                "--name=seqfixed".into(),
                format!("--filename={s}"),
                "--rw=read".into(),
                "--bs=1M".into(),
                "--iodepth=16".into(),
                format!("--size={size}"),
                "--fixedbufs".into(),
                "--registerfiles".into(),
            ])
        },
        || {
            let mut b = Batch::new();
            b.read(&sf, 0, size, hdest, 0);
            timed(&seq_l, b)
        },
        "fio",
        "loader",
    );
    random_rows(job);
    (seq_l, sf)
}

/// The loader against fio, random 128 KiB reads into host memory: one file, then many shards.
fn random_rows(job: &Job) {
    let Job { reg, seq, size, rounds, hdest, shard_dir, nfiles, fsize } = job;
    let (size, rounds, nfiles, fsize) = (*size, *rounds, *nfiles, *fsize);
    let s = seq.display().to_string();
    let rand_l = Loader::new(reg, Options { chunk: 128 << 10, depth: 32, ..Options::default() }).unwrap();
    let rf = rand_l.open(seq).unwrap();
    let mut seed = 0;
    pair(
        &format!("random 128 KiB QD32, {} MiB read, host memory", size / MIB),
        rounds,
        || {
            fio(&[
                "--name=rand".into(),
                format!("--filename={s}"),
                "--rw=randread".into(),
                "--bs=128k".into(),
                "--iodepth=32".into(),
                format!("--size={size}"),
                format!("--io_size={size}"),
            ])
        },
        || {
            seed += 1;
            timed(
                &rand_l,
                random_batch(
                    std::slice::from_ref(&rf),
                    (size / (128 << 10)) as usize,
                    128 << 10,
                    hdest,
                    64 * MIB,
                    seed,
                ),
            )
        },
        "fio",
        "loader",
    );
    let shard_files: Vec<Source> =
        (0..nfiles).map(|i| rand_l.open(shard_dir.join(format!("shard.{i}"))).unwrap()).collect();
    let sd = shard_dir.display().to_string();
    let shard_bytes = size.min(256 * MIB);
    pair(
        &format!("shards: {nfiles} files x 512 KiB, random 128 KiB QD32, {} MiB read", shard_bytes / MIB),
        rounds,
        || {
            fio(&[
                "--name=shards".into(),
                format!("--directory={sd}"),
                "--filename_format=shard.$filenum".into(),
                format!("--nrfiles={nfiles}"),
                format!("--filesize={fsize}"),
                "--file_service_type=random".into(),
                "--rw=randread".into(),
                "--bs=128k".into(),
                "--iodepth=32".into(),
                format!("--io_size={shard_bytes}"),
            ])
        },
        || {
            seed += 1;
            timed(
                &rand_l,
                random_batch(&shard_files, (shard_bytes / (128 << 10)) as usize, 128 << 10, hdest, 64 * MIB, seed),
            )
        },
        "fio",
        "loader",
    );
}

/// Host-visible and device-local Vulkan buffers against host memory, same loader and file.
fn vulkan_rows(job: &Job, seq_l: &Loader, sf: &Source) {
    let Job { reg, size, rounds, hdest, .. } = job;
    let (size, rounds) = (*size, *rounds);
    let dev = match Device::open(Select::Best) {
        Ok(d) => d,
        Err(e) => {
            println!("(no Vulkan device: {e}; Vulkan rows skipped)");
            return;
        }
    };
    let vis = Arc::new(dev.allocate(size, Placement::Mappable).unwrap());
    let vg = reg.register(vis.clone() as Arc<dyn PeerMemory>).unwrap();
    let vdest = Dest::region(&vg);
    let local = Arc::new(dev.allocate(size, Placement::DeviceLocal).unwrap());
    let lg = reg.register(local.clone() as Arc<dyn PeerMemory>).unwrap();
    let ldest = seq_l.vulkan_device_dest(&lg, &dev, local.clone()).unwrap();
    let whole = |d: &Dest| {
        let mut b = Batch::new();
        b.read(sf, 0, size, d, 0);
        b
    };
    pair(
        &format!("sequential 1 MiB QD16 {} MiB: host-visible Vulkan buffer vs host memory", size / MIB),
        rounds,
        || timed(seq_l, whole(hdest)),
        || timed(seq_l, whole(&vdest)),
        "host",
        "vulkan",
    );
    pair(
        &format!(
            "sequential 1 MiB QD16 {} MiB: device-local Vulkan buffer (staged, GPU copies) vs host memory",
            size / MIB
        ),
        rounds,
        || timed(seq_l, whole(hdest)),
        || timed(seq_l, whole(&ldest)),
        "host",
        "vulkan-device",
    );
}

/// `n` random `bs`-aligned reads over the first `span` bytes of a namespace into a `ring`-byte
/// destination.
fn random_nvme_batch(ns: &Source, span: u64, n: usize, bs: u64, dest: &Dest, ring: u64, seed: u64) -> Batch {
    let mut r = rng(seed);
    let mut b = Batch::new();
    for i in 0..n as u64 {
        b.read(ns, (r() % (span / bs)) * bs, bs, dest, (i * bs) % ring);
    }
    b
}

/// The namespace block device of `bdf` once the kernel driver has it back (bounded wait).
fn kernel_namespace(bdf: Bdf) -> PathBuf {
    for _ in 0..1000 {
        if let Ok(t) = Topology::discover("/") {
            if let Ok(b) = BlockDevice::open_namespace(&t, bdf) {
                return b.path().to_path_buf();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{bdf}: the nvme driver did not come back");
}

/// Runs `f` on a loader holding controller `bdf` through vfio-pci, then gives the controller
/// back to the kernel driver.
fn with_vfio<T>(reg: &Registry, bdf: Bdf, opts: &Options, f: impl FnOnce(&Loader, &Source) -> T) -> T {
    let binding = Binding::to_vfio(bdf).unwrap();
    let l = Loader::new(reg, opts.clone()).unwrap();
    let ns = l.open_nvme(Controller::open(&binding, reg, 1).unwrap()).unwrap();
    let out = f(&l, &ns);
    drop(l);
    drop(ns.into_controller().unwrap());
    binding.restore().unwrap();
    kernel_namespace(bdf);
    out
}

fn vs_fio_vfio(bdf: Bdf) {
    let rounds: usize = std::env::var("PEERMEM_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let size = std::env::var("PEERMEM_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(128) * MIB;
    let topo = Arc::new(Topology::discover("/").unwrap());
    let reg = Registry::new(topo.clone());
    let (_host, hg) = host(&reg, size);
    let hdest = Dest::region(&hg);
    let dev = kernel_namespace(bdf);
    println!("{bdf}: fio on {} (kernel driver) vs the loader through the VFIO driver", dev.display());
    println!("| workload | fio / host side | loader / other side | ratio |");
    println!("|---|---|---|---|");
    let seq = Options { chunk: MIB, depth: 16, ..Options::default() };
    pair(
        &format!("raw namespace, sequential 1 MiB QD16, {} MiB, host memory", size / MIB),
        rounds,
        || {
            let d = kernel_namespace(bdf).display().to_string();
            fio(&[
                "--name=seq".into(),
                format!("--filename={d}"),
                "--rw=read".into(),
                "--bs=1M".into(),
                "--iodepth=16".into(),
                format!("--size={size}"),
            ])
        },
        || {
            with_vfio(&reg, bdf, &seq, |l, ns| {
                let mut b = Batch::new();
                b.read(ns, 0, size, &hdest, 0);
                timed(l, b)
            })
        },
        "fio",
        "loader (VFIO)",
    );
    let rand = Options { chunk: 128 << 10, depth: 32, ..Options::default() };
    let mut seed = 0;
    pair(
        &format!("raw namespace, random 128 KiB QD32, {} MiB read, host memory", size / MIB),
        rounds,
        || {
            let d = kernel_namespace(bdf).display().to_string();
            fio(&[
                "--name=rand".into(),
                format!("--filename={d}"),
                "--rw=randread".into(),
                "--bs=128k".into(),
                "--iodepth=32".into(),
                format!("--size={size}"),
                format!("--io_size={size}"),
            ])
        },
        || {
            seed += 1;
            with_vfio(&reg, bdf, &rand, |l, ns| {
                let n = (size / (128 << 10)) as usize;
                timed(l, random_nvme_batch(ns, size, n, 128 << 10, &hdest, size, seed))
            })
        },
        "fio",
        "loader (VFIO)",
    );
    // Peer to peer: into the ivshmem "GPU" BAR, against host memory, in one VFIO session.
    let Some(shm) = topo.devices().iter().find(|d| d.vendor == 0x1af4 && d.device == 0x1110).map(|d| d.bdf) else {
        println!("(no ivshmem BAR: the peer-to-peer row is skipped)");
        return;
    };
    let len = size.min(128 * MIB);
    let bar = reg.register(Arc::new(peermem::BarRegion { bdf: shm, bar: 2, offset: 0, len }) as Arc<dyn PeerMemory>);
    let bar = bar.unwrap();
    let bdest = Dest::region(&bar);
    with_vfio(&reg, bdf, &seq, |l, ns| {
        let whole = |d: &Dest| {
            let mut b = Batch::new();
            b.read(ns, 0, len, d, 0);
            b
        };
        let r = l.run(whole(&bdest)).unwrap();
        println!("(ivshmem BAR: route {}, {}: {})", r.route(), r.via(), r.dests[0].method);
        pair(
            &format!(
                "raw namespace, sequential 1 MiB QD16, {} MiB: ivshmem BAR (peer to peer) vs host memory",
                len / MIB
            ),
            rounds,
            || timed(l, whole(&hdest)),
            || timed(l, whole(&bdest)),
            "host",
            "ivshmem BAR",
        );
    });
}

fn main() {
    if let Ok(bdf) = std::env::var("PEERMEM_LOADER_VS_FIO_VFIO") {
        vs_fio_vfio(bdf.parse().expect("PEERMEM_LOADER_VS_FIO_VFIO: a PCI address like 0000:03:00.0"));
        return;
    }
    if let Ok(dir) = std::env::var("PEERMEM_LOADER_VS_FIO") {
        vs_fio(PathBuf::from(dir));
        return;
    }
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
