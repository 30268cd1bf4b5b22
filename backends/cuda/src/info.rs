//! What the backend knows about the driver and a device, as plain data: the device address
//! space (`DevicePtr`), the driver's version and kernel module, a device's identity, PCI function
//! and capabilities (`DeviceInfo`), and why a dma-buf cannot be had (`DmaBufRefusal`).
//!
//! Owns: these types and what follows from them alone (parsing the driver's PCI bus id and
//! version file, the provider, the dma-buf verdict before any call is made). Must not: import
//! another module of the crate (the `sys` layer fills these; `device`, `region` and `error` read
//! them) or call the driver.

use std::fmt;

use peermem::{Bdf, Provider};

/// An address in the CUDA unified address space: device memory as kernels and copies name it.
/// Not a CPU address (the CPU cannot dereference it) and not a bus address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevicePtr(u64);

impl DevicePtr {
    pub const fn new(raw: u64) -> DevicePtr {
        DevicePtr(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// `self + off`, or None on overflow.
    pub fn checked_add(self, off: u64) -> Option<DevicePtr> {
        self.0.checked_add(off).map(DevicePtr)
    }
}

impl fmt::Display for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda:{:#x}", self.0)
    }
}

/// The CUDA version the driver supports (`cuDriverGetVersion`: 1000 x major + 10 x minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DriverVersion {
    pub major: u32,
    pub minor: u32,
}

impl DriverVersion {
    pub fn from_raw(v: i32) -> DriverVersion {
        let v = v.max(0) as u32;
        DriverVersion { major: v / 1000, minor: v % 1000 / 10 }
    }
    /// `cuMemGetHandleForAddressRange` (dma-buf export) entered the driver API in CUDA 11.7.
    pub fn has_dma_buf_export(self) -> bool {
        self >= DriverVersion { major: 11, minor: 7 }
    }
}

impl fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Which NVIDIA kernel module runs, from `/proc/driver/nvidia/version`. Only the open module
/// ("NVIDIA UNIX Open Kernel Module") exports device memory as a dma-buf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelModule {
    Open {
        version: String,
    },
    Proprietary {
        version: String,
    },
    /// The file is missing or unreadable (a container without /proc/driver/nvidia), or its
    /// first line is not the one the module writes.
    Unknown(String),
}

impl KernelModule {
    /// Parses the first line of `/proc/driver/nvidia/version`, e.g.
    /// `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build ...`.
    pub fn parse(text: &str) -> KernelModule {
        let Some(line) = text.lines().next().and_then(|l| l.strip_prefix("NVRM version:")) else {
            return KernelModule::Unknown(format!("unexpected version text {:?}", text.lines().next().unwrap_or("")));
        };
        // The version is the first word made of digits and dots.
        let version = line
            .split_whitespace()
            .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
            .unwrap_or("")
            .to_string();
        if line.contains("Open Kernel Module") {
            KernelModule::Open { version }
        } else {
            KernelModule::Proprietary { version }
        }
    }

    /// Reads the live system's module.
    pub fn detect() -> KernelModule {
        match std::fs::read_to_string("/proc/driver/nvidia/version") {
            Ok(t) => KernelModule::parse(&t),
            Err(e) => KernelModule::Unknown(format!("/proc/driver/nvidia/version: {e}")),
        }
    }
}

/// Parses what `cuDeviceGetPCIBusId` writes (`0000:3B:00.0`, NUL-padded; some drivers write an
/// 8-digit domain) into the core's `Bdf`.
pub fn parse_pci_bus_id(text: &str) -> Result<Bdf, String> {
    let t = text.trim_end_matches('\0').trim();
    t.parse::<Bdf>().map_err(|e| e.to_string())
}

/// Why CUDA memory cannot be exported as a dma-buf. Each says what would make it possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaBufRefusal {
    /// The driver predates `cuMemGetHandleForAddressRange`.
    DriverTooOld { version: DriverVersion },
    /// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` is 0; the kernel module (when known) says why.
    DeviceCannot { module: KernelModule },
    /// The memory is not a range the driver exports (a foreign pointer inside a larger
    /// allocation, or a range not aligned to the host page size).
    Range(String),
    /// The driver refused the export itself.
    Driver { call: String },
}

impl fmt::Display for DmaBufRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaBufRefusal::DriverTooOld { version } => write!(
                f,
                "the driver supports CUDA {version}; dma-buf export (cuMemGetHandleForAddressRange) needs 11.7 or newer"
            ),
            DmaBufRefusal::DeviceCannot { module: KernelModule::Proprietary { version } } => write!(
                f,
                "the device reports no dma-buf support: the proprietary NVIDIA kernel module ({version}) runs; \
                 only the open kernel module (nvidia-open) exports GPU memory as a dma-buf"
            ),
            DmaBufRefusal::DeviceCannot { module: KernelModule::Open { version } } => write!(
                f,
                "the device reports no dma-buf support although the open kernel module ({version}) runs \
                 (kernel without CONFIG_DMA_SHARED_BUFFER, or a virtualized GPU)"
            ),
            DmaBufRefusal::DeviceCannot { module: KernelModule::Unknown(why) } => write!(
                f,
                "the device reports no dma-buf support (kernel module unknown: {why}; the proprietary module \
                 never exports dma-bufs, the open one does)"
            ),
            DmaBufRefusal::Range(why) => write!(f, "{why}"),
            DmaBufRefusal::Driver { call } => write!(f, "the driver refused the export: {call}"),
        }
    }
}

