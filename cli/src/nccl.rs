//! `peermem export --nccl-xml FILE [--map HOST=GUEST]... [--map-file FILE]`: core's NCCL export
//! written to a file (or stdout), then what the file leaves out and why.
//!
//! Owns: reading the map arguments and the map file (bounded), writing the XML, the report
//! lines. Must not: decide what goes into the file or check it (core's `nccl` does both).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use peermem::nccl::{self, BusMap, Export, Options, NCCL_MAX_ELEMENTS};
use peermem::Topology;

use crate::out::Out;

/// The largest map file read.
const MAX_MAP_FILE: u64 = 1 << 20;

/// The host-to-guest map from `--map` entries and a `--map-file`.
pub fn bus_map(entries: &[String], file: Option<&Path>) -> Result<BusMap> {
    let mut map = BusMap::default();
    if let Some(p) = file {
        let meta = std::fs::metadata(p).map_err(|e| anyhow!("--map-file {}: {e}", p.display()))?;
        if !meta.is_file() || meta.len() > MAX_MAP_FILE {
            bail!("--map-file {}: not a regular file of at most {MAX_MAP_FILE} bytes", p.display());
        }
        let mut text = String::new();
        std::fs::File::open(p)
            .and_then(|f| f.take(MAX_MAP_FILE).read_to_string(&mut text))
            .with_context(|| format!("--map-file {}", p.display()))?;
        map.add_file(p, &text)?;
    }
    for e in entries {
        map.add(e, &format!("--map {e}"))?;
    }
    Ok(map)
}

/// Writes the file (`-`: stdout) and reports on it: on stdout after `wrote ...`, on stderr when
/// the XML itself goes to stdout.
pub fn export(t: &Topology, name: String, map: BusMap, to: &PathBuf, o: &mut Out) -> Result<()> {
    let ex = nccl::export(t, &Options { name, map })?;
    let report = report(&ex);
    if to == Path::new("-") {
        o.text(&ex.xml);
        for l in report {
            eprintln!("peermem: {l}");
        }
        return Ok(());
    }
    std::fs::write(to, &ex.xml).with_context(|| format!("--nccl-xml {}", to.display()))?;
    o.line(&format!("wrote {} (use it with NCCL_TOPO_FILE={})", to.display(), to.display()));
    for l in report {
        o.line(&l);
    }
    Ok(())
}

/// What the file holds against NCCL's limit, what it leaves to NCCL, and each NIC left out.
fn report(ex: &Export) -> Vec<String> {
    let mut lines = vec![format!(
        "{} elements of NCCL's {NCCL_MAX_ELEMENTS}, {} kept free for what NCCL adds at run time",
        ex.elements, ex.added_at_run_time
    )];
    lines.extend(ex.notes.iter().map(|n| format!("note: {n}")));
    if ex.left_out.is_empty() {
        return lines;
    }
    lines.push(format!("left out {} NIC(s) to stay within NCCL's limit:", ex.left_out.len()));
    lines.extend(ex.left_out.iter().map(|l| format!("  {l}")));
    let hint = "NCCL adds a left-out NIC back at run time when its network plugin lists it";
    if ex.rdma_names.is_empty() {
        lines.push(format!("{hint}: keep it to the NICs in the file (NCCL_SOCKET_IFNAME)"));
    } else {
        lines.push(format!("{hint}: keep it to the ones in the file: NCCL_IB_HCA='={}'", ex.rdma_names.join(",")));
    }
    lines
}
