//! nvme_to_gpu: a byte range of an NVMe namespace (or a file) into GPU memory through
//! `peermem-loader`, printing the route, how the bytes moved, why, and MB/s.
//!
//! With no arguments: the first NVMe namespace of the machine (the example's own executable when
//! there is none) into the best destination it has: a Vulkan device-local buffer on a real GPU,
//! else the ivshmem stand-in GPU BAR of the testbed, else a host-visible Vulkan buffer, else host
//! memory. 64 MiB at most.
//!
//! ```text
//! nvme_to_gpu [--file PATH | --namespace BDF [--vfio]] [--offset N] [--len N]
//!             [--dest host|vulkan|vulkan-device|ivshmem|bar:BDF:BAR|p2pmem:BDF]
//!             [--chunk N] [--depth N] [--strict] [--verify]
//! ```
//! `--vfio` binds the controller to vfio-pci for the run and reads through the userspace driver;
//! otherwise the kernel reads. Either way one `Loader` batch moves the bytes.

use std::process::ExitCode;
use std::sync::Arc;

use peermem::{BarRegion, Bdf, HostRegion, PeerMemory, Registry, Topology};
use peermem_examples::size;
use peermem_loader::{Dest, Loader, Options, Verify};
use peermem_nvme::{Binding, BlockDevice, Controller, P2pmemRegion};
use peermem_vulkan::{Device, DeviceKind, Placement, Select};

#[derive(Default)]
struct Args {
    file: Option<String>,
    namespace: Option<Bdf>,
    vfio: bool,
    offset: u64,
    len: Option<u64>,
    dest: Option<String>,
    chunk: Option<u64>,
    depth: Option<usize>,
    strict: bool,
    verify: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--file" => a.file = Some(v()?),
            "--namespace" => a.namespace = Some(v()?.parse().map_err(|e| format!("--namespace: {e}"))?),
            "--vfio" => a.vfio = true,
            "--offset" => a.offset = size(&v()?)?,
            "--len" => a.len = Some(size(&v()?)?),
            "--dest" => a.dest = Some(v()?),
            "--chunk" => a.chunk = Some(size(&v()?)?),
            "--depth" => a.depth = Some(v()?.parse().map_err(|e| format!("--depth: {e}"))?),
            "--strict" => a.strict = true,
            "--verify" => a.verify = true,
            "-h" | "--help" => return Err("usage: see the header of examples/nvme_to_gpu.rs".into()),
            _ => return Err(format!("unknown argument '{k}'")),
        }
    }
    if a.file.is_some() && a.namespace.is_some() {
        return Err("give at most one of --file PATH or --namespace BDF".into());
    }
    if a.vfio && a.namespace.is_none() {
        return Err("--vfio needs --namespace BDF".into());
    }
    Ok(a)
}

/// The first NVMe controller with a kernel namespace.
fn first_namespace(topo: &Topology) -> Option<Bdf> {
    topo.devices()
        .iter()
        .filter(|d| d.class == 0x01_08_02)
        .map(|d| d.bdf)
        .find(|&b| BlockDevice::open_namespace(topo, b).is_ok())
}

/// The best destination this machine has, by name.
fn best_dest(topo: &Topology, vk: Option<&Device>) -> &'static str {
    let real_gpu = vk.is_some_and(|d| d.info().kind != DeviceKind::Cpu);
    let ivshmem = topo.devices().iter().any(|d| d.vendor == 0x1af4 && d.device == 0x1110);
    match (real_gpu, ivshmem, vk.is_some()) {
        (true, _, _) => "vulkan-device",
        (false, true, _) => "ivshmem",
        (false, false, true) => "vulkan",
        _ => "host",
    }
}

type Run = Result<(), Box<dyn std::error::Error>>;

fn run(a: Args) -> Run {
    let topo = Arc::new(Topology::discover("/")?);
    let reg = Registry::new(topo.clone());
    let vk = Device::open(Select::Best).ok();
    let (path, ns) = match (&a.file, a.namespace) {
        (Some(f), _) => (f.clone(), None),
        (None, Some(b)) => (BlockDevice::open_namespace(&topo, b)?.path().display().to_string(), Some(b)),
        (None, None) => match first_namespace(&topo) {
            Some(b) => (BlockDevice::open_namespace(&topo, b)?.path().display().to_string(), Some(b)),
            None => {
                let me = std::env::current_exe()?.display().to_string();
                println!("nvme_to_gpu: no NVMe namespace on this machine; reading {me} instead");
                (me, None)
            }
        },
    };
    let dest_name = a.dest.clone().unwrap_or_else(|| best_dest(&topo, vk.as_ref()).to_string());
    let mut opts = Options::from_env()?;
    opts.strict |= a.strict;
    opts.chunk = a.chunk.unwrap_or(opts.chunk);
    opts.depth = a.depth.unwrap_or(opts.depth);
    if a.verify {
        opts.verify = Verify::Reread;
    }
    let loader = Loader::new(&reg, opts)?;
    let src_len = loader.open(&path)?.len();
    let len = a.len.unwrap_or(src_len.saturating_sub(a.offset).min(64 << 20));
    println!("nvme_to_gpu: {len} bytes at {:#x} of {path} -> {dest_name}", a.offset);

    let mut vk_region = None;
    let region: Arc<dyn PeerMemory> = match dest_name.as_str() {
        "host" => Arc::new(HostRegion::new(len)?),
        "vulkan" | "vulkan-device" => {
            let d = vk.as_ref().ok_or("no Vulkan device")?;
            let p = if dest_name == "vulkan" { Placement::Mappable } else { Placement::DeviceLocal };
            let v = Arc::new(d.allocate(len, p)?);
            vk_region = Some(v.clone());
            v
        }
        "ivshmem" => {
            let d =
                topo.devices().iter().find(|d| d.vendor == 0x1af4 && d.device == 0x1110).ok_or("no ivshmem device")?;
            Arc::new(BarRegion { bdf: d.bdf, bar: 2, offset: 0, len: d.bar(2).ok_or("ivshmem has no BAR2")?.cpu.len() })
        }
        s if s.starts_with("bar:") => {
            let (b, n) = s[4..].rsplit_once(':').ok_or("--dest bar:BDF:BAR")?;
            let (bdf, bar): (Bdf, u8) = (b.parse()?, n.parse()?);
            let blen = topo.by_bdf(bdf)?.bar(bar).ok_or("no such BAR")?.cpu.len();
            Arc::new(BarRegion { bdf, bar, offset: 0, len: blen })
        }
        s if s.starts_with("p2pmem:") => Arc::new(P2pmemRegion::allocate(&topo, s[7..].parse()?, len)?),
        other => return Err(format!("unknown --dest '{other}'").into()),
    };
    let guard = reg.register(region)?;
    let dest = match (&vk_region, dest_name.as_str()) {
        (Some(v), "vulkan-device") => loader.vulkan_device_dest(&guard, vk.as_ref().ok_or("no Vulkan")?, v.clone())?,
        _ => Dest::region(&guard),
    };
    // The userspace driver reads (programming the routed address), or the kernel does.
    let binding = if a.vfio { Some(Binding::to_vfio(ns.ok_or("--vfio needs --namespace")?)?) } else { None };
    let src = match &binding {
        Some(b) => loader.open_nvme(Controller::open(b, &reg, 1)?)?,
        None => loader.open(&path)?,
    };
    let r = loader.read(&src, a.offset, len, &dest, 0)?;
    println!("{r}");
    drop((src, loader));
    if let Some(b) = binding {
        b.restore()?;
    }
    Ok(())
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
