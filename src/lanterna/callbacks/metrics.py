"""Built-in callback that keeps the epoch's loss, metrics and ``ctx.log`` values — on the device, read once
per phase — and writes them into the epoch's history record.

Speed: a metric ``update`` costs microseconds of Python whatever the batch size (a torchmetrics one tens of
them), as much as a whole training step of a small model. So the batch losses and the (prediction, target) pairs of
``ln.metrics`` (whose states are sums or concatenations over samples, so that one update on concatenated
batches equals the per-batch updates) are kept on the device and folded in with one update every
``FLUSH_BATCHES`` batches and at the end of the phase. The first batch of each set is updated at once and
computed once, so a shape error or a metric that cannot compute still surfaces at the first batch. Other
torchmetrics are updated every batch.

The epoch's ``<set>_loss`` is ``Σ w·loss / Σ w`` over the batches, where ``w`` is the batch size, or
``ctx.loss_weight`` when the step sets it (the denominator of a batch's weighted mean loss: class weights,
``ignore_index``), so the epoch value equals the loss of the whole set in one call. A metric that returns a dict
(``ClasswiseWrapper``, ``MetricCollection``) logs each entry as ``<set>_<name>_<entry>``.

(Over 350 lines on purpose: the buffering, the first-batch checks, the epoch reduction and the mid-epoch state
are one mechanism over the same buffers; split, each part would reach into the others' state.)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.callback import Callback
from ..core.context import Context
from ..core.sync import allowed_sync
from ..core.world import Local
from ..errors import LanternaError
from ..metrics import metric_display, unique_names
from ..metrics.base import LanternaMetric, entry_key

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
    """Updates metrics after every batch and computes them at the end of each phase (order -100).

    ``fit`` adds it with the setup's metrics; the values land in ``ctx.record`` and the history.

    Args:
        train: the metrics of the training phase.
        valid: the metrics of the validation phase.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
    >>> fitted = setup.set_hparams(in_features=3, out_features=1).fit(
    ...     (torch.randn(8, 3), torch.randn(8, 1)), epochs=1, verbose=False)
    >>> "train_mae" in fitted.history[-1]
    True
    """

    order = -100
    _losses: list[Tensor]  # detached batch losses not yet added to _loss_sum
    _sizes: list[Any]  # batch sizes (ints) or, under ctx.loss_weight, 0-dim device tensors
    _pending: list[list[tuple[Any, ...]] | None]  # per metric: buffered batches, or None (updated every batch)
    _slots: list[tuple[str, Any, Any, list[tuple[Any, ...]] | None]]  # (key, metric, output, pending)

    def __init__(self, train: list[Any], valid: list[Any]) -> None:
        self.sets = {"train": self._named(train), "valid": self._named(valid)}
        self._seen: set[str] = set()
        self._buffer = True
        self._active: list[tuple[str, Any]] = []
        self._losses, self._sizes, self._pending, self._slots = [], [], [], []
        self._where = ("train", 0)
        self._flushed_to = 0

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
        ctx.display_names = {**ctx.display_names, **names}
        weighted = {"train": ctx.train_data is not None and ctx.train_data.weighted,
                    "valid": ctx.valid_data is not None and ctx.valid_data.weighted}
        for set_name, pairs in self.sets.items():
            for key, m in pairs:
                if weighted[set_name] and not getattr(m, "supports_weight", False):
                    raise LanternaError(
                        f"Metric {key!r} ({type(m).__name__}) cannot take sample weights, and the "
                        f"{'training' if set_name == 'train' else 'validation'} data has them (sample_weight=). "
                        "Use ln.metrics (MAE, MSE, RMSE, the accuracies, the AUROCs), or a LanternaMetric whose "
                        "update(pred, target, weight) takes them (supports_weight = True)."
                    )
        ctx.metrics = {s: [m for _, m in pairs] for s, pairs in self.sets.items()}
        ctx.metric_names = {s: [k for k, _ in pairs] for s, pairs in self.sets.items()}
        # CUDA graphs (compile modes "reduce-overhead", "max-autotune") overwrite a step's outputs at the next
        # step: no buffering
        acc = ctx.accelerator
        self._buffer = not (device.type == "cuda" and bool(getattr(acc, "uses_cuda_graphs", False)))

    def _begin(self, ctx: Context) -> None:
        self._active = self.sets["train" if ctx.training else "valid"]
        for _, m in self._active:
            m.reset()
        self._loss_sum = torch.zeros((), dtype=torch.float64 if ctx.device.type != "mps" else torch.float32,
                                     device=ctx.device)
        self._has_loss = False
        self._saw_target = False
        self._count = 0
        # loss weights: batch sizes (Python ints) or, when the step sets ctx.loss_weight, device tensors
        self._weighted = False
        self._loss_wsum = torch.zeros_like(self._loss_sum)  # Σ ctx.loss_weight
        self._loss_count = 0  # Σ batch size of the batches with a loss and no ctx.loss_weight
        self._losses = []  # detached batch losses not yet added to _loss_sum
        self._sizes = []
        # per metric: buffered (pred, target) pairs, or None when the metric is updated every batch
        first = ctx.set_name not in self._seen
        self._seen.add(ctx.set_name)
        self._pending = [
            [] if self._buffer and isinstance(m, LanternaMetric) and m.fold_batches else None for _, m in self._active]
        self._slots = [(key, m, getattr(m, "_lanterna_output", None), pending)
                       for (key, m), pending in zip(self._active, self._pending)]
        self._pending_elements = 0
        self._direct = first  # the set's first batch is updated and computed at once (errors at the first batch)
        self._where, self._flushed_to = (ctx.set_name, ctx.epoch), 0
        ctx.pop_logs()

    on_train_begin = _begin
    on_valid_begin = _begin

    def _batch_end(self, ctx: Context) -> None:
        bs = ctx.batch_size
        if bs == 0:  # an empty batch of a rank keeping step with the others: nothing to count
            return
        self._count += bs
        loss = ctx.loss
        if loss is not None:
            self._losses.append(loss.detach())
            weight = ctx.loss_weight
            if weight is None:
                self._sizes.append(bs)
                self._loss_count += bs
            else:
                self._sizes.append(weight.detach())
                self._weighted = True
            self._has_loss = True
            if len(self._losses) >= FLUSH_BATCHES:
                self._flush_losses()
        if self._active and ctx.target is not None:
            self._saw_target = True
            if self._direct:
                with allowed_sync():  # the set's first batch is computed at once: a natural synchronisation point
                    self._first_batch(ctx)
                return
            pred, target, weight = ctx.pred, ctx.target, ctx.sample_weight
            n = 0
            for key, m, out, pending in self._slots:
                args: tuple[Any, ...] = (_select(pred, out).detach(), _select(target, out))
                if weight is not None:
                    args += (weight,)
                if pending is None:
                    try:
                        m.update(*args)
                    except Exception as e:
                        raise self._failure(key, m, "update", f"batch {ctx.iter}", e) from e
                else:
                    p = args[0]
                    pending.append(args)
                    n = len(pending)
                    self._pending_elements += p.numel()
            if n >= FLUSH_BATCHES or self._pending_elements >= FLUSH_ELEMENTS:
                self._flush_metrics(ctx.iter)

    on_train_batch_end = _batch_end
    on_valid_batch_end = _batch_end

    def _first_batch(self, ctx: Context) -> None:
        """The set's first batch: update every metric and compute it once on that batch (on this process), so a
        metric that cannot update or compute fails now, naming itself, rather than after a whole epoch."""
        self._direct = False
        self._flushed_to = ctx.iter
        pred, target = ctx.pred, ctx.target
        where = f"batch {ctx.iter}"
        keys = {"loss"}
        weight = () if ctx.sample_weight is None else (ctx.sample_weight,)
        for key, m, out, _ in self._slots:
            try:
                m.update(_select(pred, out).detach(), _select(target, out), *weight)
            except Exception as e:
                raise self._failure(key, m, "update", where, e) from e
            try:
                value = _local_compute(m)
            except Exception as e:
                if ctx.batch_size < 2:  # some metrics need two samples (R²): the epoch's compute will tell
                    continue
                raise self._failure(key, m, "compute (on the first batch, to check it)", where, e) from e
            entries, parts = [key], [value]
            if isinstance(value, Mapping):
                named = getattr(m, "_lanterna_name", None) is not None
                entries, parts = [f"{key}_{entry_key(k)}" for k in value], list(value.values())
                ctx.display_names.update({f"{key}_{entry_key(k)}": f"{key}_{k}" if named else str(k) for k in value})
            for part in parts:
                if not isinstance(part, (Tensor, int, float)):
                    raise LanternaError(
                        f"Metric {key!r} ({type(m).__name__}) of the {ctx.set_name} set returned a "
                        f"{type(part).__name__} from compute(); lanterna logs a tensor, a number, or a dict of them."
                    )
            for name in entries:
                if name in keys:
                    raise LanternaError(
                        f"Metric {key!r} ({type(m).__name__}) of the {ctx.set_name} set logs "
                        f"{ctx.set_name}_{name}, which another metric (or the loss) logs too. Rename one with "
                        "ln.metrics.named(metric, 'name')."
                    )
                keys.add(name)

    def _failure(self, key: str, metric: Any, action: str, where: str, err: Exception) -> LanternaError:
        """The error of a metric that raised, naming the metric, its set, the epoch and the batch (the original
        error is its ``__cause__``)."""
        set_name, epoch = self._where
        msg = (f"Metric {key!r} ({type(metric).__name__}) of the {set_name} set failed in {action} at {where}"
               + (f" of epoch {epoch}" if epoch else "") + f": {type(err).__name__}: {err}")
        if isinstance(err, LanternaError):  # keep the type (ShapeMismatchError ...)
            try:
                return type(err)(msg)
            except Exception:
                pass
        return LanternaError(msg)

    def _flush_losses(self) -> None:
        """Add the buffered batch losses, weighted by batch size, to the running sum: one stacked sum per
        run of equal batch sizes (all of them but a short last batch, usually). Losses weighted by
        ``ctx.loss_weight`` (device tensors) are added in one stacked sum, with their weights."""
        losses, sizes = self._losses, self._sizes
        if not losses:
            return
        self._losses, self._sizes = [], []
        acc, start = self._loss_sum, 0
        if self._weighted:
            tensor_weights = [i for i, w in enumerate(sizes) if isinstance(w, Tensor)]
            if tensor_weights:
                ls = torch.stack([losses[i].reshape(()).to(acc.dtype) for i in tensor_weights])
                ws = torch.stack([sizes[i].reshape(()).to(acc.dtype) for i in tensor_weights])
                acc.add_(torch.where(ws > 0, ls * ws, torch.zeros_like(ls)).sum())  # 0/0 batches weigh nothing
                self._loss_wsum.add_(ws.sum())
                keep = [i for i, w in enumerate(sizes) if not isinstance(w, Tensor)]
                losses, sizes = [losses[i] for i in keep], [sizes[i] for i in keep]
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

    def _flush_metrics(self, upto: int | None = None) -> None:
        """One update per ln metric with the buffered batches concatenated (those after batch ``_flushed_to``
        up to batch ``upto``)."""
        where = f"batches {self._flushed_to + 1}-{upto}" if upto else f"the batches after {self._flushed_to}"
        for (key, m), pending in zip(self._active, self._pending):
            if not pending:
                continue
            try:
                if len(pending) == 1:
                    m.update(*pending[0])
                else:
                    try:  # (pred, target) or, with sample weights, (pred, target, weight)
                        parts = [torch.cat(column) for column in zip(*pending)]
                    except (RuntimeError, TypeError):  # batches that do not concatenate (varying trailing sizes)
                        for args in pending:
                            m.update(*args)
                    else:
                        m.update(*parts)
            except Exception as e:
                raise self._failure(key, m, "update", where, e) from e
            pending.clear()
        self._pending_elements = 0
        if upto:
            self._flushed_to = upto

    def flush(self, upto: int | None = None) -> None:
        """Fold every buffered batch into the loss sum and the metric states (done at each phase's end)."""
        self._flush_losses()
        self._flush_metrics(upto)

    def _loss_denominator(self, count: int) -> Tensor | int:
        """Σ weights of the losses: the sample count, or Σ ctx.loss_weight (+ the batch sizes of batches
        without one) when the step sets it."""
        return self._loss_wsum + self._loss_count if self._weighted else count

    def _end(self, ctx: Context) -> None:
        self.flush(ctx.iter)
        loss_sum, count, logs = self._loss_sum, self._count, ctx.pop_logs()
        denominator = self._loss_denominator(count)
        flags = (self._weighted, self._has_loss, self._saw_target)
        # exact global values: sums and counts reduced over the processes (ctx.world), never means
        loss_sum, denominator, count, (weighted, has_loss, saw_target), logs = _reduce(
            ctx.world, loss_sum, denominator, count, flags, logs)
        if not weighted:
            denominator = max(count, 1)
        names: list[str] = []
        values: list[Any] = []
        if has_loss:
            names.append("loss")
            values.append(loss_sum / denominator)
        if self._active and saw_target:  # every process computes (metrics reduce their states themselves)
            for key, m in self._active:
                try:
                    value = m.compute()  # metrics reduce their states across ranks themselves
                except Exception as e:
                    raise self._failure(key, m, "compute", "the end of the phase", e) from e
                if isinstance(value, Mapping):  # ClasswiseWrapper, MetricCollection: one history key per entry
                    names.extend(f"{key}_{entry_key(k)}" for k in value)
                    values.extend(value.values())
                else:
                    names.append(key)
                    values.append(value)
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
        """The current phase's running loss sum, loss weights, sample count and metric states."""
        self.flush()
        return {"loss_sum": self._loss_sum.detach().clone(), "has_loss": self._has_loss, "count": self._count,
                "weighted": self._weighted, "loss_wsum": self._loss_wsum.detach().clone(),
                "loss_count": self._loss_count,
                "metrics": [_metric_state(m) for _, m in self._active]}

    def load_phase_state_dict(self, state: dict[str, Any]) -> None:
        """Put back :meth:`phase_state_dict` (after this phase's ``on_*_begin``)."""
        device = self._loss_sum.device
        self._loss_sum = state["loss_sum"].to(device=device, dtype=self._loss_sum.dtype)
        self._has_loss, self._count = bool(state["has_loss"]), int(state["count"])
        self._weighted = bool(state.get("weighted", False))
        if "loss_wsum" in state:
            self._loss_wsum = state["loss_wsum"].to(device=device, dtype=self._loss_sum.dtype)
        self._loss_count = int(state.get("loss_count", self._count))
        for (_, m), saved in zip(self._active, state["metrics"]):
            if isinstance(m, LanternaMetric):
                m.load_metric_state(saved["state"])
                continue
            # a torchmetrics Metric: its own states and those of the metrics inside it (wrappers, collections)
            modules = saved.get("modules", {"": saved})
            for path, part in modules.items():
                mod = m.get_submodule(path) if path else m
                for k, v in part["state"].items():
                    setattr(mod, k, [t.to(device) for t in v] if isinstance(v, list) else v.to(device))
                mod._update_count = int(part["updates"])
                mod._computed = None


def _metric_state(m: Any) -> dict[str, Any]:
    """A metric's states for a mid-epoch checkpoint; for a torchmetrics metric, those of every torchmetrics
    Metric inside it too, by module path (a ClasswiseWrapper's states live in its wrapped metric)."""
    def copy(v: Any) -> Any:
        return list(v) if isinstance(v, list) else v.detach().clone()

    if isinstance(m, LanternaMetric):
        return {"state": {k: copy(v) for k, v in m.metric_state.items()}, "updates": 0}
    modules = {}
    for path, mod in m.named_modules():
        defaults = getattr(mod, "_defaults", None)
        if isinstance(defaults, dict) and hasattr(mod, "_update_count"):
            modules[path] = {"state": {k: copy(getattr(mod, k)) for k in defaults},
                             "updates": int(mod._update_count)}
    return {"modules": modules}


def _local_compute(m: Any) -> Any:
    """``m.compute()`` on this process's states only (no collective: a check on the first batch), without the
    warnings a single batch may give (a class absent, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(m, LanternaMetric):
            object.__setattr__(m, "_syncing", True)
            try:
                return m.compute()
            finally:
                object.__setattr__(m, "_syncing", False)
        synced = [mod for mod in m.modules() if hasattr(mod, "_to_sync")]
        saved = [mod._to_sync for mod in synced]
        for mod in synced:
            mod._to_sync = False
        try:
            return m.compute()
        finally:
            for mod, to_sync in zip(synced, saved):
                mod._to_sync = to_sync
                mod._computed = None  # never serve this local value as the epoch's (global) one


def _reduce(world: Local, loss_sum: Tensor, denominator: Tensor | int, count: int, flags: tuple[bool, ...],
            logs: dict[str, Any]) -> tuple[Tensor, Tensor, int, tuple[bool, ...], dict[str, Any]]:
    """Sum the loss, its weights, the sample count, the flags (true on any process: losses weighted by
    ctx.loss_weight, a loss seen, a target seen) and the logged sums/weights over the processes, in one
    all-reduce (one process: they are what they are)."""
    if not world.distributed:  # one process: nothing to sum (and no tensors to build, 400 times in W1)
        return loss_sum, denominator, count, tuple(bool(f) for f in flags), logs  # type: ignore[return-value]
    dtype, device = loss_sum.dtype, loss_sum.device
    parts = [loss_sum.reshape(1), torch.as_tensor(denominator, dtype=dtype, device=device).reshape(1),
             torch.tensor([float(count), *map(float, flags)], dtype=dtype, device=device)]
    for total, weight in logs.values():
        parts.append(torch.as_tensor(total, dtype=dtype, device=device).reshape(1))
        parts.append(torch.tensor([float(weight)], dtype=dtype, device=device))
    vec = world.all_reduce_sum(torch.cat(parts))
    head = 3 + len(flags)
    reduced = {k: (vec[head + 2 * i], float(vec[head + 1 + 2 * i])) for i, k in enumerate(logs)}
    counts = vec[2:head].tolist()
    return vec[0], vec[1], int(counts[0]), tuple(c > 0 for c in counts[1:]), reduced


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
