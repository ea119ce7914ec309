"""Batch sources: what the loop iterates over. One per data set (train, valid, test).

``TensorBatches`` is the in-memory fast path: batches are slices of tensors that already sit on the
device, with exactly the semantics (and the RNG use) of a ``DataLoader`` over a ``TensorDataset`` with
the default sampler and collate. ``LoaderBatches`` wraps any other ``DataLoader``.
"""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .structure import flatten, move_to, unflatten

__all__ = ["BatchSource", "WrappedSource", "TensorBatches", "LoaderBatches", "auto_num_workers"]


class BatchSource:
    """Iterable of batches already on the loop's device; ``len()`` is the number of batches (or None)."""

    num_samples: int | None = None
    weighted = False  # batches come as (batch, sample weights): fit(sample_weight=...)

    def __iter__(self) -> Iterator[Any]:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement __iter__")

    def num_batches(self) -> int | None:
        return None

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch (DistributedSampler needs it)."""

    def to_device(self, device: torch.device) -> BatchSource:
        return self

    def close(self) -> None:
        """Release what the source holds between epochs (worker processes); called when fit/predict ends."""


class WrappedSource(BatchSource):
    """A source over another one (its batches skipped, cut short ...): it delegates the number of samples,
    whether batches carry sample weights, epochs, devices and closing. Subclasses define ``__iter__``."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self.num_samples = source.num_samples

    @property
    def weighted(self) -> bool:  # type: ignore[override]
        return self.source.weighted

    def num_batches(self) -> int | None:
        return self.source.num_batches()

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def to_device(self, device: torch.device) -> BatchSource:
        self.source.to_device(device)
        return self

    def close(self) -> None:
        self.source.close()


