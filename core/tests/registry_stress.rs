//! Registry stress: readers looking up and resolving, writers registering and unregistering,
//! registration guards dropped on another thread, all at once for a bounded time
//! (`PEERMEM_STRESS_SECS`, default 1 s). `tools/valgrind-stress` runs this test under valgrind
//! memcheck, which reports any read of freed or uninitialised memory the churn provokes.
//!
//! The property checked on every operation: no lookup or resolve returns a region after its
//! unregister has returned. Each slot records the id of the last registration whose unregister
//! returned (ids grow with every registration); a reader reads that record first, then looks up
//! or resolves, and a result for an id at or below the record is a violation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use peermem::{HostRegion, HostSlice, Peer, PeerMemory, Registration, Registry, ResolveError, Topology, VirtAddr};

const SLOTS: u64 = 64;
const WRITERS: u64 = 2;
const READERS: u64 = 2;

fn duration() -> Duration {
    let secs = std::env::var("PEERMEM_STRESS_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(1.0);
    Duration::from_secs_f64(secs.clamp(0.1, 600.0))
}

struct Slots {
    /// The id of the last registration of each slot whose unregister has returned.
    dead: Vec<AtomicU64>,
    /// Registered (or waiting for its guard to be dropped): its writer must not register it.
    busy: Vec<AtomicBool>,
}

impl Slots {
    fn retire(&self, slot: usize, g: Registration) {
        let id = g.id().raw();
        drop(g);
        self.dead[slot].fetch_max(id, Ordering::SeqCst);
        self.busy[slot].store(false, Ordering::Release);
    }
}

#[derive(Default, Debug)]
struct Counts {
    lookups: u64,
    hits: u64,
    resolved: u64,
    refused: u64,
}

#[test]
fn no_lookup_or_resolve_returns_a_region_after_its_unregister_returned() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/host-fc-amd");
    let reg = Registry::new(Arc::new(Topology::discover(root).expect("host fixture")));
    let nic = reg.peer("0000:00:03.0".parse().unwrap()).unwrap();
    let pool = Arc::new(HostRegion::new(SLOTS * 4096).unwrap());
    let base = pool.cpu_range().unwrap().start().raw();
    let slots = Slots {
        dead: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        busy: (0..SLOTS).map(|_| AtomicBool::new(false)).collect(),
    };
    let stop = AtomicBool::new(false);
    let registered = AtomicU64::new(0);
    let deadline = Instant::now() + duration();

    let counts: Vec<Counts> = std::thread::scope(|s| {
        let (to_dropper, dropped) = mpsc::channel::<(usize, Registration)>();
        let slots = &slots;
        s.spawn(move || {
            for (slot, g) in dropped {
                slots.retire(slot, g);
            }
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (reg, pool, stop, registered, to_dropper) = (&reg, &pool, &stop, &registered, to_dropper.clone());
                s.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let slot = (w + WRITERS * (n % (SLOTS / WRITERS))) as usize;
                        if slots.busy[slot].load(Ordering::Acquire) {
                            std::thread::yield_now();
                            continue;
                        }
                        let region = Arc::new(HostSlice::new(pool.clone(), slot as u64 * 4096, 4096).unwrap());
                        let g = reg.register(region).unwrap_or_else(|e| panic!("slot {slot}: {e}"));
                        slots.busy[slot].store(true, Ordering::Release);
                        registered.fetch_add(1, Ordering::Relaxed);
                        // Half the guards are dropped by the dropper thread, half here.
                        if n.is_multiple_of(2) {
                            to_dropper.send((slot, g)).unwrap();
                        } else {
                            std::thread::yield_now();
                            slots.retire(slot, g);
                        }
                    }
                })
            })
            .collect();
        drop(to_dropper);
        let readers: Vec<_> = (0..READERS)
            .map(|t| {
                let (reg, stop) = (&reg, &stop);
                s.spawn(move || {
                    let mut reader = reg.reader();
                    let mut c = Counts::default();
                    let mut x = t + 1;
                    while !stop.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let slot = ((x >> 33) % SLOTS) as usize;
                        let before = slots.dead[slot].load(Ordering::SeqCst);
                        c.lookups += 1;
                        if c.lookups.is_multiple_of(256) {
                            // Under valgrind threads take turns: let the writers run too.
                            std::thread::yield_now();
                        }
                        let Some(hit) = reader.lookup_va(VirtAddr::new(base + slot as u64 * 4096 + 7)) else {
                            continue;
                        };
                        c.hits += 1;
                        let entry = hit.entry.clone();
                        let id = entry.id().raw();
                        assert!(id > before, "slot {slot}: lookup returned {id} after its unregister returned");
                        assert_eq!(hit.offset, 7);
                        assert_eq!(entry.cpu_range().unwrap().start().raw(), base + slot as u64 * 4096);
                        let peer = if x & 1 == 0 { Peer::Cpu } else { nic };
                        let before = slots.dead[slot].load(Ordering::SeqCst);
                        match reg.resolve(&entry, peer) {
                            Ok(r) => {
                                assert!(id > before, "slot {slot}: resolve of {id} after its unregister returned");
                                assert_eq!(r.len, 4096);
                                c.resolved += 1;
                            }
                            Err(ResolveError::Unregistered(e)) if e.raw() == id => c.refused += 1,
                            Err(e) => panic!("slot {slot}: {e}"),
                        }
                    }
                    c
                })
            })
            .collect();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let sum = |f: fn(&Counts) -> u64| counts.iter().map(f).sum::<u64>();
    let (lookups, hits, resolved, refused) =
        (sum(|c| c.lookups), sum(|c| c.hits), sum(|c| c.resolved), sum(|c| c.refused));
    let registered = registered.load(Ordering::Relaxed);
    println!(
        "registry stress {:?}: {registered} registrations, {lookups} lookups, {hits} hits, {resolved} resolves, \
         {refused} refused as unregistered",
        duration()
    );
    assert!(registered > 0 && hits > 0 && resolved > 0, "the stress did not exercise the registry");
    assert_eq!(reg.len(), 0, "every guard was dropped");
}
