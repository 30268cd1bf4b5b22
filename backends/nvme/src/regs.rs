//! NVMe controller registers (NVMe 1.4 section 3.1): decoding BAR0 into types.
//!
//! Owns: the register offsets, the field layouts of CAP, VS, CC, CSTS, AQA, ASQ, ACQ, CMBLOC,
//! CMBSZ, CMBMSC and CMBSTS, the CMB geometry they describe, and their sanity checks (a
//! controller that stopped answering reads all ones; reserved encodings are garbage). Decoding
//! works on a byte image, so every rule is testable without a device; [`Bar0`] reads the image
//! from a live mapping. Must not: write a register other than through the explicit methods of
//! [`Bar0`], or decide anything about peer-to-peer (the CMB is just a BAR range to the core).
//!
//! NVMe 1.4 semantics measured on QEMU: CMBLOC and CMBSZ read 0 until CMBMSC.CRE is set.

use crate::sys::Mmio;

/// Byte offsets of the registers this module decodes.
pub mod off {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
    pub const CMBLOC: u64 = 0x38;
    pub const CMBSZ: u64 = 0x3c;
    pub const CMBMSC: u64 = 0x50;
    pub const CMBSTS: u64 = 0x58;
    /// First doorbell.
    pub const DOORBELLS: u64 = 0x1000;
}

/// Bytes of BAR0 a register image holds (CAP .. CMBSTS inclusive).
pub const IMAGE_LEN: usize = 0x5c;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    #[error("register image of {len} bytes, need >= {IMAGE_LEN}")]
    ShortImage { len: usize },
    #[error("{reg} reads all ones ({value:#x}): the controller is not answering (surprise removal, or BAR disabled)")]
    AllOnes { reg: &'static str, value: u64 },
    #[error("{reg} = {value:#x}: {why}")]
    Garbage { reg: &'static str, value: u64, why: String },
    #[error("CMB of {size:#x} bytes at offset {offset:#x} of BAR{bir} runs past the BAR's {bar_len:#x} bytes")]
    CmbOutsideBar { bir: u8, offset: u64, size: u64, bar_len: u64 },
    #[error("BAR0 access at {offset:#x}: {why}")]
    Access { offset: u64, why: String },
}

fn bits(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

fn bit(v: u64, b: u32) -> bool {
    (v >> b) & 1 == 1
}

/// CAP: controller capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub raw: u64,
    /// Maximum queue entries supported (already converted from 0's based: >= 2).
    pub mqes: u32,
    /// Contiguous queues required.
    pub cqr: bool,
    /// Worst-case time to become ready / not ready, in milliseconds (CAP.TO x 500 ms).
    pub timeout_ms: u64,
    /// Doorbell stride in bytes (4 << DSTRD).
    pub doorbell_stride: u64,
    pub nssrs: bool,
    /// Command sets supported (bit 0: NVM command set).
    pub css: u8,
    /// Minimum and maximum memory page sizes in bytes (2 ^ (12 + MPS)).
    pub mps_min: u64,
    pub mps_max: u64,
    /// CMBLOC/CMBSZ/CMBMSC supported (NVMe 1.4 CAP.CMBS).
    pub cmbs: bool,
    /// PMRCAP supported.
    pub pmrs: bool,
}

impl Cap {
    pub fn decode(raw: u64) -> Result<Cap, RegError> {
        if raw == u64::MAX {
            return Err(RegError::AllOnes { reg: "CAP", value: raw });
        }
        let garbage = |why: &str| RegError::Garbage { reg: "CAP", value: raw, why: why.to_string() };
        let mqes = bits(raw, 0, 16) as u32 + 1;
        if mqes < 2 {
            return Err(garbage("MQES is 0 (a queue needs at least 2 entries)"));
        }
        let (mps_min, mps_max) = (bits(raw, 48, 4), bits(raw, 52, 4));
        if mps_min > mps_max {
            return Err(garbage(&format!("MPSMIN {mps_min} > MPSMAX {mps_max}")));
        }
        let css = bits(raw, 37, 8) as u8;
        if css == 0 {
            return Err(garbage("CSS is 0: no command set supported"));
        }
        let to = bits(raw, 24, 8);
        if to == 0 {
            return Err(garbage("TO is 0: no ready timeout"));
        }
        Ok(Cap {
            raw,
            mqes,
            cqr: bit(raw, 16),
            timeout_ms: to * 500,
            doorbell_stride: 4u64 << bits(raw, 32, 4),
            nssrs: bit(raw, 36),
            css,
            mps_min: 1u64 << (12 + mps_min),
            mps_max: 1u64 << (12 + mps_max),
            pmrs: bit(raw, 56),
            cmbs: bit(raw, 57),
        })
    }
}

/// VS: the NVMe version the controller implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u8,
    pub tertiary: u8,
}

