"""DDP under ``torchrun``: process group, per-rank device, data shards, cross-rank reductions (README.md, "torchrun").

The same script runs with ``python train.py`` and ``torchrun --nproc_per_node=N train.py``: when torchrun's
environment says ``WORLD_SIZE > 1``, :func:`from_env` initialises the process group (nccl on cuda, gloo on
cpu) and fit wraps the model in ``DistributedDataParallel``.

Sharding: every rank sees ``order[rank::world_size]`` of each epoch's order — each sample exactly once, no
padding duplicates. The order is drawn from a generator seeded with ``seed + epoch`` (as DistributedSampler
does), identical on every rank. Uneven shards: in training a rank whose shard ran out runs empty batches
while the others finish (:mod:`.even_batches`: every rank steps its optimizer every time, which DDP's
``join()`` did not); validation runs the unwrapped module, so ranks never wait for one another inside it. A
DataLoader with a custom sampler (a WeightedRandomSampler ...) is never silently re-sampled: it is kept when
its sampler deals each rank its share (DistributedSampler's ``num_replicas`` / ``rank``), else refused with an
error. Memory-mapped arrays are
sharded like tensors, each rank reading only its rows. An IterableDataset is split across ranks × DataLoader
workers: sample ``i`` of the stream goes to shard ``i mod (world_size · workers)``, shard
``rank · workers + worker_id`` (:mod:`lanterna.data.streams`; every rank must use the same ``num_workers``).
Sums and counts are reduced across ranks at the end of each phase (exact epoch values), and stop / Ctrl-C
decisions are agreed at epoch end.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from ..core.world import Local, all_gather_rows
from ..data.memmap import MemmapBatches
from ..data.options import custom_sampler, loader_options
from ..data.sources import BatchSource, LoaderBatches, TensorBatches
from ..data.streams import StreamBatches
from ..errors import DataError

__all__ = ["Distributed", "from_env", "world_size_from_env"]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class ShardSampler(Sampler[int]):
    """``order[rank::world_size]``, where ``order`` is a permutation seeded by ``seed + epoch`` (shuffle) or
    ``range(n)``. No padding: shards differ in length by at most one.

    >>> from lanterna.integrations.distributed import ShardSampler
    >>> list(ShardSampler(5, rank=0, world_size=2, shuffle=False))
    [0, 2, 4]
    >>> list(ShardSampler(5, rank=1, world_size=2, shuffle=False))
    [1, 3]
    """

    def __init__(self, n: int, rank: int, world_size: int, shuffle: bool, seed: int = 0) -> None:
        self.n, self.rank, self.world_size, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n)[self.rank :: self.world_size]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _shards_itself(dl: DataLoader) -> bool:
    """Whether ``dl``'s sampler or batch sampler deals ranks their shares (DistributedSampler's interface)."""
    samplers = (dl.sampler, dl.batch_sampler, getattr(dl.batch_sampler, "sampler", None))
    return any(hasattr(s, "num_replicas") and hasattr(s, "rank") for s in samplers if s is not None)


class _ShardedTensorBatches(TensorBatches):
    """The fast path over one rank's shard, re-drawn every epoch."""

    sampler: ShardSampler

    def __init__(self, base: TensorBatches, sampler: ShardSampler) -> None:
        super().__init__(base.leaves, base.spec, batch_size=base.batch_size, shuffle=False,
                         drop_last=base.drop_last, weighted=base.weighted)
        self.sampler = sampler
        self.num_samples = len(sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def epoch_order(self) -> Tensor:
        return self.sampler.order()


class _ShardedMemmapBatches(MemmapBatches):
    """Memory-mapped arrays over one rank's shard, re-drawn every epoch: only this rank's rows are read."""

    sampler: ShardSampler

    def __init__(self, base: MemmapBatches, sampler: ShardSampler) -> None:
        self.__dict__.update(base.__dict__)  # the same files and rows; the sampler draws the order
        self.shuffle = False
        self.sampler = sampler
        self.num_samples = len(sampler)

    set_epoch = _ShardedTensorBatches.set_epoch  # the order: the sampler's, re-drawn every epoch
    epoch_order = _ShardedTensorBatches.epoch_order


class Distributed(Local):
    """One process of a DDP job: rank, world size, device, and the collectives fit needs (the interface of
    :class:`lanterna.core.world.Local`, with real collectives)."""

    distributed = True

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.seed = seed
        self.is_main = rank == 0
        self._ddp: nn.parallel.DistributedDataParallel | None = None

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # ----------------------------------------------------------------- model and data
    def wrap(self, forward_model: Any, model: nn.Module) -> Any:
        """DDP around the module (compiled modules are wrapped through their original module)."""
        if not any(p.requires_grad for p in model.parameters()):
            return forward_model
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if forward_model is model:
            return self._ddp
        warnings.warn("compile=True under DDP compiles the module inside DDP lazily.", stacklevel=3)
        return torch.compile(self._ddp)

    def shard(self, source: BatchSource, *, train: bool) -> BatchSource:
        """This rank's part of a batch source: each sample on exactly one rank."""
        if isinstance(source, TensorBatches):
            sampler = ShardSampler(source.num_samples, self.rank, self.world_size,
                                   shuffle=source.shuffle and train, seed=self.seed)
            if isinstance(source, MemmapBatches):
                return _ShardedMemmapBatches(source, sampler)
            return _ShardedTensorBatches(source, sampler)
        if isinstance(source, LoaderBatches):
            dl = source.loader
            if isinstance(dl.dataset, IterableDataset):  # ranks × workers shards (data/streams.py)
                stream = source if isinstance(source, StreamBatches) else StreamBatches.from_loader(dl)
                workers = stream.num_workers
                if self.min_int(workers) != -self.min_int(-workers):
                    raise DataError(
                        f"Under torchrun every rank must read a stream with the same number of DataLoader workers "
                        f"(rank {self.rank} has num_workers={workers}, another rank a different number): sample i "
                        "goes to shard i mod (ranks x workers), so different counts would drop or repeat samples. "
                        "Use the same num_workers on every rank."
                    )
                return stream.sharded(self.rank, self.world_size)
            if isinstance(dl.sampler, ShardSampler):
                return source
            name = custom_sampler(dl)
            # for evaluation a DistributedSampler is replaced below: exact (no padding duplicates), dataset order
            replace = not train and type(dl.sampler) is DistributedSampler and dl.batch_size is not None
            if name is not None and not replace:
                if _shards_itself(dl):
                    return source  # the user's sampler deals each rank its share
                raise DataError(
                    f"Under torchrun lanterna shards a DataLoader by giving it its own sampler, which would drop "
                    f"this loader's {name}. Give the loader a sampler (or batch sampler) that deals each rank its "
                    "share (a torch DistributedSampler, or any sampler with num_replicas and rank attributes that "
                    "yields this rank's indices), or pass the Dataset / tensors and let lanterna shard them."
                )
            shuffle = train and type(dl.sampler) is RandomSampler
            sampler = ShardSampler(len(dl.dataset), self.rank, self.world_size,  # type: ignore[arg-type]
                                   shuffle=shuffle, seed=self.seed)
            return LoaderBatches(DataLoader(dl.dataset, sampler=sampler, **loader_options(dl)), source.device,
                                 owned=True, weighted=source.weighted)
        return source

    @staticmethod
    def total_samples(source: BatchSource) -> int:
        """Samples over all ranks of a source made by :meth:`shard` (map-style data and arrays)."""
        sampler = (source.sampler if isinstance(source, (_ShardedTensorBatches, _ShardedMemmapBatches))
                   else source.loader.sampler)  # type: ignore[attr-defined]
        return sampler.n

    def adapt(self, accelerator: Any) -> Any:
        """The accelerator the step uses (DDP: the fit's own)."""
        return accelerator

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's whole state dict (each DDP rank holds all of it)."""
        return model.state_dict()

    def balance(self, source: BatchSource, *, training: bool) -> BatchSource:
        """``source`` (this rank's shard) made to yield as many batches as every other rank's: in training, where
        each step all-reduces gradients (:class:`~lanterna.integrations.even_batches.EvenBatches`). Validation,
        evaluate and predict run the bare module (no collective inside a batch): their shards stay as they are."""
        if not training or self._ddp is None:
            return source
        from .even_batches import EvenBatches

        return EvenBatches(source, self)

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the next training forward/backward all-reduces gradients (``DDP.no_sync`` without the
        ``with``: DDP reads the flag at forward time, before the backward it governs)."""
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = enabled

    # ----------------------------------------------------------------- collectives
    def min_int(self, n: int) -> int:
        """The smallest ``n`` over all ranks."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over all ranks, in place."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_in_order(self, local: Tensor, n_total: int) -> Tensor:
        """Reassemble per-rank results of ``range(n)[rank::world]`` into dataset order (first dim)."""
        out = torch.empty((n_total, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for r, part in enumerate(all_gather_rows(local, local.device)):
            out[r::self.world_size] = part
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def _destroy() -> None:
    """At exit: leave together, then tear the group down. A group left to interpreter teardown, or torn down
    while a peer still uses its connections, can abort the process in gloo's destructors."""
    if not dist.is_initialized():
        return
    if getattr(sys, "last_value", None) is None:  # a clean exit (an uncaught error skips the wait)
        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def from_env(accelerator: Any, seed: int | None, make: Callable[..., Distributed] = Distributed) -> Distributed | None:
    """A :class:`Distributed` when launched by torchrun with WORLD_SIZE > 1, else None.

    ``make(rank, world_size, local_rank, device, seed)`` builds it (FSDP's world: :func:`.fsdp.from_env`).

    Initialises the default process group once (nccl on cuda, gloo on cpu) and picks ``cuda:LOCAL_RANK``.
    """
    world = world_size_from_env()
    if world <= 1 or accelerator.strategy == "none":
        return None
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = accelerator.device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("LANTERNA_DIST_TIMEOUT", "1800")))
        # torchrun keeps one store across restarts (--max-restarts): keys of the killed attempt would still
        # be there, and a restarted rank could read a dead peer's address. Keep each attempt's keys apart.
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"lanterna/attempt_{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
        atexit.register(_destroy)
    if seed is None:  # every rank must shuffle alike: take rank 0's seed
        t = torch.randint(0, 2**31 - 1, (1,), device=device) if rank == 0 else torch.zeros(1, dtype=torch.long,
                                                                                        device=device)
        dist.broadcast(t, src=0)
        seed = int(t.item())
    return make(rank, world, local_rank, device, seed)
