//! A polled userspace NVMe driver over VFIO whose data pointers come only from registry routes.
//!
//! Owns: controller reset and enable, the admin queue, Identify, one I/O queue pair, PRP entries
//! and lists, doorbells and phase bits, bounded waits and decoded completion status.
//! Must not: compute a DMA address on its own. Every data page's address comes from
//! `Registry::resolve(region, this controller)`: `BusAddr`/`HostBridge`/`Iommu(Some)` as given,
//! `Iommu(None)` after mapping the region into this container, `CpuMapped` through the pages this
//! process locked or mapped (`Vfio::dma_address`). A `Bounce` (or any route without an address)
//! is refused before a command is built. I/O goes to the one namespace named at open, inside its
//! size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::sys::Mapping;
use peermem::{Backing, Entry, HostRegion, Peer, PeerMemory, Registry, RouteKind, Topology, VirtAddr};

use crate::regs::{off, Aqa, Bar0, Cap, Cc, RegError};
use crate::sys::{self, Mmio};
use crate::vfio::{Binding, IommuMode, Vfio, VfioError};

/// The memory page size this driver programs (CC.MPS = 0).
pub const PAGE: u64 = 4096;
const ADMIN_DEPTH: u16 = 32;
/// I/O queue depth (entries; one stays empty so at most DEPTH - 1 are in flight).
pub const IO_DEPTH: u16 = 64;
/// Largest transfer per command this driver builds (one PRP list page: 512 entries).
const MAX_XFER: u64 = 512 * PAGE;

/// A completion status that is not success: status code type and status code, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub more: bool,
    pub dnr: bool,
}

