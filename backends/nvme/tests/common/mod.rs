//! Helpers of the guest tests (NVMe backend and loader): the live topology, the testbed's devices
//! and known data on the namespaces. Included by path from both crates' `tests/guest.rs`.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use peermem::{Backing, BarMapping, Bdf, HostRegion, MapType, PeerMemory, Topology};
use peermem_nvme::BlockDevice;

pub fn live() -> Arc<Topology> {
    assert!(
        std::env::var_os("PEERMEM_GUEST").is_some(),
        "this test needs the testbed guest: testbed/run switch -- <this test binary>"
    );
    Arc::new(Topology::discover("/").expect("live sysfs"))
}

pub fn nvme_controllers(t: &Topology) -> Vec<Bdf> {
    t.devices().iter().filter(|d| d.class_devices.iter().any(|c| c.class == "nvme")).map(|d| d.bdf).collect()
}

/// The ivshmem function: the stand-in GPU BAR (BAR2, contents = $PEERMEM_IVSHMEM_FILE).
pub fn ivshmem(t: &Topology) -> Option<Bdf> {
    t.devices().iter().find(|d| d.vendor == 0x1af4 && d.device == 0x1110).map(|d| d.bdf)
}

pub fn iommu_group_size(bdf: Bdf) -> Option<usize> {
    let dir = format!("/sys/bus/pci/devices/{bdf}/iommu_group/devices");
    std::fs::read_dir(dir).ok().map(|d| d.count())
}

/// The controller to hand to VFIO: with an IOMMU, one alone in its group (the switch pair shares
/// one, and the other would keep its kernel driver); without, one with a switch peer.
pub fn vfio_candidate(t: &Topology, nvmes: &[Bdf]) -> (Bdf, Option<Bdf>) {
    let peer_of = |x: Bdf| {
        nvmes.iter().copied().find(|&y| {
            y != x
                && t.by_bdf(y).unwrap().p2pmem.is_some()
                && t.verdict(t.idx(y).unwrap(), t.idx(x).unwrap()).map_type == MapType::BusAddr
        })
    };
    match nvmes.iter().copied().find(|&b| iommu_group_size(b).is_some()) {
        Some(_) => {
            let x = *nvmes.iter().find(|&&b| iommu_group_size(b) == Some(1)).expect("an NVMe alone in its IOMMU group");
            (x, peer_of(x))
        }
        None => {
            let x = nvmes.iter().copied().find(|&b| peer_of(b).is_some()).unwrap_or(nvmes[0]);
            (x, peer_of(x))
        }
    }
}

pub fn fill(seed: u8, i: usize) -> u8 {
    (i as u64).wrapping_mul(2_654_435_761).wrapping_add(seed as u64 * 977).rotate_right(13) as u8
}

/// Writes `len` bytes of `fill(seed, _)` at byte `at` of `bdf`'s namespace (O_DIRECT through the
/// kernel driver) and returns them.
pub fn write_known(topo: &Topology, bdf: Bdf, at: u64, len: u64, seed: u8) -> Vec<u8> {
    let mut known = HostRegion::new(len).unwrap();
    for (i, b) in known.as_mut_slice().iter_mut().enumerate() {
        *b = fill(seed, i);
    }
    BlockDevice::open_namespace(topo, bdf).unwrap().write_at(at, known.as_mut_slice()).unwrap();
    known.as_mut_slice()[..len as usize].to_vec()
}

pub fn wait_for_nvme_driver(bdf: Bdf) -> Arc<Topology> {
    for _ in 0..500 {
        let t = Arc::new(Topology::discover("/").unwrap());
        if let Ok(d) = t.by_bdf(bdf) {
            if d.class_devices.iter().any(|c| c.class == "nvme") && BlockDevice::open_namespace(&t, bdf).is_ok() {
                return t;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{bdf}: the nvme driver did not come back");
}

/// `len` bytes of memory BAR `bar` of `bdf` from its start, mapped for the CPU.
pub fn open_resource(topo: &Topology, bdf: Bdf, bar: u8, len: u64) -> BarMapping {
    topo.map_bar(bdf, bar, 0, len).unwrap()
}

/// A controller with a switch-local p2pmem peer (kernel verdict bus_addr), and that peer.
pub fn switch_pair(t: &Topology, nvmes: &[Bdf]) -> Option<(Bdf, Bdf)> {
    nvmes.iter().find_map(|&x| {
        nvmes
            .iter()
            .copied()
            .find(|&y| {
                y != x
                    && t.by_bdf(y).unwrap().p2pmem.is_some()
                    && t.verdict(t.idx(y).unwrap(), t.idx(x).unwrap()).map_type == MapType::BusAddr
            })
            .map(|y| (x, y))
    })
}

/// Bytes `at..at+len` of the host file behind the ivshmem BAR.
pub fn ivshmem_file(at: u64, len: u64) -> Option<Vec<u8>> {
    let file = std::env::var_os("PEERMEM_IVSHMEM_FILE")?;
    let mut back = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&file).unwrap(), &mut back, at).unwrap();
    Some(back)
}

/// Reads a loaded destination back through the CPU: its own mapping, or its BAR range mapped
/// afresh.
pub fn read_dest(topo: &Topology, region: &Arc<dyn PeerMemory>, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    if region.cpu_mapping().is_some() {
        region.read_at(off, &mut v).unwrap();
    } else if let Backing::Bar { bdf, bar, offset } = region.backing() {
        topo.map_bar(bdf, bar, offset + off, len).unwrap().read_at(0, &mut v).unwrap();
    } else {
        panic!("a destination the CPU cannot read back");
    }
    v
}

/// A rate limit QEMU puts on one NVMe's drive (`$PEERMEM_HOTPLUG throttle`, in the `switch-gpu`
/// topology), lifted when dropped. At `iops` requests a second QEMU holds the rest of a queue's
/// commands, so a command really takes longer than a short driver timeout: a timeout test does
/// not depend on how fast TCG happens to complete a read.
pub struct Throttle {
    id: String,
}

impl Throttle {
    /// Limits the drive of NVMe `bdf`, which must still be bound to the kernel's nvme driver (its
    /// serial is the QEMU device's id).
    pub fn new(bdf: Bdf, iops: u32) -> Throttle {
        let dir = format!("/sys/bus/pci/devices/{bdf}/nvme");
        let ctrl = std::fs::read_dir(&dir).unwrap().flatten().next().unwrap_or_else(|| panic!("{dir}: empty"));
        let id = std::fs::read_to_string(ctrl.path().join("serial")).unwrap().trim().to_string();
        let t = Throttle { id };
        t.set(iops).unwrap_or_else(|e| panic!("{e}"));
        println!("{bdf} ({}): QEMU limits its drive to {iops} requests/s", t.id);
        t
    }

    fn set(&self, iops: u32) -> Result<(), String> {
        let tool = std::env::var("PEERMEM_HOTPLUG").map_err(|_| {
            "PEERMEM_HOTPLUG is not set: run this in the `switch-gpu` topology (TOPO_QMP=1)".to_string()
        })?;
        let out = std::process::Command::new(tool)
            .args(["throttle", &self.id, &iops.to_string()])
            .output()
            .map_err(|e| format!("hotplug throttle: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "hotplug throttle {} {iops}: {} {}",
                self.id,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        match self.set(0) {
            Ok(()) => println!("{}: QEMU's limit lifted", self.id),
            Err(e) if std::thread::panicking() => eprintln!("{e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
