"""Metric base class and naming.

``ln.metrics`` share one small base, :class:`LanternaMetric`: states declared with ``add_state`` (sums, maxima
or concatenations over samples), ``update`` / ``compute`` / ``reset`` as in torchmetrics, and states reduced
across processes inside ``compute`` under DDP. It does not import torchmetrics: importing torchmetrics loads
scipy and matplotlib (+~100 MB of memory, ~1 s), paid only by users who pass a ``torchmetrics.Metric``.
(Over 350 lines: the base class and the naming helpers every metric and the metrics callback share.)
"""

from __future__ import annotations

import abc
import copy
import functools
import operator
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.world import all_gather_rows, world_size
from ..errors import MetricError, ShapeMismatchError

__all__ = ["LanternaMetric", "named", "on_output", "metric_key", "metric_display", "MetricSet", "unique_names",
           "is_metric", "entry_key"]

_REDUCTIONS = ("sum", "max", "min", "cat")


class LanternaMetric(nn.Module, abc.ABC):
    """Base of ``ln.metrics``, and of your own metrics: declare states in ``__init__`` with :meth:`add_state`,
    fold a batch into them in ``update(pred, target)``, turn them into the value in ``compute()``.

    States that are sums over samples make the value exact over the epoch (a short last batch weighs by its
    size) and let lanterna fold many batches into one ``update``; under DDP ``compute`` sees the states of all
    processes (summed, max/min-reduced or concatenated).

    >>> import torch
    >>> from lanterna.metrics import LanternaMetric
    >>> class MeanError(LanternaMetric):
    ...     name, display_name = "me", "ME"
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.add_state("total", torch.tensor(0.0, dtype=torch.float64))
    ...         self.add_state("count", torch.tensor(0.0, dtype=torch.float64))
    ...     def update(self, pred, target):
    ...         self.total += (pred - target).sum(dtype=torch.float64)
    ...         self.count += target.numel()
    ...     def compute(self):
    ...         return (self.total / self.count).float()
    >>> m = MeanError(); m.update(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])); float(m.compute())
    1.0
    """

    name: str = "metric"
    display_name: str = "Metric"
    higher_is_better: bool | None = None
    dist_sync: bool = True  # reduce the states across processes in compute() when a process group is running
    fold_batches: bool = True  # one update on concatenated batches equals the per-batch updates (fit buffers)
    _defaults: dict[str, tuple[Tensor | list[Tensor], str]]  # name -> (default, dist_reduce_fx)
    _syncing: bool

    if TYPE_CHECKING:  # states are plain attributes set by add_state (nn.Module types them Tensor | Module)
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_defaults", {})
        object.__setattr__(self, "_syncing", False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "compute" in cls.__dict__:
            cls.compute = _synced(cls.__dict__["compute"])  # type: ignore[method-assign, assignment]

    # ------------------------------------------------------------------ states
    def add_state(self, name: str, default: Tensor | list, dist_reduce_fx: str = "sum") -> None:
        """Declare a state: a tensor reduced by ``"sum"`` (default), ``"max"`` or ``"min"``, or an empty list of
        tensors (``dist_reduce_fx="cat"``) that ``compute`` concatenates. ``reset`` puts the default back."""
        if dist_reduce_fx not in _REDUCTIONS:
            raise ValueError(f"add_state({name!r}): dist_reduce_fx must be one of {_REDUCTIONS}, "
                             f"got {dist_reduce_fx!r}.")
        if isinstance(default, list):
            if default or dist_reduce_fx != "cat":
                raise ValueError(f"add_state({name!r}): a list state starts empty and uses dist_reduce_fx='cat'.")
        elif not isinstance(default, Tensor):
            raise TypeError(f"add_state({name!r}): the default must be a tensor or [], got {type(default).__name__}.")
        self._defaults[name] = (default.detach().clone() if isinstance(default, Tensor) else [], dist_reduce_fx)
        object.__setattr__(self, name, _fresh(self._defaults[name][0]))

    @property
    def metric_state(self) -> dict[str, Tensor | list[Tensor]]:
        """The current states by name (lists are copied)."""
        state = {n: getattr(self, n) for n in self._defaults}
        return {n: list(v) if isinstance(v, list) else v for n, v in state.items()}

    def load_metric_state(self, state: dict[str, Any]) -> None:
        """Put back states read from :attr:`metric_state` (e.g. from a checkpoint), on this metric's device."""
        for n, v in state.items():
            if n not in self._defaults:
                raise KeyError(f"{type(self).__name__} has no state {n!r}; its states are {list(self._defaults)}.")
            default = self._defaults[n][0]
            if isinstance(default, list):
                object.__setattr__(self, n, [t.to(self.device) for t in v])
            else:
                object.__setattr__(self, n, v.to(device=default.device, dtype=default.dtype).clone())

    def reset(self) -> None:
        """Back to the declared defaults (a new epoch)."""
        for n, (default, _) in self._defaults.items():
            object.__setattr__(self, n, _fresh(default))

    @property
    def device(self) -> torch.device:
        """The device of the states."""
        for default, _ in self._defaults.values():
            if isinstance(default, Tensor):
                return default.device
        return getattr(self, "_device", torch.device("cpu"))

    def set_dtype(self, dtype: torch.dtype) -> LanternaMetric:
        """Floating-point states in ``dtype`` (float32 on MPS, which has no float64)."""
        return self._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LanternaMetric:
        super()._apply(fn, recurse)  # type: ignore[call-arg]
        for n, (default, fx) in list(self._defaults.items()):
            value = getattr(self, n)
            if isinstance(default, Tensor):
                self._defaults[n] = (fn(default), fx)
                object.__setattr__(self, n, fn(value))
            else:
                object.__setattr__(self, n, [fn(t) for t in value])
        probe = fn(torch.zeros((), device=self.device))  # the target device, for metrics with list states only
        object.__setattr__(self, "_device", probe.device)
        return self

    # ------------------------------------------------------------------ the protocol
    @abc.abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Fold one batch into the states."""

    @abc.abstractmethod
    def compute(self) -> Tensor:
        """The value of the states accumulated since the last reset."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``metric(pred, target)``, as in torchmetrics: accumulate the batch and return its own value."""
        saved = self.metric_state
        self.reset()
        self.update(pred, target)
        object.__setattr__(self, "_syncing", True)  # the batch value is this process's own
        try:
            value = self.compute()
        finally:
            object.__setattr__(self, "_syncing", False)
        for n, before in saved.items():
            object.__setattr__(self, n, _MERGE[self._defaults[n][1]](before, getattr(self, n)))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # ``self.total += x`` re-assigns the state: skip nn.Module's ~5 µs of checks for plain attributes
        if name in self.__dict__ and type(value) in _PLAIN_TYPES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and k not in self._defaults and k != "training")


