//! One load: a byte range of a source into a registered region, direct when the mover's planner
//! says so, otherwise a pipelined bounce through host staging buffers.
//!
//! Owns: turning the planner's decision into transfers (O_DIRECT reads into the destination's
//! pages, VFIO reads to the routed address, the bounce pipeline), and the checksums. Must not:
//! decide directness itself (`peermem::mover` does), compute an address, or map a BAR itself
//! (`Topology::map_bar` does).

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use peermem::mover::{BounceReason, Decision, Pipeline, Plan, Probe, Reach};
use peermem::{Backing, Entry, HostRegion, Peer, PeerMemory, Registry, Side};
use peermem_nvme::Dir;

use crate::checksum::Checksum;
use crate::error::LoadError;
use crate::report::{LoadOptions, LoadReport, Method};
use crate::source::{Source, ALIGN};

/// Bytes a route probe moves (read-only: the source's own data, never a write to it).
const PROBE_LEN: u64 = 64 << 10;

/// The destination as the CPU reaches it: its own mapping, or a fresh mapping of its BAR range.
fn cpu_window(reg: &Registry, dest: &Entry) -> Result<Arc<dyn PeerMemory>, LoadError> {
    if dest.region().cpu_mapping().is_some() {
        return Ok(dest.region().clone());
    }
    match dest.region().backing() {
        Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => {
            Ok(Arc::new(reg.topology().map_bar(bdf, bar, offset, dest.len())?))
        }
        _ => Err(LoadError::Unreachable("a driver-private region without a CPU mapping".into())),
    }
}

/// The peer the registry resolves the destination for: the device reading the source.
fn reader_peer(source: &Source<'_>, reg: &Registry) -> Peer {
    match source {
        Source::Kernel(k) => k.device.and_then(|b| reg.peer(b).ok()).unwrap_or(Peer::Cpu),
        Source::Vfio(c) => c.peer(),
    }
}

/// Loads bytes `range` of `source` into the registered region `dest` at `opts.dest_offset`.
///
/// The device reading the source (the file's PCI device, or the VFIO controller) is the peer the
/// registry resolves `dest` for; the mover's planner decides direct or bounce from that route,
/// how the reader reaches memory (the kernel pins pages for O_DIRECT; the VFIO driver programs
/// addresses), and for device memory a read-only probe of the source's own bytes.
///
/// A load whose source or destination device leaves the machine (surprise removal, as the
/// registry's `hotplug::Watcher` or the device's vanished sysfs directory shows) ends with
/// `LoadError::DeviceGone`, naming the device and the error the removal caused.
pub fn load(
    source: &mut Source<'_>,
    range: Range<u64>,
    dest: &Entry,
    reg: &Registry,
    opts: &LoadOptions,
) -> Result<LoadReport, LoadError> {
    load_inner(source, range, dest, reg, opts)
        .map_err(|e| crate::gone::explain(e, source_device(source), source_emptied(source), dest, reg))
}

/// Whether the source is a block device that now reads as empty (a removed namespace's
/// capacity drops to 0).
fn source_emptied(source: &Source<'_>) -> bool {
    match source {
        Source::Kernel(k) => k.emptied_block_device(),
        Source::Vfio(_) => false,
    }
}

/// The PCI function that reads the source, when there is one.
fn source_device(source: &Source<'_>) -> Option<peermem::Bdf> {
    match source {
        Source::Kernel(k) => k.device,
        Source::Vfio(c) => Some(c.bdf()),
    }
}