/// One CUDA device as the driver describes it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// The driver's ordinal (`cuDeviceGet`): what `cuda:N` names.
    pub ordinal: usize,
    pub name: String,
    /// The PCI function, from `cuDeviceGetPCIBusId`.
    pub pci: Option<Bdf>,
    /// The bus id as the driver wrote it (kept when it did not parse).
    pub pci_text: String,
    pub uuid: [u8; 16],
    pub total_mem: u64,
    pub compute_capability: (i32, i32),
    /// Virtual memory management (`cuMemCreate`/`cuMemMap`).
    pub vmm: bool,
    /// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
    pub dma_buf: bool,
    /// `CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED`.
    pub gpu_direct_rdma: bool,
    /// `CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED`.
    pub gpu_direct_rdma_vmm: bool,
    pub driver: DriverVersion,
}

impl DeviceInfo {
    /// Who owns the memory physically: the GPU's PCI function when the driver named it.
    pub fn provider(&self) -> Provider {
        match self.pci {
            Some(bdf) => Provider::Pci(bdf),
            None => Provider::Host { numa: None },
        }
    }

    /// Why the provider is what it is.
    pub fn provider_note(&self) -> String {
        match (self.pci, parse_pci_bus_id(&self.pci_text)) {
            (Some(bdf), _) => format!("provider: PCI function {bdf} (cuDeviceGetPCIBusId)"),
            (None, Err(why)) => format!(
                "provider unknown: the driver's PCI bus id {:?} is not a PCI address ({why}); reported as host memory",
                self.pci_text
            ),
            (None, Ok(_)) => "provider unknown: reported as host memory".into(),
        }
    }

    /// Why this device's memory cannot be exported as a dma-buf, before trying (None: try).
    pub fn dma_buf_refusal(&self, module: impl FnOnce() -> KernelModule) -> Option<DmaBufRefusal> {
        if !self.driver.has_dma_buf_export() {
            return Some(DmaBufRefusal::DriverTooOld { version: self.driver });
        }
        (!self.dma_buf).then(|| DmaBufRefusal::DeviceCannot { module: module() })
    }

    /// Whether memory another device exported is on this GPU: `provider` (the exporter's PCI
    /// function, e.g. from VK_EXT_pci_bus_info) must be this device's (`cuDeviceGetPCIBusId`),
    /// and `uuid` (the exporter's device UUID, Vulkan's `deviceUUID`) equal to this device's
    /// where given. `Err` says why not.
    pub fn same_gpu(&self, provider: Provider, uuid: Option<[u8; 16]>) -> Result<(), String> {
        match (provider, self.pci) {
            (Provider::Pci(theirs), Some(mine)) if theirs == mine => {}
            (Provider::Pci(theirs), Some(mine)) => {
                return Err(format!("the exporter is PCI function {theirs}, this device is {mine}"))
            }
            (Provider::Pci(theirs), None) => {
                return Err(format!(
                    "the exporter is PCI function {theirs}, and this device's PCI bus id {:?} is not an address",
                    self.pci_text
                ))
            }
            (Provider::Host { .. }, _) => {
                return Err("the exporter names no PCI function (a device without VK_EXT_pci_bus_info, or host \
                            memory), so it cannot be shown to be this GPU"
                    .into())
            }
        }
        match uuid {
            Some(u) if u != self.uuid => Err(format!(
                "the same PCI function, but the device UUIDs differ ({} here, {} exported)",
                self.uuid_text(),
                uuid_text(&u)
            )),
            _ => Ok(()),
        }
    }

    /// The UUID as `nvidia-smi -L` prints it (`GPU-xxxxxxxx-xxxx-...`).
    pub fn uuid_text(&self) -> String {
        uuid_text(&self.uuid)
    }
}