impl Version {
    pub fn decode(raw: u32) -> Result<Version, RegError> {
        if raw == u32::MAX {
            return Err(RegError::AllOnes { reg: "VS", value: raw as u64 });
        }
        let v = Version { major: (raw >> 16) as u16, minor: (raw >> 8) as u8, tertiary: raw as u8 };
        if v.major == 0 || v.major > 9 {
            return Err(RegError::Garbage { reg: "VS", value: raw as u64, why: format!("major version {}", v.major) });
        }
        Ok(v)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.tertiary)
    }
}

/// CC: controller configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc {
    pub en: bool,
    /// I/O command set selected.
    pub css: u8,
    /// Memory page size exponent: page = 2 ^ (12 + mps).
    pub mps: u8,
    /// Arbitration mechanism.
    pub ams: u8,
    /// Shutdown notification.
    pub shn: u8,
    /// I/O submission/completion queue entry sizes as log2 bytes (6 = 64, 4 = 16).
    pub iosqes: u8,
    pub iocqes: u8,
}

impl Cc {
    pub fn decode(raw: u32) -> Cc {
        let r = raw as u64;
        Cc {
            en: bit(r, 0),
            css: bits(r, 4, 3) as u8,
            mps: bits(r, 7, 4) as u8,
            ams: bits(r, 11, 3) as u8,
            shn: bits(r, 14, 2) as u8,
            iosqes: bits(r, 16, 4) as u8,
            iocqes: bits(r, 20, 4) as u8,
        }
    }
    pub fn encode(&self) -> u32 {
        (self.en as u32)
            | ((self.css as u32 & 7) << 4)
            | ((self.mps as u32 & 0xf) << 7)
            | ((self.ams as u32 & 7) << 11)
            | ((self.shn as u32 & 3) << 14)
            | ((self.iosqes as u32 & 0xf) << 16)
            | ((self.iocqes as u32 & 0xf) << 20)
    }
}

/// CSTS: controller status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csts {
    pub rdy: bool,
    /// Controller fatal status.
    pub cfs: bool,
    pub shst: u8,
    pub nssro: bool,
    pub pp: bool,
}

impl Csts {
    pub fn decode(raw: u32) -> Result<Csts, RegError> {
        if raw == u32::MAX {
            return Err(RegError::AllOnes { reg: "CSTS", value: raw as u64 });
        }
        let r = raw as u64;
        Ok(Csts { rdy: bit(r, 0), cfs: bit(r, 1), shst: bits(r, 2, 2) as u8, nssro: bit(r, 4), pp: bit(r, 5) })
    }
}

/// AQA: admin queue sizes (entries, converted from 0's based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aqa {
    pub asqs: u32,
    pub acqs: u32,
}

impl Aqa {
    pub fn decode(raw: u32) -> Aqa {
        Aqa { asqs: (raw & 0xfff) + 1, acqs: ((raw >> 16) & 0xfff) + 1 }
    }
    pub fn encode(&self) -> u32 {
        (self.asqs.saturating_sub(1) & 0xfff) | ((self.acqs.saturating_sub(1) & 0xfff) << 16)
    }
}

/// What the CMB may hold (CMBSZ capability bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmbCaps {
    /// Submission queues.
    pub sqs: bool,
    /// Completion queues.
    pub cqs: bool,
    /// PRP/SGL lists.
    pub lists: bool,
    /// Read data (the controller writes read data into it).
    pub rds: bool,
    /// Write data (the controller fetches write data from it).
    pub wds: bool,
}

