"""Every rank runs the same number of batches in a phase, so that every collective inside a step has a partner.

Shards of ``N`` samples over ``W`` ranks differ by one sample, so ranks can differ by one batch (and a stream's
shards by more). A rank without a batch still has to take part in the step's collectives: DDP's gradient
all-reduce, FSDP's all-gathers and reduce-scatters. DDP's ``join()`` shadows only the all-reduce: the rank
skips its optimizer step and scheduler step, so its optimizer state falls behind (Adam's step count and
moments), and after the next batch its gradients are taken at other weights than rank 0's — a silent error.
FSDP has no ``join()`` at all: each rank owns a shard of the optimizer state, which must step every time.

:class:`EvenBatches` keeps the ranks in step instead: a rank whose data ran out yields *empty batches* — its
last batch cut to zero rows — while any rank still has data. An empty batch goes through the whole step like
any other: forward on zero rows, a zero loss (``LossComputer``), backward (zero gradients, which the
all-reduce / reduce-scatter averages in exactly as DDP's ``join()`` does), clipping, the optimizer and the
scheduler. It adds nothing to the epoch's loss or metrics (zero samples). Callbacks see ``ctx.batch_size == 0``.

Sized data agrees on the number of batches once per phase (one all-reduce); data without a length (an
IterableDataset) agrees before every batch whether any rank still has one (one all-reduce of one number per
batch, as DDP's ``join()`` does).

>>> from lanterna.integrations.even_batches import empty_like
>>> import torch
>>> x, y = empty_like((torch.ones(4, 3), torch.zeros(4, dtype=torch.long)))
>>> x.shape, y.dtype
(torch.Size([0, 3]), torch.int64)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..data.sources import BatchSource, WrappedSource
from ..errors import DataError

__all__ = ["EvenBatches", "empty_like"]


def empty_like(batch: Any) -> Any:
    """``batch`` with every tensor cut to zero rows along its first dimension (0-d tensors and other values kept).

    Args:
        batch: a batch (tensors nested in tuples, lists and dicts).

    Returns:
        the same structure, each tensor ``t[:0]``.

    >>> import torch
    >>> from lanterna.integrations.even_batches import empty_like
    >>> empty_like({"x": torch.ones(2, 5)})["x"].shape
    torch.Size([0, 5])
    """
    if isinstance(batch, Tensor):
        return batch[:0] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: empty_like(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple):
        items = [empty_like(v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [empty_like(v) for v in batch]
    return batch


class EvenBatches(WrappedSource):
    """The batches of ``source``, then empty batches until every rank of ``world`` has run out.

    Args:
        source: this rank's shard.
        world: the ranks (a :class:`~lanterna.integrations.distributed.Distributed`: ``all_reduce_sum``,
            ``min_int``, ``device``).

    >>> from lanterna.core.world import Local
    >>> from lanterna.data import make_source
    >>> from lanterna.integrations.even_batches import EvenBatches
    >>> import torch
    >>> src = make_source(torch.arange(6.).view(6, 1), train=False, options={"batch_size": 4})
    >>> [b.shape[0] for b in EvenBatches(src, Local())]  # one process: its batches, nothing added
    [4, 2]
    """

    def __init__(self, source: BatchSource, world: Any) -> None:
        super().__init__(source)
        self.world = world
        self.template: Any = None  # the last batch seen: the structure of the empty ones
        # agreed now, when every rank builds its source (a shard's length is the same every epoch): later
        # calls of num_batches(), from any one rank, are then no collectives
        own = source.num_batches()
        flag = -1 if own is None else own
        most, least = -world.min_int(-flag), world.min_int(flag)
        self.agreed: int | None = most if least >= 0 else None  # None: some rank's data has no length

    def num_batches(self) -> int | None:
        """The largest number of batches of any rank (the same on every rank); None for data without a length."""
        return self.agreed

    def __iter__(self) -> Iterator[Any]:
        if self.agreed is not None:
            yield from self._sized(self.agreed)
        else:
            yield from self._streamed()

    def _sized(self, agreed: int) -> Iterator[Any]:
        done = 0
        for batch in self.source:
            self.template = batch
            done += 1
            yield batch
        for _ in range(agreed - done):
            yield self._empty()

    def _streamed(self) -> Iterator[Any]:
        it = iter(self.source)
        flag = torch.zeros(1, dtype=torch.int64, device=self.world.device)
        while True:
            batch = next(it, _END)
            flag.fill_(0 if batch is _END else 1)
            if int(self.world.all_reduce_sum(flag).item()) == 0:
                return
            if batch is _END:
                yield self._empty()
            else:
                self.template = batch
                yield batch

    def _empty(self) -> Any:
        if self.template is None:
            raise DataError(
                f"Under torchrun rank {self.world.rank} got no sample of this data while other ranks did; it needs "
                "one batch to take part in the others' steps. Give at least as many samples as processes "
                "(WORLD_SIZE), or use fewer processes."
            )
        return empty_like(self.template)


_END = object()
