//! RDMA WRITE bandwidth into a peermem-registered region against perftest's `ib_write_bw` on the
//! same rxe link, same message size and queue depth, in one guest run.
//!
//! Runs only inside the testbed guest (soft-RoCE rxe0 on eth0, out-of-band over 127.0.0.1):
//!   cargo bench -p peermem-bench --bench rdma_write --no-run   # prints the binary
//!   testbed/run switch -- target/release/deps/rdma_write-XXXX
//! Elsewhere it prints "skipped" and exits 0. Rounds alternate (ours, ib_write_bw) so drift in
//! the emulated machine hits both; the medians are compared. Env: PEERMEM_RDMA_MSG (bytes,
//! default 65536), PEERMEM_RDMA_ITERS (default 1000), PEERMEM_RDMA_ROUNDS (default 3).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{HostRegion, Registry, Topology};
use peermem_rdma::{Access, ConnectOpts, Connection, Nic};

mod guest;

use guest::{env, median, rxe0, DEV};

const DEPTH: usize = 128;

/// Gbit/s of `iters` RDMA WRITEs of `msg` bytes into a registered host region.
fn ours(nic: &Nic, reg: &Registry, msg: u32, iters: usize) -> Result<f64, String> {
    let opts = ConnectOpts { max_send_wr: DEPTH as u32, ..Default::default() };
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let (mut server, mut client) = std::thread::scope(|s| {
        let h = s.spawn(|| Connection::accept(nic, &l, opts));
        let c = Connection::connect(nic, addr, opts);
        (h.join().expect("accept thread"), c)
    });
    let (server, client) = (server.as_mut().map_err(|e| e.to_string())?, client.as_mut().map_err(|e| e.to_string())?);
    let target = Arc::new(HostRegion::new(msg as u64).map_err(|e| e.to_string())?);
    let tmr = nic.register(reg, target, Access::REMOTE_WRITE).map_err(|e| e.to_string())?;
    server.advertise(tmr.remote()).map_err(|e| e.to_string())?;
    let remote = client.expect_remote().map_err(|e| e.to_string())?;
    let src = Arc::new(HostRegion::new(msg as u64).map_err(|e| e.to_string())?);
    let smr = nic.register(reg, src, Access::LOCAL_READ).map_err(|e| e.to_string())?;
    let t = client.write_stream(&smr, remote, msg, iters, DEPTH).map_err(|e| e.to_string())?;
    Ok(msg as f64 * iters as f64 * 8.0 / t.as_secs_f64() / 1e9)
}

fn wait_bounded(mut c: Child, limit: Duration) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        if c.try_wait().map_err(|e| e.to_string())?.is_some() {
            let out = c.wait_with_output().map_err(|e| e.to_string())?;
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        if Instant::now() >= deadline {
            let _ = c.kill();
            let _ = c.wait();
            return Err("ib_write_bw did not finish in time".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Gbit/s that `ib_write_bw` reports (BW average) for the same message size, depth and count.
fn perftest(msg: u32, iters: usize) -> Result<f64, String> {
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "-d",
            DEV,
            "-x",
            "0",
            "-F",
            "--report_gbits",
            "-t",
            &DEPTH.to_string(),
            "-s",
            &msg.to_string(),
            "-n",
            &iters.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let spawn = |a: Vec<String>| {
        Command::new("ib_write_bw")
            .args(a)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    };
    let server = spawn(args(&[]))?;
    std::thread::sleep(Duration::from_millis(1500));
    let client = spawn(args(&["127.0.0.1"]))?;
    let out = wait_bounded(client, Duration::from_secs(120))?;
    let _ = wait_bounded(server, Duration::from_secs(10));
    // " 65536      1000           0.14               0.14   		   0.000272"
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 4 && w[0] == msg.to_string()).then(|| w[3].parse::<f64>().ok()).flatten()
        })
        .next()
        .ok_or_else(|| format!("no result line in ib_write_bw output:\n{out}"))
}

fn main() {
    if !guest::in_guest() {
        println!("rdma_write: skipped (needs the testbed guest: testbed/run switch -- <this binary>)");
        return;
    }
    let msg = env("PEERMEM_RDMA_MSG", 65536) as u32;
    let iters = env("PEERMEM_RDMA_ITERS", 1000) as usize;
    let rounds = env("PEERMEM_RDMA_ROUNDS", 3).max(1) as usize;
    let nic = match rxe0() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("rdma_write: {DEV} unavailable: {e}");
            std::process::exit(1);
        }
    };
    let reg = Registry::new(Arc::new(Topology::discover("/").expect("live sysfs")));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let x = ours(&nic, &reg, msg, iters).unwrap_or_else(|e| panic!("peermem round {r}: {e}"));
        let y = perftest(msg, iters).unwrap_or_else(|e| panic!("ib_write_bw round {r}: {e}"));
        println!("round {r}: peermem {x:.4} Gbit/s, ib_write_bw {y:.4} Gbit/s");
        a.push(x);
        b.push(y);
    }
    let (x, y) = (median(a), median(b));
    println!(
        "rdma_write {DEV} msg {msg} B x {iters}, depth {DEPTH}: peermem {x:.4} Gbit/s ({:.1} MB/s), ib_write_bw {y:.4} Gbit/s, ratio {:.3}",
        x * 1e9 / 8.0 / 1e6,
        x / y
    );
}
