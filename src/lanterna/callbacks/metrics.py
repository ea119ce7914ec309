"""Built-in callback that keeps the epoch's loss, metrics and ``ctx.log`` values — on the device, read once
per phase — and writes them into the epoch's history record.

Speed: a metric ``update`` costs microseconds of Python whatever the batch size (a torchmetrics one tens of
them), as much as a whole training step of a small model. So the batch losses and the (prediction, target) pairs of
``ln.metrics`` (whose states are sums or concatenations over samples, so that one update on concatenated
batches equals the per-batch updates) are kept on the device and folded in with one update every
``FLUSH_BATCHES`` batches and at the end of the phase. The first batch of each set is updated at once, so a
shape error still surfaces at the first batch. Other torchmetrics are updated every batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.callback import Callback
from ..core.context import Context
from ..metrics import metric_display, unique_names
from ..metrics.base import LanternaMetric

__all__ = ["MetricsCallback", "main_output"]

FLUSH_BATCHES = 64  # batches buffered before one metric update
FLUSH_ELEMENTS = 1 << 22  # ... or fewer, once the buffered predictions hold this many elements


def main_output(obj: Any) -> Any:
    """The output (or target) metrics see: the first of a tuple, the first value of a dict."""
    if isinstance(obj, (tuple, list)) and obj:
        return obj[0]
    if isinstance(obj, Mapping) and obj:
        return next(iter(obj.values()))
    return obj


def _select(obj: Any, output: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj
    if output is None:
        return main_output(obj)
    if isinstance(obj, (Mapping, tuple, list)):
        return obj[output]
    return obj


class MetricsCallback(Callback):
    """Updates metrics after every batch and computes them at the end of each phase (order -100)."""

    order = -100

    def __init__(self, train: list[Any], valid: list[Any]) -> None:
        self.sets = {"train": self._named(train), "valid": self._named(valid)}
        self._seen: set[str] = set()
        self._buffer = True
        self._active: list[tuple[str, Any]] = []
        self._losses, self._sizes, self._pending, self._slots = [], [], [], []

    @staticmethod
    def _named(metrics: list[Any]) -> list[tuple[str, Any]]:
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
        # CUDA graphs (compile mode "reduce-overhead") overwrite a step's outputs at the next step: no buffering
        acc = getattr(ctx, "accelerator", None)
        self._buffer = not (device.type == "cuda" and getattr(acc, "compile", False))

    def _begin(self, ctx: Context) -> None:
        self._active = self.sets["train" if ctx.training else "valid"]
        for _, m in self._active:
            m.reset()
        self._loss_sum = torch.zeros((), dtype=torch.float64 if ctx.device.type != "mps" else torch.float32,
                                     device=ctx.device)
        self._has_loss = False
        self._count = 0
        self._losses: list[Tensor] = []  # detached batch losses not yet added to _loss_sum
        self._sizes: list[int] = []
        # per metric: buffered (pred, target) pairs, or None when the metric is updated every batch
        first = ctx.set_name not in self._seen
        self._seen.add(ctx.set_name)
        self._pending: list[list[tuple[Any, Any]] | None] = [
            [] if self._buffer and isinstance(m, LanternaMetric) and m.fold_batches else None for _, m in self._active]
        self._slots = [(m, getattr(m, "_lanterna_output", None), pending)
                       for (_, m), pending in zip(self._active, self._pending)]
        self._pending_elements = 0
        self._direct = first  # the set's first batch is updated at once (errors at the first batch)
        ctx.pop_logs()

    on_train_begin = _begin
    on_valid_begin = _begin

    def _batch_end(self, ctx: Context) -> None:
        bs = ctx.batch_size
        self._count += bs
        loss = ctx.loss
        if loss is not None:
            self._losses.append(loss.detach())
            self._sizes.append(bs)
            self._has_loss = True
            if len(self._losses) >= FLUSH_BATCHES:
                self._flush_losses()
        if self._active and ctx.target is not None:
            pred, target = ctx.pred, ctx.target
            direct, n = self._direct, 0
            for m, out, pending in self._slots:
                p, t = _select(pred, out).detach(), _select(target, out)
                if pending is None or direct:
                    m.update(p, t)
                else:
                    pending.append((p, t))
                    n = len(pending)
                    self._pending_elements += p.numel()
            self._direct = False
            if n >= FLUSH_BATCHES or self._pending_elements >= FLUSH_ELEMENTS:
                self._flush_metrics()

    on_train_batch_end = _batch_end
    on_valid_batch_end = _batch_end

    def _flush_losses(self) -> None:
        """Add the buffered batch losses, weighted by batch size, to the running sum: one stacked sum per
        run of equal batch sizes (all of them but a short last batch, usually)."""
        losses, sizes = self._losses, self._sizes
        if not losses:
            return
        self._losses, self._sizes = [], []
        acc, start = self._loss_sum, 0
        for i in range(1, len(sizes) + 1):
            if i < len(sizes) and sizes[i] == sizes[start]:
                continue
            run, size = losses[start:i], sizes[start]
            start = i
            if len(run) > 1:
                try:
                    acc.add_(torch.stack(run).sum(dtype=acc.dtype), alpha=size)
                    continue
                except RuntimeError:  # losses of different shapes or dtypes: one by one
                    pass
            for loss in run:
                acc.add_(loss, alpha=size)

    def _flush_metrics(self) -> None:
        """One update per ln metric with the buffered batches concatenated."""
        for (_, m), pending in zip(self._active, self._pending):
            if not pending:
                continue
            if len(pending) == 1:
                m.update(*pending[0])
            else:
                try:
                    preds = torch.cat([p for p, _ in pending])
                    targets = torch.cat([t for _, t in pending])
                except (RuntimeError, TypeError):  # batches that do not concatenate (varying trailing sizes)
                    for p, t in pending:
                        m.update(p, t)
                else:
                    m.update(preds, targets)
            pending.clear()
        self._pending_elements = 0

    def flush(self) -> None:
        """Fold every buffered batch into the loss sum and the metric states (done at each phase's end)."""
        self._flush_losses()
        self._flush_metrics()

    def _end(self, ctx: Context) -> None:
        self.flush()
        loss_sum, count, logs = self._loss_sum, self._count, ctx.pop_logs()
        if ctx.dist is not None:  # exact global values: reduce sums and counts, never means
            loss_sum, count, logs = _reduce(ctx, loss_sum, count, logs)
        names: list[str] = []
        values: list[Any] = []
        has_loss = self._has_loss if ctx.dist is None else (count > 0 and ctx.loss_fn is not None)
        if has_loss:
            names.append("loss")
            values.append(loss_sum / max(count, 1))
        if self._active and (ctx.target is not None or ctx.dist is not None):
            for key, m in self._active:
                names.append(key)
                values.append(m.compute())  # metrics reduce their states across ranks themselves
        for key, (total, weight) in logs.items():
            names.append(key)
            values.append(total / weight)
        prefix = ctx.set_name + "_"
        for name, value in zip(names, _to_python(values)):
            ctx.record[prefix + name] = value

    on_train_end = _end
    on_valid_end = _end

    # A mid-epoch checkpoint (AutoResume on SIGTERM) stores the running sums of the phase under way, and the
    # resumed run puts them back after its own _begin, so the epoch's values come out exactly the same.
    def phase_state_dict(self) -> dict[str, Any]:
        """The current phase's running loss sum, sample count and metric states."""
        self.flush()
        return {"loss_sum": self._loss_sum.detach().clone(), "has_loss": self._has_loss, "count": self._count,
                "metrics": [{"state": {k: (list(v) if isinstance(v, list) else v.detach().clone())
                                       for k, v in m.metric_state.items()},
                             "updates": int(getattr(m, "_update_count", 0))} for _, m in self._active]}

    def load_phase_state_dict(self, state: dict[str, Any]) -> None:
        """Put back :meth:`phase_state_dict` (after this phase's ``on_*_begin``)."""
        device = self._loss_sum.device
        self._loss_sum = state["loss_sum"].to(device=device, dtype=self._loss_sum.dtype)
        self._has_loss, self._count = bool(state["has_loss"]), int(state["count"])
        for (_, m), saved in zip(self._active, state["metrics"]):
            if isinstance(m, LanternaMetric):
                m.load_metric_state(saved["state"])
                continue
            for k, v in saved["state"].items():  # a torchmetrics Metric
                setattr(m, k, [t.to(device) for t in v] if isinstance(v, list) else v.to(device))
            m._update_count = int(saved["updates"])
            m._computed = None


def _reduce(ctx: Context, loss_sum: Tensor, count: int, logs: dict[str, Any]) -> tuple[Tensor, int, dict[str, Any]]:
    """Sum the loss, the sample count and the logged sums/weights over all ranks, in one all-reduce."""
    dtype = loss_sum.dtype
    parts = [loss_sum.reshape(1), torch.tensor([float(count)], dtype=dtype, device=loss_sum.device)]
    for total, weight in logs.values():
        parts.append(torch.as_tensor(total, dtype=dtype, device=loss_sum.device).reshape(1))
        parts.append(torch.tensor([float(weight)], dtype=dtype, device=loss_sum.device))
    vec = ctx.dist.all_reduce_sum(torch.cat(parts))
    reduced = {k: (vec[2 + 2 * i], float(vec[3 + 2 * i])) for i, k in enumerate(logs)}
    return vec[0], int(vec[1].item()), reduced


def _to_python(values: list[Any]) -> list[Any]:
    """Epoch values as Python floats (lists for non-scalar metrics), with one device synchronisation."""
    tensors = [v.detach().reshape(-1) for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    if all(t.device.type == "cpu" for t in tensors):  # nothing to synchronise: read each value directly
        return [(float(v.item()) if v.numel() == 1 else [float(x) for x in v.detach().reshape(-1).tolist()])
                if isinstance(v, Tensor) else float(v) for v in values]
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
