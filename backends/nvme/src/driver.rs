//! A polled userspace NVMe driver over VFIO whose data pointers come only from registry routes.
//!
//! Owns: controller reset and enable, the admin queue, Identify, one I/O queue pair, PRP entries
//! and lists, doorbells and phase bits, bounded waits and decoded completion status, and what
//! each command holds: its region and its PRP list page (named by its command id) stay its own
//! until its completion, matched by id, is seen or the controller is quiesced.
//! Must not: release memory a device may still write (after any failure the controller is
//! disabled first), or compute a DMA address on its own. Every data page's address comes from
//! `Registry::resolve(region, this controller)`: `BusAddr`/`HostBridge`/`Iommu(Some)` as given,
//! `Iommu(None)` after mapping the region into this container, `CpuMapped` through the pages this
//! process locked or mapped (`Vfio::dma_address`). A `Bounce` (or any route without an address)
//! is refused before a command is built. What a transfer maps stays mapped while its
//! registration lives, up to `MAP_CACHE` mappings: each transfer, before its commands (so with
//! none in flight), lets go of those whose registration ended and of the least recently used
//! beyond the bound. I/O goes to the one namespace named at open, inside its size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use peermem::{Address, Backing, DmaAddr, Entry, HostRegion, Peer, PeerMemory, Registry, RouteKind, VirtAddr};

use crate::regs::{off, Aqa, Bar0, Cap, Cc, RegError};
use crate::sys::{self, Mmio};
use crate::vfio::{Binding, IommuMode, MapKey, MapStats, Owner, Vfio, VfioError};

/// The memory page size this driver programs (CC.MPS = 0).
pub const PAGE: u64 = 4096;
const ADMIN_DEPTH: u16 = 32;
/// How many DMA mappings of registered regions and peer BAR ranges a controller keeps between
/// transfers, besides its own pool, so that repeated transfers into the same few buffers (a
/// staging buffer, a ring of batch buffers) map each once. Each transfer, before its commands,
/// lets go of every kept mapping whose registration ended, then of the least recently used
/// beyond this many.
pub const MAP_CACHE: usize = 32;
/// I/O queue depth (entries; one stays empty so at most DEPTH - 1 are in flight).
pub const IO_DEPTH: u16 = 64;
/// Largest transfer per command this driver builds (one PRP list page: 512 entries).
const MAX_XFER: u64 = 512 * PAGE;
/// How long a wait for a completion spins before it naps between looks: a controller on real
/// hardware answers within it. Past it (a long transfer, or an emulated controller whose model
/// runs on the same host cores as the polling vCPU) a nap gives the CPU back to whatever is
/// producing the completion.
const SPIN: Duration = Duration::from_micros(100);
const NAP: Duration = Duration::from_micros(20);
/// How long a quiesce after an interruption or a timeout lets the commands in flight complete
/// before it disables the controller. Disabling aborts them, which the specification allows, but
/// a device (QEMU 10.0's NVMe model among them: a use-after-free in `nvme_rw_complete_cb`) may
/// still complete a read into the queue the reset tore down; commands that drain in time end
/// the ordinary way.
const DRAIN: Duration = Duration::from_secs(1);
/// The transfer id `retire` gets while draining: every completion is an earlier command's.
const DRAINING: u64 = u64::MAX;

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
    #[error("{what}: interrupted by a termination signal (the controller was quiesced)")]
    Interrupted { what: String },
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
    #[error("{bdf} is being removed from the machine: {what} ended (the controller was quiesced)")]
    DeviceGone { bdf: peermem::Bdf, what: String },
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

/// A command the controller holds. What its data pointers reach stays alive (the region's `Arc`)
/// until its completion, matched by command id, is seen or the controller is quiesced.
struct InFlight {
    /// The transfer it belongs to (a completion of another transfer's command is not counted).
    transfer: u64,
    /// The region its data pointers reach (None: the driver's own pool), held, never read: it
    /// keeps the memory alive while the device may write it.
    _region: Option<Arc<dyn PeerMemory>>,
}

/// One submission/completion queue pair living in the DMA pool.
struct Queue {
    qid: u16,
    depth: u16,
    sq_off: u64,
    cq_off: u64,
    tail: u16,
    head: u16,
    phase: bool,
    /// Commands the controller holds, indexed by command id. An I/O command's id also names
    /// its PRP list page, so a list page is reused only after its own command completed.
    slots: Vec<Option<InFlight>>,
    /// Where the search for a free command id starts (ids rotate rather than repeat at once).
    next_cid: u16,
}

