"""Cross-process gathering used by the metrics (their ``cat`` states) and by DDP's ``predict``.

>>> from lanterna.core.collectives import world_size
>>> world_size()   # no process group running
1
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "all_gather_rows"]

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
