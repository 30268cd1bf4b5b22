//! What the benchmarks that run inside the testbed guest share: soft-RoCE on the guest's first
//! link, a shell, medians.

use std::process::Command;
use std::time::{Duration, Instant};

use peermem_rdma::Nic;

/// The soft-RoCE device the guest benchmarks use.
pub const DEV: &str = "rxe0";

/// Whether this process runs inside the testbed guest (testbed/run sets PEERMEM_GUEST).
pub fn in_guest() -> bool {
    std::env::var_os("PEERMEM_GUEST").is_some()
}

pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Brings `rxe0` up on eth0 (once) and opens it, waiting up to 20 s for its port.
pub fn rxe0() -> Result<Nic, String> {
    if !sh("rdma link show").contains(DEV) {
        sh("ip link set eth0 up; ip addr add 10.9.0.1/24 dev eth0; sleep 2; rdma link add rxe0 type rxe netdev eth0");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Nic::open(Some(DEV)) {
            Ok(n) => return Ok(n),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
