//! NIC device memory (`ibv_alloc_dm`) as a peer-memory region, and its registration
//! (`ibv_reg_dm_mr`). Devices without device memory (rxe, siw, most NICs) answer with a clean
//! `NotSupported`.
//!
//! Owns: `DeviceMemory`, `Nic::register_dm`. Must not: pretend device memory has a CPU mapping
//! (it is reached with `ibv_memcpy_{to,from}_dm`, or by RDMA).

use std::sync::Arc;

use peermem::nic::NicPlace;
use peermem::{Backing, PeerMemory, Provider, Registry};

use crate::device::Nic;
use crate::error::{Method, RdmaError};
use crate::mr::Access;
use crate::sys;

/// Memory on the NIC itself. Its backing is the device's driver-private command fd: only that
/// device's driver can reach it, so the registry sends every other peer through a bounce.
#[derive(Debug)]
pub struct DeviceMemory {
    dm: Arc<sys::Dm>,
    provider: Provider,
    dev: String,
}

impl DeviceMemory {
    /// Allocates `len` bytes of device memory on `nic`.
    pub fn alloc(nic: &Nic, len: u64) -> Result<DeviceMemory, RdmaError> {
        let dev = nic.name().to_string();
        if len == 0 {
            return Err(RdmaError::Invalid(format!("{dev}: device memory of 0 bytes")));
        }
        let ctx = nic.pd.context();
        let max = match ctx.max_dm_size() {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => 0,
            Err(source) => return Err(RdmaError::Verbs { dev, what: "ibv_query_device_ex", source }),
        };
        if max == 0 {
            return Err(RdmaError::NotSupported {
                dev,
                what: "device memory (ibv_alloc_dm)",
                why: "the device reports max_dm_size 0".into(),
            });
        }
        if len > max {
            return Err(RdmaError::Invalid(format!("{dev}: {len} bytes of device memory asked, the device has {max}")));
        }
        let dm = sys::Dm::alloc(ctx, len).map_err(|source| match source.raw_os_error() {
            Some(libc::EOPNOTSUPP) => RdmaError::NotSupported {
                dev: dev.clone(),
                what: "device memory (ibv_alloc_dm)",
                why: source.to_string(),
            },
            _ => RdmaError::Verbs { dev: dev.clone(), what: "ibv_alloc_dm", source },
        })?;
        let provider = match nic.place() {
            NicPlace::Pci(b) => Provider::Pci(*b),
            NicPlace::Virtual { .. } => Provider::Host { numa: None },
        };
        Ok(DeviceMemory { dm, provider, dev })
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), RdmaError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.dm.len => Ok(()),
            _ => Err(RdmaError::Invalid(format!(
                "{}: {len} bytes at {offset:#x} run past {:#x} bytes of device memory",
                self.dev, self.dm.len
            ))),
        }
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RdmaError> {
        self.check(offset, data.len())?;
        self.dm.copy_to(offset, data).map_err(|source| RdmaError::Verbs {
            dev: self.dev.clone(),
            what: "ibv_memcpy_to_dm",
            source,
        })
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RdmaError> {
        self.check(offset, buf.len())?;
        self.dm.copy_from(offset, buf).map_err(|source| RdmaError::Verbs {
            dev: self.dev.clone(),
            what: "ibv_memcpy_from_dm",
            source,
        })
    }
}

impl PeerMemory for DeviceMemory {
    fn len(&self) -> u64 {
        self.dm.len
    }
    fn provider(&self) -> Provider {
        self.provider
    }
    fn backing(&self) -> Backing<'_> {
        Backing::OpaqueFd(self.dm.context().cmd_fd())
    }
}

impl Nic {
    /// Registers device memory of this NIC with it (`ibv_reg_dm_mr`, zero-based addressing) and
    /// in `registry`. Device memory of another NIC goes through `register` (and bounces).
    pub fn register_dm(
        &self,
        registry: &Registry,
        dm: Arc<DeviceMemory>,
        access: Access,
    ) -> Result<crate::mr::NicMr, RdmaError> {
        if dm.dev != self.name() {
            return self.register(registry, dm, access);
        }
        // Device memory MRs must be zero-based on every driver that has them.
        let bits = access.bits() | libc_zero_based();
        let mr = self.pd.reg_dm_mr(&dm.dm, 0, dm.dm.len as usize, bits).map_err(self.verbs_err("ibv_reg_dm_mr"))?;
        crate::mr::NicMr::from_parts(self, registry, dm, mr, Method::DeviceMemory, access)
    }
}

/// `IBV_ACCESS_ZERO_BASED`.
fn libc_zero_based() -> u32 {
    sys::access::ZERO_BASED
}
