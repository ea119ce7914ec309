"""IterableDatasets split across ranks × DataLoader workers: every sample read once per epoch (docs/models.md,
"Streams and data larger than memory").

The rule: a loader with ``num_workers`` workers per process (1 when it reads in the main process), on
``world_size`` processes, reads ``n = world_size · max(num_workers, 1)`` shards; worker ``w`` of rank ``r`` reads
shard ``s = r · max(num_workers, 1) + w``, and sample ``i`` of the stream (0-based, in the dataset's own order)
belongs to shard ``i mod n``. Each shard iterates the whole stream and keeps its part.

A dataset that can seek (files, row groups, byte ranges) reads only its part instead: it defines
``set_shard(shard_index, num_shards)``, which lanterna calls in each worker before every pass, and then yields
only that shard; lanterna does not filter it. For :meth:`~lanterna.Fitted.predict` to return the stream's order,
its shard ``s`` should hold the samples ``i`` with ``i mod num_shards == s`` (in order); predictions come back
in the order ``j · num_shards + s`` for the ``j``-th sample of shard ``s``.

With one shard (one process, ``num_workers`` 0 or 1) the user's loader is used as it is.

>>> import torch
>>> from torch.utils.data import IterableDataset
>>> from lanterna.data.streams import ShardedStream
>>> class Count(IterableDataset):
...     def __iter__(self):
...         return iter(range(10))
>>> list(ShardedStream(Count(), rank=1, world_size=3))
[1, 4, 7]
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate, default_convert

from ..errors import DataError
from .options import _user_stacklevel, loader_options
from .sources import LoaderBatches
from .structure import batch_size_of, flatten, split_batch, unflatten

__all__ = ["ShardedStream", "StreamBatches", "shard_sizes", "shards_itself", "stream_order"]


def shards_itself(dataset: Any) -> bool:
    """Whether ``dataset`` reads only its shard when told which: it has a ``set_shard(shard_index, num_shards)``
    method (the self-sharding protocol of this module).

    Args:
        dataset: an IterableDataset.

    Returns:
        True when lanterna calls ``set_shard`` in each worker instead of filtering the stream.

    >>> from torch.utils.data import IterableDataset
    >>> from lanterna.data.streams import shards_itself
    >>> class Files(IterableDataset):
    ...     mine = range(8)
    ...     def set_shard(self, shard_index, num_shards):
    ...         self.mine = range(shard_index, 8, num_shards)
    ...     def __iter__(self):
    ...         return iter(self.mine)
    >>> shards_itself(Files()), shards_itself(range(3))
    (True, False)
    """
    return callable(getattr(dataset, "set_shard", None))


class ShardedStream(IterableDataset):
    """``dataset``'s share for one process: in each DataLoader worker, the samples of its shard (module rule).

    Args:
        dataset: the IterableDataset to split.
        rank: this process's rank (0 in a single process).
        world_size: the number of processes.
        num_workers: the loader's ``num_workers`` (only for ``len()``; the worker's own count is read in it).
        keyed: yield ``(position, sample)``: the sample's position in the order predictions are returned in.

    >>> from lanterna.data.streams import ShardedStream
    >>> list(ShardedStream(range(7), rank=0, world_size=2, keyed=True))
    [(0, 0), (2, 2), (4, 4), (6, 6)]
    """

    def __init__(self, dataset: Any, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 keyed: bool = False) -> None:
        self.dataset = dataset
        self.rank, self.world_size, self.num_workers, self.keyed = rank, world_size, num_workers, keyed
        self.self_sharding = shards_itself(dataset)
        # the epoch, in shared memory: persistent workers keep their copy of this object across epochs
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._epoch_seen = 0

    def __getattr__(self, name: str) -> Any:  # a worker_init_fn reading get_worker_info().dataset.<attr>
        dataset = self.__dict__.get("dataset")
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def shard(self) -> tuple[int, int]:
        """``(shard_index, num_shards)`` of the calling worker (or process, without workers)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[Any]:
        epoch = int(self.epoch)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if epoch and epoch != self._epoch_seen and callable(set_epoch):
            set_epoch(epoch)
            self._epoch_seen = epoch
        index, count = self.shard()
        if self.self_sharding:
            self.dataset.set_shard(index, count)
            samples: Iterator[Any] = iter(self.dataset)
            if not self.keyed:
                return samples
            return ((j * count + index, s) for j, s in enumerate(samples))
        if self.keyed:
            return itertools.islice(enumerate(self.dataset), index, None, count)
        return itertools.islice(iter(self.dataset), index, None, count)

    def __len__(self) -> int:
        """This process's samples (all its workers), when the dataset has a length and lanterna filters it."""
        n = len(self.dataset)
        if self.self_sharding:
            if self.world_size * max(self.num_workers, 1) > 1:
                raise TypeError("the shards of a self-sharding dataset have unknown lengths")
            return n
        return sum(shard_sizes(n, self.rank, self.world_size, self.num_workers))