/// A device UUID as `nvidia-smi -L` prints it (`GPU-xxxxxxxx-xxxx-...`).
fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("GPU-{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_bus_ids_parse_in_both_domain_widths_and_with_padding() {
        let want = Bdf::new(0, 0x3b, 0, 0).unwrap();
        assert_eq!(parse_pci_bus_id("0000:3B:00.0\0\0\0\0"), Ok(want));
        assert_eq!(parse_pci_bus_id("00000000:3B:00.0"), Ok(want));
        assert_eq!(parse_pci_bus_id("0001:c1:1f.7").unwrap(), Bdf::new(1, 0xc1, 0x1f, 7).unwrap());
        assert!(parse_pci_bus_id("").is_err());
        assert!(parse_pci_bus_id("0000:3B:20.0").is_err(), "device 0x20 does not exist");
        assert!(parse_pci_bus_id("GPU-1234").is_err());
    }

    #[test]
    fn driver_versions_decode_as_the_driver_encodes_them() {
        assert_eq!(DriverVersion::from_raw(13000), DriverVersion { major: 13, minor: 0 });
        assert_eq!(DriverVersion::from_raw(12090).to_string(), "12.9");
        assert!(DriverVersion::from_raw(11070).has_dma_buf_export());
        assert!(!DriverVersion::from_raw(11060).has_dma_buf_export());
        assert_eq!(DriverVersion::from_raw(-1), DriverVersion { major: 0, minor: 0 });
    }

    #[test]
    fn the_kernel_module_is_told_from_its_version_line() {
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U16)  Thu Sep  4 2025\nGCC version: gcc 12";
        assert_eq!(KernelModule::parse(open), KernelModule::Open { version: "580.95.05".into() });
        let prop = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024";
        assert_eq!(KernelModule::parse(prop), KernelModule::Proprietary { version: "535.183.01".into() });
        assert!(matches!(KernelModule::parse("garbage"), KernelModule::Unknown(_)));
        assert!(matches!(KernelModule::parse(""), KernelModule::Unknown(_)));
    }

    fn info(driver: i32, dma_buf: bool) -> DeviceInfo {
        DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            pci: Some(Bdf::new(0, 0x3b, 0, 0).unwrap()),
            pci_text: "0000:3B:00.0".into(),
            uuid: [0xab; 16],
            total_mem: 80 << 30,
            compute_capability: (9, 0),
            vmm: true,
            dma_buf,
            gpu_direct_rdma: true,
            gpu_direct_rdma_vmm: true,
            driver: DriverVersion::from_raw(driver),
        }
    }

    #[test]
    fn a_dma_buf_refusal_names_the_driver_or_the_kernel_module() {
        let prop = || KernelModule::Proprietary { version: "535.1".into() };
        assert_eq!(info(13000, true).dma_buf_refusal(prop), None);
        let r = info(11040, true).dma_buf_refusal(prop).unwrap();
        assert!(r.to_string().contains("CUDA 11.4") && r.to_string().contains("11.7"), "{r}");
        let r = info(13000, false).dma_buf_refusal(prop).unwrap();
        assert!(r.to_string().contains("proprietary NVIDIA kernel module (535.1)"), "{r}");
        let r = info(13000, false).dma_buf_refusal(|| KernelModule::Unknown("no file".into())).unwrap();
        assert!(r.to_string().contains("no file"), "{r}");
    }

    #[test]
    fn an_export_is_this_gpus_only_when_the_pci_functions_and_uuids_agree() {
        let i = info(13000, true);
        let here = Provider::Pci(Bdf::new(0, 0x3b, 0, 0).unwrap());
        assert_eq!(i.same_gpu(here, Some([0xab; 16])), Ok(()));
        assert_eq!(i.same_gpu(here, None), Ok(()), "no UUID given: the PCI function decides");
        let other = Provider::Pci(Bdf::new(0, 0x5e, 0, 0).unwrap());
        let e = i.same_gpu(other, Some([0xab; 16])).unwrap_err();
        assert!(e.contains("0000:5e:00.0") && e.contains("0000:3b:00.0"), "{e}");
        let e = i.same_gpu(here, Some([0xcd; 16])).unwrap_err();
        assert!(e.contains("UUIDs differ") && e.contains("GPU-cdcdcdcd"), "{e}");
        let e = i.same_gpu(Provider::Host { numa: None }, None).unwrap_err();
        assert!(e.contains("VK_EXT_pci_bus_info"), "{e}");
        let unparsed = DeviceInfo { pci: None, pci_text: "weird".into(), ..i };
        assert!(unparsed.same_gpu(here, None).unwrap_err().contains("\"weird\""));
    }

    #[test]
    fn the_provider_is_the_gpu_function_and_the_uuid_prints_as_nvidia_smi_does() {
        let i = info(13000, true);
        assert_eq!(i.provider(), Provider::Pci(Bdf::new(0, 0x3b, 0, 0).unwrap()));
        assert_eq!(i.uuid_text(), "GPU-abababab-abab-abab-abab-abababababab");
        let no_pci = DeviceInfo { pci: None, ..i };
        assert_eq!(no_pci.provider(), Provider::Host { numa: None });
        assert_eq!(DevicePtr::new(0x7f00).to_string(), "cuda:0x7f00");
        assert_eq!(DevicePtr::new(u64::MAX).checked_add(1), None);
    }
}
