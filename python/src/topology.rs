//! `Topology`, its devices, `why` and `route`: the core's topology, verdict and registry.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use peermem::pci::BarKind;
use peermem::{BarRegion, Bdf, DevIdx, PeerMemory, Registry, TopologyError};

use crate::errors::peermem_err;

/// The PCI topology of a sysroot: the live system (`root=None`) or a captured directory.
#[pyclass(module = "peermem", frozen)]
pub struct Topology {
    reg: Registry,
    /// Names from the system's pci.ids (empty without one), and the CLI's labels.
    names: peermem::pciids::PciIds,
    labels: peermem::pci::select::Labels,
    /// A capture archive unpacked for this topology (removed with it).
    _unpacked: Option<tempfile::TempDir>,
}

impl Topology {
    fn topo(&self) -> &Arc<peermem::Topology> {
        self.reg.topology()
    }

    /// The device index of a BDF string: `ValueError` naming the input when it does not parse or
    /// is not in this topology.
    fn idx(&self, what: &str, s: &str) -> PyResult<(Bdf, DevIdx)> {
        let bdf: Bdf = s.parse().map_err(|e| PyValueError::new_err(format!("{what} {s:?}: {e}")))?;
        let i = self.topo().idx(bdf).map_err(|e| PyValueError::new_err(format!("{what} {s:?}: {e}")))?;
        Ok((bdf, i))
    }
}

/// One PCI function.
#[pyclass(module = "peermem", frozen, get_all)]
pub struct Device {
    /// `dddd:bb:dd.f`.
    bdf: String,
    vendor: u16,
    device: u16,
    /// The 24-bit class code (class, subclass, programming interface).
    class_code: u32,
    /// Vendor name from a PCI ID database (None: the core reads no such database yet).
    vendor_name: Option<String>,
    /// Device name from a PCI ID database (None: the core reads no such database yet).
    device_name: Option<String>,
    /// The label `peermem topo` prints: `GPU0`, `NIC0`, `NVME0`, `STOR0`, `ACC0` in PCI bus order
    /// (`PCIn` for other functions).
    label: Option<String>,
    numa_node: Option<i32>,
    /// The BDF of the bridge above, None on a root bus.
    upstream: Option<String>,
    /// The host bridge, `pci<domain>:<bus>`.
    host_bridge: String,
}

#[pymethods]
impl Device {
    fn __repr__(&self) -> String {
        format!("<peermem.Device {} [{:04x}:{:04x}] class {:06x}>", self.bdf, self.vendor, self.device, self.class_code)
    }
}

/// The kernel's P2PDMA verdict for a (provider, client) pair, explained.
#[pyclass(module = "peermem", frozen, get_all)]
pub struct Why {
    provider: String,
    client: String,
    /// `bus_addr`, `host_bridge` or `not_supported`.
    map_type: String,
    /// The kernel's distance (lower is closer).
    distance: u32,
    /// NCCL-style label: `PIX`, `PXB`, `PHB` or `SYS`.
    path: String,
    /// Devices with ACS redirect on the path.
    acs_redirect: Vec<String>,
    reasons: Vec<String>,
    /// The kernel parameter that removes the ACS redirects, if any.
    fix: Option<String>,
}

#[pymethods]
impl Why {
    fn __repr__(&self) -> String {
        format!(
            "<peermem.Why {} -> {}: {} ({}, distance {})>",
            self.provider, self.client, self.map_type, self.path, self.distance
        )
    }
}

/// What a client programs to reach bytes of a provider's BAR, and why.
#[pyclass(module = "peermem", frozen, get_all)]
pub struct RouteInfo {
    /// `bus_addr`, `host_bridge`, `iommu`, `kernel_import`, `cpu_mapped` or `bounce`.
    route: String,
    /// The address the client programs, None when the route has none.
    dma_address: Option<u64>,
    reasons: Vec<String>,
}

#[pymethods]
impl RouteInfo {
    fn __repr__(&self) -> String {
        match self.dma_address {
            Some(a) => format!("<peermem.RouteInfo {} {a:#x}>", self.route),
            None => format!("<peermem.RouteInfo {}>", self.route),
        }
    }
}

fn bdf_str(b: Bdf) -> String {
    b.to_string()
}

