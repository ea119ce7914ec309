"""Hook names, in the order they fire, and the exceptions that steer the loop."""

from __future__ import annotations

__all__ = ["HOOKS", "BATCH_HOOKS", "FitDecision", "CancelFit", "StopTraining", "Interrupted"]

#: Every hook a callback may implement (docs/callbacks.md). Order of firing for one epoch:
#: on_epoch_begin → on_train_begin → per batch (on_train_batch_begin → _after_pred → _after_loss →
#: _before_backward → _before_step → _after_step → _end) → on_train_end → on_valid_begin → per batch
#: (on_valid_batch_begin → _after_pred → _after_loss → _end) → on_valid_end → on_epoch_end.
HOOKS: tuple[str, ...] = (
    "on_fit_begin",
    "on_epoch_begin",
    "on_train_begin",
    "on_train_batch_begin",
    "on_train_batch_after_pred",
    "on_train_batch_after_loss",
    "on_train_batch_before_backward",
    "on_train_batch_before_step",
    "on_train_batch_after_step",
    "on_train_batch_end",
    "on_train_end",
    "on_valid_begin",
    "on_valid_batch_begin",
    "on_valid_batch_after_pred",
    "on_valid_batch_after_loss",
    "on_valid_batch_end",
    "on_valid_end",
    "on_epoch_end",
    "on_fit_end",
    "on_early_stopping",
    "on_interrupt",
    "on_predict_begin",
    "on_predict_batch_begin",
    "on_predict_batch_end",
    "on_predict_end",
)

BATCH_HOOKS = tuple(h for h in HOOKS if "_batch_" in h)


class FitDecision(Exception):
    """A decision that ends fit now, not a failure: it passes through callbacks unwrapped, and the fit's end
    hooks (``on_fit_end``) always fire. ``status`` is what ``ctx.status`` / ``fitted.status`` become.

    The one family of ways a fit stops early, besides ``ctx.stop_training = True`` (stop after this epoch,
    never before ``min_epochs``): :class:`CancelFit` and its kinds end fit and return the Fitted so far; any
    other decision (Optuna's pruning) leaves fit as an exception for its caller.
    """

    status = "stopped"


class CancelFit(FitDecision):
    """End fit now and return the Fitted so far (fastai's ``CancelFitException``)."""


class StopTraining(CancelFit):
    """Raise from a callback (or call ``ctx.stop()``) to end fit at once (after the current hook); the Fitted so
    far is returned with ``status == "stopped"``."""


class Interrupted(CancelFit):
    """Ctrl-C: fit ends after the current batch, fires ``on_interrupt`` and returns the finished epochs."""

    status = "interrupted"
