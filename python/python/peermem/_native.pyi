"""peermem._native: the extension module `import peermem` re-exports.

Topology and verdicts (`Topology`, `why`, `route`), zero-copy buffers (`HostBuffer`,
`VulkanBuffer`: buffer protocol and DLPack), a loader that reads files straight into them
(`Loader.read`, `Loader.pread`), record batches (`ShardReader`) and the transfer engine
(`_Engine`, `_Ticket`, `_Watch`: `peermem.Engine` and its `Transfer` futures are built on them
in `_engine.py`). A thin layer over the Rust crates.
"""

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from typing_extensions import Buffer

__version__: str

_Path = Union[str, "os.PathLike[str]"]

class PeerMemError(Exception):
    """A failure of the Rust library; the message is the Rust error's."""

class NotDirectError(PeerMemError):
    """A strict load could not move the bytes directly."""

    reasons: List[str]
    """Every reason: the route's, then the loader's plan."""

class Device:
    """One PCI function."""

    bdf: str
    """`dddd:bb:dd.f`."""
    vendor: int
    device: int
    class_code: int
    """The 24-bit class code (class, subclass, programming interface)."""
    vendor_name: Optional[str]
    """Vendor name from the system's pci.ids (`PEERMEM_PCI_IDS` overrides); None when unknown."""
    device_name: Optional[str]
    """Device name from the system's pci.ids; None when unknown."""
    label: Optional[str]
    """The label `peermem topo` prints: `GPU0`, `NIC0`, `NVME0`, `STOR0`, `ACC0` in PCI bus
    order (`PCIn` for other functions)."""
    numa_node: Optional[int]
    upstream: Optional[str]
    """The BDF of the bridge above; None on a root bus."""
    host_bridge: str
    """`pci<domain>:<bus>`."""

class Why:
    """The kernel's P2PDMA verdict for a (provider, client) pair."""

    provider: str
    client: str
    map_type: str
    """`bus_addr`, `host_bridge` or `not_supported`."""
    distance: int
    path: str
    """`PIX`, `PXB`, `PHB` or `SYS`."""
    acs_redirect: List[str]
    """Devices with ACS redirect on the path."""
    reasons: List[str]
    fix: Optional[str]
    """The kernel parameter that removes the ACS redirects (`pci=disable_acs_redir=...`)."""

class RouteInfo:
    """What a client programs to reach a byte of a provider's BAR."""

    route: str
    """`bus_addr`, `host_bridge`, `iommu`, `kernel_import`, `cpu_mapped` or `bounce`."""
    dma_address: Optional[int]
    """The address the client programs; None when the route has none."""
    reasons: List[str]

class Topology:
    """The PCI topology of a sysroot: the live system (`root=None`), a captured directory, or a
    capture archive (`.tar`, `.tar.gz`, `.tar.bz2`, `.tar.xz`).

    Raises `PeerMemError` when `root` is not a sysroot.
    """

    def __init__(self, root: Optional[_Path] = None) -> None: ...
    @property
    def devices(self) -> List[Device]:
        """Every PCI function, in BDF order."""
    def why(self, provider: str, client: str) -> Why:
        """The verdict for `provider` -> `client`. `ValueError` names a bad or unknown BDF."""
    def route(self, provider: str, bar: int, offset: int, client: str) -> RouteInfo:
        """The route `client` takes to byte `offset` of memory BAR `bar` of `provider`.

        `ValueError` for a bad BDF, a missing or I/O BAR, or an offset past the BAR's end.
        """

class HostBuffer:
    """Page-aligned, zero-filled host memory registered in the package's registry.

    `memoryview(buf)`, `numpy.asarray(buf)` and `numpy.from_dlpack(buf)` share its bytes (zero
    copy). `ValueError` for `nbytes == 0`.
    """

    def __init__(self, nbytes: int) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def data_ptr(self) -> Optional[int]:
        """The CPU address of the first byte."""
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any:
        """A DLPack capsule (1-D uint8 on the CPU; versioned and writable for DLPack >= 1.0)."""
    def __dlpack_device__(self) -> Tuple[int, int]:
        """`(1, 0)`: the CPU."""