/// CMBLOC: where the CMB sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmbloc {
    pub raw: u32,
    /// BAR indicator register: which BAR holds the CMB (0, 2, 3, 4 or 5).
    pub bir: u8,
    /// Offset in CMBSZ size units.
    pub ofst: u32,
}

impl Cmbloc {
    pub fn decode(raw: u32) -> Result<Cmbloc, RegError> {
        if raw == u32::MAX {
            return Err(RegError::AllOnes { reg: "CMBLOC", value: raw as u64 });
        }
        let bir = (raw & 7) as u8;
        if bir == 1 || bir > 5 {
            return Err(RegError::Garbage {
                reg: "CMBLOC",
                value: raw as u64,
                why: format!("BIR {bir} is reserved (BAR0/1 is the 64-bit register BAR; valid: 0, 2-5)"),
            });
        }
        Ok(Cmbloc { raw, bir, ofst: raw >> 12 })
    }
}

/// CMBSZ: how big the CMB is and what it supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmbsz {
    pub raw: u32,
    pub caps: CmbCaps,
    /// Size unit in bytes (4 KiB x 16^SZU).
    pub unit: u64,
    /// Size in units.
    pub sz: u32,
}

impl Cmbsz {
    pub fn decode(raw: u32) -> Result<Cmbsz, RegError> {
        if raw == u32::MAX {
            return Err(RegError::AllOnes { reg: "CMBSZ", value: raw as u64 });
        }
        let r = raw as u64;
        let szu = bits(r, 8, 4);
        if szu > 6 {
            return Err(RegError::Garbage {
                reg: "CMBSZ",
                value: r,
                why: format!("SZU {szu} is reserved (0-6: 4 KiB .. 64 GiB units)"),
            });
        }
        Ok(Cmbsz {
            raw,
            caps: CmbCaps { sqs: bit(r, 0), cqs: bit(r, 1), lists: bit(r, 2), rds: bit(r, 3), wds: bit(r, 4) },
            unit: 4096u64 << (4 * szu),
            sz: raw >> 12,
        })
    }
    /// Size in bytes.
    pub fn bytes(&self) -> Option<u64> {
        self.unit.checked_mul(self.sz as u64)
    }
}

/// CMBMSC: CMB memory space control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmbmsc {
    pub raw: u64,
    /// Capabilities registers enabled (CMBLOC/CMBSZ read their values only when set).
    pub cre: bool,
    /// Controller memory space enable (the CMB also answers at CBA in the controller's space).
    pub cmse: bool,
    /// Controller base address.
    pub cba: u64,
}

impl Cmbmsc {
    pub fn decode(raw: u64) -> Cmbmsc {
        Cmbmsc { raw, cre: bit(raw, 0), cmse: bit(raw, 1), cba: raw & !0xfff }
    }
}

/// CMBSTS: CMB status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmbsts {
    /// Controller base address invalid.
    pub cbai: bool,
}

impl Cmbsts {
    pub fn decode(raw: u32) -> Cmbsts {
        Cmbsts { cbai: raw & 1 == 1 }
    }
}

/// Where the controller memory buffer is, decoded from CMBLOC/CMBSZ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmb {
    pub bir: u8,
    /// Byte offset inside BAR `bir`.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    pub caps: CmbCaps,
}

impl Cmb {
    /// Checks the CMB lies inside its BAR of `bar_len` bytes.
    pub fn check_within(&self, bar_len: u64) -> Result<(), RegError> {
        match self.offset.checked_add(self.size) {
            Some(end) if end <= bar_len => Ok(()),
            _ => Err(RegError::CmbOutsideBar { bir: self.bir, offset: self.offset, size: self.size, bar_len }),
        }
    }
}

/// The CMB as the registers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmbState {
    /// CAP.CMBS clear and CMBSZ 0: the controller has no CMB.
    Absent,
    /// CAP.CMBS set but CMBMSC.CRE clear: CMBLOC/CMBSZ read 0 until CRE is set (NVMe 1.4).
    NotEnabled,
    Present(Cmb),
}

