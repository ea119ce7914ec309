"""Monitored quantities (``valid_loss``, ``train_mae`` ...): names, modes and comparisons, shared by
EarlyStopping, ModelCheckpoint, KeepBestModel, LRScheduler and OptunaPruning.

``mode="auto"`` reads the direction from the metric behind the name (its ``higher_is_better``: lanterna metrics
declare it, torchmetrics metrics have their own); ``<set>_loss`` and other ``*_loss`` names are minimised; any
other name (a ``ctx.log`` value, a metric whose ``higher_is_better`` is None) needs an explicit mode.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.context import Context
from ..errors import MonitorError
from ..metrics.base import LanternaMetric, MetricSet, entry_key, is_metric, unique_names

__all__ = ["available_monitors", "resolve_mode", "Monitor"]

_MODES = ("min", "max", "auto")
_SETS = ("train", "valid")


def available_monitors(ctx: Context) -> list[str]:
    """Names known before the first batch: ``<set>_loss`` and ``<set>_<metric>`` for each set that runs."""
    names = []
    for s in _running_sets(ctx):
        if ctx.loss_fn is not None:
            names.append(f"{s}_loss")
        for m in ctx.metric_names.get(s, []):
            names.append(f"{s}_{m}")
    return names


def _running_sets(ctx: Context) -> list[str]:
    return ["train"] + (["valid"] if ctx.valid_data is not None else [])


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise MonitorError(f"mode={mode!r} is not one of 'min', 'max', 'auto'.")


def _metric_pairs(metrics: Any) -> dict[str, list[tuple[str, Any]]]:
    """``{set: [(history key, metric)]}`` from a setup's metric spec (a list, one metric, a MetricSet, None)."""
    if metrics is None:
        return {}
    if isinstance(metrics, MetricSet):
        train, valid = list(metrics.train), list(metrics.valid)
    elif is_metric(metrics):
        train = valid = [metrics]
    else:
        train = valid = list(metrics)
    return {"train": list(zip(unique_names(train), train)), "valid": list(zip(unique_names(valid), valid))}


def _ctx_pairs(ctx: Context) -> dict[str, list[tuple[str, Any]]]:
    metrics, names = ctx.metrics or {}, ctx.metric_names or {}
    return {s: list(zip(names.get(s, []), metrics.get(s, []))) for s in _running_sets(ctx)}


def _find(monitor: str, pairs: dict[str, list[tuple[str, Any]]]) -> tuple[Any, str] | None:
    """The metric behind ``monitor`` and the entry key after its name ("" for the metric's own value): an exact
    ``<set>_<key>``, else ``<set>_<key>_<entry>`` of a metric that may return a dict (a torchmetrics metric)."""
    set_name, _, rest = monitor.partition("_")
    candidates = []
    for key, metric in pairs.get(set_name, []):
        if rest == key:
            return metric, ""
        if not isinstance(metric, LanternaMetric) and rest.startswith(key + "_"):
            candidates.append((len(key), metric, rest[len(key) + 1:]))
    if not candidates:
        return None
    _, metric, entry = max(candidates, key=lambda c: c[0])  # the longest name: "f1_1_x" is f1_1's entry x
    return metric, entry


def _higher_is_better(metric: Any, entry: str) -> bool | None:
    if entry and hasattr(metric, "items") and not hasattr(metric, "higher_is_better"):  # a MetricCollection
        members = list(metric.items(keep_base=False, copy_state=False))
        for name, member in sorted(members, key=lambda kv: -len(str(kv[0]))):
            key = entry_key(name)
            if entry == key or entry.startswith(key + "_"):
                return _higher_is_better(member, entry[len(key) + 1:])
        directions = {_higher_is_better(m, "") for _, m in members}
        return directions.pop() if len(directions) == 1 else None
    value = getattr(metric, "higher_is_better", None)
    return value if isinstance(value, bool) else None


def _direction(monitor: str, pairs: dict[str, list[tuple[str, Any]]]) -> tuple[str | None, str]:
    """(``"min"``/``"max"``/None, why None)."""
    set_name, _, rest = monitor.partition("_")
    if rest == "loss" and set_name in _SETS:
        return "min", ""
    found = _find(monitor, pairs)
    if found is not None:
        metric, entry = found
        higher = _higher_is_better(metric, entry)
        if higher is not None:
            return ("max" if higher else "min"), ""
        if not monitor.endswith("_loss"):
            return None, f"its metric {type(metric).__name__} declares higher_is_better=None"
    if monitor.endswith("_loss"):
        return "min", ""
    return None, "it is not a metric that declares higher_is_better (a ctx.log value?)"


def _unknown_direction(monitor: str, why: str) -> MonitorError:
    return MonitorError(
        f"mode='auto' cannot tell whether {monitor!r} should be minimised or maximised: {why}. "
        f"Pass mode='min' or mode='max'."
    )