fn load_inner(
    source: &mut Source<'_>,
    range: Range<u64>,
    dest: &Entry,
    reg: &Registry,
    opts: &LoadOptions,
) -> Result<LoadReport, LoadError> {
    let src_len = source.len();
    if range.start >= range.end || range.end > src_len {
        return Err(LoadError::BadRange { start: range.start, end: range.end, len: src_len });
    }
    let len = range.end - range.start;
    let doff = opts.dest_offset;
    if doff.checked_add(len).is_none_or(|e| e > dest.len()) {
        return Err(LoadError::TooSmall { len, offset: doff, region_len: dest.len() });
    }
    let chunk = opts.chunk.max(ALIGN).div_ceil(ALIGN) * ALIGN;
    let depth = opts.depth.max(1);
    let peer = reader_peer(source, reg);
    let route = reg.resolve(dest, peer)?;
    let window = cpu_window(reg, dest)?;
    let align = source.align();
    // The part a direct method moves: from an aligned start, whole aligned blocks; the tail
    // shorter than one block goes through a small bounce. O_DIRECT also needs the destination's
    // memory aligned (a region lent by a caller, e.g. a numpy array, may not be page aligned).
    let memory_aligned = match source {
        Source::Kernel(_) => dest.cpu_range().is_none_or(|r| (r.start().raw() + doff).is_multiple_of(ALIGN)),
        Source::Vfio(_) => true,
    };
    let body = if range.start.is_multiple_of(align) && doff.is_multiple_of(ALIGN) && memory_aligned {
        len / align * align
    } else {
        0
    };

    let (reach, direct_method) = match source {
        Source::Kernel(_) => (Reach::KernelPages, Method::KernelDirect),
        Source::Vfio(_) => (Reach::DeviceAddress, Method::VfioDirect),
    };
    // What the source side rules out before the planner is asked.
    let precondition = match source {
        _ if body == 0 => Err(format!(
            "range start {:#x} / destination address + offset {doff:#x} not {align}-byte aligned",
            range.start
        )),
        Source::Kernel(k) if !k.direct => Err("the filesystem refused O_DIRECT".to_string()),
        _ => Ok(()),
    };
    let decision = match precondition {
        Err(why) => {
            let plan = Plan::Bounce(BounceReason::NotDirect { route: route.kind.name(), why });
            let mut reasons = route.reasons();
            reasons.push(format!("plan: {plan}"));
            Decision { plan, route: route.kind.name(), reasons }
        }
        Ok(()) => {
            let n = PROBE_LEN.min(body);
            // Device memory is probed with the source's own first bytes, read through host memory.
            let expected = if matches!(dest.provider(), peermem::Provider::Pci(_)) {
                Some(read_via_host(source, range.start, n, reg)?)
            } else {
                None
            };
            let w = &*window;
            let probe = expected.map(|expected| Probe::Known {
                expected,
                poison: Box::new(move |p: &[u8]| w.write_at(doff, p).map_err(LoadError::from)),
                transfer: Box::new(|| direct(source, &direct_method, range.start, n, dest, reg, doff, n, 1)),
                read_back: Box::new(move |b: &mut [u8]| w.read_at(doff, b).map_err(LoadError::from)),
            });
            opts.health.decide(&route, dest, peer, reach, probe)
        }
    };
    let method = match &decision.plan {
        Plan::Direct => direct_method,
        Plan::Bounce(_) => Method::Bounce { why: decision.plan.to_string() },
    };
    tracing::info!(route = decision.route, %method, len, "load");

    let start = Instant::now();
    let mut moved = 0;
    if decision.is_direct() {
        direct(source, &method, range.start, body, dest, reg, doff, chunk, depth)?;
        moved = body;
    }
    if moved < len {
        let pipe = Pipeline::new(chunk, depth)?;
        bounce(source, &pipe, range.start + moved..range.end, reg, &*window, doff + moved)?;
    }
    let seconds = start.elapsed().as_secs_f64();

    let checksum = checksum_region(&*window, doff, len)?;
    let source_checksum = if opts.verify { Some(checksum_source(source, range.clone(), reg, chunk)?) } else { None };
    if let Some(s) = source_checksum {
        if s != checksum {
            return Err(LoadError::Mismatch { dest: checksum, source_sum: s });
        }
    }
    Ok(LoadReport {
        source: source.describe(),
        route: decision.route,
        method,
        reasons: decision.reasons,
        bytes: len,
        seconds,
        checksum,
        source_checksum,
    })
}

/// Reads `n` bytes at `at` of the source into `dest` by `method` (direct), starting at `doff`.
#[allow(clippy::too_many_arguments)]
fn direct(
    source: &mut Source<'_>,
    method: &Method,
    at: u64,
    n: u64,
    dest: &Entry,
    reg: &Registry,
    doff: u64,
    chunk: u64,
    depth: usize,
) -> Result<(), LoadError> {
    match (source, method) {
        (Source::Kernel(k), Method::KernelDirect) => {
            let region = dest.region().as_ref();
            let chunks = n.div_ceil(chunk);
            let file = &k.file;
            let path = &k.path;
            // `depth` readers, each taking every depth-th chunk: that many requests in flight.
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..depth as u64)
                    .map(|w| {
                        s.spawn(move || -> Result<(), LoadError> {
                            let mut i = w;
                            while i < chunks {
                                let o = i * chunk;
                                let len = chunk.min(n - o);
                                read_full(file, path, at + o, region, doff + o, len)?;
                                i += depth as u64;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers.into_iter().try_for_each(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LoadError::Copy { what: "direct read", offset: at, why: "a reader panicked".into() })
                    })
                })
            })
        }
        (Source::Vfio(c), Method::VfioDirect) => {
            let bs = c.namespace().block_size;
            c.transfer(reg, Dir::Read, dest, doff, at / bs, n)?;
            Ok(())
        }
        (_, m) => {
            Err(LoadError::Copy { what: "direct read", offset: at, why: format!("{m} does not fit this source") })
        }
    }
}

