"""Metric base class and naming. Metrics are torchmetrics ``Metric`` objects: update / compute / reset."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["LanternaMetric", "named", "on_output", "metric_key", "metric_display", "MetricSet", "unique_names"]


class LanternaMetric(Metric):
    """Base of ``ln.metrics``: a torchmetrics Metric with a history key and a display name.

    Subclasses declare sum states, so the value is exact over the epoch (a short last batch weighs by its
    size) and reduces across processes by summing.
    """

    name: str = "metric"
    display_name: str = "Metric"
    higher_is_better: bool | None = None
    full_state_update = False

    def _add_sum_states(self, *names: str) -> None:
        for n in names:
            self.add_state(n, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def __setattr__(self, name: str, value: Any) -> None:
        # torchmetrics re-assigns its bookkeeping and the states a dozen times per reset/update/compute; for an
        # existing plain attribute nn.Module.__setattr__ ends in object.__setattr__ after ~5 µs of checks.
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


_PLAIN_TYPES = (Tensor, int, float, bool, type(None))  # exact types: a Parameter or Buffer takes the slow path


def _check_same_numel(metric: str, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape == target.shape:
        return pred, target
    if pred.numel() == target.numel() and pred.shape[0] == target.shape[0]:
        return pred.reshape(target.shape), target
    raise ValueError(
        f"{metric}: predictions of shape {tuple(pred.shape)} and targets of shape {tuple(target.shape)} "
        "do not match. Make the model output the target's shape (e.g. y.unsqueeze(1) or pred.squeeze(1))."
    )


def named(metric: Metric, name: str, *, output: int | str | None = None) -> Metric:
    """Give a metric the history key ``name`` (e.g. ``named(MulticlassF1Score(10), "f1")`` → ``valid_f1``);
    ``output`` also binds it to one output of a multi-output model (see :func:`on_output`).

    >>> import torchmetrics
    >>> m = named(torchmetrics.MeanSquaredError(), "mse2")
    >>> metric_key(m)
    'mse2'
    """
    metric._lanterna_name = name  # type: ignore[attr-defined]
    if output is not None:
        on_output(metric, output)
    return metric


def on_output(metric: Metric, output: int | str) -> Metric:
    """Compute ``metric`` on one output of a multi-output model: an index into a returned tuple or a key of a
    returned dict. The target is taken the same way when it is a tuple/dict (one target per output), else the
    one shared target is used. Without it, metrics see the main output (the first).

    >>> from lanterna.metrics import MAE
    >>> aux_mae = named(on_output(MAE(), 1), "aux_mae")   # history: train_aux_mae, valid_aux_mae
    """
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(f"on_output(metric, output): output must be an index (int) or a key (str), got {output!r}.")
    metric._lanterna_output = output  # type: ignore[attr-defined]
    return metric


def metric_key(metric: Metric) -> str:
    """History key of a metric: its ``named`` name, a lanterna metric's ``name``, or the class name."""
    key = getattr(metric, "_lanterna_name", None)
    if key:
        return key
    if isinstance(metric, LanternaMetric):
        return metric.name
    return type(metric).__name__.lower()


def metric_display(metric: Metric, key: str) -> str:
    """Name shown on the console (luz's abbreviations for lanterna metrics)."""
    if getattr(metric, "_lanterna_name", None) is None and isinstance(metric, LanternaMetric):
        return metric.display_name + key[len(metric.name):]
    return key


def unique_names(metrics: Sequence[Metric]) -> list[str]:
    """History keys for a list of metrics; repeated names get ``_1``, ``_2`` ... suffixes."""
    seen: dict[str, int] = {}
    out = []
    for m in metrics:
        key = metric_key(m)
        if key in seen:
            seen[key] += 1
            key = f"{key}_{seen[key]}"
        else:
            seen[key] = 0
        out.append(key)
    return out


class MetricSet:
    """Different metrics for training and validation (luz's ``luz_metric_set``).

    >>> from lanterna.metrics import MAE, RMSE
    >>> ms = MetricSet(train=[MAE()], valid=[MAE(), RMSE()])
    >>> [type(m).__name__ for m in ms.valid]
    ['MAE', 'RMSE']
    """

    def __init__(self, train: Iterable[Metric] | None = None, valid: Iterable[Metric] | None = None) -> None:
        self.train = list(train or [])
        self.valid = list(valid or [])


def split_metric_spec(metrics: Any) -> tuple[list[Metric], list[Metric]]:
    """(train metrics, valid metrics) as fresh copies, from a list or a MetricSet."""
    if metrics is None:
        return [], []
    if isinstance(metrics, MetricSet):
        train, valid = metrics.train, metrics.valid
    elif isinstance(metrics, Metric):
        train = valid = [metrics]
    else:
        train = valid = list(metrics)
    for m in [*train, *valid]:
        if not isinstance(m, Metric):
            raise TypeError(
                f"metrics must be ln.metrics objects or torchmetrics.Metric instances; got {type(m).__name__}. "
                "Wrap a plain function in a torchmetrics.Metric subclass."
            )
    return [copy.deepcopy(m) for m in train], [copy.deepcopy(m) for m in valid]
