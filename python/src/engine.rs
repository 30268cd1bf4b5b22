//! `_Engine`: the native face of the transfer engine (`peermem_engine::Engine`), subclassed by
//! the package's `peermem.Engine` (`_engine.py`). Memory is registered as the loader's
//! destinations are (`memory::Target`: a package buffer, or any writable buffer export); batches
//! of `(local_id, local_offset, remote_id, remote_offset, length)` tuples are posted as one unit
//! and return a `transfer::Ticket`, which `peermem.Engine` wraps in a `Transfer` future.
//!
//! Every call into the Rust engine is made with the GIL released: a thread that holds the
//! engine's lock may drop the last reference to a Python buffer export, which takes the GIL.
//!
//! Owns: Python argument checks (batch tuples, options), what a registration holds until it is
//! unregistered. Must not: decide rails, check ranges against regions, or
//! let a buffer go while the engine may still use it (the engine refuses to unregister a region
//! a posted batch uses, and holds the region itself until then).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyString, PyTuple};

use peermem::Registry;
use peermem_engine::{EngineOptions, Op, PeerId, RegionId, Request};

use crate::args;
use crate::errors::{engine_err, peermem_err};
use crate::memory::{registry, Target};
use crate::transfer::{rail_dict, Ticket, SLICE};

/// The most work requests in flight per rail: half of a connection's send queue, the rest left
/// for notifications.
fn max_depth() -> u64 {
    u64::from(EngineOptions::default().connect.max_send_wr / 2)
}

/// `obj` as bytes: `bytes`, `bytearray` or `memoryview`; `name` in the error.
fn byte_string(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<u8>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if obj.is_instance_of::<PyMemoryView>() {
        return byte_string(&obj.call_method0("tobytes")?, name);
    }
    Err(PyTypeError::new_err(format!("{name} must be bytes, not {}", args::type_name(obj))))
}

/// The engine's options from `Engine(...)`'s keywords, each checked by name.
fn options(
    nics: Option<&Bound<'_, PyAny>>,
    port: Option<&Bound<'_, PyAny>>,
    host: Option<&Bound<'_, PyAny>>,
    timeout: Option<&Bound<'_, PyAny>>,
    depth: Option<&Bound<'_, PyAny>>,
) -> PyResult<EngineOptions> {
    let d = EngineOptions::default();
    let nics = match nics.filter(|n| !n.is_none()) {
        None => None,
        Some(n) if n.is_instance_of::<PyString>() => {
            return Err(PyTypeError::new_err("nics must be a list of RDMA device names, not a str"))
        }
        Some(n) => Some(args::strings(n, "nics")?),
    };
    let host = match host.filter(|h| !h.is_none()) {
        None => None,
        Some(h) if h.is_instance_of::<PyString>() => Some(h.extract::<String>()?),
        Some(h) => return Err(PyTypeError::new_err(format!("host must be a str, not {}", args::type_name(h)))),
    };
    let timeout = args::opt_seconds(timeout, "timeout")?.unwrap_or(d.timeout);
    if timeout.is_zero() {
        return Err(PyValueError::new_err("timeout must be > 0 (got 0)"));
    }
    Ok(EngineOptions {
        nics,
        host,
        port: args::int_or(port, "port", 0, u16::MAX.into(), 0)? as u16,
        timeout,
        depth: args::int_or(depth, "depth", 1, max_depth(), d.depth as u64)? as usize,
        ..d
    })
}

/// A batch given as `(local_id, local_offset, remote_id, remote_offset, length)` tuples, as
/// engine requests of `op`; errors name the tuple's index and field.
fn requests(op: Op, batch: &Bound<'_, PyAny>) -> PyResult<Vec<Request>> {
    const SHAPE: &str = "(local_id, local_offset, remote_id, remote_offset, length)";
    let items = batch.try_iter().map_err(|_| {
        PyTypeError::new_err(format!("batch must be a list of {SHAPE} tuples, not {}", args::type_name(batch)))
    })?;
    let mut v = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        let t = item.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err(format!("batch[{i}] must be a tuple {SHAPE}, not {}", args::type_name(&item)))
        })?;
        if t.len() != 5 {
            return Err(PyValueError::new_err(format!("batch[{i}] has {} items, not 5: {SHAPE}", t.len())));
        }
        let field =
            |k: usize, name: &str, lo: u64, hi: u64| args::int(&t.get_item(k)?, &format!("batch[{i}] {name}"), lo, hi);
        let id = |k: usize, name: &str| field(k, name, 0, u32::MAX.into()).map(|n| RegionId(n as u32));
        v.push(Request {
            op,
            local: id(0, "local_id")?,
            local_offset: field(1, "local_offset", 0, u64::MAX)?,
            remote: id(2, "remote_id")?,
            remote_offset: field(3, "remote_offset", 0, u64::MAX)?,
            len: field(4, "length", 1, u64::MAX)?,
        });
    }
    Ok(v)
}

