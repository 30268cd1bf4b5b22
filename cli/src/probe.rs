//! `peermem probe PROVIDER CLIENT`: prove a route on the live system with the mover's canary
//! through the kernel's P2PDMA path. The provider's p2pmem is mapped; the client is an NVMe
//! namespace doing O_DIRECT I/O straight into and out of it, on a scratch byte range whose
//! content is saved first and written back afterwards.
//!
//! Both directions: the client writing the provider's memory (a namespace read into p2pmem) and
//! reading it (a namespace write from p2pmem). Each ends intact, corrupted (with the count of
//! wrong bytes) or refused (the kernel's EREMOTEIO). Every I/O here is a synchronous O_DIRECT
//! call: when it returns, the device is done with the buffer.

use anyhow::{anyhow, bail, Context, Result};
use peermem::mover::{canary, compare};
use peermem::{DevIdx, HostRegion, PeerMemory, Topology};
use peermem_nvme::{BlockDevice, DirectIoError, P2pmemRegion};

use crate::out::Out;

const ALIGN: u64 = 4096;

/// What one direction showed.
enum Outcome {
    Intact,
    Corrupted { wrong: usize, first: usize },
    Refused(String),
}

impl Outcome {
    fn text(&self, len: usize) -> String {
        match self {
            Outcome::Intact => "intact".into(),
            Outcome::Corrupted { wrong, first } => {
                format!("corrupted: {wrong} of {len} bytes wrong (first at byte {first})")
            }
            Outcome::Refused(e) => format!("refused: {e}"),
        }
    }
    fn rank(&self) -> u8 {
        match self {
            Outcome::Intact => 0,
            Outcome::Refused(_) => 1,
            Outcome::Corrupted { .. } => 2,
        }
    }
}

fn judge(c: &[u8], back: &[u8]) -> Outcome {
    match compare(c, back) {
        None => Outcome::Intact,
        Some(b) => Outcome::Corrupted { wrong: b.mismatched, first: b.first_mismatch },
    }
}

/// Runs an O_DIRECT call whose EREMOTEIO is the kernel's refusal, not an error.
fn p2p(r: Result<(), DirectIoError>) -> Result<Option<String>> {
    match r {
        Ok(()) => Ok(None),
        Err(e) if e.is_remote() => Ok(Some(e.to_string())),
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn namespace_bytes(bd: &BlockDevice) -> Result<u64> {
    let name = bd.path().file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let p = format!("/sys/class/block/{name}/size");
    let s = std::fs::read_to_string(&p).with_context(|| p.clone())?;
    Ok(s.trim().parse::<u64>().map_err(|_| anyhow!("{p}: {s:?} is not a sector count"))? * 512)
}

/// The client writes the provider's memory: host -> namespace, then namespace -> p2pmem.
fn client_writes(
    bd: &BlockDevice,
    region: &mut P2pmemRegion,
    host: &mut HostRegion,
    off: u64,
    n: usize,
) -> Result<Outcome> {
    let c = canary(n, 0x7065_6572 ^ off);
    host.as_mut_slice().copy_from_slice(&c);
    bd.write_at(off, host.as_mut_slice()).map_err(|e| anyhow!("writing the canary: {e}"))?;
    region.as_mut_slice().fill(0);
    if let Some(e) = p2p(bd.read_at(off, region.as_mut_slice()))? {
        return Ok(Outcome::Refused(e));
    }
    let mut back = vec![0u8; n];
    region.read_at(0, &mut back).map_err(|e| anyhow!("reading p2pmem: {e}"))?;
    Ok(judge(&c, &back))
}

/// The client reads the provider's memory: p2pmem -> namespace, then namespace -> host.
fn client_reads(
    bd: &BlockDevice,
    region: &mut P2pmemRegion,
    host: &mut HostRegion,
    off: u64,
    n: usize,
) -> Result<Outcome> {
    let c = canary(n, 0x6d65_6d21 ^ off);
    region.as_mut_slice().copy_from_slice(&c);
    if let Some(e) = p2p(bd.write_at(off, region.as_mut_slice()))? {
        return Ok(Outcome::Refused(e));
    }
    host.as_mut_slice().fill(0);
    bd.read_at(off, host.as_mut_slice()).map_err(|e| anyhow!("reading the canary back: {e}"))?;
    Ok(judge(&c, host.as_mut_slice()))
}

pub fn probe(t: &Topology, p: DevIdx, c: DevIdx, len: u64, offset: Option<u64>, o: &mut Out) -> Result<u8> {
    let (pd, cd) = (t.device(p), t.device(c));
    let len = len.div_ceil(ALIGN).max(1) * ALIGN;
    if len > 64 << 20 {
        bail!("--len {len}: at most 64 MiB");
    }
    let v = t.verdict(p, c);
    let mut region = P2pmemRegion::allocate(t, pd.bdf, len).map_err(|e| anyhow!("provider {}: {e}", pd.bdf))?;
    let bd = BlockDevice::open_namespace(t, cd.bdf).map_err(|e| anyhow!("client {}: {e}", cd.bdf))?;
    let size = namespace_bytes(&bd)?;
    let off = match offset {
        Some(off) => off,
        None => size.saturating_sub(1 << 20) / ALIGN * ALIGN,
    };
    if !off.is_multiple_of(ALIGN) || off.checked_add(len).is_none_or(|end| end > size) {
        bail!(
            "--offset {off:#x}: the {len}-byte scratch range must be 4096-aligned and inside {} ({size} bytes)",
            bd.path().display()
        );
    }
    let n = len as usize;
    let mut host = HostRegion::new(len).map_err(|e| anyhow!("{e}"))?;
    bd.read_at(off, host.as_mut_slice()).map_err(|e| anyhow!("saving the scratch range: {e}"))?;
    let saved = host.as_mut_slice().to_vec();

    // Every step below runs, and the scratch range is written back, whatever fails on the way.
    let into = client_writes(&bd, &mut region, &mut host, off, n);
    let from = client_reads(&bd, &mut region, &mut host, off, n);
    host.as_mut_slice().copy_from_slice(&saved);
    bd.write_at(off, host.as_mut_slice()).map_err(|e| anyhow!("restoring the scratch range: {e}"))?;
    let (into, from) = (into?, from?);

    o.line(&format!(
        "probe provider {} (p2pmem in BAR{} +{:#x})  client {} ({}, scratch bytes {off:#x}+{len}, restored)",
        pd.bdf,
        region.bar(),
        region.bar_offset(),
        cd.bdf,
        bd.path().display()
    ));
    o.line(&format!("kernel verdict: {} {}", v.map_type.as_str(), v.path));
    o.line(&format!("client writes provider memory (namespace read into p2pmem): {}", into.text(n)));
    o.line(&format!("client reads provider memory (namespace write from p2pmem): {}", from.text(n)));
    let worst = if into.rank() >= from.rank() { &into } else { &from };
    let word = match worst {
        Outcome::Intact => "intact",
        Outcome::Refused(_) => "refused",
        Outcome::Corrupted { .. } => "corrupted",
    };
    o.line(&format!("result: {word}"));
    Ok(u8::from(!matches!(worst, Outcome::Intact)))
}