class TensorBatches(BatchSource):
    """Batches by index slicing of in-memory tensors, reshuffled every epoch.

    It draws from the same random generators, in the same order, as ``DataLoader(TensorDataset(...),
    batch_size, shuffle, drop_last, generator)``, so both give the same batches for the same RNG state.

    >>> import torch
    >>> from lanterna.data.sources import TensorBatches
    >>> src = TensorBatches([torch.arange(10.0), torch.arange(10)], ("tuple", [None, None]), batch_size=4)
    >>> [len(b[0]) for b in src]
    [4, 4, 2]
    """

    num_samples: int  # always known for in-memory tensors

    def __init__(
        self,
        leaves: list[Tensor],
        spec: Any,
        *,
        batch_size: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        loader_generator: torch.Generator | None = None,
        sampler_generator: torch.Generator | None = None,
        weighted: bool = False,
    ) -> None:
        self.leaves = list(leaves)
        self.weighted = weighted  # the last leaf is the samples' weights, yielded beside each batch
        self.spec = spec
        self.num_samples = int(leaves[0].shape[0])
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.loader_generator = loader_generator
        self.sampler_generator = sampler_generator
        self._flat = spec is not None and spec[0] == "tuple" and all(c is None for c in spec[1])
        self._stage_device: torch.device | None = None  # set when leaves stay on the host (too big)

    def num_batches(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def to_device(self, device: torch.device) -> TensorBatches:
        if all(t.device == device for t in self.leaves):
            return self
        if device.type == "cuda":
            nbytes = sum(t.numel() * t.element_size() for t in self.leaves)
            free, _ = torch.cuda.mem_get_info(device)
            if nbytes > free // 4:  # too big to keep on the GPU: pin on the host, copy per batch
                self.leaves = [t.pin_memory() for t in self.leaves]
                self._stage_device = device
                return self
        self.leaves = [t.to(device) for t in self.leaves]
        return self

    def epoch_order(self) -> Tensor | None:
        """The sample order for one epoch (None = sequential), drawn like a DataLoader iteration."""
        # DataLoader draws a base seed for its workers at every iteration, shuffled or not.
        torch.empty((), dtype=torch.int64).random_(generator=self.loader_generator)
        if not self.shuffle:
            return None
        gen = self.sampler_generator
        if gen is None:  # RandomSampler without a generator seeds a fresh one from the global RNG
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            gen = torch.Generator()
            gen.manual_seed(seed)
            return torch.randperm(self.num_samples, generator=gen)
        order = torch.randperm(self.num_samples, generator=gen)
        # RandomSampler draws one more (empty-sliced) permutation when it runs out; with the user's generator
        # that draw advances it, so make it too.
        torch.randperm(self.num_samples, generator=gen)
        return order

    def __iter__(self) -> Iterator[Any]:
        order = self.epoch_order()
        n = self.num_samples if order is None else len(order)
        bs = self.batch_size
        stop = n - n % bs if self.drop_last else n
        leaves = self.leaves
        if order is not None:
            order = order.to(leaves[0].device)
        stage = self._stage_device
        for start in range(0, stop, bs):
            if order is None:
                parts = [t[start : start + bs] for t in leaves]
            else:
                idx = order[start : start + bs]
                parts = [t.index_select(0, idx) for t in leaves]
            if stage is not None:
                parts = [p.to(stage, non_blocking=True) for p in parts]
            if self.weighted:
                *parts, weight = parts
                yield (tuple(parts) if self._flat else unflatten(parts, self.spec)), weight
            else:
                yield tuple(parts) if self._flat else unflatten(parts, self.spec)

    def subset(self, indices: Tensor, *, shuffle: bool | None = None) -> TensorBatches:
        """A new source over ``indices`` (a 1-D index tensor), same options unless overridden."""
        idx = indices.to(self.leaves[0].device)
        return TensorBatches(
            [t.index_select(0, idx) for t in self.leaves],
            self.spec,
            batch_size=self.batch_size,
            shuffle=self.shuffle if shuffle is None else shuffle,
            drop_last=self.drop_last,
            loader_generator=self.loader_generator,
            sampler_generator=self.sampler_generator,
            weighted=self.weighted,
        )


class LoaderBatches(BatchSource):
    """Any DataLoader; batches moved to the device (``non_blocking`` when the loader pins memory).

    ``build=(dataset, options, user_keys)`` marks a loader that lanterna built itself from a Dataset; at
    :meth:`to_device` it is rebuilt with settings chosen for the device and the dataset, unless the user set
    them in ``dataloader_options``: ``pin_memory=True`` on CUDA, and worker processes when reading a batch
    costs the main process real time (see :func:`auto_num_workers`).
    """

    def __init__(self, loader: DataLoader, device: torch.device | None = None,
                 build: tuple[Any, dict[str, Any], frozenset[str]] | None = None, owned: bool | None = None,
                 weighted: bool = False) -> None:
        self.loader = loader
        self.weighted = weighted  # its dataset is a WeightedSamples: each batch is (batch, weights)
        self.device = device
        self.build = build
        self.owned = build is not None if owned is None else owned  # lanterna built the loader: it may close it
        try:
            self.num_samples = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            self.num_samples = None

    def num_batches(self) -> int | None:
        try:
            return len(self.loader)
        except TypeError:
            return None

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.loader.sampler, getattr(self.loader, "batch_sampler", None)):
            set_epoch = getattr(obj, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def to_device(self, device: torch.device) -> LoaderBatches:
        self.device = device
        if self.build is not None:
            dataset, options, user_keys = self.build
            self.build = None  # tuned once
            tuned = dict(options)
            if device.type == "cuda" and "pin_memory" not in user_keys:
                tuned["pin_memory"] = True
            if "num_workers" not in user_keys:
                workers = auto_num_workers(dataset, int(options.get("batch_size") or 1))
                if workers:
                    tuned.update(num_workers=workers, multiprocessing_context="fork")
            if tuned != options:
                self.loader = DataLoader(dataset, **tuned)
        return self

    def close(self) -> None:
        """Stop the persistent workers of a loader lanterna built (a user's own loader keeps them)."""
        iterator = getattr(self.loader, "_iterator", None) if self.owned else None
        if iterator is not None:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            self.loader._iterator = None

    def __iter__(self) -> Iterator[Any]:
        device = self.device
        with warnings.catch_warnings():  # Python >= 3.12 warns on any fork of a threaded process
            warnings.filterwarnings("ignore", message=r".*multi-threaded, use of fork\(\)", category=DeprecationWarning)
            batches = iter(self.loader)
        if device is None or device.type == "cpu":
            yield from (tuple(b) for b in batches) if self.weighted else batches
            return
        non_blocking = bool(self.loader.pin_memory)
        for batch in batches:
            moved = move_to(batch, device, non_blocking)
            yield tuple(moved) if self.weighted else moved


#: below this estimated loading time per batch (ms), workers cost more (IPC, start-up) than they save
WORKER_MIN_BATCH_MS = 1.0
#: ... and below this estimated loading time per epoch (s), their start-up is not repaid
WORKER_MIN_EPOCH_S = 0.2


def auto_num_workers(dataset: Any, batch_size: int, *, max_workers: int = 8) -> int:
    """Worker processes for a DataLoader that lanterna builds: 0 unless loading is costly.

    A few samples are read and timed in this process (with the random generators' states restored, so
    the probe changes no random stream); workers are used when a batch would take at least
    ``WORKER_MIN_BATCH_MS`` ms and an epoch at least ``WORKER_MIN_EPOCH_S`` s to load: one per CPU, at
    most ``max_workers``. Never for an IterableDataset (reading samples to time them would consume it), a
    dataset that returns tensors on an accelerator, or where processes cannot be forked (only Linux
    forks by default). Set ``dataloader_options={"num_workers": ...}`` to choose yourself.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lanterna.data.sources import auto_num_workers
    >>> auto_num_workers(TensorDataset(torch.zeros(100, 3)), 32)  # a tensor per sample: cheap
    0
    """
    if not sys.platform.startswith("linux") or isinstance(dataset, IterableDataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        n = len(dataset)
    except TypeError:
        return 0
    if cpus < 2 or n < 2:
        return 0
    states = (random.getstate(), torch.get_rng_state(), _numpy_state())
    try:
        sample = dataset[0]  # the first read may open files or fill caches: not timed
        if any(isinstance(t, Tensor) and t.device.type != "cpu" for t in flatten(sample)[0]):
            return 0
        times: list[float] = []
        t_end = time.perf_counter() + 0.05
        for i in range(1, min(n, 9)):
            t0 = time.perf_counter()
            dataset[i]
            times.append(time.perf_counter() - t0)
            if t0 > t_end:
                break
    except Exception:  # the real loop will raise it, with lanterna's explanation
        return 0
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])
        if states[2] is not None:
            import numpy as np

            np.random.set_state(states[2])
    per_sample = sorted(times)[len(times) // 2]
    if per_sample * batch_size * 1e3 < WORKER_MIN_BATCH_MS or per_sample * n < WORKER_MIN_EPOCH_S:
        return 0
    return min(cpus, max_workers)


def _numpy_state() -> Any:
    np = sys.modules.get("numpy")
    return np.random.get_state() if np is not None else None
