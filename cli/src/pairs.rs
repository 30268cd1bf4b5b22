//! `peermem check` and `peermem fix`: verdicts over many pairs at once.

use anyhow::{bail, Result};
use peermem::pci::{Labels, Selection};
use peermem::verdict::AcsFix;
use peermem::{Bdf, DevIdx, MapType, Topology, Verdict};

use crate::out::Out;
use crate::Root;

/// One pair to judge, with its labels.
pub struct Pair {
    pub names: (String, String),
    pub verdict: Verdict,
}

/// The pairs named on the command line (PROVIDER CLIENT ...), or every ordered pair of the
/// selected endpoints.
pub fn pairs(t: &Topology, root: &Root, sel: &Selection, args: &[String]) -> Result<Vec<Pair>> {
    let labels = Labels::new(t);
    let mut idx: Vec<(DevIdx, DevIdx)> = Vec::new();
    if args.is_empty() {
        let eps = labels.select(sel);
        for &a in &eps {
            for &b in &eps {
                if a != b {
                    idx.push((a, b));
                }
            }
        }
    } else {
        if !args.len().is_multiple_of(2) {
            bail!(
                "pairs come as PROVIDER CLIENT: {} names given (odd), last is {:?}",
                args.len(),
                args[args.len() - 1]
            );
        }
        for pc in args.chunks(2) {
            idx.push((crate::resolve(t, &labels, root, &pc[0])?, crate::resolve(t, &labels, root, &pc[1])?));
        }
    }
    Ok(idx
        .into_iter()
        .map(|(p, c)| Pair {
            names: (labels.label(p).to_string(), labels.label(c).to_string()),
            verdict: t.verdict(p, c),
        })
        .collect())
}

/// The reason that matters most for a pair that is not direct.
fn blocker(v: &Verdict) -> String {
    if !v.acs_redirect.is_empty() {
        return format!(
            "ACS redirect on {} (fix: {})",
            v.acs_redirect.iter().map(Bdf::to_string).collect::<Vec<_>>().join(", "),
            v.acs_fix.as_deref().unwrap_or("-")
        );
    }
    match v.common_upstream {
        None => format!("no common upstream bridge ({})", v.path),
        Some(c) => format!("common upstream {c}"),
    }
}

/// One line per pair; exit 0 when all are direct, 1 when any is not.
pub fn check(t: &Topology, pairs: &[Pair], allow_host_bridge: bool, o: &mut Out) -> u8 {
    let _ = t;
    if pairs.is_empty() {
        o.line("no pairs to check (no endpoints selected; try --all or name pairs)");
        return 0;
    }
    let mut bad = 0;
    for p in pairs {
        let v = &p.verdict;
        let ok = v.allows_p2p(allow_host_bridge);
        let status = if ok { "ok " } else { "NOT" };
        let why = if ok { String::new() } else { format!("  {}", blocker(v)) };
        o.line(&format!(
            "{status} {:>6} -> {:<6} {} -> {}  {} {}{why}",
            p.names.0,
            p.names.1,
            v.provider,
            v.client,
            v.map_type.as_str(),
            v.path
        ));
        bad += usize::from(!ok);
    }
    let want = if allow_host_bridge { "bus_addr or thru_host_bridge" } else { "bus_addr" };
    o.line(&format!("{} of {} pairs direct ({want})", pairs.len() - bad, pairs.len()));
    u8::from(bad > 0)
}

/// The smallest change that makes the pairs direct, merged over all of them.
pub fn fix(t: &Topology, pairs: &[Pair], o: &mut Out) {
    let not_direct: Vec<&Pair> = pairs.iter().filter(|p| p.verdict.map_type != MapType::BusAddr).collect();
    if not_direct.is_empty() {
        o.line(&format!("nothing to fix: all {} pairs are direct (bus_addr)", pairs.len()));
        return;
    }
    // ACS redirect is the only thing software can change: a pair with a common upstream device
    // becomes bus_addr once no device on its path redirects.
    let (acs, rest): (Vec<&Pair>, Vec<&Pair>) =
        not_direct.iter().partition(|p| p.verdict.common_upstream.is_some() && !p.verdict.acs_redirect.is_empty());
    let devices: Vec<Bdf> = acs.iter().flat_map(|p| p.verdict.acs_redirect.iter().copied()).collect();
    o.line(&format!("{} of {} pairs are not direct", not_direct.len(), pairs.len()));
    if let Some(f) = AcsFix::for_devices(&devices) {
        let names: Vec<String> = acs.iter().map(|p| pair_name(p)).collect();
        o.line(&format!(
            "{} pair(s) become direct without ACS redirect on {}: {}",
            acs.len(),
            devices_str(&f.devices),
            names.join(" ")
        ));
        o.line("");
        o.line("kernel command line (Linux 4.20+):");
        o.line(&format!("  {}", f.disable_acs_redir));
        o.line("kernel command line (Linux 6.11+, clears RR CR EC and keeps the other ACS bits):");
        o.line(&format!("  {}", f.config_acs));
        o.line("now, as root, until the next boot (re-probe or reboot the peers so the kernel re-evaluates them):");
        for s in &f.setpci {
            o.line(&format!("  {s}"));
        }
        o.line("");
        o.line(&format!("trade-off: {}", f.trade_off));
    }
    let thru: Vec<String> =
        rest.iter().filter(|p| p.verdict.map_type == MapType::ThruHostBridge).map(|p| pair_name(p)).collect();
    let refused: Vec<String> =
        rest.iter().filter(|p| p.verdict.map_type == MapType::NotSupported).map(|p| pair_name(p)).collect();
    if !thru.is_empty() {
        o.line("");
        o.line(&format!(
            "{} pair(s) share no upstream switch but the kernel allows them through the host bridge (`check --allow-host-bridge` accepts them): {}",
            thru.len(),
            thru.join(" ")
        ));
    }
    if !refused.is_empty() {
        o.line("");
        o.line(&format!(
            "{} pair(s) share no upstream switch and the kernel refuses the host bridge path (CPU {}, host bridge not allowlisted): no setting makes them direct; place such devices below one switch: {}",
            refused.len(),
            t.platform.cpu.describe(),
            refused.join(" ")
        ));
    }
}

fn pair_name(p: &Pair) -> String {
    format!("{}->{}", p.names.0, p.names.1)
}

fn devices_str(d: &[Bdf]) -> String {
    d.iter().map(Bdf::to_string).collect::<Vec<_>>().join(", ")
}
