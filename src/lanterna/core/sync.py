"""Where a fit may wait for the device: its natural synchronisation points, marked.

Inside the batches lanterna reads nothing from an accelerator (docs/performance.md, "GPU path"): the loss and
metric sums stay on the device and the NaN guard decides on the device whether a step is applied. The host
reads device values only at the boundaries of a fit — a phase's begin and end (metrics computed, the NaN
guard's flag read), an epoch's begin and end (callbacks, printing), the first batch's checks, the start of an
epoch's data (a sampler's order copied to the device) — and each of those runs inside :func:`allowed_sync`.
On CUDA that region turns torch's sync debug mode off and puts it back afterwards, so a fit run under
``torch.cuda.set_sync_debug_mode("error")`` fails on any synchronisation outside those points
(tests/core/test_gpu_path.py). Without CUDA it only keeps a count of open regions (:func:`in_allowed_sync`),
which the CPU tests use to tell a read at a natural point from a read inside a batch.

:class:`LatestValue` is how the progress bars show a running loss without waiting: on CUDA the value is copied
to pinned host memory without blocking, and shown once that copy has completed.

>>> from lanterna.core.sync import allowed_sync, in_allowed_sync
>>> with allowed_sync():
...     in_allowed_sync()
True
>>> in_allowed_sync()
False
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["allowed_sync", "in_allowed_sync", "LatestValue"]

_open = 0  # allowed_sync regions open now (nested regions count each)


class _AllowedSync:
    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        global _open
        _open += 1
        self._previous = 0
        if torch.cuda.is_initialized():  # CUDA never used in this process: no mode to change
            mode = torch.cuda.get_sync_debug_mode()
            if mode:
                torch.cuda.set_sync_debug_mode(0)
                self._previous = mode

    def __exit__(self, *exc: object) -> None:
        global _open
        _open -= 1
        if self._previous:
            torch.cuda.set_sync_debug_mode(self._previous)


def allowed_sync() -> _AllowedSync:
    """A region where the host may wait for the device: a natural synchronisation point of the fit.

    On CUDA, torch's sync debug mode (``torch.cuda.set_sync_debug_mode``) is off inside the region and restored
    when it ends; regions nest. Costs well under a microsecond where CUDA is not in use.

    Returns:
        A context manager.

    >>> import torch
    >>> from lanterna.core.sync import allowed_sync
    >>> with allowed_sync():
    ...     value = float(torch.ones(()))  # an epoch-end read
    >>> value
    1.0
    """
    return _AllowedSync()


def in_allowed_sync() -> bool:
    """Whether an :func:`allowed_sync` region is open now (the CPU tests' stand-in for the sync debug mode).

    Returns:
        True inside a region.

    >>> from lanterna.core.sync import in_allowed_sync
    >>> in_allowed_sync()
    False
    """
    return _open > 0


class LatestValue:
    """The most recent value of a device scalar that the host can have without waiting for the device.

    On the CPU :meth:`read` returns the value itself. On CUDA it returns the value of an earlier call whose
    non-blocking copy to pinned host memory has completed (None until one has), and starts the next copy when
    none is in flight: a progress bar's running loss, at most a refresh behind, with no synchronisation. On
    other accelerators it reads the value (a synchronisation, as before).

    >>> import torch
    >>> from lanterna.core.sync import LatestValue
    >>> LatestValue().read(torch.tensor(2.5))
    2.5
    """

    def __init__(self) -> None:
        self._host: Tensor | None = None  # pinned float64 buffer the copies land in
        self._event: Any = None  # the CUDA event recorded after the copy in flight
        self._value: float | None = None

    def read(self, t: Tensor) -> float | None:
        """The latest value of the one-element tensor ``t`` the host has (see the class).

        Args:
            t: a one-element tensor (the batch's loss).

        Returns:
            A float, or None on CUDA while no copy has completed yet.
        """
        t = t.detach()
        if t.device.type != "cuda":
            return float(t)
        if self._event is not None and self._event.query():  # a query, not a wait
            self._value = float(self._host)  # type: ignore[arg-type]  # host memory: no synchronisation
            self._event = None
        if self._event is None:
            if self._host is None:
                self._host = torch.empty((), dtype=torch.float64, pin_memory=True)
            self._host.copy_(t.reshape(()), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        return self._value
