"""Where a fit runs: its processes and the collectives between them.

:class:`Local` is one process, and the interface every part of lanterna uses: ``ctx.world.any(flag)``,
``all_reduce_sum``, ``min_int``, ``is_main``, ``phase_context`` ... Under torchrun the world is
``integrations.distributed.Distributed``, a subclass with real collectives, so callbacks and metrics never
branch on whether a fit is distributed. This module sits below everything else in lanterna (it imports only
torch), so the metrics' own reductions (:func:`all_gather_rows`, :func:`world_size`) live here too.

>>> from lanterna.core.world import Local
>>> world = Local()
>>> world.any(True), world.min_int(3), world.is_main
(True, 3, True)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Local", "world_size", "all_gather_rows"]


class Local:
    """The world of a single process: every collective is the identity."""

    distributed = False
    rank = 0
    world_size = 1
    is_main = True
    #: whether each process holds only a shard of every parameter (FSDP): gradients and flags read on one rank
    #: then describe its shard only
    shards_parameters = False
    #: where checkpoints go when every rank holds a part of the state (FSDP); None: one file, written by rank 0
    checkpoints: Any = None

    def __repr__(self) -> str:
        return "Local()"

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any (here: ``flag``)."""
        return flag

    def min_int(self, n: int) -> int:
        """The smallest ``n`` over all processes (here: ``n``)."""
        return n

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over all processes, in place (here: ``t``)."""
        return t

    def phase_context(self, training: bool) -> contextlib.AbstractContextManager[Any]:
        """The context around a phase's batches (DDP's ``join()`` for uneven shards)."""
        return contextlib.nullcontext()

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the next backward all-reduces gradients (``DDP.no_sync``); nothing to do here."""

    def barrier(self) -> None:
        """Wait for every process (here: nothing to wait for)."""


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8
def world_size() -> int:
    """Processes in the running default group; 1 when none runs."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(local: Tensor | None, device: torch.device) -> list[Tensor]:
    """Every process's ``local`` tensor (rank order), whatever its number of rows; a process may pass None
    (it has nothing, and no shape to tell), as long as one process has a tensor. Two all-gathers: a header
    with each one's rows, shape and dtype, then the rows padded to the longest."""
    header = torch.full((3 + _MAX_DIMS,), -1, dtype=torch.int64, device=device)  # rows, ndim, dtype, dims...
    if local is not None:
        if local.dim() == 0 or local.dim() > _MAX_DIMS or local.dtype not in _DTYPES:
            raise ValueError(f"cannot gather a tensor of shape {tuple(local.shape)} and dtype {local.dtype}.")
        header[0], header[1], header[2] = local.shape[0], local.dim(), _DTYPES.index(local.dtype)
        header[3:3 + local.dim() - 1] = torch.tensor(local.shape[1:], dtype=torch.int64)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size())]
    dist.all_gather(headers, header)
    rows = [int(h[0]) if int(h[1]) >= 0 else 0 for h in headers]
    ref = next((h for h in headers if int(h[1]) >= 0), None)
    if ref is None:
        raise ValueError("all_gather_rows: no process has a tensor to gather.")
    dtype, trailing = _DTYPES[int(ref[2])], tuple(int(d) for d in ref[3:3 + int(ref[1]) - 1])
    padded = torch.zeros((max(rows), *trailing), dtype=dtype, device=device)
    if local is not None:
        padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(gathered, padded)
    return [g[:r] for g, r in zip(gathered, rows)]
