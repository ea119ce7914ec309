"""Regression metrics: MAE, MSE, RMSE — exact over the epoch."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LanternaMetric, _add_sum_states, _check_same_shape, per_sample

__all__ = ["MAE", "MSE", "RMSE"]


class _ErrorSum(LanternaMetric):
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        _add_sum_states(self, "error_sum", "count")

    def _errors(self, diff: Tensor) -> Tensor:
        return diff.square()

    supports_weight = True

    def update(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        """Fold a batch in; ``weight`` (N,) weighs each sample (all of its elements)."""
        _check_same_shape(self.display_name, pred, target)
        errors = self._errors(pred.detach() - target)
        w = per_sample(weight, errors)
        if w is None:
            self.error_sum += errors.sum(dtype=torch.float64)
            self.count += target.numel()
        else:
            self.error_sum += (errors * w).sum(dtype=torch.float64)
            self.count += w.sum() * (errors[0].numel() if errors.dim() else 1)

    def compute(self) -> Tensor:
        return (self.error_sum / self.count).float()


class MAE(_ErrorSum):
    """Mean absolute error over all elements of the epoch.

    >>> import torch
    >>> from lanterna.metrics import MAE
    >>> m = MAE(); m.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])); float(m.compute())
    1.5
    """

    name, display_name = "mae", "MAE"

    def _errors(self, diff: Tensor) -> Tensor:
        return diff.abs()


class MSE(_ErrorSum):
    """Mean squared error over all elements of the epoch.

    >>> import torch
    >>> from lanterna.metrics import MSE
    >>> m = MSE(); m.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])); float(m.compute())
    2.5
    """

    name, display_name = "mse", "MSE"


class RMSE(_ErrorSum):
    """Root of the epoch's mean squared error (never a mean of batch RMSEs).

    >>> import torch
    >>> from lanterna.metrics import RMSE
    >>> m = RMSE(); m.update(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])); round(float(m.compute()), 4)
    3.5355
    """

    name, display_name = "rmse", "RMSE"

    def compute(self) -> Tensor:
        return (self.error_sum / self.count).sqrt().float()
