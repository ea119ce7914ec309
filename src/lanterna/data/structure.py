"""Batch structure: splitting a batch into (input, target), calling a model with it, moving it.

A batch is ``(input, target)``; a bare tensor is an input with no target; a batch of more than two
items has the target last and the positional inputs before it; a batch of one item has no target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "call_model",
    "batch_size_of",
    "flatten",
    "move_to",
    "split_batch",
    "unflatten",
]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(input, target)`` for one batch, following docs/models.md, "Several inputs".

    >>> import torch
    >>> from lanterna.data.structure import split_batch
    >>> x, y = torch.zeros(4, 3), torch.zeros(4)
    >>> split_batch((x, y))[1] is y
    True
    """
    if isinstance(batch, (Tensor, Mapping)):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) > 2:
            return tuple(batch[:-1]), batch[-1]
    raise TypeError(
        f"A batch must be a tensor, a dict of inputs or a tuple (input, target); got {type(batch).__name__}. "
        "Return (x, y) from your Dataset's __getitem__ or pass tensors/arrays as (x, y)."
    )


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` with a batch input: tensor → ``model(x)``, tuple → ``model(*x)``, dict → ``model(**x)``."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size_of(obj: Any) -> int:
    """Number of samples in a batch: the first dimension of its first tensor (1 for a 0-d tensor)."""
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() > 0 else 1
    if isinstance(obj, Mapping):
        for v in obj.values():
            return batch_size_of(v)
    if isinstance(obj, (tuple, list)):
        for v in obj:
            return batch_size_of(v)
    return len(obj)


def move_to(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a nested tuple/list/dict to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(move_to(v, device, non_blocking) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device, non_blocking) for v in obj]
    return obj


def flatten(obj: Any) -> tuple[list[Any], Any]:
    """Flatten nested tuples/lists/dicts into ``(leaves, spec)``; :func:`unflatten` inverts it."""
    leaves: list[Any] = []

    def walk(o: Any) -> Any:
        if isinstance(o, Mapping):
            return ("dict", [(k, walk(v)) for k, v in o.items()])
        if isinstance(o, (tuple, list)):
            return (type(o).__name__, [walk(v) for v in o])
        leaves.append(o)
        return None

    return leaves, walk(obj)


def unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    """Rebuild the structure described by ``spec`` from ``leaves`` (in :func:`flatten`'s order)."""
    return _build(spec, iter(leaves))


def _build(spec: Any, it: Any) -> Any:
    # module level, not a closure: a recursive inner function is a reference cycle that would keep every
    # batch's tensors alive until the garbage collector runs
    if spec is None:
        return next(it)
    kind, children = spec
    if kind == "dict":
        return {k: _build(c, it) for k, c in children}
    items = [_build(c, it) for c in children]
    return tuple(items) if kind == "tuple" else items