def shard_sizes(n: int, rank: int, world_size: int, num_workers: int) -> list[int]:
    """The samples of each worker of ``rank`` in a stream of ``n`` samples (module rule).

    Args:
        n: the stream's length.
        rank: the process.
        world_size: the number of processes.
        num_workers: the loader's ``num_workers`` (0: the main process reads, one shard).

    Returns:
        One count per worker.

    >>> from lanterna.data.streams import shard_sizes
    >>> shard_sizes(10, rank=1, world_size=2, num_workers=2)  # shards 2 and 3 of 4
    [2, 2]
    """
    workers = max(num_workers, 1)
    count = world_size * workers
    return [len(range(rank * workers + w, n, count)) for w in range(workers)]


class _KeyedCollate:
    """Collate ``(position, sample)`` items into ``(positions, batch)`` with the loader's own collate function."""

    def __init__(self, collate: Callable[[Any], Any] | None, batched: bool) -> None:
        self.batched = batched
        self.collate = collate or (default_collate if batched else default_convert)

    def __call__(self, items: Any) -> tuple[Tensor, Any]:
        if not self.batched:
            position, sample = items
            return torch.tensor(position, dtype=torch.int64), self.collate(sample)
        return (torch.tensor([p for p, _ in items], dtype=torch.int64),
                self.collate([sample for _, sample in items]))


def _seems_to_split_itself(dataset: Any) -> bool:
    """A dataset whose ``__iter__`` reads the worker or the rank (torch's documented ways of splitting a stream)
    without declaring ``set_shard``: lanterna's split would apply on top of its own."""
    try:
        source = inspect.getsource(type(dataset).__iter__)
    except (OSError, TypeError):
        return False
    return any(name in source for name in ("get_worker_info", "get_rank(", "get_world_size("))


