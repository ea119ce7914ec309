"""Data for a resumed fit: :class:`SkipBatches` (the rest of an interrupted epoch),
:func:`source_generators` (the generators whose states a checkpoint holds) and :func:`data_fingerprint` (to
tell a resumed run that its data differ from the interrupted run's)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from ..errors import CheckpointError
from .memmap import MemmapBatches
from .sources import BatchSource, TensorBatches, WrappedSource

__all__ = ["SkipBatches", "source_generators", "data_fingerprint"]

_END = object()


class SkipBatches(WrappedSource):
    """The rest of an epoch interrupted after ``done`` training batches: ``source`` is iterated from the
    start (drawing the epoch's shuffle exactly as the interrupted run did), its first ``done`` batches are
    dropped, then ``after_skip`` runs (AutoResume puts back the RNG states of the moment of the interruption)
    and the remaining batches follow.

    Args:
        source: the epoch's batch source.
        done: how many batches the interrupted run had trained.
        after_skip: called once the ``done`` batches are skipped, before the next batch is drawn.

    >>> import torch
    >>> from lanterna.data import TensorBatches
    >>> from lanterna.data.resume import SkipBatches
    >>> src = TensorBatches([torch.arange(10.0)], ("tuple", [None]), batch_size=4)
    >>> [b[0].tolist() for b in SkipBatches(src, done=2)]
    [[8.0, 9.0]]
    """

    def __init__(self, source: BatchSource, done: int, after_skip: Callable[[], None] | None = None) -> None:
        super().__init__(source)
        self.done, self.after_skip = done, after_skip

    def num_batches(self) -> int | None:
        n = self.source.num_batches()
        return None if n is None else n - self.done

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.source)
        for i in range(self.done):
            if next(it, _END) is _END:
                raise CheckpointError(
                    f"The checkpoint was taken after batch {self.done} of an epoch, but the training data now has "
                    f"only {i} batches per epoch. Resume with the same data, or delete the resume folder."
                )
        if self.after_skip is not None:
            self.after_skip()
        yield from it


def source_generators(sources: Mapping[str, Any]) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects the data sources draw from (a DataLoader's ``generator``, a sampler's
    ``generator``, the fast path's loader/sampler generators), by a stable name such as
    ``"train.loader_generator"``; the same names inside a :class:`SkipBatches` as outside. The global
    generators are captured separately (:func:`lanterna.io.capture_rng_state`).

    Args:
        sources: name -> batch source (or DataLoader, or None).

    >>> import torch
    >>> from lanterna.data import TensorBatches
    >>> from lanterna.data.resume import SkipBatches, source_generators
    >>> g = torch.Generator()
    >>> src = TensorBatches([torch.arange(4.0)], ("tuple", [None]), shuffle=True, loader_generator=g)
    >>> source_generators({"train": SkipBatches(src, 1)}) == {"train.loader_generator": g}
    True
    """
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()

    def walk(obj: Any, name: str, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, SkipBatches):
            walk(obj.source, name, depth)
            return
        if isinstance(obj, torch.Generator):
            if not any(g is obj for g in found.values()):
                found[name] = obj
            return
        if not isinstance(obj, (BatchSource, DataLoader, Sampler)):
            return
        for attr, value in sorted(vars(obj).items()):
            if isinstance(value, (torch.Generator, BatchSource, DataLoader, Sampler)):
                walk(value, f"{name}.{attr}", depth + 1)

    for name, source in sources.items():
        walk(source, name, 0)
    return found


def data_fingerprint(sources: Mapping[str, BatchSource | None]) -> dict[str, str]:
    """A cheap summary of each source (its size, and the sums of in-memory tensors or a Subset's indices),
    to tell a resumed run that its data differ from the run that wrote the checkpoint (an unseeded
    ``valid_data`` split, say). Sources that are None are left out.

    Args:
        sources: name -> batch source (``{"train": ctx.train_data, "valid": ctx.valid_data}``).

    >>> import torch
    >>> from lanterna.data import TensorBatches
    >>> from lanterna.data.resume import data_fingerprint
    >>> a = TensorBatches([torch.arange(4.0)], ("tuple", [None]), batch_size=2)
    >>> b = TensorBatches([torch.arange(4.0) + 1], ("tuple", [None]), batch_size=2)
    >>> data_fingerprint({"train": a}) == data_fingerprint({"train": b})
    False
    """
    out: dict[str, str] = {}
    for name, src in sources.items():
        if src is None:
            continue
        n = getattr(getattr(src, "sampler", None), "n", src.num_samples)  # a DDP shard counts its whole set
        h = hashlib.sha256(f"{type(src).__name__}|{n}".encode())
        inner = getattr(src, "source", src)
        if isinstance(inner, MemmapBatches):  # its file's identity: summing the rows would read it whole
            h.update(inner.fingerprint())
        elif isinstance(inner, TensorBatches):
            with torch.no_grad():
                sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in inner.leaves]).cpu()
            h.update(sums.numpy().tobytes())
        else:
            dataset = getattr(getattr(inner, "loader", None), "dataset", None)
            if isinstance(dataset, Subset):
                h.update(torch.as_tensor(list(dataset.indices), dtype=torch.int64).numpy().tobytes())
        out[name] = h.hexdigest()[:16]
    return out
