//! Address spaces as types, and the one place where converting between them happens.
//!
//! Owns: `VirtAddr`, `CpuPhys`, `BusAddr`, `Iova`, the generic `AddrRange<A>`, and `BarWindow`,
//! which converts between a BAR's CPU physical range and its PCI bus range using the bus offset
//! (`bus = cpu + bus_offset`, as Linux's `pci_bus_address(bar) - pci_resource_start(bar)`).
//! Must not: read sysfs, know about devices, or expose a bare `u64` address conversion anywhere
//! else. Every arithmetic step is checked; overflow and out-of-window addresses are typed errors.

use std::fmt;
use std::marker::PhantomData;

/// Errors from address arithmetic and translation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("{space} address {base:#x} + {delta:#x} overflows 64 bits")]
    Overflow { space: &'static str, base: u64, delta: u64 },
    #[error("{space} address {addr:#x} lies outside the window {start:#x}..{end:#x}")]
    OutsideWindow { space: &'static str, addr: u64, start: u64, end: u64 },
    #[error("empty {space} range at {start:#x}")]
    EmptyRange { space: &'static str, start: u64 },
    #[error("bus offset {offset} moves {space} address {addr:#x} outside 0..2^64")]
    OffsetOutOfRange { space: &'static str, addr: u64, offset: i128 },
}

/// A typed address. Each address space is its own type; the only way to get a raw number out is
/// `raw()` (for FFI and printing), and the only cross-space conversions are in this module.
pub trait Address: Copy + Ord + fmt::Debug + fmt::LowerHex + Send + Sync + 'static {
    /// Human name of the space, for error messages.
    const SPACE: &'static str;
    fn new(raw: u64) -> Self;
    fn raw(self) -> u64;

    fn checked_add(self, delta: u64) -> Result<Self, AddrError> {
        self.raw().checked_add(delta).map(Self::new).ok_or(AddrError::Overflow {
            space: Self::SPACE,
            base: self.raw(),
            delta,
        })
    }

    /// `self - base`, or `None` if `self < base`.
    fn checked_offset_from(self, base: Self) -> Option<u64> {
        self.raw().checked_sub(base.raw())
    }
}

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $space:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl Address for $name {
            const SPACE: &'static str = $space;
            #[inline]
            fn new(raw: u64) -> Self {
                $name(raw)
            }
            #[inline]
            fn raw(self) -> u64 {
                self.0
            }
        }

        impl $name {
            #[inline]
            pub const fn new(raw: u64) -> Self {
                $name(raw)
            }
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address_type!(
    /// A virtual address in this process.
    VirtAddr,
    "virtual"
);
address_type!(
    /// A CPU physical address (sysfs `resource`, /proc/self/pagemap).
    CpuPhys,
    "CPU physical"
);
address_type!(
    /// A PCI bus address on one host bridge's hierarchy (what a BAR register holds).
    BusAddr,
    "PCI bus"
);
address_type!(
    /// An I/O virtual address in one IOMMU domain.
    Iova,
    "IOVA"
);

impl VirtAddr {
    /// The address of a pointer in this process.
    pub fn from_ptr<T>(p: *const T) -> Self {
        VirtAddr(p as usize as u64)
    }
}

/// What a device programs to reach memory, tagged with the address space it lies in: a PCI bus
/// address (peer-to-peer below a common bridge), a CPU physical address (through the root
/// complex, no IOMMU translation) or an IOVA (through a translating IOMMU).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DmaAddr {
    Bus(BusAddr),
    Phys(CpuPhys),
    Iova(Iova),
}

impl DmaAddr {
    /// The same kind of address `delta` bytes further on (checked).
    pub fn checked_add(self, delta: u64) -> Result<DmaAddr, AddrError> {
        Ok(match self {
            DmaAddr::Bus(a) => DmaAddr::Bus(Address::checked_add(a, delta)?),
            DmaAddr::Phys(a) => DmaAddr::Phys(Address::checked_add(a, delta)?),
            DmaAddr::Iova(a) => DmaAddr::Iova(Address::checked_add(a, delta)?),
        })
    }
    /// The value the device's address field holds (a PRP entry, a descriptor): the one place a
    /// typed DMA address becomes wire bits.
    pub fn device_bits(self) -> u64 {
        match self {
            DmaAddr::Bus(a) => a.raw(),
            DmaAddr::Phys(a) => a.raw(),
            DmaAddr::Iova(a) => a.raw(),
        }
    }
    /// The name of the address space.
    pub fn space(self) -> &'static str {
        match self {
            DmaAddr::Bus(_) => BusAddr::SPACE,
            DmaAddr::Phys(_) => CpuPhys::SPACE,
            DmaAddr::Iova(_) => Iova::SPACE,
        }
    }
}

impl fmt::Display for DmaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:#x}", self.space(), self.device_bits())
    }
}

/// A half-open, non-empty range `[start, start + len)` in one address space.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrRange<A: Address> {
    start: A,
    len: u64,
    _space: PhantomData<A>,
}

