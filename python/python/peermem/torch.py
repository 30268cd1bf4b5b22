"""`ShardDataset`: a PyTorch `IterableDataset` over `peermem.ShardReader`.

Owns: finding the rank and world size (`torch.distributed`) and the DataLoader worker, the epoch
shared with persistent workers, and handing batches to torch (zero copy in the process that
reads them; one copy into shared memory in a DataLoader worker). Must not: order, pad or split
records (the Rust reader does, through `ShardReader`'s `rank`/`worker` arguments), nor check
arguments `ShardReader` checks.

Importing this module imports torch; `import peermem` never does.
"""

import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import Batch, ShardReader

_Path = Union[str, "os.PathLike[str]"]

# Readers this process inherited through fork from the process that made them. Dropping one
# would wait for its parent's loader thread, which does not exist in the child: they are kept,
# untouched, until the process exits.
_INHERITED: List[ShardReader] = []


def _distributed() -> Tuple[int, int]:
    """`(rank, world_size)` of the default process group, or `(0, 1)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared_copy(x: torch.Tensor) -> torch.Tensor:
    """`x` (a uint8 batch) copied once into a new shared-memory tensor: it crosses from a
    DataLoader worker to the main process without a further copy, and the batch's ring buffer is
    free again at once."""
    n = x.numel() * x.element_size()
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return x.clone().share_memory_()
    out = torch.empty(0, dtype=torch.uint8).set_(new_shared(n)).view(x.shape)
    out.copy_(x)
    return out


class ShardDataset(IterableDataset):
    """Batches of records from `files` for data-parallel training, as a PyTorch
    `IterableDataset` that yields whole batches (use it with `DataLoader(ds, batch_size=None)`,
    or `ds.dataloader(...)`).

    Every argument but `rank`, `world_size` and `transform` is `ShardReader`'s. `rank` and
    `world_size` default to those of `torch.distributed`'s default group when it is initialised
    when the dataset is made (else 0 and 1); arguments given win. The ranks' shares are evened as
    `DistributedSampler` does (padded by wrapping, or the tail dropped with `drop_last=True`), so
    every rank yields the same number of batches and DDP's collectives cannot wait on a rank that
    has run out. Inside a DataLoader worker, worker `w` of `W` reads the rank's batches `w, w + W,
    ...`, so the DataLoader's round-robin over its workers yields them in the order of
    `num_workers=0`.

    `num_workers=0` is the fast way: the batch is handed over zero copy (`torch.from_dlpack`),
    the reader keeps `prefetch` batches in flight, and I/O overlaps training on its own. A worker
    copies each batch once into shared memory for the main process.

    `set_epoch(e)` reaches persistent workers: the epoch lives in shared memory and is read at the
    start of every epoch's iteration. `transform(x, batch)`, when given, is applied to each batch
    (`x` the tensor, `batch` the `peermem.Batch` with `indices`, `offsets`, `lengths`), in the
    process that reads it; what it returns is yielded. Do not keep `batch` past the call: it holds
    a buffer of the reader's ring.
    """

    def __init__(
        self,
        files: Sequence[_Path],
        record_size: Optional[int] = None,
        index: Optional[List[Tuple[int, int, int]]] = None,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        prefetch: int = 2,
        ring: Optional[int] = None,
        depth: Optional[int] = None,
        transform: Optional[Callable[[torch.Tensor, Batch], Any]] = None,
        io: Optional[str] = None,
    ) -> None:
        super().__init__()
        group_rank, group_size = _distributed()
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
        if not isinstance(files, (str, bytes, os.PathLike)):
            files = list(files)  # an iterator is read once, here
        self._args = dict(
            files=files, record_size=record_size, index=index, batch_size=batch_size, shuffle=shuffle,
            seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, prefetch=prefetch, ring=ring,
            depth=depth, io=io,
        )
        # Every argument and file is checked here, in the process that makes the dataset; the
        # readers are made where batches are read (here, or in each worker).
        with ShardReader(**self._args) as probe:
            self._batches = probe.num_batches
        self.rank: int = rank
        self.world_size: int = world_size
        self.transform = transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._reader: Optional[ShardReader] = None
        self._owner: Tuple[int, int, int] = (0, 0, 1)  # (pid, worker, workers) of `_reader`

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch the next iteration reads (the shuffle), in this process and in every
        DataLoader worker, persistent ones included. Call it before each epoch's iteration."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, not {type(epoch).__name__}")
        if not 0 <= epoch < 2**63:
            raise ValueError(f"epoch must be >= 0 and < 2**63 (got {epoch})")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch over all its DataLoader workers: what a DataLoader
        yields, and the same on every rank."""
        return self._batches

    def dataloader(self, **kwargs: Any) -> DataLoader:
        """A `DataLoader` over this dataset with `batch_size=None` (the dataset yields whole
        batches); `kwargs` go to `DataLoader` (`num_workers`, `persistent_workers`, ...)."""
        return DataLoader(self, batch_size=None, **kwargs)

    def _reader_for(self, worker: int, workers: int) -> ShardReader:
        """This process's reader for `worker` of `workers`, made on first use and kept across
        epochs (persistent workers keep theirs)."""
        pid = os.getpid()
        if self._reader is not None and self._owner[0] != pid:
            _INHERITED.append(self._reader)
            self._reader = None
        if self._reader is None or self._owner != (pid, worker, workers):
            self._reader = ShardReader(**self._args, worker=worker, workers=workers)
            self._owner = (pid, worker, workers)
        return self._reader

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = self._reader_for(worker, workers)
        reader.set_epoch(int(self._epoch))
        in_worker = info is not None
        for batch in reader:
            x = torch.from_dlpack(batch)
            if in_worker:
                x = _shared_copy(x)
            out = x if self.transform is None else self.transform(x, batch)
            # Only the caller holds the batch from here: its ring buffer goes back as soon as
            # the caller lets go (or at once, after the copy of a worker).
            del batch, x
            yield out
            del out

    def __getstate__(self) -> dict:
        # A reader does not travel to a spawned worker: each worker makes its own.
        state = self.__dict__.copy()
        state["_reader"] = None
        return state