class StreamBatches(LoaderBatches):
    """The batches of an IterableDataset for one process: its DataLoader over a :class:`ShardedStream`
    (rule of this module), with every option of the user's loader or of ``dataloader_options``.

    Args:
        dataset: the IterableDataset.
        options: the DataLoader's options (``batch_size``, ``num_workers``, ``collate_fn`` ...).
        user_keys: the options the user set in ``dataloader_options`` when lanterna builds the loader (it may tune
            the others for the device); None for a user's own DataLoader.
        rank: this process's rank.
        world_size: the number of processes.
        keyed: record each sample's position (for :meth:`positions`), for prediction.
        loader: the user's DataLoader, used as it is when the stream needs no split.
        device: where batches go.

    >>> import torch
    >>> from torch.utils.data import DataLoader, IterableDataset
    >>> from lanterna.data.streams import StreamBatches
    >>> class Count(IterableDataset):
    ...     def __iter__(self):
    ...         return iter(torch.arange(10.0))
    >>> src = StreamBatches(Count(), {"batch_size": 4}, rank=1, world_size=2)
    >>> [b.tolist() for b in src]
    [[1.0, 3.0, 5.0, 7.0], [9.0]]
    """

    def __init__(self, dataset: Any, options: Mapping[str, Any], *, user_keys: frozenset[str] | None = None,
                 rank: int = 0, world_size: int = 1, keyed: bool = False, loader: DataLoader | None = None,
                 device: torch.device | None = None) -> None:
        self.dataset, self.options, self.user_keys = dataset, dict(options), user_keys
        self.rank, self.world_size = rank, world_size
        self.num_workers = int(self.options.get("num_workers", 0) or 0)
        self.num_shards = world_size * max(self.num_workers, 1)
        self.split = self.num_shards > 1 or shards_itself(dataset)
        self.keyed = keyed and self.num_shards > 1  # one shard: the stream's own order
        self._positions: list[Tensor] = []
        if self.split and not shards_itself(dataset) and _seems_to_split_itself(dataset):
            warnings.warn(
                f"{type(dataset).__name__}.__iter__ reads the DataLoader worker or the process rank, as a dataset "
                f"that splits itself does; lanterna also splits streams ({self.num_shards} shards: sample i goes to "
                "shard i mod the shard count), so each sample would be dropped or read by the wrong shard. Define "
                "set_shard(self, shard_index, num_shards) on the dataset and yield only that shard: lanterna then "
                "calls it in each worker instead of filtering.",
                stacklevel=_user_stacklevel(),
            )
        opts = dict(self.options)
        if self.split:
            self.stream: Any = ShardedStream(dataset, rank, world_size, self.num_workers, self.keyed)
            if self.keyed:
                opts["collate_fn"] = _KeyedCollate(opts.get("collate_fn"), opts.get("batch_size", 1) is not None)
            built = DataLoader(self.stream, **opts)
        else:
            self.stream = dataset
            built = loader if loader is not None else DataLoader(dataset, **opts)
        self._loader = loader
        build = (self.stream, opts, user_keys) if user_keys is not None else None
        super().__init__(built, device, build=build, owned=user_keys is not None or built is not loader)

    @classmethod
    def from_loader(cls, dl: DataLoader) -> StreamBatches:
        """A user's DataLoader over an IterableDataset, rebuilt over its shard with all its options.

        Args:
            dl: the DataLoader.

        Returns:
            The batch source (using ``dl`` itself where there is nothing to split).

        >>> from torch.utils.data import DataLoader
        >>> from lanterna.data.streams import StreamBatches
        >>> dl = DataLoader(range(5), batch_size=2)
        >>> StreamBatches.from_loader(dl).loader is dl
        True
        """
        return cls(dl.dataset, loader_options(dl), loader=dl)

    def _like(self, **changes: Any) -> StreamBatches:
        kwargs: dict[str, Any] = dict(user_keys=self.user_keys, rank=self.rank, world_size=self.world_size,
                                      keyed=self.keyed, loader=self._loader, device=self.device)
        kwargs.update(changes)
        return StreamBatches(self.dataset, self.options, **kwargs)

    def sharded(self, rank: int, world_size: int) -> StreamBatches:
        """This source for process ``rank`` of ``world_size``.

        Args:
            rank: the process.
            world_size: the number of processes.

        Returns:
            A new source over that process's shards.
        """
        return self._like(rank=rank, world_size=world_size)

    def with_positions(self) -> StreamBatches:
        """This source recording each sample's position (see :meth:`positions`), as prediction needs.

        Returns:
            A new source (or this one, when the stream is read in one shard and in order).
        """
        return self._like(keyed=True) if self.num_shards > 1 else self

    def num_batches(self) -> int | None:
        """Batches of this process per epoch: exact (every worker's last batch may be short), or None when
        unknown (no ``len()``, or a self-sharding dataset split in several shards)."""
        if not self.split or (shards_itself(self.dataset) and self.num_shards == 1):
            return super().num_batches()
        if shards_itself(self.dataset):
            return None
        try:
            n = len(self.dataset)
        except TypeError:
            return None
        bs = self.options.get("batch_size", 1)
        sizes = shard_sizes(n, self.rank, self.world_size, self.num_workers)
        if bs is None:
            return sum(sizes)
        drop_last = bool(self.options.get("drop_last", False))
        return sum(k // bs if drop_last else -(-k // bs) for k in sizes)

    def set_epoch(self, epoch: int) -> None:
        """Tell the dataset the epoch (its ``set_epoch``, when it has one), in every worker."""
        super().set_epoch(epoch)
        if self.split:
            self.stream.epoch.fill_(epoch)
        else:
            set_epoch = getattr(self.dataset, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        if not self.keyed:
            return super().__iter__()
        return self._keyed_batches()

    def _keyed_batches(self) -> Iterator[Any]:
        self._positions = []
        batched = self.options.get("batch_size", 1) is not None
        for positions, batch in super().__iter__():
            if not batched:  # the dataset yields whole batches: one position for each of its rows
                positions = positions.reshape(1).expand(batch_size_of(split_batch(batch)[0]))
            self._positions.append(positions)
            yield batch

    def positions(self) -> Tensor:
        """The positions of the samples of the last pass, in the order they came (a CPU int64 tensor).

        Returns:
            One position per sample row (:func:`stream_order` sorts predictions by them).
        """
        if not self._positions:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([p.reshape(-1) for p in self._positions]).cpu()


def stream_order(predictions: Any, positions: Tensor, world: Any = None) -> Any:
    """Predictions of a stream's shards put back in the stream's order (on every process under torchrun).

    Args:
        predictions: this process's predictions (a tensor, or a tuple/dict of them), one row per position;
            None when this process had no batch.
        positions: each row's position (:meth:`StreamBatches.positions`).
        world: the processes (``lanterna.integrations.distributed.Distributed``); None for one process.

    Returns:
        All predictions, sorted by position.

    Raises:
        DataError: predictions without one row per sample, or a process without samples for a model with
            several outputs.

    >>> import torch
    >>> from lanterna.data.streams import stream_order
    >>> stream_order(torch.tensor([[0.0], [2.0], [1.0]]), torch.tensor([0, 2, 1])).flatten().tolist()
    [0.0, 1.0, 2.0]
    """
    leaves, spec = flatten(predictions) if predictions is not None else ([], None)
    for leaf in leaves:
        if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != positions.shape[0]:
            raise DataError(
                "predict over a stream read by several shards needs one prediction row per sample to put them in "
                f"the stream's order; got {len(positions)} samples and an output of shape "
                f"{tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__}."
            )
    if world is None or not getattr(world, "distributed", False):
        order = torch.argsort(positions, stable=True)
        return unflatten([leaf.index_select(0, order) for leaf in leaves], spec)
    from ..core.world import all_gather_rows

    device = world.device
    n_leaves = -world.min_int(-len(leaves))
    if world.any(predictions is None) and n_leaves > 1:
        raise DataError(
            "predict over a stream: a process received no samples (the stream has fewer samples than shards), "
            "and the model has several outputs, which cannot be gathered then. Predict in one process, or "
            "with fewer DataLoader workers."
        )
    order = torch.argsort(torch.cat(all_gather_rows(positions.to(device), device)).cpu(), stable=True)
    gathered = []
    for k in range(n_leaves):
        local = leaves[k].to(device) if leaves else None
        gathered.append(torch.cat(all_gather_rows(local, device)).cpu().index_select(0, order))
    return unflatten(gathered, spec)
