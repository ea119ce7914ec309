"""Sample weights (``fit(data, sample_weight=w)``): one non-negative weight per sample, carried beside each batch.

In-memory data takes the weights as one more leaf, sliced with the same indices as the batch (shuffles and
validation splits included); a map-style ``Dataset`` is wrapped in :class:`WeightedSamples`, whose items are
``(sample, weight)``, and its collate function in :class:`WeightedCollate`. Either way the source yields
``(batch, weights)`` and the loop puts the weights in ``ctx.sample_weight``.

>>> import torch
>>> from lanterna.data.weights import check_sample_weight
>>> check_sample_weight([1, 0, 2], 3, "training data")
tensor([1., 0., 2.])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from ..errors import DataError

__all__ = ["check_sample_weight", "WeightedSamples", "WeightedCollate"]


def check_sample_weight(weight: Any, n: int | None, what: str) -> Tensor:
    """``weight`` as a 1-D float32 tensor of ``n`` finite, non-negative values, or a clear error.

    Args:
        weight: a tensor, NumPy array, pandas Series or list, one weight per sample.
        n: the number of samples of the data (None: unknown, not checked).
        what: how the error names the data.
    """
    try:
        w = torch.as_tensor(np.asarray(weight) if not isinstance(weight, Tensor) else weight)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"sample_weight for the {what} must be a 1-D tensor or array of numbers; got "
                        f"{type(weight).__name__} ({e}).") from None
    if w.dim() != 1:
        raise DataError(f"sample_weight for the {what} must be 1-D (one weight per sample); got shape "
                        f"{tuple(w.shape)}. Flatten it: w.reshape(-1).")
    if not (w.is_floating_point() or w.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                  torch.bool)):
        raise DataError(f"sample_weight for the {what} must hold numbers; got dtype {w.dtype}.")
    w = w.detach().to(torch.float32).cpu()
    if n is not None and w.numel() != n:
        raise DataError(f"sample_weight has {w.numel()} weights but the {what} has {n} samples; give one weight per "
                        "sample, in the data's order.")
    if not bool(torch.isfinite(w).all()):
        raise DataError(f"sample_weight for the {what} holds NaN or Inf; weights must be finite.")
    if bool((w < 0).any()):
        raise DataError(f"sample_weight for the {what} holds negative weights (the smallest is {float(w.min())}); "
                        "weights must be >= 0 (0: the sample has no influence).")
    if n and not bool((w > 0).any()):
        raise DataError(f"sample_weight for the {what} is all zeros: nothing would be trained or measured.")
    return w


class WeightedSamples(Dataset):
    """A map-style dataset whose item ``i`` is ``(dataset[i], weight[i])``.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lanterna.data.weights import WeightedSamples
    >>> WeightedSamples(TensorDataset(torch.arange(3.0)), torch.tensor([1.0, 2.0, 3.0]))[1]
    ((tensor(1.),), tensor(2.))
    """

    def __init__(self, dataset: Any, weight: Tensor) -> None:
        self.dataset, self.weight = dataset, weight

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        return self.dataset[i], self.weight[i]


class WeightedCollate:
    """A collate function for :class:`WeightedSamples` items: the samples by ``collate`` (the loader's own,
    default_collate by default), the weights stacked: ``(batch, weights)``."""

    def __init__(self, collate: Any = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, items: list[tuple[Any, Tensor]]) -> tuple[Any, Tensor]:
        return self.collate([sample for sample, _ in items]), torch.stack([w for _, w in items])
