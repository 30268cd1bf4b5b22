//! nvme_bench: the userspace VFIO driver against the kernel's NVMe driver (fio, O_DIRECT) on the
//! same controller, 4 KiB random reads at queue depth 32; prints both IOPS and their ratio.
//!
//! ```text
//! nvme_bench [--bdf BDF] [--seconds N] [--qd N]      (as root, in the testbed guest)
//! ```
//! Runs fio first (kernel driver bound), then binds the controller to vfio-pci, runs the same
//! workload through `Controller::random_reads` into registered host memory, and gives the
//! controller back. Under TCG only the ratio means anything.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{Bdf, HostRegion, PeerMemory, Registry, Topology};
use peermem_nvme::{Binding, BlockDevice, Controller};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut bdf: Option<Bdf> = None;
    let mut secs = 10u64;
    let mut qd = 32usize;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--bdf" => bdf = Some(v.parse()?),
            "--seconds" => secs = v.parse()?,
            "--qd" => qd = v.parse()?,
            _ => return Err(format!("unknown argument '{k}'").into()),
        }
    }
    let topo = Arc::new(Topology::discover("/")?);
    let bdf = match bdf {
        Some(b) => b,
        None => topo.devices().iter().find(|d| d.class_devices.iter().any(|c| c.class == "nvme")).ok_or("no NVMe")?.bdf,
    };
    let dev = BlockDevice::open_namespace(&topo, bdf)?.path().to_path_buf();
    drop(topo);

    // Kernel: fio, libaio, O_DIRECT.
    let fio_args = [
        "--name=randread".to_string(),
        format!("--filename={}", dev.display()),
        "--rw=randread".into(),
        "--bs=4k".into(),
        format!("--iodepth={qd}"),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        format!("--runtime={secs}"),
        "--time_based".into(),
        "--minimal".into(),
    ];
    println!("kernel: fio {}", fio_args.join(" "));
    let out = Command::new("fio").args(&fio_args).output()?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let terse = String::from_utf8_lossy(&out.stdout);
    // Terse format v3: field 7 (0-based) is the read IOPS.
    let fio_iops: f64 = terse
        .lines()
        .find(|l| l.starts_with("3;"))
        .and_then(|l| l.split(';').nth(7))
        .ok_or(format!("unexpected fio output: {terse}"))?
        .parse()?;
    println!("kernel O_DIRECT (fio): {fio_iops:.0} IOPS");

    // Userspace: VFIO driver, same controller, same workload.
    let topo = Arc::new(Topology::discover("/")?);
    let reg = Registry::new(topo);
    let binding = Binding::to_vfio(bdf)?;
    let iops = {
        let mut ctrl = Controller::open(&binding, &reg, 1)?;
        let mem = reg.register(Arc::new(HostRegion::new(qd as u64 * 4096)?) as Arc<dyn PeerMemory>)?;
        ctrl.random_reads(&reg, &mem, 4096, 256, 1, qd)?; // warm-up (IOMMU mapping, caches)
        let t = Instant::now();
        let mut done = 0usize;
        let mut seed = 2;
        while t.elapsed() < Duration::from_secs(secs) {
            done += ctrl.random_reads(&reg, &mem, 4096, 4096, seed, qd)?;
            seed += 1;
        }
        done as f64 / t.elapsed().as_secs_f64()
    };
    binding.restore()?;
    println!("userspace VFIO driver: {iops:.0} IOPS (4 KiB random reads, queue depth {qd}, {secs} s)");
    println!("ratio VFIO/kernel = {:.2}", iops / fio_iops);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvme_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
