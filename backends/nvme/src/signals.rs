//! Giving functions bound to vfio-pci back when the process is told to stop (SIGINT, SIGTERM).
//!
//! Owns: the process-wide list of functions this process bound, an interrupt flag, and a watcher
//! thread (started with the first binding) that receives the signals through signal-hook (its
//! handler only writes to a pipe: async-signal-safe). On a signal the watcher raises the flag;
//! drivers poll it in their bounded waits and fail with an interrupt error, which unwinds through
//! their owners, whose drops quiesce the device and restore its driver. Once no function is
//! bound, or after a grace period, the watcher ends the process with the signal's default action.
//! Whatever is still bound then gets bus mastering cleared (so no DMA reaches the pages the
//! process frees as it exits), its `driver_override` cleared, and a detached `/bin/sh` helper
//! that, once this process is gone (its VFIO fds closed), unbinds vfio-pci and reprobes.
//! Must not: restore a binding itself while this process may hold the function's VFIO fds
//! (unbinding vfio-pci waits for them to close).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use peermem::Bdf;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// How long the owners of bound functions get to unwind and restore them after a signal.
const GRACE: Duration = Duration::from_secs(30);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static BOUND: Mutex<Vec<(Bdf, PathBuf)>> = Mutex::new(Vec::new());
static WATCHER: OnceLock<()> = OnceLock::new();

/// Whether SIGINT or SIGTERM arrived while a function was bound: waits on a device end early.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn bound() -> std::sync::MutexGuard<'static, Vec<(Bdf, PathBuf)>> {
    BOUND.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records that `bdf` (sysfs directory `dir`) is bound to vfio-pci by this process, starting the
/// watcher on first use.
pub(crate) fn register(bdf: Bdf, dir: PathBuf) {
    WATCHER.get_or_init(start_watcher);
    bound().push((bdf, dir));
}

/// `bdf` is back with its previous driver (or given up on).
pub(crate) fn unregister(bdf: Bdf) {
    bound().retain(|(b, _)| *b != bdf);
}

fn start_watcher() {
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no SIGINT/SIGTERM watcher ({e}): a signal leaves functions bound to vfio-pci");
            return;
        }
    };
    let spawned = std::thread::Builder::new().name("peermem-vfio-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            on_signal(sig);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("no SIGINT/SIGTERM watcher thread ({e})");
    }
}

fn on_signal(sig: i32) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    let end = Instant::now() + GRACE;
    tracing::warn!(sig, bound = bound().len(), "termination signal: giving VFIO functions back");
    while !bound().is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (bdf, dir) in bound().iter() {
        tracing::error!(%bdf, "still bound to vfio-pci after {GRACE:?}: clearing bus mastering and driver_override");
        if let Err(e) = clear_bus_master(dir) {
            tracing::error!(%bdf, "clearing bus mastering: {e}");
        }
        if let Err(e) = std::fs::write(dir.join("driver_override"), "\n") {
            tracing::error!(%bdf, "clearing driver_override: {e}");
        }
        if let Err(e) = rebind_after_exit(*bdf) {
            tracing::error!(%bdf, "starting the rebind helper: {e}");
        }
    }
    if let Err(e) = signal_hook::low_level::emulate_default_handler(sig) {
        tracing::error!(sig, "re-raising the signal: {e}");
        std::process::exit(128 + sig);
    }
}

/// Starts a detached helper that waits (bounded, 60 s) for this process to end, then unbinds
/// `bdf` from vfio-pci and asks the kernel to probe it (driver_override is clear by then, so its
/// own driver takes it). Unbinding cannot happen earlier: vfio-pci waits for our fds to close.
fn rebind_after_exit(bdf: Bdf) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let script = "i=0; while [ -e /proc/$0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                  echo $1 > /sys/bus/pci/drivers/vfio-pci/unbind; echo $1 > /sys/bus/pci/drivers_probe";
    std::process::Command::new("/bin/sh")
        .args(["-c", script, &std::process::id().to_string(), &bdf.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}

/// Clears bus-master enable in the function's command register through sysfs config space.
fn clear_bus_master(dir: &std::path::Path) -> std::io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).open(dir.join("config"))?;
    let mut cmd = [0u8; 2];
    f.read_exact_at(&mut cmd, 4)?;
    let v = u16::from_le_bytes(cmd) & !0x4;
    f.write_all_at(&v.to_le_bytes(), 4)
}
