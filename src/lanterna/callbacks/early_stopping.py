"""Stop training when a monitored quantity stops improving (luz's ``luz_callback_early_stopping``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError
from .monitor import Monitor, finite_number

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` consecutive epochs (order 1000: it runs after
    every other callback at epoch end, so checkpoints and loggers see the epoch first).

    The first epoch sets the best value (or ``baseline``, when given, is the value to beat); an epoch improves
    when it beats the best by more than ``min_delta``; fit stops at the end of the ``patience``-th
    consecutive epoch without improvement, so with ``patience=10`` the last epoch is the best epoch + 10
    (``patience=0`` stops at the first epoch that does not improve). Never before ``min_epochs`` (``fit(...,
    epochs=(min, max))``): when patience runs out earlier, fit stops at ``min_epochs``. Prints
    ``Early stopping at epoch N of M`` (unless ``verbose=False``) and fires ``on_early_stopping``.

    Args:
        monitor: a history key such as ``"valid_loss"``, ``"train_loss"``, ``"valid_acc"``.
        min_delta: the smallest change that counts as an improvement.
        patience: epochs without improvement to wait before stopping.
        mode: ``"min"``, ``"max"`` or ``"auto"``: the direction of the metric behind ``monitor`` (its
            ``higher_is_better``; ``*_loss`` is minimised), read at fit begin; a name whose direction cannot be
            known (a ``ctx.log`` value) needs ``"min"`` or ``"max"``.
        baseline: a value the monitor must beat; epochs that do not beat it count as not improving.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> cb = ln.callbacks.EarlyStopping(monitor="valid_loss", patience=10)
    >>> cb.mode
    'min'
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> stop = ln.callbacks.EarlyStopping(monitor="train_loss", min_delta=100.0, patience=2)  # nothing improves
    >>> len(setup.fit((x, y), epochs=50, verbose=False, callbacks=[stop]).history)  # epoch 1 is the best
    3
    """

    order = 1000
    runs_last = True

    def __init__(
        self,
        monitor: str = "valid_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 0:
            raise LanternaError(f"EarlyStopping(patience={patience!r}): patience must be an integer >= 0.")
        self.monitor = Monitor(monitor, mode, min_delta)
        self.patience = int(patience)
        self.baseline = None if baseline is None else finite_number(baseline, "EarlyStopping baseline")
        self._reset()

    @property
    def mode(self) -> str:
        """The mode, ``"min"`` or ``"max"`` (``"auto"`` until fit begins, for a name that is not a loss)."""
        return self.monitor.mode

    @property
    def best(self) -> float | None:
        """The best value seen so far (the baseline until an epoch beats it)."""
        return self.monitor.best

    def _reset(self) -> None:
        self.monitor.best = self.baseline
        self.wait = 0
        self.best_epoch = 0
        self.stopped_epoch = 0

    def on_fit_begin(self, ctx: Context) -> None:
        self.monitor.check_known(ctx)
        self._reset()  # on resume AutoResume (which runs after this) puts the saved state back

    def on_epoch_end(self, ctx: Context) -> None:
        if self.monitor.improves(self.monitor.value(ctx)):
            self.wait = 0
            self.best_epoch = ctx.epoch
        else:
            self.wait += 1
        if self.wait >= max(self.patience, 1):
            self.stopped_epoch = ctx.epoch
            ctx.stop_training = True

    def on_early_stopping(self, ctx: Context) -> None:
        # The loop fires this only when it honours a stop (never before min_epochs); stay quiet when another
        # callback asked for the stop and patience has not run out.
        if self.wait >= max(self.patience, 1):
            self.stopped_epoch = ctx.epoch
            if ctx.verbose and ctx.is_main:
                print(f"Early stopping at epoch {ctx.epoch} of {ctx.max_epochs}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best, "wait": self.wait, "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.best = state.get("best", self.baseline)
        self.wait = int(state.get("wait", 0))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.stopped_epoch = int(state.get("stopped_epoch", 0))

    def __repr__(self) -> str:
        return (f"EarlyStopping(monitor={self.monitor.name!r}, min_delta={self.monitor.min_delta}, "
                f"patience={self.patience}, mode={self.mode!r}, baseline={self.baseline})")
