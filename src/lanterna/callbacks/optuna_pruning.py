"""Optuna pruning: report the monitored value every epoch and stop trials the pruner gives up on."""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..core.events import FitDecision
from .monitor import Monitor

__all__ = ["OptunaPruning", "import_optuna"]


def import_optuna() -> Any:
    """Import optuna, or raise an ImportError that names the extra to install."""
    try:
        import optuna
    except ImportError as e:
        raise ImportError(
            "Hyperparameter tuning needs optuna, which is not installed. Install it with "
            "pip install 'lanterna[optuna]' (or pip install optuna)."
        ) from e
    return optuna


class OptunaPruning(Callback):
    """Reports ``monitor`` to an Optuna trial after every epoch (``trial.report(value, epoch)``) and raises
    ``optuna.TrialPruned`` when the study's pruner says so; the exception ends fit and reaches
    ``study.optimize``, which records the trial as PRUNED (Optuna's ``MedianPruner`` loop, docs/models.md).

    Runs at epoch end after the metrics and the other callbacks, before EarlyStopping, ModelCheckpoint and
    AutoResume (order 900). A NaN value is reported as is; Optuna's pruners prune it. With ``mode="auto"`` the
    monitored metric's direction (its ``higher_is_better``) is checked against the study's, and a name whose
    direction cannot be known (a ``ctx.log`` value) takes the study's.

    Args:
        trial: the ``optuna.Trial`` the objective function receives.
        monitor: the history key reported every epoch.
        mode: ``"auto"``, ``"min"`` or ``"max"`` for ``monitor``.

    >>> import lanterna as ln, optuna, torch
    >>> from torch import nn
    >>> x = torch.randn(200, 4); y = (x[:, 0] > 0).long()
    >>> setup = (ln.setup(nn.Linear, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()])
    ...          .set_hparams(in_features=4, out_features=2))
    >>> def objective(trial):
    ...     lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    ...     fitted = setup.set_opt_hparams(lr=lr).fit(
    ...         (x, y), valid_data=0.2, epochs=3, verbose=False,
    ...         callbacks=[ln.callbacks.OptunaPruning(trial, monitor="valid_acc")])
    ...     return fitted.history[-1]["valid_acc"]
    >>> study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    >>> study.optimize(objective, n_trials=4)
    >>> sorted(study.trials[0].intermediate_values)  # one report per epoch
    [1, 2, 3]
    """

    order = 900

    def __init__(self, trial: Any, monitor: str = "valid_loss", mode: str = "auto") -> None:
        optuna = import_optuna()
        if not isinstance(trial, optuna.trial.BaseTrial):
            raise TypeError(
                f"OptunaPruning(trial, ...) needs the optuna Trial that the objective function receives, "
                f"got {type(trial).__name__}."
            )
        self._pruned_cls = _pruned_class(optuna)
        self.trial = trial
        self.monitor = Monitor(monitor, mode)

    def __repr__(self) -> str:
        return f"OptunaPruning(trial={getattr(self.trial, 'number', '?')}, monitor={self.monitor.name!r})"

    def on_fit_begin(self, ctx: Context) -> None:
        direction = _study_direction(self.trial)
        self.monitor.check_known(ctx, fallback_mode=direction)  # a ctx.log value: the study's direction
        if direction is not None and direction != self.monitor.mode:
            warnings.warn(
                f"OptunaPruning: the study {'minimizes' if direction == 'min' else 'maximizes'} but "
                f"{self.monitor.name!r} is a quantity to {'maximize' if self.monitor.mode == 'max' else 'minimize'}"
                ", so the pruner would stop the best trials. Create the study with "
                f"direction={'maximize' if self.monitor.mode == 'max' else 'minimize'!r} (or pass mode=...).",
                stacklevel=2,
            )

    def on_epoch_end(self, ctx: Context) -> None:
        value = self.monitor.value(ctx)
        self.trial.report(value, ctx.epoch)
        if self.trial.should_prune():
            shown = value if math.isfinite(value) else str(value)
            raise self._pruned_cls(f"Trial pruned at epoch {ctx.epoch}: {self.monitor.name}={shown}.")


def _pruned_class(optuna: Any) -> type[Exception]:
    """optuna's ``TrialPruned`` that is also a lanterna :class:`FitDecision`: it leaves fit unwrapped (the end
    hooks fire, ``fitted.status`` would be "pruned") and the study records the trial as pruned."""
    global _PRUNED
    if _PRUNED is None:
        _PRUNED = type("TrialPruned", (FitDecision, optuna.TrialPruned), {"status": "pruned", "__module__": __name__})
    return _PRUNED


_PRUNED: type[Exception] | None = None


def _study_direction(trial: Any) -> str | None:
    study = getattr(trial, "study", None)
    try:
        directions = study.directions if study is not None else None
    except Exception:  # a FixedTrial or a study without directions
        return None
    if not directions or len(directions) != 1:
        return None
    return "max" if directions[0].name == "MAXIMIZE" else "min"
