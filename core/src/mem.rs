//! Memory as the CPU sees it, for every crate of the project: shared mappings (`Mapping`,
//! unmapped on drop), borrowed views of mapped bytes (`MappedSpan`, through which every CPU copy
//! goes, and its `SpanError`), sealed memory files (`sealed_memfd`), the page size, and the
//! physical address behind a virtual one (`virt_to_phys`, `virt_to_phys_many`, at most
//! `PAGEMAP_SPAN` pages apart, failing with `PagemapError`).
//!
//! Owns: the public names of these. Defines nothing itself: the types and calls are made by the
//! crate's private `sys` layer, which owns every `unsafe` block of the core, and are re-exported
//! here unchanged. Backends map shared memory through `Mapping` (sysfs `p2pmem/allocate`,
//! `resourceN`, VFIO regions) instead of calling mmap themselves. Must not: know what a region
//! or a device is.

pub use crate::sys::{
    page_size, sealed_memfd, virt_to_phys, virt_to_phys_many, MappedSpan, Mapping, PagemapError, SpanError,
    PAGEMAP_SPAN,
};