impl<A: Address> AddrRange<A> {
    /// A range of `len` bytes at `start`; rejects empty ranges and ranges that wrap past 2^64.
    pub fn new(start: A, len: u64) -> Result<Self, AddrError> {
        if len == 0 {
            return Err(AddrError::EmptyRange { space: A::SPACE, start: start.raw() });
        }
        // The last byte must be representable.
        start.checked_add(len - 1)?;
        Ok(AddrRange { start, len, _space: PhantomData })
    }

    pub fn start(&self) -> A {
        self.start
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: ranges are non-empty by construction (kept for clippy's len-without-is-empty).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The last byte's address (inclusive), never overflows.
    pub fn last(&self) -> A {
        A::new(self.start.raw() + (self.len - 1))
    }
    /// One past the end, as a raw `u128` so a range ending at 2^64 is representable.
    pub fn end_exclusive(&self) -> u128 {
        self.start.raw() as u128 + self.len as u128
    }
    pub fn contains(&self, a: A) -> bool {
        a >= self.start && a <= self.last()
    }
    /// Byte offset of `a` inside the range.
    pub fn offset_of(&self, a: A) -> Result<u64, AddrError> {
        if self.contains(a) {
            Ok(a.raw() - self.start.raw())
        } else {
            Err(self.outside(a.raw()))
        }
    }
    /// The address at byte `offset` of the range.
    pub fn at(&self, offset: u64) -> Result<A, AddrError> {
        if offset < self.len {
            Ok(A::new(self.start.raw() + offset))
        } else {
            Err(AddrError::OutsideWindow {
                space: A::SPACE,
                addr: self.start.raw().saturating_add(offset),
                start: self.start.raw(),
                end: self.last().raw().saturating_add(1),
            })
        }
    }
    /// The sub-range `[offset, offset + len)` of this range.
    pub fn subrange(&self, offset: u64, len: u64) -> Result<Self, AddrError> {
        let s = self.at(offset)?;
        let r = AddrRange::new(s, len)?;
        if r.last() > self.last() {
            return Err(self.outside(r.last().raw()));
        }
        Ok(r)
    }
    pub fn overlaps(&self, other: &Self) -> bool {
        self.start <= other.last() && other.start <= self.last()
    }
    fn outside(&self, addr: u64) -> AddrError {
        AddrError::OutsideWindow {
            space: A::SPACE,
            addr,
            start: self.start.raw(),
            end: self.last().raw().wrapping_add(1),
        }
    }
}

impl<A: Address> fmt::Debug for AddrRange<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{:#x}..={:#x}]", A::SPACE, self.start.raw(), self.last().raw())
    }
}

/// The signed difference `bus - cpu` for one BAR window (Linux's `bus_offset`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BusOffset(i128);

impl BusOffset {
    pub const ZERO: BusOffset = BusOffset(0);
    /// Offset between a BAR's bus start and CPU start.
    pub fn between(cpu: CpuPhys, bus: BusAddr) -> Self {
        BusOffset(bus.raw() as i128 - cpu.raw() as i128)
    }
    pub fn get(self) -> i128 {
        self.0
    }
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for BusOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for BusOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            write!(f, "-{:#x}", self.0.unsigned_abs())
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}

/// A BAR as seen from both sides of the host bridge: its CPU physical range and its bus start.
/// The only CPU<->bus conversion in the crate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BarWindow {
    cpu: AddrRange<CpuPhys>,
    bus: AddrRange<BusAddr>,
}