/// pread until `len` bytes arrived (a short read only at the end of the source is an error here:
/// the range was checked against the source length).
fn read_full(
    file: &std::fs::File,
    path: &std::path::Path,
    at: u64,
    region: &dyn PeerMemory,
    off: u64,
    len: u64,
) -> Result<(), LoadError> {
    let mut done = 0;
    while done < len {
        let span = region.span_at(Side::Destination, off + done, len - done)?;
        let r = peermem_nvme::pread_into(file, at + done, span)
            .map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
        if r == 0 {
            return Err(LoadError::Copy { what: "read", offset: at + done, why: "unexpected end of source".into() });
        }
        done += r as u64;
    }
    Ok(())
}

/// Pipelined bounce of `range` of the source into `window` at `doff`: fill reads aligned pieces
/// into the staging buffers, drain copies the wanted bytes on to the destination.
fn bounce(
    source: &mut Source<'_>,
    pipe: &Pipeline,
    range: Range<u64>,
    reg: &Registry,
    window: &dyn PeerMemory,
    doff: u64,
) -> Result<(), LoadError> {
    let align = source.align();
    let src_len = source.len();
    let a0 = range.start / align * align;
    let a1 = (range.end.div_ceil(align) * align).min(src_len.div_ceil(align) * align);
    let staging = pipe.staging().to_vec();
    // The VFIO driver reaches staging buffers only through the registry.
    let regs = match source {
        Source::Vfio(_) => {
            staging.iter().map(|s| reg.register(s.clone() as Arc<dyn PeerMemory>)).collect::<Result<Vec<_>, _>>()?
        }
        Source::Kernel(_) => Vec::new(),
    };
    let drain = |slot: usize, off: u64, n: u64| -> Result<(), LoadError> {
        // This piece holds source bytes a0+off .. a0+off+n; keep the part inside `range`.
        let lo = (a0 + off).max(range.start);
        let hi = (a0 + off + n).min(range.end);
        if lo >= hi {
            return Ok(());
        }
        Ok(staging[slot].copy_to(lo - (a0 + off), window, doff + (lo - range.start), hi - lo)?)
    };
    match source {
        Source::Kernel(k) => {
            let fill = |slot: usize, off: u64, n: u64| -> Result<(), LoadError> {
                let want = n.min(src_len - (a0 + off));
                let io = |source| LoadError::Io { path: k.path.clone(), source };
                let mut done = 0;
                while done < want {
                    let span = staging[slot].span_at(Side::Destination, done, n - done)?;
                    let r = peermem_nvme::pread_into(&k.file, a0 + off + done, span).map_err(io)?;
                    if r == 0 {
                        break;
                    }
                    done += r as u64;
                }
                if done < want {
                    return Err(LoadError::Copy {
                        what: "read",
                        offset: a0 + off + done,
                        why: format!("{}: short read, {done} of {want} bytes", k.path.display()),
                    });
                }
                Ok(())
            };
            pipe.run(a1 - a0, fill, drain)?;
        }
        Source::Vfio(c) => {
            let bs = c.namespace().block_size;
            let fill = |slot: usize, off: u64, n: u64| -> Result<(), LoadError> {
                c.transfer(reg, Dir::Read, &regs[slot], 0, (a0 + off) / bs, n.div_ceil(bs) * bs)?;
                Ok(())
            };
            pipe.run(a1 - a0, fill, drain)?;
        }
    }
    Ok(())
}

/// Reads `n` bytes at `at` of the source through host memory (the known-good path).
fn read_via_host(source: &mut Source<'_>, at: u64, n: u64, reg: &Registry) -> Result<Vec<u8>, LoadError> {
    let pipe = Pipeline::new(n.max(ALIGN).div_ceil(ALIGN) * ALIGN, 1)?;
    let out: Arc<dyn PeerMemory> = Arc::new(HostRegion::new(n)?);
    bounce(source, &pipe, at..at + n, reg, &*out, 0)?;
    let mut v = vec![0u8; n as usize];
    out.read_at(0, &mut v)?;
    Ok(v)
}