impl Status {
    fn from_dw3(dw3: u32) -> Status {
        Status { sc: (dw3 >> 17) as u8, sct: ((dw3 >> 25) & 7) as u8, more: dw3 >> 30 & 1 == 1, dnr: dw3 >> 31 == 1 }
    }
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// The specification's name of the status.
    pub fn name(&self) -> &'static str {
        match (self.sct, self.sc) {
            (0, 0x00) => "successful completion",
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x03) => "command ID conflict",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x08) => "command aborted due to SQ deletion",
            (0, 0x0b) => "invalid namespace or format",
            (0, 0x13) => "PRP offset invalid",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (1, 0x00) => "completion queue invalid",
            (1, 0x01) => "invalid queue identifier",
            (1, 0x02) => "invalid queue size",
            (1, 0x08) => "invalid interrupt vector",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x86) => "access denied",
            (0, _) => "generic command status",
            (1, _) => "command specific status",
            (2, _) => "media and data integrity error",
            (3, _) => "path related status",
            _ => "vendor specific or reserved status",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SCT {:#x} SC {:#04x}{})", self.name(), self.sct, self.sc, if self.dnr { ", DNR" } else { "" })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error(transparent)]
    Reg(#[from] RegError),
    #[error("{what}: {source}")]
    Region { what: &'static str, source: peermem::RegionError },
    #[error("{what}: {source}")]
    Access { what: &'static str, source: peermem::AccessError },
    #[error("route refused: {region} is not directly reachable from this controller ({kind}): {reasons}")]
    RouteRefused { region: String, kind: &'static str, reasons: String },
    #[error("resolve: {0}")]
    Resolve(#[from] peermem::ResolveError),
    #[error("{what}: no answer within {waited:?}")]
    Timeout { what: String, waited: Duration },
    #[error("the controller reports a fatal status (CSTS.CFS)")]
    Fatal,
    #[error("{what}: {status}")]
    Command { what: String, status: Status },
    #[error("namespace {nsid}: {lba_count} blocks at LBA {lba} run past its {size} blocks")]
    OutOfNamespace { nsid: u32, lba: u64, lba_count: u64, size: u64 },
    #[error("transfer of {len} bytes at offset {offset:#x} of a {region_len}-byte region: {why}")]
    BadTransfer { len: u64, offset: u64, region_len: u64, why: String },
    #[error("controller: {0}")]
    Unsupported(String),
}

/// What Identify Controller said.
#[derive(Debug, Clone)]
pub struct ControllerInfo {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum data transfer size in bytes (None: unlimited).
    pub mdts: Option<u64>,
    pub namespaces: u32,
}

/// What Identify Namespace said.
#[derive(Debug, Clone, Copy)]
pub struct Namespace {
    pub nsid: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    pub block_size: u64,
}

impl Namespace {
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }
}

/// One submission/completion queue pair living in the DMA pool.
#[derive(Debug)]
struct Queue {
    qid: u16,
    depth: u16,
    sq_off: u64,
    cq_off: u64,
    tail: u16,
    head: u16,
    phase: bool,
    next_cid: u16,
    in_flight: u16,
}

/// Layout of the DMA pool (one HostRegion): admin SQ/CQ, I/O SQ/CQ, an identify page, and one
/// PRP list page per I/O queue slot.
const POOL_ASQ: u64 = 0;
const POOL_ACQ: u64 = PAGE;
const POOL_IOSQ: u64 = 2 * PAGE;
const POOL_IOCQ: u64 = 3 * PAGE;
const POOL_IDENT: u64 = 4 * PAGE;
const POOL_PRP: u64 = 5 * PAGE;
const POOL_LEN: u64 = POOL_PRP + IO_DEPTH as u64 * PAGE;

/// A 64-byte submission queue entry.
#[derive(Debug, Clone, Copy, Default)]
struct Sqe {
    opcode: u8,
    nsid: u32,
    prp1: u64,
    prp2: u64,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
}

impl Sqe {
    fn bytes(&self, cid: u16) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&(self.opcode as u32 | (cid as u32) << 16).to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        b[40..44].copy_from_slice(&self.cdw10.to_le_bytes());
        b[44..48].copy_from_slice(&self.cdw11.to_le_bytes());
        b[48..52].copy_from_slice(&self.cdw12.to_le_bytes());
        b
    }
}

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Namespace -> memory.
    Read,
    /// Memory -> namespace.
    Write,
}

/// A resolved data target: how to get the DMA address of byte `o` of the transfer.
enum Target {
    /// A fixed device-visible address for the region's first byte (bus, CPU physical or IOVA).
    Linear(u64),
    /// Host pages: per-page lookup through the VFIO mapping.
    Host(VirtAddr),
}

/// A userspace NVMe controller over VFIO.
pub struct Controller {
    bar0: Bar0<Box<dyn Mmio + Send + Sync>>,
    cap: Cap,
    vfio: Vfio,
    pool: Arc<HostRegion>,
    admin: Queue,
    io: Option<Queue>,
    info: Option<ControllerInfo>,
    ns: Option<Namespace>,
    /// This controller as a registry peer.
    peer: Peer,
    timeout: Duration,
    commands: u64,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("bdf", &self.vfio.bdf())
            .field("mode", &self.vfio.mode())
            .field("ns", &self.ns)
            .field("commands", &self.commands)
            .finish()
    }
}

impl Controller {
    /// Opens a function already bound to vfio-pci, resets and enables it, identifies it and
    /// namespace `nsid`, and creates one I/O queue pair. `reg` must describe the live topology:
    /// it is where every DMA address comes from.
    pub fn open(binding: &Binding, reg: &Registry, nsid: u32) -> Result<Controller, NvmeError> {
        let vfio = Vfio::open(binding)?;
        vfio.enable_bus_master()?;
        let bar0 = Bar0::new(vfio.bar(0)?)?;
        let cap = Cap::decode(bar0.read64(off::CAP)?)?;
        if cap.mps_min > PAGE {
            return Err(NvmeError::Unsupported(format!("minimum page size {} > {PAGE}", cap.mps_min)));
        }
        let peer = reg
            .peer(binding.bdf())
            .map_err(|e| NvmeError::Unsupported(format!("{}: not in the registry's topology: {e}", binding.bdf())))?;
        let pool =
            Arc::new(HostRegion::new(POOL_LEN).map_err(|source| NvmeError::Region { what: "DMA pool", source })?);
        let mut c = Controller {
            bar0,
            cap,
            vfio,
            pool,
            admin: Queue::new(0, ADMIN_DEPTH, POOL_ASQ, POOL_ACQ),
            io: None,
            info: None,
            ns: None,
            peer,
            // Commands get the controller's own ready timeout, at least 5 s (TCG is slow).
            timeout: Duration::from_millis(cap.timeout_ms.max(5000)),
            commands: 0,
        };
        let va = c.pool_va();
        c.vfio.map(va, POOL_LEN)?;
        c.init(nsid)?;
        Ok(c)
    }

    fn pool_va(&self) -> VirtAddr {
        self.pool.cpu_range().expect("a HostRegion is CPU-mapped").start()
    }

    /// DMA address of byte `off` of the pool (always within one page of the pool).
    fn pool_dma(&self, off: u64) -> Result<u64, NvmeError> {
        Ok(self.vfio.dma_address(VirtAddr::new(self.pool_va().raw() + off))?)
    }

    fn init(&mut self, nsid: u32) -> Result<(), NvmeError> {
        self.disable()?;
        self.pool
            .write_at(0, &vec![0u8; POOL_PRP as usize])
            .map_err(|source| NvmeError::Access { what: "pool", source })?;
        self.admin = Queue::new(0, ADMIN_DEPTH, POOL_ASQ, POOL_ACQ);
        self.io = None;
        let aqa = Aqa { asqs: ADMIN_DEPTH as u32, acqs: ADMIN_DEPTH as u32 };
        self.bar0.write32(off::AQA, aqa.encode())?;
        self.bar0.write64(off::ASQ, self.pool_dma(POOL_ASQ)?)?;
        self.bar0.write64(off::ACQ, self.pool_dma(POOL_ACQ)?)?;
        let cc = Cc { en: true, css: 0, mps: 0, ams: 0, shn: 0, iosqes: 6, iocqes: 4 };
        self.bar0.write32(off::CC, cc.encode())?;
        self.wait_ready(true)?;

        // Identify controller.
        let ident = self.pool_dma(POOL_IDENT)?;
        self.admin_cmd("Identify controller", Sqe { opcode: 0x06, prp1: ident, cdw10: 1, ..Default::default() })?;
        let mut id = vec![0u8; PAGE as usize];
        self.pool.read_at(POOL_IDENT, &mut id).map_err(|source| NvmeError::Access { what: "identify", source })?;
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&id[r]).trim().to_string();
        let mdts = match id[77] {
            0 => None,
            m => Some(self.cap.mps_min << m),
        };
        let info = ControllerInfo {
            serial: text(4..24),
            model: text(24..64),
            firmware: text(64..72),
            mdts,
            namespaces: u32::from_le_bytes([id[516], id[517], id[518], id[519]]),
        };
        tracing::info!(bdf = %self.vfio.bdf(), ?info, "identified");
        if nsid == 0 || nsid > info.namespaces {
            return Err(NvmeError::Unsupported(format!("namespace {nsid} (controller has {})", info.namespaces)));
        }
        self.info = Some(info);

        // Identify namespace.
        self.admin_cmd("Identify namespace", Sqe { opcode: 0x06, nsid, prp1: ident, cdw10: 0, ..Default::default() })?;
        self.pool.read_at(POOL_IDENT, &mut id).map_err(|source| NvmeError::Access { what: "identify", source })?;
        let blocks = u64::from_le_bytes(id[0..8].try_into().expect("8 bytes"));
        let flbas = (id[26] & 0xf) as usize;
        let lbaf = u32::from_le_bytes(id[128 + 4 * flbas..132 + 4 * flbas].try_into().expect("4 bytes"));
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=16).contains(&lbads) || blocks == 0 {
            return Err(NvmeError::Unsupported(format!("namespace {nsid}: {blocks} blocks of 2^{lbads} bytes")));
        }
        self.ns = Some(Namespace { nsid, blocks, block_size: 1 << lbads });

        // One I/O queue pair, polled (no interrupts).
        let depth = IO_DEPTH.min(self.cap.mqes.min(u16::MAX as u32) as u16);
        let q = Queue::new(1, depth, POOL_IOSQ, POOL_IOCQ);
        let qsize = (depth as u32 - 1) << 16 | 1;
        let cq = self.pool_dma(POOL_IOCQ)?;
        self.admin_cmd("Create I/O CQ", Sqe { opcode: 0x05, prp1: cq, cdw10: qsize, cdw11: 1, ..Default::default() })?;
        let sq = self.pool_dma(POOL_IOSQ)?;
        self.admin_cmd(
            "Create I/O SQ",
            Sqe { opcode: 0x01, prp1: sq, cdw10: qsize, cdw11: 1 << 16 | 1, ..Default::default() },
        )?;
        self.io = Some(q);
        Ok(())
    }

    fn wait_ready(&self, want: bool) -> Result<(), NvmeError> {
        let limit = Duration::from_millis(self.cap.timeout_ms.max(1000));
        let start = Instant::now();
        loop {
            let csts = self.bar0.csts()?;
            if csts.cfs && want {
                return Err(NvmeError::Fatal);
            }
            if csts.rdy == want {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(NvmeError::Timeout { what: format!("CSTS.RDY = {want}"), waited: limit });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Clears CC.EN and waits (bounded) for CSTS.RDY = 0: the controller drops every queue.
    pub fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = Cc::decode(self.bar0.read32(off::CC)?);
        if cc.en {
            self.bar0.write32(off::CC, Cc { en: false, ..cc }.encode())?;
        }
        self.wait_ready(false)
    }

    /// Resets the controller (CC.EN 1 -> 0) and brings it back with fresh queues: what to do
    /// after a timeout or a fatal status. Commands in flight are lost.
    pub fn reset(&mut self) -> Result<(), NvmeError> {
        let nsid = self.namespace().nsid;
        tracing::warn!(bdf = %self.vfio.bdf(), "controller reset");
        self.init(nsid)
    }

    pub fn info(&self) -> &ControllerInfo {
        self.info.as_ref().expect("identified at open")
    }
    pub fn namespace(&self) -> Namespace {
        self.ns.expect("identified at open")
    }
    pub fn mode(&self) -> IommuMode {
        self.vfio.mode()
    }
    /// The controller's PCI function.
    pub fn bdf(&self) -> peermem::Bdf {
        self.vfio.bdf()
    }
    /// This controller as a registry peer.
    pub fn peer(&self) -> Peer {
        self.peer
    }
    /// Commands submitted so far (admin and I/O): a refused transfer leaves it unchanged.
    pub fn commands_issued(&self) -> u64 {
        self.commands
    }
    /// Changes the bound on every wait for a completion.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn doorbell(&self, qid: u16, cq: bool) -> u64 {
        off::DOORBELLS + (2 * qid as u64 + cq as u64) * self.cap.doorbell_stride
    }

    fn submit(&mut self, admin: bool, sqe: &Sqe) -> Result<u16, NvmeError> {
        let q = if admin { &mut self.admin } else { self.io.as_mut().expect("I/O queue created") };
        let cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        let at = q.sq_off + q.tail as u64 * 64;
        q.tail = (q.tail + 1) % q.depth;
        q.in_flight += 1;
        let (tail, qid) = (q.tail, q.qid);
        self.pool.write_at(at, &sqe.bytes(cid)).map_err(|source| NvmeError::Access { what: "SQ", source })?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.commands += 1;
        self.bar0.write32(self.doorbell(qid, false), tail as u32)?;
        Ok(cid)
    }

    /// Waits (bounded) for the next completion of a queue; returns (cid, status).
    fn reap(&mut self, admin: bool, what: &str) -> Result<(u16, Status), NvmeError> {
        let start = Instant::now();
        let va = self.pool_va().raw();
        let mut spins = 0u32;
        loop {
            let q = if admin { &self.admin } else { self.io.as_ref().expect("I/O queue created") };
            let at = q.cq_off + q.head as u64 * 16;
            let dw3 = sys::dma_read32(va, POOL_LEN, at + 12).map_err(NvmeError::Unsupported)?;
            if (dw3 >> 16 & 1 == 1) == q.phase {
                let q = if admin { &mut self.admin } else { self.io.as_mut().expect("I/O queue created") };
                q.head = (q.head + 1) % q.depth;
                if q.head == 0 {
                    q.phase = !q.phase;
                }
                q.in_flight = q.in_flight.saturating_sub(1);
                let (head, qid) = (q.head, q.qid);
                self.bar0.write32(self.doorbell(qid, true), head as u32)?;
                return Ok((dw3 as u16, Status::from_dw3(dw3)));
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                if start.elapsed() > self.timeout {
                    if self.bar0.csts().map(|c| c.cfs).unwrap_or(true) {
                        return Err(NvmeError::Fatal);
                    }
                    return Err(NvmeError::Timeout { what: what.to_string(), waited: self.timeout });
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn admin_cmd(&mut self, what: &str, sqe: Sqe) -> Result<(), NvmeError> {
        self.submit(true, &sqe)?;
        let (_, status) = self.reap(true, what)?;
        if !status.is_success() {
            return Err(NvmeError::Command { what: what.to_string(), status });
        }
        Ok(())
    }

    /// Resolves `entry` for this controller into a DMA target, refusing routes without a direct
    /// address. Nothing is submitted here.
    fn target(&mut self, reg: &Registry, entry: &Entry) -> Result<Target, NvmeError> {
        let route = reg.resolve(entry, self.peer)?;
        let refuse = |kind: &'static str, reasons: Vec<String>| NvmeError::RouteRefused {
            region: entry.id().to_string(),
            kind,
            reasons: reasons.join("; "),
        };
        Ok(match route.kind {
            RouteKind::BusAddr(a) => Target::Linear(a.raw()),
            RouteKind::Iommu(Some(a)) => Target::Linear(a.raw()),
            RouteKind::HostBridge(a) if self.vfio.mode() == IommuMode::NoIommu => Target::Linear(a.raw()),
            RouteKind::Iommu(None) | RouteKind::HostBridge(_) => {
                // Through the root complex into this container's IOMMU domain: map the BAR range.
                if self.vfio.mode() != IommuMode::Type1 {
                    return Err(refuse("iommu", route.reasons()));
                }
                let map = peer_bar_mapping(reg.topology(), entry).map_err(|why| refuse("iommu", vec![why]))?;
                Target::Linear(self.vfio.map_peer(map)?.raw())
            }
            RouteKind::CpuMapped(va) => {
                if !matches!(entry.region().backing(), Backing::HostPages) {
                    return Err(refuse("cpu_mapped", route.reasons()));
                }
                self.vfio.map_owned(Some(entry.id()), va, entry.len())?;
                Target::Host(va)
            }
            RouteKind::KernelImport | RouteKind::Bounce(_) => return Err(refuse(route.kind.name(), route.reasons())),
        })
    }

    fn dma_at(&self, t: &Target, off: u64) -> Result<u64, NvmeError> {
        match t {
            Target::Linear(a) => Ok(a + off),
            Target::Host(va) => Ok(self.vfio.dma_address(VirtAddr::new(va.raw() + off))?),
        }
    }

    /// Builds PRP1/PRP2 for `len` bytes at `off` of the target, using PRP list page `slot`.
    fn prps(&self, t: &Target, off: u64, len: u64, slot: u16) -> Result<(u64, u64), NvmeError> {
        let first = self.dma_at(t, off)?;
        if first % 4 != 0 {
            return Err(NvmeError::BadTransfer {
                len,
                offset: off,
                region_len: 0,
                why: format!("DMA address {first:#x} is not dword aligned"),
            });
        }
        let first_chunk = PAGE - first % PAGE;
        if len <= first_chunk {
            return Ok((first, 0));
        }
        let mut entries = Vec::new();
        let mut o = first_chunk;
        while o < len {
            let a = self.dma_at(t, off + o)?;
            if a % PAGE != 0 {
                return Err(NvmeError::BadTransfer {
                    len,
                    offset: off + o,
                    region_len: 0,
                    why: format!("page address {a:#x} is not page aligned"),
                });
            }
            entries.push(a);
            o += PAGE;
        }
        if entries.len() == 1 {
            return Ok((first, entries[0]));
        }
        let list_off = POOL_PRP + slot as u64 * PAGE;
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.pool.write_at(list_off, &bytes).map_err(|source| NvmeError::Access { what: "PRP list", source })?;
        Ok((first, self.pool_dma(list_off)?))
    }

    /// Moves `len` bytes between LBA `lba` of the namespace and byte `offset` of the registered
    /// region `entry`, through the route the registry resolves for this controller. Refused
    /// (with no command submitted) when the route is not direct, the range leaves the region or
    /// the namespace, or `len` is not a multiple of the block size.
    pub fn transfer(
        &mut self,
        reg: &Registry,
        dir: Dir,
        entry: &Entry,
        offset: u64,
        lba: u64,
        len: u64,
    ) -> Result<(), NvmeError> {
        let ns = self.namespace();
        let bad = |why: String| NvmeError::BadTransfer { len, offset, region_len: entry.len(), why };
        if len == 0 || !len.is_multiple_of(ns.block_size) {
            return Err(bad(format!("length is not a non-zero multiple of the {}-byte block", ns.block_size)));
        }
        if offset.checked_add(len).is_none_or(|e| e > entry.len()) {
            return Err(bad("runs past the region".into()));
        }
        let count = len / ns.block_size;
        if lba.checked_add(count).is_none_or(|e| e > ns.blocks) {
            return Err(NvmeError::OutOfNamespace { nsid: ns.nsid, lba, lba_count: count, size: ns.blocks });
        }
        let target = self.target(reg, entry)?;
        let chunk = self.info().mdts.unwrap_or(MAX_XFER).min(MAX_XFER);
        let mut cmds = Vec::new();
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            cmds.push((offset + done, lba + done / ns.block_size, n));
            done += n;
        }
        let depth = self.io.as_ref().expect("I/O queue created").depth as usize;
        self.run_io(dir, &target, &cmds, depth - 1)
    }

    /// Submits `count` random 4 KiB-block reads at queue depth `qd` into `entry` (for benches):
    /// returns the number completed.
    pub fn random_reads(
        &mut self,
        reg: &Registry,
        entry: &Entry,
        io_size: u64,
        count: usize,
        seed: u64,
        qd: usize,
    ) -> Result<usize, NvmeError> {
        let ns = self.namespace();
        let t = self.target(reg, entry)?;
        let slots = (entry.len() / io_size).max(1);
        let span = ns.bytes() / io_size;
        let mut x = seed | 1;
        let mut cmds = Vec::with_capacity(count);
        for i in 0..count as u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cmds.push(((i % slots) * io_size, (x % span) * io_size / ns.block_size, io_size));
        }
        let depth = self.io.as_ref().expect("I/O queue").depth as usize;
        let saved = qd.clamp(1, depth - 1);
        self.run_io(Dir::Read, &t, &cmds, saved)?;
        Ok(count)
    }

    /// Runs I/O commands (region offset, LBA, bytes) keeping up to `qd` in flight; after an
    /// error no more are submitted, the ones in flight are reaped, and the first error returned.
    fn run_io(&mut self, dir: Dir, t: &Target, cmds: &[(u64, u64, u64)], qd: usize) -> Result<(), NvmeError> {
        let ns = self.namespace();
        let depth = self.io.as_ref().expect("I/O queue").depth;
        let mut next = 0;
        let mut reaped = 0;
        let mut first_err = None;
        let what = format!("{dir:?} of {} commands", cmds.len());
        while reaped < cmds.len() {
            while next < cmds.len() && next - reaped < qd && first_err.is_none() {
                let (off, lba, n) = cmds[next];
                let slot = self.io.as_ref().expect("I/O queue").next_cid % depth;
                let (prp1, prp2) = self.prps(t, off, n, slot)?;
                let sqe = Sqe {
                    opcode: if dir == Dir::Read { 0x02 } else { 0x01 },
                    nsid: ns.nsid,
                    prp1,
                    prp2,
                    cdw10: lba as u32,
                    cdw11: (lba >> 32) as u32,
                    cdw12: (n / ns.block_size - 1) as u32,
                };
                self.submit(false, &sqe)?;
                next += 1;
            }
            if next == reaped {
                break;
            }
            let (_, status) = self.reap(false, &what)?;
            reaped += 1;
            if !status.is_success() && first_err.is_none() {
                first_err = Some(NvmeError::Command { what: what.clone(), status });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Deletes the I/O queues and disables the controller (bounded), before handing it back.
    pub fn shutdown(mut self) -> Result<(), NvmeError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), NvmeError> {
        if self.io.take().is_some() {
            self.admin_cmd("Delete I/O SQ", Sqe { opcode: 0x00, cdw10: 1, ..Default::default() })?;
            self.admin_cmd("Delete I/O CQ", Sqe { opcode: 0x04, cdw10: 1, ..Default::default() })?;
        }
        self.disable()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.io.is_some() {
            if let Err(e) = self.shutdown_inner() {
                tracing::warn!(bdf = %self.vfio.bdf(), "shutdown: {e}");
            }
        }
    }
}

impl Queue {
    fn new(qid: u16, depth: u16, sq_off: u64, cq_off: u64) -> Queue {
        Queue { qid, depth, sq_off, cq_off, tail: 0, head: 0, phase: true, next_cid: 0, in_flight: 0 }
    }
}

/// A CPU mapping of a BAR-backed region to hand to the IOMMU: the region's own mapping when it
/// has one is not reusable (it is not ours to keep), so the topology maps the BAR range afresh.
fn peer_bar_mapping(topo: &Topology, entry: &Entry) -> Result<Mapping, String> {
    let (bdf, bar, offset) = match entry.region().backing() {
        Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => (bdf, bar, offset),
        _ => return Err("not a BAR-backed region".into()),
    };
    if offset % PAGE != 0 {
        return Err(format!("BAR offset {offset:#x} is not page aligned"));
    }
    topo.map_bar(bdf, bar, offset, entry.len()).map(|m| m.into_mapping()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_decode_from_completion_dword3() {
        // Phase 1, SC 0x80 (LBA out of range), SCT 0, DNR.
        let s = Status::from_dw3(1 << 16 | 0x80 << 17 | 1 << 31 | 7);
        assert_eq!((s.sct, s.sc, s.dnr, s.more), (0, 0x80, true, false));
        assert_eq!(s.to_string(), "LBA out of range (SCT 0x0 SC 0x80, DNR)");
        let s = Status::from_dw3(2 << 25 | 0x81 << 17);
        assert_eq!(s.name(), "unrecovered read error");
        assert!(Status::from_dw3(1 << 16 | 0xffff).is_success());
        assert_eq!(Status::from_dw3(7 << 25 | 1 << 17).name(), "vendor specific or reserved status");
    }

    #[test]
    fn submission_entries_follow_the_spec_layout() {
        let b = Sqe { opcode: 0x02, nsid: 1, prp1: 0x1000, prp2: 0x2000, cdw10: 5, cdw11: 6, cdw12: 7 }.bytes(0x1234);
        assert_eq!(&b[0..4], &[0x02, 0, 0x34, 0x12]);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7);
    }
}
