"""peermem: PCIe peer-to-peer memory from Python.

Topology and verdicts (`Topology`, `why`, `route`), zero-copy buffers (`HostBuffer`,
`VulkanBuffer`: buffer protocol and DLPack; `CudaBuffer`: DLPack on the GPU), a loader that
reads files straight into them (`Loader.read`, `Loader.pread`), record batches for training
(`ShardReader`) and the transfer engine across hosts (`Engine`: RDMA READ/WRITE batches between
registered memories, each a `Transfer`, a `concurrent.futures.Future`). A thin layer over the
Rust crates: everything here is the native module `peermem._native`, re-exported, but `Engine`
and `Transfer` (`_engine.py`: the native engine with its batches as futures).

`peermem.torch` (imported on its own; it imports torch, this module never does) has
`ShardDataset`, a PyTorch `IterableDataset` over `ShardReader`.
"""

from ._native import (
    Batch as Batch,
    CudaBuffer as CudaBuffer,
    Device as Device,
    Future as Future,
    HostBuffer as HostBuffer,
    Loader as Loader,
    NotDirectError as NotDirectError,
    PeerMemError as PeerMemError,
    Report as Report,
    RouteInfo as RouteInfo,
    ShardIter as ShardIter,
    ShardReader as ShardReader,
    Topology as Topology,
    VulkanBuffer as VulkanBuffer,
    Why as Why,
    _Engine as _Engine,
    _Ticket as _Ticket,
    _Watch as _Watch,
    __version__ as __version__,
    _rust_read_batch as _rust_read_batch,
    _rust_shards as _rust_shards,
    cuda_available as cuda_available,
    cufile_status as cufile_status,
    registered_buffers as registered_buffers,
    vulkan_available as vulkan_available,
)
from ._engine import Engine as Engine, Transfer as Transfer

__all__ = [
    "Batch",
    "CudaBuffer",
    "Device",
    "Engine",
    "Future",
    "HostBuffer",
    "Loader",
    "NotDirectError",
    "PeerMemError",
    "Report",
    "RouteInfo",
    "ShardIter",
    "ShardReader",
    "Topology",
    "Transfer",
    "VulkanBuffer",
    "Why",
    "cuda_available",
    "cufile_status",
    "registered_buffers",
    "vulkan_available",
]