impl Queue {
    fn new(qid: u16, depth: u16, sq_off: u64, cq_off: u64) -> Queue {
        let slots = (0..depth).map(|_| None).collect();
        Queue { qid, depth, sq_off, cq_off, tail: 0, head: 0, phase: true, slots, next_cid: 0 }
    }

    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// A free command id, or None when depth - 1 commands are in flight (the most a queue of
    /// `depth` entries holds: one entry always stays empty).
    fn alloc(&mut self) -> Option<u16> {
        if self.in_flight() + 1 >= self.depth as usize {
            return None;
        }
        let cid =
            (0..self.depth).map(|i| (self.next_cid + i) % self.depth).find(|&c| self.slots[c as usize].is_none())?;
        self.next_cid = (cid + 1) % self.depth;
        Some(cid)
    }
}

/// Layout of the DMA pool (one HostRegion): admin SQ/CQ, I/O SQ/CQ, an identify page, and one
/// PRP list page per I/O command id.
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
    prp1: Option<DmaAddr>,
    prp2: Option<DmaAddr>,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
}

impl Sqe {
    fn bytes(&self, cid: u16) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&(self.opcode as u32 | (cid as u32) << 16).to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&prp_entry(self.prp1));
        b[32..40].copy_from_slice(&prp_entry(self.prp2));
        b[40..44].copy_from_slice(&self.cdw10.to_le_bytes());
        b[44..48].copy_from_slice(&self.cdw11.to_le_bytes());
        b[48..52].copy_from_slice(&self.cdw12.to_le_bytes());
        b
    }
}

/// What a PRP entry (in a command or a PRP list) holds for a typed DMA address; zero for none.
fn prp_entry(a: Option<DmaAddr>) -> [u8; 8] {
    a.map_or(0, DmaAddr::device_bits).to_le_bytes()
}

/// One completion queue entry, as read from the queue.
#[derive(Debug, Clone, Copy)]
struct Completion {
    cid: u16,
    sqid: u16,
    status: Status,
}

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Namespace -> memory.
    Read,
    /// Memory -> namespace.
    Write,
}

/// One range of a batch: `len` bytes between LBA `lba` of the namespace and byte `offset` of
/// the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    pub offset: u64,
    pub lba: u64,
    pub len: u64,
}

/// A resolved data target: how to get the DMA address of byte `o` of the transfer.
enum Target {
    /// A fixed device-visible address for the region's first byte (bus, CPU physical or IOVA).
    Linear(DmaAddr),
    /// Host pages without an IOMMU: each page's physical address, looked up through the pages
    /// this process locked. (With one, host pages are mapped in one IOVA run: `Linear`.)
    Host(VirtAddr),
}

