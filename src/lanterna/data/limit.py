"""Batch sources for the debug callbacks (docs/callbacks.md, "Debug runs"): :class:`FirstBatches` (only the first
``n`` batches of each pass) and :func:`in_dataset_order` (the same data without shuffling)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from ..errors import DataError
from .options import custom_sampler, loader_options
from .sources import BatchSource, LoaderBatches, TensorBatches, WrappedSource

__all__ = ["FirstBatches", "in_dataset_order"]


class FirstBatches(WrappedSource):
    """The first ``n`` batches of every pass over ``source`` (all of them when it has fewer). The pass is
    drawn as a whole one would be (the same shuffle), then left after ``n`` batches.

    Args:
        source: the batch source to cut short.
        n: how many batches each pass yields (>= 1).

    >>> import torch
    >>> from lanterna.data import TensorBatches
    >>> from lanterna.data.limit import FirstBatches
    >>> src = TensorBatches([torch.arange(10.0)], ("tuple", [None]), batch_size=4)
    >>> [b[0].tolist() for b in FirstBatches(src, 2)]
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    """

    def __init__(self, source: BatchSource, n: int) -> None:
        super().__init__(source)
        self.n = int(n)

    def num_batches(self) -> int | None:
        total = self.source.num_batches()
        return self.n if total is None else min(self.n, total)

    def __iter__(self) -> Iterator[Any]:
        if self.n <= 0:
            return
        undo = _undo_last_draw(self.source, self.n)
        for i, batch in enumerate(self.source, 1):
            if undo is not None:
                undo()  # the order is drawn when the first batch is: now it may be put right
                undo = None
            yield batch
            if i >= self.n:
                return


def _undo_last_draw(source: BatchSource, n: int) -> Callable[[], None] | None:
    """A DataLoader left after ``n`` batches never draws the second permutation its RandomSampler draws
    when it runs out (:meth:`TensorBatches.epoch_order` draws it at once, as a whole pass does): so the
    fast path over a user's generator, cut short, would shuffle later epochs unlike the DataLoader. The
    returned function rewinds that generator to just after the epoch's first permutation."""
    if (not isinstance(source, TensorBatches) or type(source).epoch_order is not TensorBatches.epoch_order
            or not source.shuffle or source.sampler_generator is None):
        return None
    src, gen = source, source.sampler_generator
    partial = src.num_samples % src.batch_size and not src.drop_last
    if n >= src.num_batches() and partial:
        return None  # forming the last, partial batch runs the sampler out: the DataLoader draws it too
    before = gen.get_state()

    def undo() -> None:
        gen.set_state(before)
        if src.loader_generator is gen:  # the loader's base seed comes first
            torch.empty((), dtype=torch.int64).random_(generator=gen)
        torch.randperm(src.num_samples, generator=gen)

    return undo


def in_dataset_order(source: BatchSource, what: str) -> BatchSource:
    """``source`` without shuffling: its batches in dataset order, every pass (a new source; ``source`` is
    left as it is). The in-memory fast path and DataLoaders with the default sampler (``shuffle=True`` or
    not) are rebuilt in order; an IterableDataset is read in its own order. A DataLoader with a sampler of
    its own (weighted, a custom batch sampler) cannot be put in order: that is an error naming ``what``.

    Args:
        source: a training batch source.
        what: who asks, for the error message (``"OverfitBatches"``).

    >>> import torch
    >>> from lanterna.data import TensorBatches
    >>> from lanterna.data.limit import in_dataset_order
    >>> src = TensorBatches([torch.arange(6.0)], ("tuple", [None]), batch_size=3, shuffle=True)
    >>> [b[0].tolist() for b in in_dataset_order(src, "example")]
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    if isinstance(source, TensorBatches):
        ordered = copy.copy(source)  # shares the tensors
        ordered.shuffle = False
        sampler = getattr(source, "sampler", None)  # a DDP shard deals its samples with its own sampler
        if sampler is not None and getattr(sampler, "shuffle", False):
            ordered.sampler = copy.copy(sampler)  # type: ignore[attr-defined]
            ordered.sampler.shuffle = False  # type: ignore[attr-defined]
        return ordered
    if isinstance(source, LoaderBatches):
        dl = source.loader
        plain_batches = dl.batch_sampler is None or type(dl.batch_sampler) is BatchSampler
        if isinstance(dl.dataset, IterableDataset) or (type(dl.sampler) is SequentialSampler and plain_batches):
            return source
        name = custom_sampler(dl)
        if name is None:  # the default sampler over the whole dataset, shuffled
            sampler: Any = SequentialSampler(dl.dataset)  # type: ignore[no-redef, arg-type]
        elif plain_batches and hasattr(dl.sampler, "shuffle") and hasattr(dl.sampler, "rank"):
            sampler = copy.copy(dl.sampler)  # a DDP shard (ShardSampler, DistributedSampler), in order
            sampler.shuffle = False
        else:
            raise DataError(
                f"{what} needs the training batches in dataset order, but the DataLoader's {name} decides the "
                "order itself. Pass a DataLoader with shuffle=False and no sampler of its own (or the Dataset / "
                "tensors, and let lanterna batch them)."
            )
        return LoaderBatches(DataLoader(dl.dataset, sampler=sampler, **loader_options(dl)), source.device,
                             owned=True)
    raise DataError(f"{what} cannot put a {type(source).__name__} in dataset order; pass the training data as "
                    "tensors, a Dataset or a DataLoader.")