impl BarWindow {
    /// A window of `len` bytes at CPU `cpu_start` whose bus address is `bus_start`.
    pub fn new(cpu_start: CpuPhys, bus_start: BusAddr, len: u64) -> Result<Self, AddrError> {
        Ok(BarWindow { cpu: AddrRange::new(cpu_start, len)?, bus: AddrRange::new(bus_start, len)? })
    }
    pub fn cpu(&self) -> AddrRange<CpuPhys> {
        self.cpu
    }
    pub fn bus(&self) -> AddrRange<BusAddr> {
        self.bus
    }
    pub fn len(&self) -> u64 {
        self.cpu.len()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn offset(&self) -> BusOffset {
        BusOffset::between(self.cpu.start(), self.bus.start())
    }
    /// The bus address a peer programs to reach CPU physical address `cpu` of this BAR.
    pub fn to_bus(&self, cpu: CpuPhys) -> Result<BusAddr, AddrError> {
        let off = self.cpu.offset_of(cpu)?;
        self.bus.at(off)
    }
    /// The CPU physical address behind bus address `bus` of this BAR.
    pub fn to_cpu(&self, bus: BusAddr) -> Result<CpuPhys, AddrError> {
        let off = self.bus.offset_of(bus)?;
        self.cpu.at(off)
    }
    /// CPU and bus address of byte `offset` into the BAR.
    pub fn at(&self, offset: u64) -> Result<(CpuPhys, BusAddr), AddrError> {
        Ok((self.cpu.at(offset)?, self.bus.at(offset)?))
    }
}

/// Apply a signed offset to an address of one space, producing the other (used when an offset is
/// known from a host-bridge window rather than a BAR, e.g. device-tree `ranges`).
pub fn apply_offset(cpu: CpuPhys, offset: BusOffset) -> Result<BusAddr, AddrError> {
    let v = cpu.raw() as i128 + offset.get();
    u64::try_from(v).map(BusAddr::new).map_err(|_| AddrError::OffsetOutOfRange {
        space: CpuPhys::SPACE,
        addr: cpu.raw(),
        offset: offset.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_rejects_empty_and_wrapping() {
        assert!(matches!(AddrRange::new(CpuPhys::new(0x1000), 0), Err(AddrError::EmptyRange { .. })));
        assert!(matches!(AddrRange::new(CpuPhys::new(u64::MAX), 2), Err(AddrError::Overflow { .. })));
        let r = AddrRange::new(CpuPhys::new(u64::MAX), 1).unwrap();
        assert_eq!(r.last(), CpuPhys::new(u64::MAX));
        assert_eq!(r.end_exclusive(), 1u128 << 64);
    }

    #[test]
    fn range_offsets_and_subranges() {
        let r = AddrRange::new(VirtAddr::new(0x1000), 0x1000).unwrap();
        assert_eq!(r.offset_of(VirtAddr::new(0x1fff)).unwrap(), 0xfff);
        assert!(r.offset_of(VirtAddr::new(0x2000)).is_err());
        assert!(r.offset_of(VirtAddr::new(0xfff)).is_err());
        assert_eq!(r.at(0x10).unwrap(), VirtAddr::new(0x1010));
        assert!(r.at(0x1000).is_err());
        assert!(r.subrange(0x800, 0x800).is_ok());
        assert!(r.subrange(0x800, 0x801).is_err());
        let other = AddrRange::new(VirtAddr::new(0x1fff), 1).unwrap();
        assert!(r.overlaps(&other));
        let apart = AddrRange::new(VirtAddr::new(0x2000), 1).unwrap();
        assert!(!r.overlaps(&apart));
    }

    #[test]
    fn zero_offset_window_is_identity() {
        let w = BarWindow::new(CpuPhys::new(0xfe00_0000), BusAddr::new(0xfe00_0000), 0x4000).unwrap();
        assert!(w.offset().is_zero());
        assert_eq!(w.to_bus(CpuPhys::new(0xfe00_1234)).unwrap(), BusAddr::new(0xfe00_1234));
    }

    #[test]
    fn positive_bus_offset_translates_both_ways() {
        // bus = cpu + 0x1_0000_0000
        let w = BarWindow::new(CpuPhys::new(0x8000_0000), BusAddr::new(0x1_8000_0000), 0x10_0000).unwrap();
        assert_eq!(w.offset().get(), 0x1_0000_0000);
        assert_eq!(w.to_bus(CpuPhys::new(0x8000_0010)).unwrap(), BusAddr::new(0x1_8000_0010));
        assert_eq!(w.to_cpu(BusAddr::new(0x1_8000_0010)).unwrap(), CpuPhys::new(0x8000_0010));
        assert_eq!(format!("{}", w.offset()), "0x100000000");
    }

    #[test]
    fn negative_bus_offset_translates_both_ways() {
        // POWER-like: CPU window high, bus window low.
        let w = BarWindow::new(CpuPhys::new(0x6000_0000_0000), BusAddr::new(0x8000_0000), 0x20_0000).unwrap();
        assert!(w.offset().get() < 0);
        assert_eq!(w.to_bus(CpuPhys::new(0x6000_0000_1000)).unwrap(), BusAddr::new(0x8000_1000));
        assert_eq!(w.to_cpu(BusAddr::new(0x8000_1000)).unwrap(), CpuPhys::new(0x6000_0000_1000));
        assert_eq!(format!("{}", w.offset()), "-0x5fff80000000");
    }

    #[test]
    fn translation_outside_window_is_an_error() {
        let w = BarWindow::new(CpuPhys::new(0x1000), BusAddr::new(0x9000), 0x1000).unwrap();
        assert!(matches!(w.to_bus(CpuPhys::new(0x2000)), Err(AddrError::OutsideWindow { .. })));
        assert!(matches!(w.to_cpu(BusAddr::new(0x1000)), Err(AddrError::OutsideWindow { .. })));
        assert!(w.at(0x1000).is_err());
    }

    #[test]
    fn apply_offset_is_checked() {
        assert_eq!(
            apply_offset(CpuPhys::new(0x1000), BusOffset::between(CpuPhys::new(0x2000), BusAddr::new(0))).unwrap_err(),
            AddrError::OffsetOutOfRange { space: "CPU physical", addr: 0x1000, offset: -0x2000 }
        );
        let off = BusOffset::between(CpuPhys::new(0), BusAddr::new(u64::MAX));
        assert!(apply_offset(CpuPhys::new(1), off).is_err());
        assert_eq!(apply_offset(CpuPhys::new(0), off).unwrap(), BusAddr::new(u64::MAX));
    }
}