/// A userspace NVMe controller over VFIO.
///
/// A device may still DMA after an error, so no memory it was given is released before it is
/// known to be done: every command holds its region until its own completion (matched by
/// command id) is seen, and any failure that leaves commands in flight (a timeout, a fatal
/// status, a failed submission, an interrupt) disables the controller (bounded; bus mastering is
/// cleared if that fails) before the error is returned. The queues are then re-created before
/// the next transfer. Fields drop in order: the BAR mapping and the VFIO fds (closing them makes
/// vfio-pci disable the function) before the pool and the regions of commands in flight.
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
    completed: u64,
    strays: u64,
    peak_in_flight: usize,
    transfers: u64,
    /// The queues are gone (the controller was disabled after a failure): re-create them first.
    needs_init: bool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("bdf", &self.vfio.bdf())
            .field("mode", &self.vfio.mode())
            .field("ns", &self.ns)
            .field("commands", &self.commands)
            .field("needs_init", &self.needs_init)
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
            completed: 0,
            strays: 0,
            peak_in_flight: 0,
            transfers: 0,
            needs_init: true,
        };
        c.vfio.map(c.pool.clone())?;
        c.init(nsid)?;
        Ok(c)
    }

    fn pool_va(&self) -> VirtAddr {
        self.pool.cpu_range().expect("a HostRegion is CPU-mapped").start()
    }

    /// DMA address of byte `off` of the pool (always within one page of the pool).
    fn pool_dma(&self, off: u64) -> Result<DmaAddr, NvmeError> {
        let va = self.pool_va().checked_add(off).map_err(|source| VfioError::Addr { what: "pool", source })?;
        Ok(self.vfio.dma_address(va)?)
    }

    fn init(&mut self, nsid: u32) -> Result<(), NvmeError> {
        self.needs_init = true;
        self.disable()?;
        // The controller holds nothing now: forget what was in flight (releasing its regions).
        self.io = None;
        self.admin = Queue::new(0, ADMIN_DEPTH, POOL_ASQ, POOL_ACQ);
        self.vfio.enable_bus_master()?;
        self.pool
            .write_at(0, &vec![0u8; POOL_PRP as usize])
            .map_err(|source| NvmeError::Access { what: "pool", source })?;
        let aqa = Aqa { asqs: ADMIN_DEPTH as u32, acqs: ADMIN_DEPTH as u32 };
        self.bar0.write32(off::AQA, aqa.encode())?;
        self.bar0.write64(off::ASQ, self.pool_dma(POOL_ASQ)?.device_bits())?;
        self.bar0.write64(off::ACQ, self.pool_dma(POOL_ACQ)?.device_bits())?;
        let cc = Cc { en: true, css: 0, mps: 0, ams: 0, shn: 0, iosqes: 6, iocqes: 4 };
        self.bar0.write32(off::CC, cc.encode())?;
        self.wait_ready(true)?;

        // Identify controller.
        let ident = Some(self.pool_dma(POOL_IDENT)?);
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
        let cq = Some(self.pool_dma(POOL_IOCQ)?);
        self.admin_cmd("Create I/O CQ", Sqe { opcode: 0x05, prp1: cq, cdw10: qsize, cdw11: 1, ..Default::default() })?;
        let sq = Some(self.pool_dma(POOL_IOSQ)?);
        self.admin_cmd(
            "Create I/O SQ",
            Sqe { opcode: 0x01, prp1: sq, cdw10: qsize, cdw11: 1 << 16 | 1, ..Default::default() },
        )?;
        self.io = Some(q);
        self.needs_init = false;
        Ok(())
    }

    /// Re-creates the queues if a failure disabled the controller.
    fn ensure_init(&mut self) -> Result<(), NvmeError> {
        if self.needs_init {
            let nsid = self.namespace().nsid;
            tracing::info!(bdf = %self.vfio.bdf(), "re-creating the queues after a failure");
            self.init(nsid)?;
        }
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
        self.needs_init = true;
        let cc = Cc::decode(self.bar0.read32(off::CC)?);
        if cc.en {
            self.bar0.write32(off::CC, Cc { en: false, ..cc }.encode())?;
        }
        self.wait_ready(false)
    }

    /// Makes sure the controller touches no memory any more, after `why` left commands in
    /// flight: disables it (CC.EN = 0, bounded wait for CSTS.RDY = 0); if that fails, clears bus
    /// mastering. Only then are the commands forgotten and their regions released. When neither
    /// works the commands stay owned (their regions alive) until the controller is dropped.
    fn quiesce(&mut self, why: &NvmeError) {
        let bdf = self.vfio.bdf();
        let held = self.admin.in_flight() + self.io.as_ref().map_or(0, Queue::in_flight);
        tracing::warn!(%bdf, in_flight = held, "quiescing the controller after: {why}");
        self.needs_init = true;
        if matches!(why, NvmeError::Interrupted { .. } | NvmeError::Timeout { .. }) {
            let left = self.drain();
            tracing::debug!(%bdf, drained = held - left, left, "commands completed before the disable");
        }
        let quiet = match self.disable() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%bdf, "disable failed ({e}); clearing bus mastering");
                match self.vfio.disable_bus_master() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(%bdf, "cannot quiesce ({e}): {held} commands stay owned");
                        false
                    }
                }
            }
        };
        if quiet {
            self.admin = Queue::new(0, ADMIN_DEPTH, POOL_ASQ, POOL_ACQ);
            self.io = None;
        }
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
    /// Completions matched to a command in flight by its command id (admin and I/O).
    pub fn commands_completed(&self) -> u64 {
        self.completed
    }
    /// Completions whose command id was not in flight (or named another queue): logged and
    /// ignored, never counted for a transfer.
    pub fn stray_completions(&self) -> u64 {
        self.strays
    }
    /// The most I/O commands the controller held at once so far.
    pub fn peak_in_flight(&self) -> usize {
        self.peak_in_flight
    }
    /// Whether a failure disabled the controller: the next transfer re-creates the queues.
    pub fn needs_reinit(&self) -> bool {
        self.needs_init
    }
    /// What the controller has mapped for its device: its own pool for its life, and the kept
    /// mappings of registered regions and peer BAR ranges (at most `MAP_CACHE` once a transfer
    /// has swept them), with the IOVA space they use.
    pub fn dma_mappings(&self) -> MapStats {
        self.vfio.stats()
    }
    /// Lets go now of the kept DMA mappings whose registration ended, rather than at the next
    /// transfer (which does it before its commands): for an owner about to go idle. Returns how
    /// many; none while commands a failed quiesce left are still owned.
    pub fn release_ended_mappings(&mut self) -> usize {
        self.sweep_mappings(None)
    }
    /// Changes the bound on every wait for a completion.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn doorbell(&self, qid: u16, cq: bool) -> u64 {
        off::DOORBELLS + (2 * qid as u64 + cq as u64) * self.cap.doorbell_stride
    }

    fn queue(&mut self, admin: bool) -> Result<&mut Queue, NvmeError> {
        if admin {
            Ok(&mut self.admin)
        } else {
            self.io.as_mut().ok_or_else(|| NvmeError::Unsupported("the I/O queue is not created".into()))
        }
    }

    /// Writes `sqe` with command id `cid` (allocated by the caller) into the queue and rings the
    /// doorbell; `held` is what the command owns until its completion. If the doorbell write
    /// fails the controller may or may not have seen the command: it is quiesced.
    fn submit(&mut self, admin: bool, cid: u16, sqe: &Sqe, held: InFlight) -> Result<(), NvmeError> {
        let q = self.queue(admin)?;
        let at = q.sq_off + q.tail as u64 * 64;
        self.pool.write_at(at, &sqe.bytes(cid)).map_err(|source| NvmeError::Access { what: "SQ", source })?;
        let q = self.queue(admin)?;
        q.tail = (q.tail + 1) % q.depth;
        q.slots[cid as usize] = Some(held);
        let (tail, qid, n) = (q.tail, q.qid, q.in_flight());
        if !admin {
            self.peak_in_flight = self.peak_in_flight.max(n);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.commands += 1;
        if let Err(e) = self.bar0.write32(self.doorbell(qid, false), tail as u32) {
            let e = NvmeError::from(e);
            self.quiesce(&e);
            return Err(e);
        }
        Ok(())
    }

    /// Lets the commands in flight complete, for at most `DRAIN`, retiring each (releasing what
    /// it held). Returns how many are still in flight.
    fn drain(&mut self) -> usize {
        let start = Instant::now();
        loop {
            let (io, admin) = (self.io.as_ref().map_or(0, Queue::in_flight), self.admin.in_flight());
            if io + admin == 0 || start.elapsed() > DRAIN {
                return io + admin;
            }
            let mut got = false;
            for (is_admin, n) in [(false, io), (true, admin)] {
                if n == 0 {
                    continue;
                }
                match self.try_reap(is_admin) {
                    Ok(Some(c)) => {
                        got = true;
                        if self.retire(is_admin, c, DRAINING).is_err() {
                            return io + admin;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return io + admin,
                }
            }
            if !got {
                std::thread::sleep(NAP);
            }
        }
    }

    /// Consumes the next completion queue entry if the controller has posted one.
    fn try_reap(&mut self, admin: bool) -> Result<Option<Completion>, NvmeError> {
        let q = self.queue(admin)?;
        let at = q.cq_off + q.head as u64 * 16;
        let dw3 = sys::dma_read32(&*self.pool, at + 12).map_err(NvmeError::Unsupported)?;
        if (dw3 >> 16 & 1 == 1) != self.queue(admin)?.phase {
            return Ok(None);
        }
        let dw2 = sys::dma_read32(&*self.pool, at + 8).map_err(NvmeError::Unsupported)?;
        let q = self.queue(admin)?;
        q.head = (q.head + 1) % q.depth;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        let (head, qid) = (q.head, q.qid);
        self.bar0.write32(self.doorbell(qid, true), head as u32)?;
        Ok(Some(Completion { cid: dw3 as u16, sqid: (dw2 >> 16) as u16, status: Status::from_dw3(dw3) }))
    }

    /// Waits (bounded by `self.timeout`) for the next completion queue entry and consumes it.
    fn reap(&mut self, admin: bool, what: &str) -> Result<Completion, NvmeError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(c) = self.try_reap(admin)? {
                return Ok(c);
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                if crate::signals::interrupted() {
                    return Err(NvmeError::Interrupted { what: what.to_string() });
                }
                if self.vfio.removal_requested() {
                    return Err(NvmeError::DeviceGone { bdf: self.vfio.bdf(), what: what.to_string() });
                }
                if start.elapsed() > self.timeout {
                    if self.bar0.csts().map(|c| c.cfs).unwrap_or(true) {
                        return Err(NvmeError::Fatal);
                    }
                    return Err(NvmeError::Timeout { what: what.to_string(), waited: self.timeout });
                }
                if start.elapsed() > SPIN {
                    std::thread::sleep(NAP);
                } else {
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Matches completion `c` to the command it names and releases what that command held.
    /// Returns the status when the command belongs to `transfer`; a completion for an id not in
    /// flight (or for another queue) is logged and ignored.
    fn retire(&mut self, admin: bool, c: Completion, transfer: u64) -> Result<Option<Status>, NvmeError> {
        let bdf = self.vfio.bdf();
        let q = self.queue(admin)?;
        let qid = q.qid;
        let held = match q.slots.get_mut(c.cid as usize) {
            Some(slot) if c.sqid == qid => slot.take(),
            _ => None,
        };
        match held {
            Some(f) => {
                self.completed += 1;
                if f.transfer == transfer {
                    return Ok(Some(c.status));
                }
                if transfer != DRAINING {
                    tracing::warn!(%bdf, cid = c.cid, "completion of an earlier transfer's command: not counted");
                }
            }
            None => {
                self.strays += 1;
                tracing::warn!(%bdf, qid, cid = c.cid, sqid = c.sqid, "completion for a command not in flight: ignored");
            }
        }
        Ok(None)
    }

    /// `DeviceGone` once the kernel asked for the device back (it is being removed), after
    /// quiescing it; nothing new is submitted to a device on its way out.
    fn refuse_if_removed(&mut self, what: &str) -> Result<(), NvmeError> {
        if !self.vfio.removal_requested() {
            return Ok(());
        }
        let e = NvmeError::DeviceGone { bdf: self.vfio.bdf(), what: what.to_string() };
        if !self.needs_init {
            self.quiesce(&e);
        }
        Err(e)
    }

    /// Runs one admin command to completion (bounded); a failure to complete quiesces.
    fn admin_cmd(&mut self, what: &str, sqe: Sqe) -> Result<(), NvmeError> {
        self.refuse_if_removed(what)?;
        self.transfers += 1;
        let transfer = self.transfers;
        let cid = self.admin.alloc().ok_or_else(|| NvmeError::Unsupported("admin queue full".into()))?;
        self.submit(true, cid, &sqe, InFlight { transfer, _region: None })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let c = match self.reap(true, what) {
                Ok(c) => c,
                Err(e) => {
                    self.quiesce(&e);
                    return Err(e);
                }
            };
            if c.cid != cid {
                self.retire(true, c, transfer)?;
                if Instant::now() > deadline {
                    let e = NvmeError::Timeout { what: what.to_string(), waited: self.timeout };
                    self.quiesce(&e);
                    return Err(e);
                }
                continue;
            }
            return match self.retire(true, c, transfer)? {
                Some(status) if status.is_success() => Ok(()),
                Some(status) => Err(NvmeError::Command { what: what.to_string(), status }),
                None => Err(NvmeError::Unsupported(format!("{what}: completion on the wrong queue"))),
            };
        }
    }

    /// Resolves `entry` for this controller into a DMA target, refusing routes without a direct
    /// address; maps what the route needs mapped (kept between transfers), then lets go of the
    /// kept mappings that are done (`sweep_mappings`). Nothing is submitted here.
    fn target(&mut self, reg: &Registry, entry: &Entry) -> Result<Target, NvmeError> {
        let route = reg.resolve(entry, self.peer)?;
        let refuse = |kind: &'static str, reasons: Vec<String>| NvmeError::RouteRefused {
            region: entry.id().to_string(),
            kind,
            reasons: reasons.join("; "),
        };
        let (target, key) = match route.kind {
            RouteKind::BusAddr(a) => (Target::Linear(DmaAddr::Bus(a)), None),
            RouteKind::Iommu(Some(a)) => (Target::Linear(DmaAddr::Iova(a)), None),
            RouteKind::HostBridge(a) if self.vfio.mode() == IommuMode::NoIommu => {
                (Target::Linear(DmaAddr::Phys(a)), None)
            }
            RouteKind::Iommu(None) | RouteKind::HostBridge(_) => {
                // Through the root complex into this container's IOMMU domain: map the BAR range.
                if self.vfio.mode() != IommuMode::Type1 {
                    return Err(refuse("iommu", route.reasons()));
                }
                let (bdf, bar, offset, len) = peer_bar_range(entry).map_err(|why| refuse("iommu", vec![why]))?;
                let key = MapKey::PeerBar { bdf, bar, offset, len };
                let topo = reg.topology();
                let map = || topo.map_bar(bdf, bar, offset, len).map_err(|e| refuse("iommu", vec![e.to_string()]));
                let iova = self.vfio.map_peer(Owner::of(reg, entry), key, map)?;
                (Target::Linear(DmaAddr::Iova(iova)), Some(key))
            }
            RouteKind::CpuMapped(va) => {
                if !matches!(entry.region().backing(), Backing::HostPages) {
                    return Err(refuse("cpu_mapped", route.reasons()));
                }
                // The mapping holds the region (an Arc of it) until `sweep_mappings` lets it go,
                // which it does only while no command is in flight.
                let target = match self.vfio.map_owned(Owner::of(reg, entry), entry.region().clone())? {
                    Some(iova) => Target::Linear(DmaAddr::Iova(iova)),
                    None => Target::Host(va),
                };
                (target, Some(MapKey::Region(entry.id())))
            }
            RouteKind::KernelImport | RouteKind::Bounce(_) => return Err(refuse(route.kind.name(), route.reasons())),
        };
        self.sweep_mappings(key.as_ref());
        Ok(target)
    }

    /// Lets go of the kept DMA mappings that are done with (`Vfio::release`: registration ended,
    /// or least recently used beyond `MAP_CACHE`), sparing `current`. Only while the controller
    /// holds no command: until then the device may use any of them. (Commands a failed quiesce
    /// left owned keep everything mapped until a re-initialisation disables the controller.)
    fn sweep_mappings(&mut self, current: Option<&MapKey>) -> usize {
        let idle = self.admin.in_flight() == 0 && self.io.as_ref().is_none_or(|q| q.in_flight() == 0);
        if !idle {
            return 0;
        }
        self.vfio.release(MAP_CACHE, current)
    }

    fn dma_at(&self, t: &Target, off: u64) -> Result<DmaAddr, NvmeError> {
        let addr = |source| NvmeError::Vfio(VfioError::Addr { what: "transfer", source });
        match t {
            Target::Linear(a) => a.checked_add(off).map_err(addr),
            Target::Host(va) => Ok(self.vfio.dma_address(va.checked_add(off).map_err(addr)?)?),
        }
    }

    /// Builds PRP1/PRP2 for `len` bytes at `off` of the target, writing a PRP list (when one is
    /// needed) into the list page of command id `cid`.
    fn prps(&self, t: &Target, off: u64, len: u64, cid: u16) -> Result<(DmaAddr, Option<DmaAddr>), NvmeError> {
        let first = self.dma_at(t, off)?;
        let bad = |offset: u64, why: String| NvmeError::BadTransfer { len, offset, region_len: 0, why };
        if first.device_bits() % 4 != 0 {
            return Err(bad(off, format!("DMA address {first} is not dword aligned")));
        }
        let first_chunk = PAGE - first.device_bits() % PAGE;
        if len <= first_chunk {
            return Ok((first, None));
        }
        let offsets: Vec<u64> = (first_chunk..len).step_by(PAGE as usize).map(|o| off + o).collect();
        if offsets.len() > (PAGE / 8) as usize {
            return Err(bad(off, format!("{} PRP entries do not fit one list page", offsets.len())));
        }
        let entries = match t {
            // Host pages: every page's address in one lookup (no-IOMMU: one pagemap read).
            Target::Host(va) => {
                let addr = |source| NvmeError::Vfio(VfioError::Addr { what: "transfer", source });
                let vas = offsets.iter().map(|&o| va.checked_add(o).map_err(addr)).collect::<Result<Vec<_>, _>>()?;
                self.vfio.dma_addresses(&vas)?
            }
            Target::Linear(_) => offsets.iter().map(|&o| self.dma_at(t, o)).collect::<Result<Vec<_>, _>>()?,
        };
        if let Some((o, a)) = offsets.iter().zip(&entries).find(|(_, a)| a.device_bits() % PAGE != 0) {
            return Err(bad(*o, format!("page address {a} is not page aligned")));
        }
        if entries.len() == 1 {
            return Ok((first, Some(entries[0])));
        }
        let list_off = POOL_PRP + cid as u64 * PAGE;
        let bytes: Vec<u8> = entries.iter().flat_map(|&e| prp_entry(Some(e))).collect();
        self.pool.write_at(list_off, &bytes).map_err(|source| NvmeError::Access { what: "PRP list", source })?;
        Ok((first, Some(self.pool_dma(list_off)?)))
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
        self.transfer_batch(reg, dir, entry, &[Io { offset, lba, len }])
    }

    /// Like `transfer`, for many ranges of one region at once: each range is checked first
    /// (nothing is submitted if one is bad), then all of them run with up to the queue's depth
    /// of commands in flight, in whatever order the controller completes them.
    pub fn transfer_batch(&mut self, reg: &Registry, dir: Dir, entry: &Entry, ios: &[Io]) -> Result<(), NvmeError> {
        self.transfer_batch_depth(reg, dir, entry, ios, IO_DEPTH as usize - 1)
    }

    /// Like `transfer_batch`, with at most `qd` commands in flight (clamped to 1 ..= the queue's
    /// depth - 1).
    pub fn transfer_batch_depth(
        &mut self,
        reg: &Registry,
        dir: Dir,
        entry: &Entry,
        ios: &[Io],
        qd: usize,
    ) -> Result<(), NvmeError> {
        let ns = self.namespace();
        for io in ios {
            let bad =
                |why: String| NvmeError::BadTransfer { len: io.len, offset: io.offset, region_len: entry.len(), why };
            if io.len == 0 || !io.len.is_multiple_of(ns.block_size) {
                return Err(bad(format!("length is not a non-zero multiple of the {}-byte block", ns.block_size)));
            }
            if io.offset.checked_add(io.len).is_none_or(|e| e > entry.len()) {
                return Err(bad("runs past the region".into()));
            }
            let count = io.len / ns.block_size;
            if io.lba.checked_add(count).is_none_or(|e| e > ns.blocks) {
                return Err(NvmeError::OutOfNamespace {
                    nsid: ns.nsid,
                    lba: io.lba,
                    lba_count: count,
                    size: ns.blocks,
                });
            }
        }
        let target = self.target(reg, entry)?;
        let chunk = self.info().mdts.unwrap_or(MAX_XFER).min(MAX_XFER);
        let mut cmds = Vec::new();
        for io in ios {
            let mut done = 0;
            while done < io.len {
                let n = chunk.min(io.len - done);
                cmds.push(Io { offset: io.offset + done, lba: io.lba + done / ns.block_size, len: n });
                done += n;
            }
        }
        self.run_io(dir, &target, entry.region(), &cmds, qd.clamp(1, IO_DEPTH as usize - 1))
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
            cmds.push(Io { offset: (i % slots) * io_size, lba: (x % span) * io_size / ns.block_size, len: io_size });
        }
        self.run_io(Dir::Read, &t, entry.region(), &cmds, qd.max(1))?;
        Ok(count)
    }

    /// Runs I/O commands keeping up to `qd` in flight (at most the queue's depth - 1). Each
    /// command holds `region` and its PRP list page until its own completion is seen. After a
    /// completion error no more are submitted and the ones in flight are reaped; after any other
    /// error (a bad PRP, a failed submission, a timeout, a fatal status, an interrupt) the ones
    /// in flight are reaped if the controller still answers, else it is quiesced. Either way no
    /// command is in flight when this returns.
    fn run_io(
        &mut self,
        dir: Dir,
        t: &Target,
        region: &Arc<dyn PeerMemory>,
        cmds: &[Io],
        qd: usize,
    ) -> Result<(), NvmeError> {
        self.refuse_if_removed("a transfer")?;
        self.ensure_init()?;
        let ns = self.namespace();
        self.transfers += 1;
        let transfer = self.transfers;
        let mut next = 0;
        let mut first_err = None;
        let what = format!("{dir:?} of {} commands", cmds.len());
        loop {
            while first_err.is_none() && next < cmds.len() && self.queue(false)?.in_flight() < qd {
                let Some(cid) = self.queue(false)?.alloc() else { break };
                let Io { offset, lba, len } = cmds[next];
                let (prp1, prp2) = match self.prps(t, offset, len, cid) {
                    Ok(p) => p,
                    Err(e) => {
                        first_err = Some(e);
                        break;
                    }
                };
                let sqe = Sqe {
                    opcode: if dir == Dir::Read { 0x02 } else { 0x01 },
                    nsid: ns.nsid,
                    prp1: Some(prp1),
                    prp2,
                    cdw10: lba as u32,
                    cdw11: (lba >> 32) as u32,
                    cdw12: (len / ns.block_size - 1) as u32,
                };
                if let Err(e) = self.submit(false, cid, &sqe, InFlight { transfer, _region: Some(region.clone()) }) {
                    first_err = Some(e);
                    break;
                }
                next += 1;
            }
            // After a quiesce the queue is gone, and with it everything in flight.
            if self.io.as_ref().is_none_or(|q| q.in_flight() == 0) {
                break;
            }
            match self.reap(false, &what) {
                Ok(c) => {
                    if let Some(status) = self.retire(false, c, transfer)? {
                        if !status.is_success() && first_err.is_none() {
                            first_err = Some(NvmeError::Command { what: what.clone(), status });
                        }
                    }
                }
                Err(e) => {
                    self.quiesce(&e);
                    return Err(first_err.unwrap_or(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Deletes the I/O queues and disables the controller (bounded), before handing it back.
    pub fn shutdown(mut self) -> Result<(), NvmeError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), NvmeError> {
        if !self.needs_init && self.io.is_some() {
            let deleted = self
                .admin_cmd("Delete I/O SQ", Sqe { opcode: 0x00, cdw10: 1, ..Default::default() })
                .and_then(|()| self.admin_cmd("Delete I/O CQ", Sqe { opcode: 0x04, cdw10: 1, ..Default::default() }));
            if let Err(e) = deleted {
                self.quiesce(&e);
                return Err(e);
            }
            self.io = None;
        }
        if let Err(e) = self.disable() {
            self.quiesce(&e);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Also on unwinding: the controller must stop before the pool and the regions of any
        // command in flight are released.
        if let Err(e) = self.shutdown_inner() {
            tracing::warn!(bdf = %self.vfio.bdf(), "shutdown: {e}");
        }
    }
}

/// The BAR range (device, BAR, offset, length) of a BAR-backed region, to map into the IOMMU
/// domain under its own key: the region's CPU mapping, when it has one, is not ours to keep, so
/// the topology maps the range afresh, and the mapping is kept for the next registration of the
/// same range.
fn peer_bar_range(entry: &Entry) -> Result<(peermem::Bdf, u8, u64, u64), String> {
    let (bdf, bar, offset) = match entry.region().backing() {
        Backing::Bar { bdf, bar, offset } | Backing::P2pmem { bdf, bar, offset } => (bdf, bar, offset),
        _ => return Err("not a BAR-backed region".into()),
    };
    if offset % PAGE != 0 {
        return Err(format!("BAR offset {offset:#x} is not page aligned"));
    }
    Ok((bdf, bar, offset, entry.len()))
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

    fn held(transfer: u64) -> Option<InFlight> {
        Some(InFlight { transfer, _region: None })
    }

    #[test]
    fn a_command_id_and_its_prp_page_are_reused_only_after_that_command_completes() {
        let mut q = Queue::new(1, 4, 0, 0);
        let mut ids = Vec::new();
        while let Some(cid) = q.alloc() {
            q.slots[cid as usize] = held(1);
            ids.push(cid);
        }
        // A queue of 4 entries holds at most 3 commands.
        assert_eq!(ids, [0, 1, 2]);
        // Out of order: the command with id 1 completes first. Ids rotate, so the next one is
        // the never-used 3; then the queue is full again and nothing in flight is handed out.
        q.slots[1] = None;
        assert_eq!(q.alloc(), Some(3));
        q.slots[3] = held(2);
        assert_eq!(q.alloc(), None);
        // Only completed ids come back, in rotation order from the last one handed out.
        q.slots[2] = None;
        assert_eq!(q.alloc(), Some(1));
        q.slots[1] = held(3);
        assert_eq!(q.alloc(), None);
        assert_eq!(q.in_flight(), 3);
        assert!(q.slots[0].is_some() && q.slots[3].is_some());
    }

    #[test]
    fn submission_entries_follow_the_spec_layout() {
        let prp1 = Some(DmaAddr::Iova(peermem::Iova::new(0x1000)));
        let prp2 = Some(DmaAddr::Bus(peermem::BusAddr::new(0x2000)));
        let b = Sqe { opcode: 0x02, nsid: 1, prp1, prp2, cdw10: 5, cdw11: 6, cdw12: 7 }.bytes(0x1234);
        assert_eq!(&b[0..4], &[0x02, 0, 0x34, 0x12]);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7);
    }
}
