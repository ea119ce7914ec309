"""On CUDA, each batch's host-to-device copy runs on a side stream, overlapped with the compute of the batch
before it; elsewhere the batches are iterated as they are (``device_batches`` returns the source itself).

How the overlap arises without reading ahead: the loop makes no synchronisation inside a batch, so the host
queues a batch's kernels and asks for the next batch while the GPU still runs them. The source then copies
the next batch (``non_blocking`` from pinned memory: the loaders lanterna builds pin it, and in-memory data too
big for the GPU is kept pinned, see :mod:`.sources`) — on the side stream, so the copy does not queue behind
that compute. Before the batch is handed to the loop, the compute stream waits for the side stream (an event,
not a host wait) and each of its tensors is marked as used by the compute stream (``record_stream``), so the
caching allocator does not reuse its memory while that stream may still read it.

The batches are fetched one at a time, in the order and at the moments the plain loop fetches them, so every
random draw a loader or a dataset makes (augmentations in the main process, a sampler's permutation) happens in
the same order as without the side stream, and a mid-epoch checkpoint sees no batch fetched ahead. Sources
whose batches are already on the device (in-memory data that fits on the GPU: batches are slices taken there)
get no side stream. The first fetch of each epoch — a sampler's order copied to the device, a loader's workers
started — is a natural synchronisation point (:func:`~lanterna.core.sync.allowed_sync`).

>>> import torch
>>> from lanterna.data.prefetch import device_batches
>>> from lanterna.data.sources import TensorBatches
>>> src = TensorBatches([torch.arange(6.0)], ("tuple", [None]), batch_size=4)
>>> device_batches(src, torch.device("cpu")) is src  # the CPU path is the plain one
True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..core.sync import allowed_sync
from .sources import BatchSource, TensorBatches, WrappedSource
from .structure import flatten

__all__ = ["device_batches", "copies_per_batch", "PrefetchedBatches", "CudaStreams"]

_END = object()


class CudaStreams:
    """The side stream of a CUDA device and the hand-over of a batch to the compute stream (the current one).

    Args:
        device: the CUDA device.

    >>> # CudaStreams(torch.device("cuda", 0)).fetching(): a context in which the copies go to the side stream
    """

    _side: dict[torch.device, Any] = {}  # one side stream per device, kept for the process

    def __init__(self, device: torch.device) -> None:
        self.device = device
        side = self._side.get(device)
        if side is None:
            side = self._side[device] = torch.cuda.Stream(device)
        self.side = side

    def start(self) -> None:
        """At an epoch's start: the side stream waits for the work queued so far on the compute stream (data
        placed or written there before the epoch)."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))

    def fetching(self) -> Any:
        """The context in which a batch is fetched: the side stream is the current stream."""
        return torch.cuda.stream(self.side)

    def hand_over(self, tensors: list[Tensor]) -> None:
        """Make the compute stream wait for the batch's copies, and keep their memory until it has used them."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.side)
        for t in tensors:
            if t.device.type == "cuda":
                t.record_stream(compute)


def copies_per_batch(source: BatchSource) -> bool:
    """Whether ``source`` copies each batch to the device while it iterates (a DataLoader's batches, in-memory
    data kept pinned on the host), rather than slicing tensors already there.

    Args:
        source: a batch source, maybe wrapped (skipped, limited batches).

    Returns:
        False only for in-memory data already on the device.

    >>> import torch
    >>> from lanterna.data.prefetch import copies_per_batch
    >>> from lanterna.data.sources import TensorBatches
    >>> copies_per_batch(TensorBatches([torch.zeros(4)], ("tuple", [None]), batch_size=2))
    False
    """
    inner = source
    while isinstance(inner, WrappedSource):
        inner = inner.source
    return not (isinstance(inner, TensorBatches) and getattr(inner, "_stage_device", None) is None)


def _tensors(batch: Any) -> list[Tensor]:
    return [t for t in flatten(batch)[0] if isinstance(t, Tensor)]


class PrefetchedBatches:
    """The batches of ``source``, the same objects in the same order, each fetched under ``streams.fetching()``
    and handed over (``streams.hand_over``) before the loop gets it; the first fetch of each pass inside
    :func:`~lanterna.core.sync.allowed_sync`. With ``streams=None`` only that first fetch is marked.

    Args:
        source: what the batches come from (a batch source, or any iterable).
        streams: a :class:`CudaStreams` (or an object with its ``start`` / ``fetching`` / ``hand_over``), or None.

    >>> from lanterna.data.prefetch import PrefetchedBatches
    >>> list(PrefetchedBatches([1, 2, 3], None))
    [1, 2, 3]
    """

    def __init__(self, source: Iterable[Any], streams: Any) -> None:
        self.source = source
        self.streams = streams

    def __iter__(self) -> Iterator[Any]:
        streams = self.streams
        it = iter(self.source)
        try:
            with allowed_sync():  # the epoch's start
                if streams is None:
                    batch = next(it, _END)
                else:
                    streams.start()
                    with streams.fetching():
                        batch = next(it, _END)
            if streams is None:
                if batch is not _END:
                    yield batch
                    yield from it
                return
            while batch is not _END:
                streams.hand_over(_tensors(batch))
                yield batch
                with streams.fetching():
                    batch = next(it, _END)
        finally:
            close = getattr(it, "close", None)
            if close is not None:  # a loop left early (Ctrl-C, an error): the source's generator ends now
                close()


def device_batches(source: BatchSource, device: torch.device) -> Iterable[Any]:
    """What the loop iterates for ``source`` on ``device``: ``source`` itself off CUDA; on CUDA a
    :class:`PrefetchedBatches` (with a side stream when the source copies each batch, :func:`copies_per_batch`).

    Args:
        source: the phase's batch source.
        device: the loop's device.

    Returns:
        An iterable of the same batches.

    >>> import torch
    >>> from lanterna.data.prefetch import device_batches
    >>> device_batches([(1, 2)], torch.device("cpu"))
    [(1, 2)]
    """
    if device.type != "cuda":
        return source
    return PrefetchedBatches(source, CudaStreams(device) if copies_per_batch(source) else None)