#[pymethods]
impl Topology {
    /// Reads the PCI topology of `root`: a sysroot directory, or a capture archive (`.tar`,
    /// `.tar.gz`, `.tar.bz2`, `.tar.xz`, as `peermem capture --archive` writes); None reads `/`.
    #[new]
    #[pyo3(signature = (root=None))]
    fn new(py: Python<'_>, root: Option<PathBuf>) -> PyResult<Topology> {
        let root = root.unwrap_or_else(|| PathBuf::from("/"));
        let (dir, unpacked) = if root.is_file() {
            let tmp = tempfile::Builder::new()
                .prefix("peermem-root-")
                .tempdir()
                .map_err(|e| peermem_err(format!("temporary directory: {e}")))?;
            let dir = py
                .detach(|| peermem::archive::unpack(&root, tmp.path()))
                .map_err(|e| peermem_err(format!("{}: {e}", root.display())))?;
            (dir, Some(tmp))
        } else {
            (root.clone(), None)
        };
        let topo = py
            .detach(|| peermem::Topology::discover(&dir))
            .map_err(|e: TopologyError| peermem_err(format!("{}: {e}", root.display())))?;
        let wanted: Vec<(u16, u16)> = topo.devices().iter().map(|d| (d.vendor, d.device)).collect();
        let names = peermem::pciids::PciIds::load(&wanted).map_err(|e| peermem_err(e.to_string()))?;
        let labels = peermem::pci::select::Labels::new(&topo);
        Ok(Topology { reg: Registry::new(Arc::new(topo)), names, labels, _unpacked: unpacked })
    }

    /// Every PCI function, in BDF order.
    #[getter]
    fn devices(&self) -> Vec<Device> {
        let t = self.topo();
        t.indices()
            .map(|i| (i, t.device(i)))
            .map(|(i, d)| Device {
                bdf: bdf_str(d.bdf),
                vendor: d.vendor,
                device: d.device,
                class_code: d.class,
                vendor_name: self.names.vendor(d.vendor).map(str::to_string),
                device_name: self.names.device(d.vendor, d.device).map(str::to_string),
                label: Some(self.labels.label(i).to_string()),
                numa_node: d.numa_node,
                upstream: t.idx(d.bdf).ok().and_then(|i| t.upstream(i)).map(|u| bdf_str(t.device(u).bdf)),
                host_bridge: d.host_bridge.clone(),
            })
            .collect()
    }

    /// The verdict for `provider` -> `client` (BDF strings).
    fn why(&self, provider: &str, client: &str) -> PyResult<Why> {
        let (_, p) = self.idx("provider", provider)?;
        let (_, c) = self.idx("client", client)?;
        let v = self.topo().verdict(p, c);
        Ok(Why {
            provider: bdf_str(v.provider),
            client: bdf_str(v.client),
            map_type: v.map_type.as_str().to_string(),
            distance: v.distance,
            path: format!("{:?}", v.path),
            acs_redirect: v.acs_redirect.iter().map(|b| bdf_str(*b)).collect(),
            reasons: v.reasons,
            fix: v.acs_fix,
        })
    }

    /// The route `client` takes to byte `offset` of memory BAR `bar` of `provider`.
    fn route(&self, provider: &str, bar: u8, offset: u64, client: &str) -> PyResult<RouteInfo> {
        let (pb, p) = self.idx("provider", provider)?;
        let (cb, _) = self.idx("client", client)?;
        let d = self.topo().device(p);
        let b = d.bar(bar).ok_or_else(|| PyValueError::new_err(format!("provider {provider:?} has no BAR{bar}")))?;
        if b.kind == BarKind::Io {
            return Err(PyValueError::new_err(format!(
                "{provider} BAR{bar} is an I/O port BAR: peers cannot DMA to it"
            )));
        }
        let bar_len = b.cpu.len();
        if offset >= bar_len {
            return Err(PyValueError::new_err(format!(
                "offset {offset:#x} is past the end of {provider} BAR{bar} ({bar_len:#x} bytes)"
            )));
        }
        // The region is the BAR from `offset` to its end, so the route's addresses are offset's.
        let peer = self.reg.peer(cb).map_err(peermem_err)?;
        let region: Arc<dyn PeerMemory> = Arc::new(BarRegion { bdf: pb, bar, offset, len: bar_len - offset });
        let guard = self.reg.register(region).map_err(peermem_err)?;
        let route = self.reg.resolve(&guard, peer).map_err(peermem_err)?;
        Ok(RouteInfo {
            route: route.kind.name().to_string(),
            dma_address: route.dma_address().map(|a| a.device_bits()),
            reasons: route.reasons(),
        })
    }

    fn __repr__(&self) -> String {
        format!("<peermem.Topology {} ({} devices)>", self.topo().root().display(), self.topo().len())
    }
}
