"""Monitored quantities (``valid_loss``, ``train_mae`` ...): names, modes and comparisons, shared by
EarlyStopping, ModelCheckpoint, KeepBestModel, LRScheduler and OptunaPruning."""

from __future__ import annotations

import math
from typing import Any

from ..core.context import Context
from ..errors import MonitorError

__all__ = ["available_monitors", "resolve_mode", "Monitor"]

_MAXIMISED = ("acc", "auroc", "auc", "f1", "precision", "recall", "r2", "iou", "dice", "ap", "map", "score")


def available_monitors(ctx: Context) -> list[str]:
    """Names known before the first batch: ``<set>_loss`` and ``<set>_<metric>`` for each set that runs."""
    names = []
    sets = ["train"] + (["valid"] if ctx.valid_data is not None else [])
    for s in sets:
        if ctx.loss_fn is not None:
            names.append(f"{s}_loss")
        for m in ctx.metric_names.get(s, []):
            names.append(f"{s}_{m}")
    return names


def resolve_mode(monitor: str, mode: str) -> str:
    """``"min"`` or ``"max"``; ``"auto"`` maximises accuracy/AUROC-like metrics and minimises the rest."""
    if mode not in ("min", "max", "auto"):
        raise MonitorError(f"mode={mode!r} is not one of 'min', 'max', 'auto'.")
    if mode != "auto":
        return mode
    metric = monitor.split("_", 1)[-1].lower()
    return "max" if any(metric == k or metric.startswith(k + "_") or metric.endswith("_" + k)
                        for k in _MAXIMISED) else "min"


class Monitor:
    """Tracks the best value of one history key.

    >>> m = Monitor("valid_loss", "auto", min_delta=0.0)
    >>> m.improves(1.0), m.improves(0.5)
    (True, True)
    """

    def __init__(self, monitor: str, mode: str = "auto", min_delta: float = 0.0) -> None:
        self.name = monitor
        self.mode = resolve_mode(monitor, mode)
        self.min_delta = abs(float(min_delta))
        self.best: float | None = None

    def check_known(self, ctx: Context) -> None:
        """Raise before the first batch when the name cannot appear in history."""
        known = available_monitors(ctx)
        if self.name in known or getattr(ctx, "custom_step", False):
            return  # names only a custom step's ctx.log creates are checked after the first epoch
        raise MonitorError(
            f"Unknown monitor {self.name!r}. Available: {', '.join(known) or '(none)'}"
            + ("" if ctx.valid_data is not None else " (valid_* names need valid_data)") + "."
        )

    def value(self, ctx: Context) -> float:
        rec = ctx.history[-1] if ctx.history else ctx.record
        if self.name not in rec:
            names = sorted(k for k in rec if k != "epoch")
            raise MonitorError(f"Monitor {self.name!r} is not in this epoch's history; available: {', '.join(names)}.")
        return float(rec[self.name])

    def is_better(self, value: float, reference: float | None) -> bool:
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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