class VulkanBuffer:
    """A Vulkan buffer registered in the package's registry (needs a Vulkan device: see
    `vulkan_available()`). Host-visible memory (`device_local=False`) supports the buffer
    protocol and DLPack as CPU memory, zero copy."""

    def __init__(self, nbytes: int, device_local: bool = False) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def host_visible(self) -> bool: ...
    @property
    def data_ptr(self) -> Optional[int]: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

class CudaBuffer:
    """CUDA device memory registered in the package's registry (needs an NVIDIA driver: see
    `cuda_available()`). DLPack only (on `(kDLCUDA, device)`, zero copy); `read` copies back."""

    def __init__(self, nbytes: int, device: Union[int, str, None] = None) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def data_ptr(self) -> int: ...
    @property
    def dma_buf(self) -> bool: ...
    @property
    def dma_buf_reason(self) -> Optional[str]: ...
    @property
    def notes(self) -> List[str]: ...
    def read(self, offset: int = 0, size: Optional[int] = None) -> bytes: ...
    def __len__(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

class Report:
    """What one load (or one batch of reads) did."""

    bytes: int
    seconds: float
    """Wall time of the copy (verification excluded)."""
    mb_per_s: float
    route: str
    """The registry's route kind for (destination, the device reading the source)."""
    method: str
    """How the bytes moved, in words."""
    direct: bool
    """True when every destination was planned direct (the reading device wrote its pages);
    pieces O_DIRECT cannot take (unaligned edges, a short tail) still went through staging, as
    `bytes_staged` says."""
    bytes_direct: int
    """Bytes the reading device wrote straight into the destinations."""
    bytes_staged: int
    """Bytes that went through staging buffers."""
    reasons: List[str]
    """The route's and the planner's reasons, then every fallback the loader took."""
    source: str
    """The first destination's source as opened: path, O_DIRECT or buffered, and the PCI
    device that reads it (or why the CPU does)."""
    io: List[str]
    """How each source was read and why, once per source: `path: O_DIRECT: why` or
    `path: buffered: why` (through the page cache)."""
    checksum: Optional[int]
    """xxh3-64 of the first read's destination bytes (`verify=True`; None otherwise)."""
    source_checksum: Optional[int]
    """xxh3-64 of the first read's source range, read a second time (`verify=True`)."""

class Future:
    """A pending `Loader.pread` or `Loader.pread_batch`: holds the Rust loader's ticket."""

    def done(self) -> bool:
        """True when the load finished (successfully or not)."""
    def result(self, timeout: Optional[float] = None) -> Report:
        """The load's report, or its exception. `TimeoutError` after `timeout` seconds (the load
        goes on); `None` waits as long as the loader's own bound on a batch (then
        `PeerMemError`). The GIL is released while waiting."""

_Out = Union[HostBuffer, VulkanBuffer, Buffer]

class Loader:
    """Loads byte ranges of files and block devices into buffers: directly (O_DIRECT into the
    destination's pages) when the route allows, else through the loader's staging buffers
    (unaligned destinations included). One asynchronous Rust loader per `Loader`: loads are
    queued and run in order, each with `depth` requests in flight.

    `strict`: raise `NotDirectError` (with `reasons`) instead of bouncing, before any byte is
    written. `verify`: hash the destination and re-read the source to compare. `chunk`: bytes per
    request (a multiple of 4096). `depth`: requests in flight. `workers`: accepted for
    compatibility (1 to 1024), unused: the loader's one I/O engine serves every load. `io`:
    `"direct"` (O_DIRECT), `"buffered"` (through the page cache) or `"auto"` (the default: the
    page cache when the files of a batch are mostly cached or fit in half of the memory this
    process may take, read ahead then; O_DIRECT otherwise; `Report.io` says which and why).
    Every setting starts from its `PEERMEM_*` variable (`PEERMEM_STRICT`, `PEERMEM_VERIFY`,
    `PEERMEM_CHUNK`, `PEERMEM_DEPTH`, `PEERMEM_ENGINE`, ...; a malformed one is a `ValueError`
    naming it); an argument given (not None) wins.
    """

    def __init__(
        self,
        strict: Optional[bool] = None,
        verify: Optional[bool] = None,
        chunk: Optional[int] = None,
        depth: Optional[int] = None,
        workers: Optional[int] = None,
        io: Optional[str] = None,
    ) -> None: ...
    def read(self, path: _Path, out: _Out, offset: int = 0, size: Optional[int] = None, out_offset: int = 0) -> Report:
        """Loads `size` bytes (default: to the end) at `offset` of `path` into `out` at
        `out_offset`, with the GIL released while bytes move. `out`: a `HostBuffer`, a
        `VulkanBuffer`, or any writable C-contiguous buffer (numpy array, bytearray).

        Raises `FileNotFoundError` (missing file), `ValueError` (range past the end, `out` too
        small or read-only, not a regular file or block device), `TypeError` (`out` is not a
        buffer), `NotDirectError` (strict), `PeerMemError` (anything else).
        """
    def pread(self, path: _Path, out: _Out, offset: int = 0, size: Optional[int] = None, out_offset: int = 0) -> Future:
        """As `read`, submitted to the loader's queue; file and range errors surface at
        `Future.result()` (argument errors about `out` at once)."""
    def read_batch(self, reads: Iterable[Tuple[Any, ...]]) -> Report:
        """Many reads as one batch, all in flight together (`depth` requests deep): `reads` are
        `(path, out, offset=0, size=None, out_offset=0)` tuples. One report for the batch."""
    def pread_batch(self, reads: Iterable[Tuple[Any, ...]]) -> Future:
        """As `read_batch`, returning a `Future` at once."""
    def close(self) -> None:
        """Waits for queued loads (each bounded), then stops the loader's thread."""
    def __enter__(self) -> "Loader": ...
    def __exit__(self, *args: Any) -> bool: ...

def registered_buffers() -> int:
    """Regions in the package's registry: live buffers and destinations of loads in flight."""

def cuda_available() -> bool:
    """True when CUDA device 0 can be opened (an NVIDIA driver and a GPU)."""
    ...

def vulkan_available() -> bool:
    """True when a Vulkan device can be opened (lavapipe counts)."""

class Batch:
    """One batch of a `ShardReader`: a `(rows, record_size)` uint8 array through the buffer
    protocol (`numpy.asarray(batch)`) and DLPack (`numpy.from_dlpack`, `torch.from_dlpack`),
    zero copy. Rows start 4096-byte aligned, `stride` bytes apart (a strided view when the record
    is not a multiple of 4096). Its buffer returns to the reader's ring when the batch and its
    views are gone."""

    @property
    def indices(self) -> List[int]:
        """The global record indices of the rows, in order."""
    @property
    def shape(self) -> Tuple[int, ...]:
        """`(rows, record_size)`, or `(nbytes,)` for variable-size records."""
    @property
    def offsets(self) -> List[int]:
        """Where each record starts in the batch's bytes."""
    @property
    def lengths(self) -> List[int]:
        """Each record's length in bytes."""
    @property
    def stride(self) -> int:
        """Bytes from one row to the next."""
    @property
    def epoch(self) -> int: ...
    @property
    def direct(self) -> bool:
        """True when every byte went straight into the batch's buffer."""
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

class ShardIter:
    """The batches of one epoch, `prefetch` batches in flight. A later `iter()` of the same
    reader restarts the epoch and ends this iterator."""

    def __iter__(self) -> "ShardIter": ...
    def __next__(self) -> Batch:
        """The next batch; raises the load's error (`PeerMemError`; also when every ring buffer
        is held by a batch the caller keeps: the message says to drop one or to raise `ring`)."""

class ShardReader:
    """Batches of fixed-size records from `files` (in order, concatenated) for data-parallel
    training. Each epoch orders the records (shuffled by `(seed, epoch)` when `shuffle`, the same
    order on every rank), and rank `rank` of `world_size` reads every `world_size`-th of them, as
    `DistributedSampler` does: with `pad=True` (the default) the order is first padded by
    wrapping around to a multiple of `world_size`, so every rank reads the same number of records
    (a few records twice); `drop_last=True` drops the tail instead (a few records not at all);
    `pad=False` (and `drop_last=False`) neither pads nor drops: every record exactly once, and the
    first `num_records % world_size` ranks read one record more (their step counts can differ:
    DDP would wait on the others). The last batch may be short.

    `worker` of `workers`: this reader reads batches `worker, worker + workers, ...` of the
    rank's batches (DataLoader workers; `peermem.torch.ShardDataset` sets them).

    Variable-size records: `index` (instead of `record_size`) lists them as `(file number,
    offset, length)`; each batch is then a 1-D uint8 array with record `i` at `batch.offsets[i]`,
    `batch.lengths[i]` bytes long. Every file must hold at least one byte (an empty file is a
    `ValueError` naming it).

    The Rust `peermem_loader::ShardReader` does the work: `prefetch` batches in flight, a ring of
    `ring` host buffers (default `prefetch + 2`: the caller may hold two batches while the next
    load; to hold N, e.g. for gradient accumulation over N steps, `ring >= prefetch + N`; asking
    for a batch while holding all `ring` raises `PeerMemError`), `depth` read requests in flight.
    The loader's settings start from the `PEERMEM_*` variables (a malformed one is a `ValueError`
    naming it); `depth` wins over `PEERMEM_DEPTH`, `io` over `PEERMEM_IO`. `io` (as for `Loader`;
    `"auto"` by default) judges the files together when the reader opens them: a data set that
    fits in half of the memory this process may take (or is mostly cached already) is read
    through the page cache, read ahead in the background, so later epochs come from memory; a
    larger one with O_DIRECT. `device="cuda:N"`: the ring lives in that GPU's memory, filled
    through pinned staging and CUDA copies; each batch is a DLPack tensor on `(kDLCUDA, N)`
    (`torch.from_dlpack(batch)` is on the GPU, zero copy) without the buffer protocol.

    Errors name the argument and the rule broken: `TypeError` (`files must be a list of paths,
    not a str`, `batch_size must be an int, not str`), `ValueError` (`rank must be >= 0 and <
    world_size (got -1)`, `world_size must be >= 1 (got 0)`), `FileNotFoundError`.
    """

    epoch: int
    def __init__(
        self,
        files: Iterable[_Path],
        record_size: Optional[int] = None,
        index: Optional[List[Tuple[int, int, int]]] = None,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        epoch: int = 0,
        ring: Optional[int] = None,
        depth: Optional[int] = None,
        drop_last: bool = False,
        pad: bool = True,
        worker: int = 0,
        workers: int = 1,
        io: Optional[str] = None,
        device: Union[int, str, None] = None,
    ) -> None: ...
    @property
    def num_records(self) -> int:
        """Records in all files."""
    @property
    def num_batches(self) -> int:
        """Batches this reader yields per epoch (its rank's; with `workers`, its worker's share):
        the same on every rank unless `pad=False`."""
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (changes the shuffle)."""
    def __len__(self) -> int:
        """Records this reader (rank, worker) reads per epoch."""
    def __iter__(self) -> ShardIter: ...
    def close(self) -> None:
        """Lets go of the ring and the loader thread (once no iterator holds them); a later
        `iter()` raises `PeerMemError`."""
    def __enter__(self) -> "ShardReader": ...
    def __exit__(self, *args: Any) -> bool: ...

def _rust_read_batch(
    path: _Path, out: _Out, reads: List[Tuple[int, int, int]], chunk: Optional[int] = None, depth: Optional[int] = None
) -> float:
    """Benchmark baseline: `reads` as one batch of a Rust loader; the seconds of the timed part."""

def _rust_shards(
    files: List[_Path],
    record_size: int,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    prefetch: int = 2,
    depth: Optional[int] = None,
) -> float:
    """Benchmark baseline: one epoch of a Rust `ShardReader`; the seconds of the timed part."""

_Bytes = Union[bytes, bytearray, memoryview]
_Request = Tuple[int, int, int, int, int]
"""`(local_id, local_offset, remote_id, remote_offset, length)`."""

class _Ticket:
    """A batch posted by `_Engine.read` or `_Engine.write`; `peermem.Transfer` is its future.
    Holds the batch's memory (in Rust) until the batch ends."""

    def done(self) -> bool:
        """True once the batch has ended (done or failed); makes progress without waiting."""
    def wait(self, timeout: Optional[float] = None) -> None:
        """Returns once the batch has ended. `TimeoutError` after `timeout` seconds (the batch
        goes on); None waits as long as the engine's `timeout` on a batch. The GIL is released
        while waiting; Ctrl-C interrupts the wait."""
    def outcome(self) -> Dict[str, Any]:
        """The ended batch's report: `bytes`, `requests`, `seconds`, `rails` (dicts: `nic`,
        `remote_nic`, `bytes`, `slices`, `state`, `error`), `retries`, `routes`, `notified`; or
        its error raised. `PeerMemError` while it is pending."""

class _Watch:
    """Pending batches of one engine, waited on together by one thread (the waiter thread of
    `peermem.Engine`): one engine progress round per look, backed off while nothing ends."""

    def __init__(self) -> None: ...
    def add(self, ticket: _Ticket) -> None:
        """Watches `ticket` until it has ended and `wait` returned it, or `discard`."""
    def discard(self, ticket: _Ticket) -> None:
        """Stops watching `ticket` (its batch was settled by another thread)."""
    def wait(self, timeout: float) -> List[_Ticket]:
        """Waits up to `timeout` seconds (GIL released) for watched batches to end; returns those
        that have (no longer watched), possibly none (the time passed, or `wake`)."""
    def wake(self) -> None:
        """Makes the current wait, or the next, return at once."""
    def __len__(self) -> int: ...

class _Engine:
    """The native transfer engine; `peermem.Engine` subclasses it and wraps the tickets of
    `read` and `write` in `Transfer` futures. Arguments as `peermem.Engine`'s."""

    def __init__(
        self,
        nics: Optional[Sequence[str]] = None,
        port: int = 0,
        host: Optional[str] = None,
        timeout: float = 60.0,
        depth: int = 64,
    ) -> None: ...
    def register(self, obj: _Out) -> int:
        """Registers `obj` with every NIC and returns its region id; the object is kept alive
        until it is unregistered or the engine closed. The same memory again gives the same
        id; memory overlapping another registration is a `PeerMemError`."""
    def register_range(self, region: int, offset: int, length: int) -> None:
        """Registers `length` bytes at `offset` of the registered `region` on their own with
        every NIC, unless a registration covers them already (counted as a hit). `ValueError`
        for an unknown region or a range past its end."""
    def unregister(self, region: int) -> None:
        """`PeerMemError` while a posted batch uses the region; `ValueError` for an unknown id."""
    def routes(self, region: int) -> List[str]:
        """How each NIC registered the region, and why."""
    def cache_counts(self) -> Dict[str, int]:
        """The registration cache, summed over the NICs: `registers` and `deregisters` (calls
        into the NICs' registrars), `hits` (registrations a cached one covered)."""
    def listen_addrs(self) -> List[Tuple[str, str]]:
        """`(nic, "ip:port")` where each NIC listens for peers."""
    def metadata(self) -> bytes:
        """For the peer's `connect`: this host's NICs and the regions registered so far."""
    def connect(self, metadata: _Bytes) -> int:
        """Connects to the peer that `metadata` describes; returns its peer id."""
    def connect_to(self, address: str) -> int:
        """Connects to the engine listening at `"ip:port"`, its metadata read over RDMA."""
    def accepted(self) -> List[str]:
        """The hosts connected to this engine, one per open accepted connection."""
    def remote_regions(self, peer: int) -> List[Tuple[int, int]]:
        """`(region, length)` for each region `peer` had registered when connected."""
    def read(self, peer: int, batch: Iterable[_Request], notify: Optional[_Bytes] = None) -> Any:
        """The peer's bytes into local regions, as one batch (a `_Ticket` here; a `Transfer`
        from `peermem.Engine`); `notify` (at most 4096 bytes) reaches the peer once every byte
        landed. `ValueError` for a bad tuple, an unknown region or peer, or a range past a
        region's end; `TypeError` for a wrong type."""
    def write(self, peer: int, batch: Iterable[_Request], notify: Optional[_Bytes] = None) -> Any:
        """Local bytes into the peer's regions; as `read`."""
    def notifications(self, timeout: float = 0.0) -> List[Tuple[str, bytes]]:
        """`(peer host, message)` received so far, waiting up to `timeout` s for the first."""
    def rails(self, peer: int) -> List[Dict[str, Any]]:
        """The rails to `peer`: dicts as in a report's `rails`."""
    def close(self) -> None:
        """Stops the listener and lets go of the registrations and connections (a batch still
        pending keeps its own until it ends); later calls raise `PeerMemError`."""
    def __enter__(self) -> "_Engine": ...
    def __exit__(self, *args: Any) -> bool:
        """Calls `self.close()` (a subclass's `close` included)."""