/// A decoded register image of BAR0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registers {
    pub cap: Cap,
    pub vs: Version,
    pub cc: Cc,
    pub csts: Csts,
    pub aqa: Aqa,
    pub asq: u64,
    pub acq: u64,
    pub cmbloc: u32,
    pub cmbsz: u32,
    pub cmbmsc: Cmbmsc,
    pub cmbsts: Cmbsts,
}

fn le32(b: &[u8], o: u64) -> u32 {
    let o = o as usize;
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: u64) -> u64 {
    le32(b, o) as u64 | ((le32(b, o + 4) as u64) << 32)
}

impl Registers {
    /// Decodes the first [`IMAGE_LEN`] bytes of BAR0 (little endian, as the device presents them).
    pub fn decode(image: &[u8]) -> Result<Registers, RegError> {
        if image.len() < IMAGE_LEN {
            return Err(RegError::ShortImage { len: image.len() });
        }
        Ok(Registers {
            cap: Cap::decode(le64(image, off::CAP))?,
            vs: Version::decode(le32(image, off::VS))?,
            cc: Cc::decode(le32(image, off::CC)),
            csts: Csts::decode(le32(image, off::CSTS))?,
            aqa: Aqa::decode(le32(image, off::AQA)),
            asq: le64(image, off::ASQ),
            acq: le64(image, off::ACQ),
            cmbloc: le32(image, off::CMBLOC),
            cmbsz: le32(image, off::CMBSZ),
            cmbmsc: Cmbmsc::decode(le64(image, off::CMBMSC)),
            cmbsts: Cmbsts::decode(le32(image, off::CMBSTS)),
        })
    }

    /// The CMB as CMBLOC/CMBSZ describe it (not yet checked against the BAR's length).
    pub fn cmb(&self) -> Result<CmbState, RegError> {
        if self.cmbsz == 0 {
            return Ok(if self.cap.cmbs && !self.cmbmsc.cre { CmbState::NotEnabled } else { CmbState::Absent });
        }
        let loc = Cmbloc::decode(self.cmbloc)?;
        let sz = Cmbsz::decode(self.cmbsz)?;
        let garbage = |why: String| RegError::Garbage { reg: "CMBSZ", value: self.cmbsz as u64, why };
        if sz.sz == 0 {
            return Err(garbage("SZ is 0 but other fields are set".into()));
        }
        let size = sz.bytes().ok_or_else(|| garbage("size overflows 64 bits".into()))?;
        let offset = sz.unit.checked_mul(loc.ofst as u64).ok_or_else(|| RegError::Garbage {
            reg: "CMBLOC",
            value: self.cmbloc as u64,
            why: "offset overflows 64 bits".into(),
        })?;
        if offset.checked_add(size).is_none() {
            return Err(RegError::CmbOutsideBar { bir: loc.bir, offset, size, bar_len: u64::MAX });
        }
        Ok(CmbState::Present(Cmb { bir: loc.bir, offset, size, caps: sz.caps }))
    }
}

/// BAR0 of a controller through some MMIO window (sysfs `resource0` or a VFIO region).
pub struct Bar0<M: Mmio> {
    mmio: M,
}

impl<M: Mmio> std::fmt::Debug for Bar0<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bar0").field("len", &self.mmio.len()).finish()
    }
}

