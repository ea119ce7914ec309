"""Restore the weights of the best epoch when fit ends."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..core.callback import Callback
from ..core.context import Context
from .monitor import Monitor

__all__ = ["KeepBestModel"]


class KeepBestModel(Callback):
    """Keep a copy of the weights (``state_dict``: parameters and buffers) of the best epoch by ``monitor``
    and load it into the model when fit ends, so ``fitted.model`` is the best model, not the last one
    (order 700: after the scheduler step and the loggers, before checkpoints and early stopping).

    The first epoch is the first best; a later epoch is better when it beats the best by more than
    ``min_delta``. The copy lives on the CPU and is taken only on improving epochs. Weights are restored
    whenever fit ends with a best epoch — completed, stopped early, interrupted (Ctrl-C) or stopped — but
    not when fit fails with an error. When nothing is restored (fit failed, no epoch completed, or every
    monitored value was NaN) a warning says why. The copy is part of the callback's state, so a resumed fit
    keeps it.

    Args:
        monitor: a history key such as ``"valid_loss"`` or ``"valid_acc"``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (maximise accuracy/AUROC-like metrics, minimise the rest).
        min_delta: the smallest change that counts as an improvement.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> cb = ln.callbacks.KeepBestModel(monitor="valid_loss")
    >>> fitted = setup.fit((x, y), epochs=5, valid_data=0.25, verbose=False, callbacks=[cb])
    >>> cb.best == min(h["valid_loss"] for h in fitted.history)
    True
    """

    order = 700

    def __init__(self, monitor: str = "valid_loss", mode: str = "auto", min_delta: float = 0.0) -> None:
        self.monitor = Monitor(monitor, mode, min_delta)
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def best(self) -> float | None:
        """The best monitored value so far."""
        return self.monitor.best

    def on_fit_begin(self, ctx: Context) -> None:
        self.monitor.check_known(ctx)
        # a fresh start; a resume (AutoResume runs after every other callback) then loads the saved copy
        self.monitor.best, self.best_epoch, self.best_state = None, 0, None

    def on_epoch_end(self, ctx: Context) -> None:
        if self.monitor.improves(self.monitor.value(ctx)):
            self.best_epoch = ctx.epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}

    def on_fit_end(self, ctx: Context) -> None:
        if self.best_state is not None and ctx.status != "failed":
            ctx.model.load_state_dict(self.best_state)
            return
        if ctx.epoch <= ctx.start_epoch:
            return  # fit ended before its first epoch (an error in on_fit_begin): nothing was trained
        if self.best_state is None:
            done = [r for r in ctx.history if self.monitor.name in r]
            why = (f"no epoch had a comparable {self.monitor.name} (all {len(done)} were NaN)" if done
                   else f"no epoch completed (fit {ctx.status} during epoch {ctx.epoch})")
            warnings.warn(f"KeepBestModel restored nothing: {why}; the model keeps the weights it had when fit "
                          "ended.", stacklevel=2)
        else:
            warnings.warn(f"KeepBestModel: fit failed, so the weights of the best epoch ({self.best_epoch}) were not "
                          "restored; the model keeps the weights it had when fit failed.", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.best_state = state.get("best_state")

    def __repr__(self) -> str:
        return (f"KeepBestModel(monitor={self.monitor.name!r}, mode={self.monitor.mode!r}, "
                f"min_delta={self.monitor.min_delta})")
