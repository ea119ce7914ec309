"""Learning-rate schedules (any ``torch.optim.lr_scheduler`` class) and the per-epoch ``lr`` record."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch.optim import lr_scheduler as torch_sched

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError
from .monitor import Monitor

__all__ = ["LRScheduler", "LRRecorder", "current_lrs"]

_CALL_ON = ("on_epoch_end", "on_train_batch_end")


def current_lrs(ctx: Context) -> dict[str, float]:
    """``{"lr": …}`` for one optimizer, ``{"lr_<name>": …}`` for several (first parameter group's rate)."""
    opts = ctx.optimizers or {}
    out: dict[str, float] = {}
    for name, opt in opts.items():
        if not opt.param_groups:
            continue
        lr = opt.param_groups[0].get("lr")
        if lr is None:
            continue
        key = "lr" if len(opts) == 1 else f"lr_{name}"
        out[key] = float(lr)  # a tensor lr (capturable optimizers) is read once per epoch only
    return out


class LRRecorder(Callback):
    """On by default: writes the learning rate each epoch trains with into history as ``lr``
    (``lr_<name>`` for several optimizers), read from the optimizers once per epoch at ``on_train_begin``
    (order 900, after every ``on_epoch_begin`` / ``on_train_begin`` that may change it).
    With a per-batch schedule (OneCycleLR) it is the rate of the epoch's first batch.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> [h["lr"] for h in setup.set_opt_hparams(lr=0.01).fit((x, y), epochs=2, verbose=False).history]
    [0.01, 0.01]
    """

    order = 900

    def on_train_begin(self, ctx: Context) -> None:
        ctx.record.update(current_lrs(ctx))


class LRScheduler(Callback):
    """Drive any ``torch.optim.lr_scheduler`` class (luz's ``luz_callback_lr_scheduler``; order 500).

    The scheduler is created at fit begin from ``ctx.optimizers`` with ``kwargs`` (so it always wraps the
    optimizer the fit really uses), registered in ``ctx.schedulers``, and stepped ``call_on``:
    ``"on_epoch_end"`` (default) or ``"on_train_batch_end"`` for per-batch schedules such as OneCycleLR.
    ``ReduceLROnPlateau`` is stepped with the ``monitor`` value (``train_loss`` when there is no validation
    and ``monitor`` is the default); its ``mode`` follows the monitored metric's direction
    (``higher_is_better``: ``"max"`` for accuracies and AUROCs) unless given, and must be given for a
    ``ctx.log`` value. A per-batch schedule steps once per optimizer step (under GradientAccumulation,
    once per group of batches); ``OneCycleLR`` without ``total_steps`` / ``epochs`` gets
    ``total_steps = max_epochs × optimizer steps per epoch``. Its state (``state_dict``) goes into
    checkpoints.

    Args:
        scheduler_cls: the scheduler class (not an instance), e.g. ``torch.optim.lr_scheduler.ExponentialLR``.
        call_on: ``"on_epoch_end"`` or ``"on_train_batch_end"``.
        monitor: the history key fed to ``ReduceLROnPlateau``.
        opt_name: which optimizer, when the module's ``set_optimizers`` returns several.
        **kwargs: the scheduler's arguments (``gamma=0.9``, ``max_lr=0.1`` ...).

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> cb = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9)
    >>> fitted = setup.set_opt_hparams(lr=0.1).fit((x, y), epochs=3, verbose=False, callbacks=[cb])
    >>> [round(h["lr"], 4) for h in fitted.history]
    [0.1, 0.09, 0.081]
    """

    order = 500

    def __init__(
        self,
        scheduler_cls: Any,
        *,
        call_on: str = "on_epoch_end",
        monitor: str = "valid_loss",
        opt_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(scheduler_cls, (torch_sched.LRScheduler, torch_sched.ReduceLROnPlateau)):
            name = type(scheduler_cls).__name__
            raise LanternaError(
                f"LRScheduler got an instance of {name}; pass the class and its arguments, e.g. "
                f"LRScheduler(torch.optim.lr_scheduler.{name}, gamma=0.9). lanterna creates the scheduler at "
                "fit begin, on the optimizer the fit builds."
            )
        if not callable(scheduler_cls):
            raise LanternaError(
                f"LRScheduler needs a torch.optim.lr_scheduler class (or a callable (optimizer, **kwargs) -> "
                f"scheduler); got {scheduler_cls!r}."
            )
        if call_on not in _CALL_ON:
            options = ", ".join(map(repr, _CALL_ON))
            raise LanternaError(f"LRScheduler(call_on={call_on!r}): use one of {options}.")
        self.scheduler_cls = scheduler_cls
        self.call_on = call_on
        self.opt_name = opt_name
        self.kwargs = kwargs
        self.plateau = _is_subclass(scheduler_cls, torch_sched.ReduceLROnPlateau)
        if self.plateau and call_on != "on_epoch_end":
            raise LanternaError(
                "ReduceLROnPlateau needs an epoch's monitored value: use call_on='on_epoch_end'."
            )
        self.monitor_name = monitor
        self.monitor: Monitor | None = None
        self.scheduler: Any = None
        self._pending: dict[str, Any] | None = None
        if call_on == "on_train_batch_end":
            # Only per-batch schedules implement the per-batch hook: epoch schedules cost nothing per batch.
            self.__class__ = _PerBatchLRScheduler

    # ------------------------------------------------------------------ fit
    def on_fit_begin(self, ctx: Context) -> None:
        opt = self._optimizer(ctx)
        kwargs = dict(self.kwargs)
        if self.plateau:
            name = self.monitor_name
            if name == "valid_loss" and ctx.valid_data is None:
                name = "train_loss"
            self.monitor = Monitor(name, kwargs.get("mode", "auto"))
            self.monitor.check_known(ctx)
            kwargs.setdefault("mode", self.monitor.mode)
        one_cycle = _is_subclass(self.scheduler_cls, torch_sched.OneCycleLR)
        if one_cycle and "total_steps" not in kwargs and "epochs" not in kwargs:
            n = ctx.train_data.num_batches() if ctx.train_data is not None else None
            if n is None:
                raise LanternaError(
                    "OneCycleLR needs total_steps (or epochs and steps_per_epoch): the training data's "
                    "length is unknown. Pass LRScheduler(OneCycleLR, max_lr=..., total_steps=...)."
                )
            kwargs["total_steps"] = ctx.max_epochs * _steps_per_epoch(ctx, n)
        try:
            self.scheduler = self.scheduler_cls(opt, **kwargs)
        except TypeError as e:
            name = getattr(self.scheduler_cls, "__name__", repr(self.scheduler_cls))
            raise LanternaError(f"Could not create {name} with {kwargs}: {e}") from e
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None
        ctx.schedulers.append(self.scheduler)

    def on_epoch_end(self, ctx: Context) -> None:
        if self.plateau:
            self.scheduler.step(self.monitor.value(ctx))  # type: ignore[union-attr]
        else:
            self.scheduler.step()

    def _optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        opts = ctx.optimizers
        if self.opt_name is not None:
            if self.opt_name not in opts:
                names = ", ".join(map(repr, opts)) or "none"
                raise LanternaError(
                    f"LRScheduler(opt_name={self.opt_name!r}): no such optimizer; the fit has {names}."
                )
            return opts[self.opt_name]
        if not opts:
            raise LanternaError("LRScheduler: the fit has no optimizer to schedule.")
        if len(opts) != 1:
            raise LanternaError(f"The fit has several optimizers ({', '.join(map(repr, opts))}); pass "
                                "LRScheduler(..., opt_name=<one of them>): one LRScheduler per optimizer.")
        return next(iter(opts.values()))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return {"scheduler": self.scheduler.state_dict()}
        return {"scheduler": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sched_state = state.get("scheduler")
        if sched_state is None:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sched_state)
        else:  # loaded before fit begin: applied when the scheduler is created
            self._pending = sched_state

    def __repr__(self) -> str:
        name = getattr(self.scheduler_cls, "__name__", repr(self.scheduler_cls))
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"LRScheduler({name}, call_on={self.call_on!r}{args})"


def _steps_per_epoch(ctx: Context, n_batches: int) -> int:
    """Optimizer steps per epoch: one per batch, or one per group under GradientAccumulation."""
    from .accumulate import GradientAccumulation

    hooks = ctx.hooks
    for cb in getattr(hooks, "callbacks", ()):
        if isinstance(cb, GradientAccumulation):
            return math.ceil(n_batches / cb.n_batches)
    return n_batches


def _is_subclass(obj: Any, cls: type) -> bool:
    return inspect.isclass(obj) and issubclass(obj, cls)


class _PerBatchLRScheduler(LRScheduler):
    """:class:`LRScheduler` with ``call_on="on_train_batch_end"``: one scheduler step per training batch."""

    def on_train_batch_end(self, ctx: Context) -> None:
        if not ctx.accumulating:  # GradientAccumulation deferred the optimizer step
            self.scheduler.step()

    on_epoch_end = Callback.on_epoch_end  # the base no-op: nothing to do per epoch


# Errors and Hooks.describe() name the callback by its class: keep the public name.
_PerBatchLRScheduler.__name__ = _PerBatchLRScheduler.__qualname__ = "LRScheduler"