fn checksum_region(window: &dyn PeerMemory, off: u64, len: u64) -> Result<u64, LoadError> {
    let mut c = Checksum::new();
    crate::checksum::read_pieces(window, off, len, |piece| c.update(piece))?;
    Ok(c.finish())
}

/// The checksum of the source range, read again through host staging buffers.
fn checksum_source(source: &mut Source<'_>, range: Range<u64>, reg: &Registry, chunk: u64) -> Result<u64, LoadError> {
    let mut c = Checksum::new();
    let mut at = range.start;
    let piece = chunk.max(ALIGN) * 4;
    while at < range.end {
        let n = piece.min(range.end - at);
        c.update(&read_via_host(source, at, n, reg)?);
        at += n;
    }
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::KernelSource;
    use peermem::Topology;

    fn fixture_registry() -> Registry {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/qemu-switch");
        Registry::new(Arc::new(Topology::discover(root).unwrap()))
    }

    /// A file on a filesystem without a PCI device (the CPU is the peer): any byte range, aligned
    /// or not, lands in a host region with the source's checksum.
    #[test]
    fn a_file_range_loads_into_host_memory_with_a_verified_checksum() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src.bin");
        let data: Vec<u8> = (0..(3 << 20) + 123u32).map(|i| (i ^ (i >> 9)) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let reg = fixture_registry();
        let host = Arc::new(HostRegion::new(4 << 20).unwrap());
        let g = reg.register(host.clone() as Arc<dyn PeerMemory>).unwrap();
        for (range, doff) in [(0..data.len() as u64, 0), (4096..(2 << 20) + 5, 8192), (777..1_000_001, 3)] {
            let mut src = Source::Kernel(KernelSource::open(&p).unwrap());
            let opts = LoadOptions { chunk: 256 << 10, depth: 3, dest_offset: doff, ..Default::default() };
            let r = load(&mut src, range.clone(), &g, &reg, &opts).unwrap();
            assert_eq!(r.bytes, range.end - range.start);
            assert_eq!(Some(r.checksum), r.source_checksum);
            assert_eq!(r.checksum, Checksum::of(&data[range.start as usize..range.end as usize]));
            let mut back = vec![0u8; r.bytes as usize];
            host.read_at(doff, &mut back).unwrap();
            assert!(back == data[range.start as usize..range.end as usize], "{range:?}: {}", r.method);
            assert!(r.reasons.iter().any(|s| s.starts_with("plan:")), "{:?}", r.reasons);
        }
    }

    /// A destination whose memory is not page aligned (a slice of a pool at an odd offset, as a
    /// caller's buffer can be) is not handed to O_DIRECT (EINVAL): it is bounced, correctly.
    #[test]
    fn a_destination_not_page_aligned_in_memory_is_bounced_not_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src.bin");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let reg = fixture_registry();
        let pool = Arc::new(HostRegion::new(2 << 20).unwrap());
        let slice = Arc::new(peermem::HostSlice::new(pool.clone(), 100, 1 << 20).unwrap());
        let g = reg.register(slice.clone() as Arc<dyn PeerMemory>).unwrap();
        let mut src = Source::Kernel(KernelSource::open(&p).unwrap());
        let r = load(&mut src, 0..1 << 20, &g, &reg, &LoadOptions::default()).unwrap();
        let mut back = vec![0u8; 1 << 20];
        slice.read_at(0, &mut back).unwrap();
        assert!(back == data);
        if KernelSource::open(&p).unwrap().is_direct() {
            assert!(matches!(r.method, Method::Bounce { .. }), "{}", r.method);
        }
    }

    #[test]
    fn bad_ranges_and_small_destinations_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src.bin");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let reg = fixture_registry();
        let g = reg.register(Arc::new(HostRegion::new(4096).unwrap()) as Arc<dyn PeerMemory>).unwrap();
        let mut src = Source::Kernel(KernelSource::open(&p).unwrap());
        let o = LoadOptions::default();
        assert!(matches!(load(&mut src, 0..10_001, &g, &reg, &o), Err(LoadError::BadRange { .. })));
        assert!(matches!(load(&mut src, 5..5, &g, &reg, &o), Err(LoadError::BadRange { .. })));
        assert!(matches!(load(&mut src, 0..8192, &g, &reg, &o), Err(LoadError::TooSmall { .. })));
        let o = LoadOptions { dest_offset: 4000, ..Default::default() };
        assert!(matches!(load(&mut src, 0..100, &g, &reg, &o), Err(LoadError::TooSmall { .. })));
    }
}
