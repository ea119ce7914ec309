"""Built-in callback that keeps the epoch's loss, metrics and ``ctx.log`` values — on the device, read once
per phase — and writes them into the epoch's history record."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ..core.callback import Callback
from ..core.context import Context
from ..metrics import metric_display, unique_names

__all__ = ["MetricsCallback", "main_output"]


def main_output(obj: Any) -> Any:
    """The output (or target) metrics see: the first of a tuple, the first value of a dict."""
    if isinstance(obj, (tuple, list)) and obj:
        return obj[0]
    if isinstance(obj, Mapping) and obj:
        return next(iter(obj.values()))
    return obj


def _select(obj: Any, output: Any) -> Any:
    if output is None:
        return main_output(obj)
    if isinstance(obj, Mapping) or isinstance(obj, (tuple, list)):
        return obj[output]
    return obj


class MetricsCallback(Callback):
    """Updates metrics after every batch and computes them at the end of each phase (order -100)."""

    order = -100

    def __init__(self, train: list[Metric], valid: list[Metric]) -> None:
        self.sets = {"train": self._named(train), "valid": self._named(valid)}

    @staticmethod
    def _named(metrics: list[Metric]) -> list[tuple[str, Metric]]:
        return list(zip(unique_names(metrics), metrics))

    def on_fit_begin(self, ctx: Context) -> None:
        device = ctx.device
        for pairs in self.sets.values():
            for _, m in pairs:
                m.to(device)
                if device.type == "mps":
                    m.set_dtype(torch.float32)
        names = {"loss": "Loss"}
        for pairs in self.sets.values():
            names.update({k: metric_display(m, k) for k, m in pairs})
        ctx.display_names = {**getattr(ctx, "display_names", {}), **names}
        ctx.metrics = {s: [m for _, m in pairs] for s, pairs in self.sets.items()}
        ctx.metric_names = {s: [k for k, _ in pairs] for s, pairs in self.sets.items()}

    def _begin(self, ctx: Context) -> None:
        self._active = self.sets["train" if ctx.training else "valid"]
        for _, m in self._active:
            m.reset()
        self._loss_sum = torch.zeros((), dtype=torch.float64 if ctx.device.type != "mps" else torch.float32,
                                     device=ctx.device)
        self._has_loss = False
        self._count = 0
        self._t0 = time.perf_counter()
        ctx.pop_logs()

    on_train_begin = _begin
    on_valid_begin = _begin

    def _batch_end(self, ctx: Context) -> None:
        bs = ctx.batch_size
        self._count += bs
        loss = ctx.loss
        if loss is not None:
            self._loss_sum.add_(loss.detach(), alpha=bs)
            self._has_loss = True
        if self._active and ctx.target is not None:
            pred, target = ctx.pred, ctx.target
            for _, m in self._active:
                out = getattr(m, "_lanterna_output", None)
                m.update(_select(pred, out).detach(), _select(target, out))

    on_train_batch_end = _batch_end
    on_valid_batch_end = _batch_end

    def _end(self, ctx: Context) -> None:
        prefix = ctx.set_name + "_"
        names: list[str] = []
        values: list[Any] = []
        if self._has_loss:
            names.append("loss")
            values.append(self._loss_sum / max(self._count, 1))
        if ctx.target is not None or self._count == 0:
            for key, m in self._active:
                names.append(key)
                values.append(m.compute())
        for key, v in ctx.pop_logs().items():
            names.append(key)
            values.append(v)
        for name, value in zip(names, _to_python(values)):
            ctx.record[prefix + name] = value
        if ctx.training:
            elapsed = time.perf_counter() - self._t0
            ctx.record["samples_per_s"] = self._count / elapsed if elapsed > 0 else float("nan")

    on_train_end = _end
    on_valid_end = _end


def _to_python(values: list[Any]) -> list[Any]:
    """Epoch values as Python floats (lists for non-scalar metrics), with one device synchronisation."""
    tensors = [v.detach().reshape(-1) for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    dtype = torch.float32 if tensors[0].device.type == "mps" else torch.float64
    flat = iter(torch.cat([t.to(dtype) for t in tensors]).cpu().tolist())
    out: list[Any] = []
    for v in values:
        if not isinstance(v, Tensor):
            out.append(float(v))
        elif v.numel() == 1:
            out.append(next(flat))
        else:
            out.append([next(flat) for _ in range(v.numel())])
    return out