_PLAIN_TYPES = (Tensor, list, int, float, bool, type(None))  # exact types: a Parameter takes the slow path


_MERGE: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add, "cat": operator.add, "max": torch.maximum, "min": torch.minimum}


def _fresh(default: Tensor | list) -> Tensor | list:
    return default.clone() if isinstance(default, Tensor) else []


def _synced(compute: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Run ``compute`` on the states of all processes when a process group of several is running."""

    @functools.wraps(compute)
    def wrapper(self: LanternaMetric) -> Any:
        if self._syncing or not self.dist_sync or world_size() < 2:
            return compute(self)
        local = {n: getattr(self, n) for n in self._defaults}
        reduced = _all_reduce_states(self)
        object.__setattr__(self, "_syncing", True)  # a subclass's compute calling super().compute()
        try:
            for n, v in reduced.items():
                object.__setattr__(self, n, v)
            return compute(self)
        finally:
            object.__setattr__(self, "_syncing", False)
            for n, v in local.items():
                object.__setattr__(self, n, v)

    return wrapper


def _all_reduce_states(metric: LanternaMetric) -> dict[str, Any]:
    dist = torch.distributed
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    out: dict[str, Any] = {}
    for n, (_, fx) in metric._defaults.items():
        value = getattr(metric, n)
        if fx == "cat":  # one tensor: every process's rows in rank order (a process may have none)
            local = torch.cat([p.reshape(1) if p.dim() == 0 else p for p in value]) if value else None
            try:
                out[n] = [torch.cat(all_gather_rows(local, metric.device))]
            except ValueError:  # no process has rows: compute() sees an empty list, as without DDP
                out[n] = []
        else:
            t = value.clone()
            dist.all_reduce(t, op=ops[fx])
            out[n] = t
    return out


def _add_sum_states(metric: LanternaMetric, *names: str) -> None:
    for n in names:
        metric.add_state(n, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")


def per_sample(weight: Tensor | None, like: Tensor) -> Tensor | None:
    """Per-sample weights ``(N,)`` shaped to broadcast over ``like`` ``(N, ...)`` (None stays None)."""
    if weight is None:
        return None
    return weight.reshape(-1, *([1] * (like.dim() - 1))).to(torch.float64)


def _check_same_shape(metric: str, pred: Tensor, target: Tensor) -> None:
    """Refuse predictions and targets of different shapes (torch would broadcast (N, 1) against (N,) into
    (N, N)), naming both shapes and the fix."""
    if pred.shape == target.shape:
        return
    if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
        fix = "Squeeze the output (pred.squeeze(1)) or give the target a trailing dimension (y.unsqueeze(1))."
    elif target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
        fix = "Squeeze the target (y.squeeze(1)) or make the model output shape (N, 1)."
    else:
        fix = "Make the model output the target's shape."
    raise ShapeMismatchError(
        f"{metric}: predictions of shape {tuple(pred.shape)} and targets of shape {tuple(target.shape)} "
        f"do not match. {fix}"
    )


def entry_key(key: Any) -> str:
    """History key of one entry of a metric that returns a dict (``ClasswiseWrapper``, ``MetricCollection``):
    lowercase, with any character other than a letter, a digit, ``_``, ``.`` or ``-`` replaced by ``_``.

    >>> from lanterna.metrics.base import entry_key
    >>> entry_key("MulticlassAccuracy"), entry_key("acc sea/lion")
    ('multiclassaccuracy', 'acc_sea_lion')
    """
    return re.sub(r"[^0-9a-z_.\-]+", "_", str(key).lower())


def named(metric: Any, name: str, *, output: int | str | None = None) -> Any:
    """Give a metric the history key ``name`` (e.g. ``named(MulticlassF1Score(10), "f1")`` → ``valid_f1``);
    ``output`` also binds it to one output of a multi-output model (see :func:`on_output`).

    Args:
        metric: an ``ln.metrics`` object or a torchmetrics metric.
        name: the history key (``train_<name>``, ``valid_<name>``).
        output: an index or key of the model's outputs that the metric is computed on.

    Returns:
        The same metric object, renamed.

    >>> import torchmetrics
    >>> from lanterna.metrics import metric_key, named
    >>> m = named(torchmetrics.MeanSquaredError(), "mse2")
    >>> metric_key(m)
    'mse2'
    """
    metric._lanterna_name = name  # type: ignore[attr-defined]
    if output is not None:
        on_output(metric, output)
    return metric


def on_output(metric: Any, output: int | str) -> Any:
    """Compute ``metric`` on one output of a multi-output model: an index into a returned tuple or a key of a
    returned dict. The target is taken the same way when it is a tuple/dict (one target per output), else the
    one shared target is used. Without it, metrics see the main output (the first).

    Args:
        metric: an ``ln.metrics`` object or a torchmetrics metric.
        output: an index into the returned tuple (int) or a key of the returned dict (str).

    Returns:
        The same metric object, bound to that output.

    >>> from lanterna.metrics import MAE, metric_key, named, on_output
    >>> aux_mae = named(on_output(MAE(), 1), "aux_mae")   # history: train_aux_mae, valid_aux_mae
    >>> metric_key(aux_mae)
    'aux_mae'
    """
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(f"on_output(metric, output): output must be an index (int) or a key (str), got {output!r}.")
    metric._lanterna_output = output  # type: ignore[attr-defined]
    return metric


def metric_key(metric: Any) -> str:
    """History key of a metric: its ``named`` name, a lanterna metric's ``name``, or the class name.

    Args:
        metric: an ``ln.metrics`` object or a torchmetrics metric.

    Returns:
        The key, without the ``train_`` / ``valid_`` prefix.

    >>> from lanterna.metrics import MAE, metric_key, named
    >>> metric_key(MAE()), metric_key(named(MAE(), "abs_err"))
    ('mae', 'abs_err')
    """
    key = getattr(metric, "_lanterna_name", None)
    if key:
        return key
    if isinstance(metric, LanternaMetric):
        return metric.name
    return type(metric).__name__.lower()


def metric_display(metric: Any, key: str) -> str:
    """Name shown on the console (luz's abbreviations for lanterna metrics).

    Args:
        metric: an ``ln.metrics`` object or a torchmetrics metric.
        key: the metric's history key (from :func:`unique_names`, so maybe with a ``_1`` suffix).

    Returns:
        The console name: a lanterna metric's ``display_name`` (plus the key's suffix), else the key.

    >>> from lanterna.metrics import MAE, Accuracy, metric_display
    >>> metric_display(MAE(), "mae"), metric_display(Accuracy(), "acc_1")
    ('MAE', 'Acc_1')
    """
    if getattr(metric, "_lanterna_name", None) is None and isinstance(metric, LanternaMetric):
        return metric.display_name + key[len(metric.name):]
    return key


def unique_names(metrics: Sequence[Any]) -> list[str]:
    """History keys for a list of metrics; repeated names get ``_1``, ``_2`` ... suffixes.

    Args:
        metrics: the metrics, in order.

    Returns:
        One key per metric, all different.

    >>> from lanterna.metrics import MAE, RMSE, unique_names
    >>> unique_names([MAE(), MAE(), RMSE()])
    ['mae', 'mae_1', 'rmse']
    """
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

    Args:
        train: the metrics computed on the training batches.
        valid: the metrics computed on the validation data.

    >>> from lanterna.metrics import MAE, RMSE, MetricSet
    >>> ms = MetricSet(train=[MAE()], valid=[MAE(), RMSE()])
    >>> [type(m).__name__ for m in ms.valid]
    ['MAE', 'RMSE']
    """

    def __init__(self, train: Iterable[Any] | None = None, valid: Iterable[Any] | None = None) -> None:
        self.train = list(train or [])
        self.valid = list(valid or [])


def is_metric(obj: Any) -> bool:
    """An ``ln.metrics`` object, a ``torchmetrics.Metric`` or a ``torchmetrics.MetricCollection`` (checked
    without importing torchmetrics: a user who made one has imported it)."""
    if isinstance(obj, LanternaMetric):
        return True
    torchmetrics = sys.modules.get("torchmetrics")
    return torchmetrics is not None and isinstance(obj, (torchmetrics.Metric, torchmetrics.MetricCollection))


def split_metric_spec(metrics: Any) -> tuple[list[Any], list[Any]]:
    """(train metrics, valid metrics) as fresh copies, from a list or a MetricSet."""
    if metrics is None:
        return [], []
    if isinstance(metrics, MetricSet):
        train, valid = metrics.train, metrics.valid
    elif is_metric(metrics):
        train = valid = [metrics]
    else:
        train = valid = list(metrics)
    for m in [*train, *valid]:
        if isinstance(m, type) and (issubclass(m, LanternaMetric) or hasattr(m, "higher_is_better")):
            raise MetricError(f"metrics=[{m.__name__}] is a class; pass an instance: metrics=[{m.__name__}()].")
        if not is_metric(m):
            raise MetricError(
                f"metrics must be ln.metrics objects or torchmetrics.Metric instances; got {type(m).__name__}. "
                "Write a subclass of ln.metrics.LanternaMetric (add_state, update, compute) for your own metric."
            )
    return [copy.deepcopy(m) for m in train], [copy.deepcopy(m) for m in valid]