/// The transfer engine: registers memory with the host's RDMA NICs, exchanges metadata with
/// peers, and moves batches of byte ranges between this host's memory and theirs.
#[pyclass(module = "peermem._native", name = "_Engine", frozen, subclass)]
pub struct Engine {
    /// None once closed.
    engine: Mutex<Option<Arc<peermem_engine::Engine>>>,
    /// What each registered region came from (its buffer export and registration), held until
    /// the region is unregistered or the engine is closed.
    held: Mutex<HashMap<RegionId, Target>>,
}

impl Engine {
    fn engine(&self) -> PyResult<Arc<peermem_engine::Engine>> {
        self.engine.lock().map_err(peermem_err)?.clone().ok_or_else(|| peermem_err("the engine is closed"))
    }

    fn post(
        &self,
        py: Python<'_>,
        op: Op,
        peer: &Bound<'_, PyAny>,
        batch: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Ticket> {
        let peer = PeerId(args::int(peer, "peer", 0, u32::MAX.into())? as u32);
        let reqs = requests(op, batch)?;
        let notify = notify.filter(|n| !n.is_none()).map(|n| byte_string(n, "notify")).transpose()?;
        let e = self.engine()?;
        let ticket = py.detach(|| e.post(peer, &reqs, notify.as_deref())).map_err(engine_err)?;
        Ok(Ticket::new(ticket))
    }
}

#[pymethods]
impl Engine {
    /// Opens the NICs (`nics`: RDMA device names; default every active one) and listens on
    /// `port` (0: any free one). `host`: the name peers see; `timeout`: seconds a batch may take;
    /// `depth`: work requests in flight per rail.
    #[new]
    #[pyo3(
        signature = (nics=None, port=None, host=None, timeout=None, depth=None),
        text_signature = "(nics=None, port=0, host=None, timeout=60.0, depth=64)"
    )]
    fn new(
        py: Python<'_>,
        nics: Option<&Bound<'_, PyAny>>,
        port: Option<&Bound<'_, PyAny>>,
        host: Option<&Bound<'_, PyAny>>,
        timeout: Option<&Bound<'_, PyAny>>,
        depth: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Engine> {
        let opts = options(nics, port, host, timeout, depth)?;
        // Its own registry over the package's topology: a buffer is registered in the package's
        // registry and, through the engine, in this one.
        let reg = Registry::new(registry()?.topology().clone());
        let e = py.detach(|| peermem_engine::Engine::new(reg, opts)).map_err(engine_err)?;
        Ok(Engine { engine: Mutex::new(Some(Arc::new(e))), held: Mutex::new(HashMap::new()) })
    }

    /// Registers `obj` (a `HostBuffer`, `VulkanBuffer` or any writable C-contiguous buffer) with
    /// every NIC; returns its region id. The same memory again gives the same id.
    fn register(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<u32> {
        let target = Target::from_py(obj, "obj")?;
        let region = target.region();
        let e = self.engine()?;
        let id = py.detach(|| e.register(region)).map_err(engine_err)?;
        self.held.lock().map_err(peermem_err)?.entry(id).or_insert(target);
        Ok(id.0)
    }

    /// Ends a region's registrations; `PeerMemError` while a posted batch uses it.
    fn unregister(&self, py: Python<'_>, region: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = RegionId(args::int(region, "region", 0, u32::MAX.into())? as u32);
        let e = self.engine()?;
        py.detach(|| e.unregister(id)).map_err(engine_err)?;
        let target = self.held.lock().map_err(peermem_err)?.remove(&id);
        drop(target);
        Ok(())
    }

    /// How each NIC registered `region`, one line each.
    fn routes(&self, py: Python<'_>, region: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let id = RegionId(args::int(region, "region", 0, u32::MAX.into())? as u32);
        let e = self.engine()?;
        py.detach(|| e.routes(id)).map_err(engine_err)
    }

    /// Registers `length` bytes at `offset` of the registered `region` on their own with every
    /// NIC, unless a registration covers them already (the engine's range cache).
    fn register_range(
        &self,
        py: Python<'_>,
        region: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let id = RegionId(args::int(region, "region", 0, u32::MAX.into())? as u32);
        let offset = args::int(offset, "offset", 0, u64::MAX)?;
        let len = args::int(length, "length", 1, u64::MAX)?;
        let e = self.engine()?;
        py.detach(|| e.register_range(id, offset, len)).map_err(engine_err)
    }

    /// The registration cache's counts, summed over the NICs: `registers` and `deregisters`
    /// (calls into the NICs' registrars) and `hits` (registrations a cached one covered).
    fn cache_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let e = self.engine()?;
        let c = py.detach(|| e.cache_counts()).map_err(engine_err)?;
        let d = PyDict::new(py);
        d.set_item("registers", c.registers)?;
        d.set_item("deregisters", c.deregisters)?;
        d.set_item("hits", c.hits)?;
        Ok(d)
    }

    /// Where peers connect: `(nic, "ip:port")` per listening NIC.
    fn listen_addrs(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        let e = self.engine()?;
        let addrs = py.detach(|| e.listen_addrs()).map_err(engine_err)?;
        Ok(addrs.into_iter().map(|(nic, a)| (nic, a.to_string())).collect())
    }

    /// This host's metadata for a peer's `connect`: its NICs and the regions registered so far.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let e = self.engine()?;
        let m = py.detach(|| e.metadata()).map_err(engine_err)?;
        Ok(PyBytes::new(py, &m))
    }

    /// Connects to the peer whose `metadata()` this is; returns its peer id.
    fn connect(&self, py: Python<'_>, metadata: &Bound<'_, PyAny>) -> PyResult<u32> {
        let m = byte_string(metadata, "metadata")?;
        let e = self.engine()?;
        Ok(py.detach(|| e.connect(&m)).map_err(engine_err)?.0)
    }

    /// Connects to the engine listening at `address` (`"ip:port"`, one of its `listen_addrs`):
    /// its metadata is read over that connection; returns the peer id.
    fn connect_to(&self, py: Python<'_>, address: &str) -> PyResult<u32> {
        let addr: std::net::SocketAddr = address
            .parse()
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("address {address:?}: {e} (ip:port)")))?;
        let e = self.engine()?;
        Ok(py.detach(|| e.connect_to(addr)).map_err(engine_err)?.0)
    }

    /// The hosts connected to this engine, one per open accepted connection.
    fn accepted(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let e = self.engine()?;
        py.detach(|| e.accepted()).map_err(engine_err)
    }

    /// The regions `peer` registered, as `(region, length)`.
    fn remote_regions(&self, py: Python<'_>, peer: &Bound<'_, PyAny>) -> PyResult<Vec<(u32, u64)>> {
        let peer = PeerId(args::int(peer, "peer", 0, u32::MAX.into())? as u32);
        let e = self.engine()?;
        let regions = py.detach(|| e.remote_regions(peer)).map_err(engine_err)?;
        Ok(regions.into_iter().map(|(r, len)| (r.0, len)).collect())
    }

    /// Posts a batch of RDMA READs (the peer's bytes into local regions); `notify` reaches the
    /// peer once every byte landed.
    #[pyo3(signature = (peer, batch, notify=None))]
    fn read(
        &self,
        py: Python<'_>,
        peer: &Bound<'_, PyAny>,
        batch: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Ticket> {
        self.post(py, Op::Read, peer, batch, notify)
    }

    /// Posts a batch of RDMA WRITEs (local bytes into the peer's regions).
    #[pyo3(signature = (peer, batch, notify=None))]
    fn write(
        &self,
        py: Python<'_>,
        peer: &Bound<'_, PyAny>,
        batch: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Ticket> {
        self.post(py, Op::Write, peer, batch, notify)
    }

    /// Notifications received so far as `(peer host, message)`, waiting up to `timeout`
    /// seconds for the first.
    #[pyo3(signature = (timeout=None), text_signature = "(self, timeout=0.0)")]
    fn notifications<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<(String, Bound<'py, PyBytes>)>> {
        let limit = args::opt_seconds(timeout, "timeout")?.unwrap_or_default();
        let deadline = Instant::now() + limit;
        let e = self.engine()?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = py.detach(|| e.notifications(left.min(SLICE))).map_err(engine_err)?;
            if !got.is_empty() || left <= SLICE {
                return Ok(got.into_iter().map(|n| (n.from, PyBytes::new(py, &n.message))).collect());
            }
            py.check_signals()?;
        }
    }

    /// The rails to `peer` and their states, as dicts (`nic`, `remote_nic`, `state`, `error`).
    fn rails<'py>(&self, py: Python<'py>, peer: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let peer = PeerId(args::int(peer, "peer", 0, u32::MAX.into())? as u32);
        let e = self.engine()?;
        let rails = py.detach(|| e.rails(peer)).map_err(engine_err)?;
        rails.iter().map(|r| rail_dict(py, r)).collect()
    }

    /// Stops the listener and lets go of the registrations and connections (also done when the
    /// engine is garbage-collected); a batch a ticket still holds keeps its connection and
    /// memory until it ends (or times out) and the ticket goes.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let e = self.engine.lock().map_err(peermem_err)?.take();
        py.detach(move || drop(e));
        let held = std::mem::take(&mut *self.held.lock().map_err(peermem_err)?);
        drop(held);
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Calls `close` by name, so that a subclass's `close` runs.
    #[pyo3(signature = (*_args))]
    fn __exit__(slf: &Bound<'_, Self>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        slf.call_method0("close")?;
        Ok(false)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let e = self.engine.get_mut().map(Option::take).unwrap_or_else(|p| p.into_inner().take());
        if e.is_some() {
            // Dropped by the garbage collector with the GIL held: the engine's listener thread is
            // joined, and its lock taken, with it released (see the module).
            Python::attach(|py| py.detach(move || drop(e)));
        }
    }
}