def resolve_mode(monitor: str, mode: str, metrics: Any = None) -> str:
    """``"min"`` or ``"max"`` for ``monitor`` before any fit; ``mode="auto"`` reads the direction from the metric
    behind the name in ``metrics`` (a setup's metric spec: a list, a MetricSet, or None), and minimises
    ``*_loss`` names.

    Args:
        monitor: a history key such as ``"valid_loss"`` or ``"valid_acc"``.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        metrics: the metrics the fit will compute (``setup.metrics``).

    Raises:
        MonitorError: a bad ``mode``, or ``"auto"`` for a name whose direction cannot be known.

    >>> import lanterna as ln
    >>> from lanterna.callbacks.monitor import resolve_mode
    >>> resolve_mode("valid_acc", "auto", [ln.metrics.Accuracy()]), resolve_mode("valid_loss", "auto")
    ('max', 'min')
    """
    _check_mode(mode)
    if mode != "auto":
        return mode
    direction, why = _direction(monitor, _metric_pairs(metrics))
    if direction is None:
        raise _unknown_direction(monitor, why)
    return direction


def finite_number(value: Any, name: str) -> float:
    """``float(value)`` for a real, finite number (a one-element tensor too); a clear error naming ``name``
    otherwise (a string, a bool, None, NaN).

    >>> import torch
    >>> from lanterna.callbacks.monitor import finite_number
    >>> finite_number(0.5, "min_delta"), finite_number(torch.tensor([2.0]), "min_delta")
    (0.5, 2.0)
    """
    try:
        if isinstance(value, (bool, str, bytes)) or value is None:
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise MonitorError(f"{name}={value!r}: give a number, e.g. {name}=0.01.") from None
    if not math.isfinite(number):
        raise MonitorError(f"{name}={value!r}: give a finite number.")
    return number


class Monitor:
    """Tracks the best value of one history key. With ``mode="auto"`` the direction is resolved in
    :meth:`check_known` (at fit begin, from the fit's metrics), except for ``*_loss`` names (minimised).

    >>> from lanterna.callbacks.monitor import Monitor
    >>> m = Monitor("valid_loss", "auto", min_delta=0.1)
    >>> m.improves(1.0), m.improves(0.95), m.improves(0.5), m.best
    (True, False, True, 0.5)
    """

    def __init__(self, monitor: str, mode: str = "auto", min_delta: float = 0.0) -> None:
        _check_mode(mode)
        if not isinstance(monitor, str) or not monitor:
            raise MonitorError(f"monitor={monitor!r}: give a history key such as 'valid_loss' or 'train_mae'.")
        self.name = monitor
        self.requested_mode = mode
        self.mode = mode
        if mode == "auto" and monitor.endswith("_loss"):
            self.mode = "min"  # known before fit (a metric named so is read again at check_known)
        self.min_delta = abs(finite_number(min_delta, "min_delta"))
        self.best: float | None = None

    def check_known(self, ctx: Context, fallback_mode: str | None = None) -> None:
        """Before the first batch: raise when the name cannot appear in history, and resolve ``mode="auto"``
        from the metric behind the name (``fallback_mode`` when its direction cannot be known, else an error)."""
        pairs = _ctx_pairs(ctx)
        known = available_monitors(ctx)
        if not (self.name in known or _find(self.name, pairs) is not None or ctx.custom_step):
            # names only a custom step's ctx.log creates are checked after the first epoch
            raise MonitorError(
                f"Unknown monitor {self.name!r}. Available: {', '.join(known) or '(none)'}"
                + ("" if ctx.valid_data is not None else " (valid_* names need valid_data)") + "."
            )
        if self.requested_mode == "auto":
            direction, why = _direction(self.name, pairs)
            direction = direction or fallback_mode
            if direction is None:
                raise _unknown_direction(self.name, why)
            self.mode = direction

    def value(self, ctx: Context) -> float:
        rec = ctx.history[-1] if ctx.history else ctx.record
        if self.name not in rec:
            names = sorted(k for k in rec if k != "epoch")
            raise MonitorError(f"Monitor {self.name!r} is not in this epoch's history; available: {', '.join(names)}.")
        return float(rec[self.name])

    def is_better(self, value: float, reference: float | None) -> bool:
        if self.mode == "auto":
            raise MonitorError(f"Monitor {self.name!r}: mode='auto' is resolved by check_known(ctx) at fit begin; "
                               "call it first, or pass mode='min' or 'max'.")
        if reference is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def improves(self, value: float) -> bool:
        """True (and records ``value`` as the best) when ``value`` beats the best by more than min_delta."""
        if self.is_better(value, self.best):
            self.best = value
            return True
        return False