impl<M: Mmio> Bar0<M> {
    pub fn new(mmio: M) -> Result<Bar0<M>, RegError> {
        if (mmio.len() as usize) < IMAGE_LEN {
            return Err(RegError::Access { offset: 0, why: format!("BAR0 window of {} bytes", mmio.len()) });
        }
        Ok(Bar0 { mmio })
    }
    pub fn mmio(&self) -> &M {
        &self.mmio
    }
    pub fn read32(&self, offset: u64) -> Result<u32, RegError> {
        self.mmio.read32(offset).map_err(|why| RegError::Access { offset, why })
    }
    pub fn write32(&self, offset: u64, v: u32) -> Result<(), RegError> {
        self.mmio.write32(offset, v).map_err(|why| RegError::Access { offset, why })
    }
    /// 64-bit register as two 32-bit accesses, low dword first.
    pub fn read64(&self, offset: u64) -> Result<u64, RegError> {
        Ok(self.read32(offset)? as u64 | ((self.read32(offset + 4)? as u64) << 32))
    }
    pub fn write64(&self, offset: u64, v: u64) -> Result<(), RegError> {
        self.write32(offset, v as u32)?;
        self.write32(offset + 4, (v >> 32) as u32)
    }
    /// The register image, read with aligned 32-bit accesses.
    pub fn image(&self) -> Result<[u8; IMAGE_LEN], RegError> {
        let mut img = [0u8; IMAGE_LEN];
        for o in (0..IMAGE_LEN).step_by(4) {
            img[o..o + 4].copy_from_slice(&self.read32(o as u64)?.to_le_bytes());
        }
        Ok(img)
    }
    pub fn registers(&self) -> Result<Registers, RegError> {
        Registers::decode(&self.image()?)
    }
    pub fn csts(&self) -> Result<Csts, RegError> {
        Csts::decode(self.read32(off::CSTS)?)
    }
    /// Sets CMBMSC.CRE (keeping CMSE and CBA as they are) so CMBLOC/CMBSZ read their values.
    pub fn enable_cmb_registers(&self) -> Result<(), RegError> {
        let lo = self.read32(off::CMBMSC)?;
        if lo & 1 == 0 {
            self.write32(off::CMBMSC, lo | 1)?;
            tracing::debug!("CMBMSC.CRE set");
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A QEMU 10 `nvme,cmb_size_mb=64` register image after the kernel driver enabled it.
    pub(crate) fn qemu_image() -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        let put32 = |b: &mut Vec<u8>, o: u64, v: u32| b[o as usize..o as usize + 4].copy_from_slice(&v.to_le_bytes());
        // CAP: MQES 0x7ff, CQR, TO 0x0f, DSTRD 0, CSS NVM+other (0x41), MPSMIN 0 MPSMAX 4, CMBS.
        let cap: u64 = 0x7ff | (1 << 16) | (0x0f << 24) | (0x41 << 37) | (4u64 << 52) | (1 << 57);
        put32(&mut b, off::CAP, cap as u32);
        put32(&mut b, off::CAP + 4, (cap >> 32) as u32);
        put32(&mut b, off::VS, 0x0001_0400);
        put32(&mut b, off::CC, 0x0046_0001);
        put32(&mut b, off::CSTS, 1);
        put32(&mut b, off::AQA, 0x001f_001f);
        put32(&mut b, off::ASQ, 0x1234_5000);
        put32(&mut b, off::ACQ, 0x1234_6000);
        put32(&mut b, off::CMBLOC, 2);
        put32(&mut b, off::CMBSZ, (64 << 12) | (2 << 8) | 0x1d);
        put32(&mut b, off::CMBMSC, 1);
        b
    }

    fn set32(b: &mut [u8], o: u64, v: u32) {
        b[o as usize..o as usize + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn qemu_registers_decode_to_types() {
        let r = Registers::decode(&qemu_image()).unwrap();
        assert_eq!(r.cap.mqes, 0x800);
        assert!(r.cap.cqr && r.cap.cmbs);
        assert_eq!(r.cap.timeout_ms, 7500);
        assert_eq!(r.cap.doorbell_stride, 4);
        assert_eq!((r.cap.mps_min, r.cap.mps_max), (4096, 65536));
        assert_eq!(r.vs, Version { major: 1, minor: 4, tertiary: 0 });
        assert_eq!(r.vs.to_string(), "1.4.0");
        assert!(r.cc.en);
        assert_eq!((r.cc.iosqes, r.cc.iocqes, r.cc.mps), (6, 4, 0));
        assert_eq!(Cc::decode(r.cc.encode()), r.cc);
        assert!(r.csts.rdy && !r.csts.cfs);
        assert_eq!(r.aqa, Aqa { asqs: 32, acqs: 32 });
        assert_eq!(Aqa::decode(r.aqa.encode()), r.aqa);
        assert_eq!((r.asq, r.acq), (0x1234_5000, 0x1234_6000));
        assert!(r.cmbmsc.cre && !r.cmbmsc.cmse);
        let CmbState::Present(cmb) = r.cmb().unwrap() else { panic!("no CMB") };
        assert_eq!(
            cmb,
            Cmb {
                bir: 2,
                offset: 0,
                size: 64 << 20,
                caps: CmbCaps { sqs: true, cqs: false, lists: true, rds: true, wds: true }
            }
        );
        cmb.check_within(64 << 20).unwrap();
    }

    #[test]
    fn cmb_registers_read_zero_until_cre_is_set() {
        let mut img = qemu_image();
        set32(&mut img, off::CMBLOC, 0);
        set32(&mut img, off::CMBSZ, 0);
        set32(&mut img, off::CMBMSC, 0);
        assert_eq!(Registers::decode(&img).unwrap().cmb().unwrap(), CmbState::NotEnabled);
        // Without CAP.CMBS there is simply no CMB.
        let cap = le64(&img, 0) & !(1 << 57);
        set32(&mut img, 0, cap as u32);
        set32(&mut img, 4, (cap >> 32) as u32);
        assert_eq!(Registers::decode(&img).unwrap().cmb().unwrap(), CmbState::Absent);
    }

    #[test]
    fn a_controller_reading_all_ones_is_not_answering() {
        let img = vec![0xffu8; IMAGE_LEN];
        assert!(matches!(Registers::decode(&img), Err(RegError::AllOnes { reg: "CAP", .. })));
        let mut img = qemu_image();
        set32(&mut img, off::CSTS, u32::MAX);
        assert!(matches!(Registers::decode(&img), Err(RegError::AllOnes { reg: "CSTS", .. })));
    }

    #[test]
    fn garbage_registers_are_typed_errors() {
        assert!(matches!(Registers::decode(&[0u8; 16]), Err(RegError::ShortImage { len: 16 })));
        // All zeroes: MQES 0.
        assert!(matches!(Registers::decode(&[0u8; IMAGE_LEN]), Err(RegError::Garbage { reg: "CAP", .. })));
        // MPSMIN > MPSMAX.
        let bad = (0x7ffu64) | (0x0f << 24) | (1 << 37) | (5u64 << 48) | (2u64 << 52);
        assert!(matches!(Cap::decode(bad), Err(RegError::Garbage { reg: "CAP", .. })));
        // Version 0.
        let mut img = qemu_image();
        set32(&mut img, off::VS, 0x0000_0102);
        assert!(matches!(Registers::decode(&img), Err(RegError::Garbage { reg: "VS", .. })));
        // Reserved BIR 1 and 7, reserved SZU 7, SZ 0 with caps set.
        for (loc, sz) in
            [(1u32, (64 << 12) | (2 << 8)), (7, (64 << 12) | (2 << 8)), (2, (64 << 12) | (7 << 8)), (2, 0x1f)]
        {
            let mut img = qemu_image();
            set32(&mut img, off::CMBLOC, loc);
            set32(&mut img, off::CMBSZ, sz);
            let r = Registers::decode(&img).unwrap();
            assert!(matches!(r.cmb(), Err(RegError::Garbage { .. })), "CMBLOC {loc:#x} CMBSZ {sz:#x}: {:?}", r.cmb());
        }
    }

    #[test]
    fn a_cmb_pointing_outside_its_bar_is_refused() {
        let mut img = qemu_image();
        // 64 MiB at offset 1 MiB (OFST 1 in 1 MiB units) of a 64 MiB BAR.
        set32(&mut img, off::CMBLOC, (1 << 12) | 2);
        let CmbState::Present(cmb) = Registers::decode(&img).unwrap().cmb().unwrap() else { panic!() };
        assert_eq!(cmb.offset, 1 << 20);
        assert_eq!(
            cmb.check_within(64 << 20),
            Err(RegError::CmbOutsideBar { bir: 2, offset: 1 << 20, size: 64 << 20, bar_len: 64 << 20 })
        );
        // Largest unit and offset (2^56 bytes at 2^56): decodes, and fits no BAR.
        set32(&mut img, off::CMBLOC, 0xffff_f002);
        set32(&mut img, off::CMBSZ, 0xffff_f61f);
        let CmbState::Present(huge) = Registers::decode(&img).unwrap().cmb().unwrap() else { panic!() };
        assert!(matches!(huge.check_within(1 << 40), Err(RegError::CmbOutsideBar { .. })));
    }
}
