"""The callback base class and the precomputed hook dispatch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import CallbackError, LanternaError
from .events import HOOKS, FitDecision

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Callback", "Hooks"]


class Callback:
    """Base class: override any hook of :data:`lanterna.core.events.HOOKS`; each receives ``ctx``.

    Hooks of one fit, in firing order (docs/callbacks.md)::

        on_fit_begin
        each epoch:  on_epoch_begin → on_train_begin
                     → each batch: on_train_batch_begin → _after_pred → _after_loss → _before_backward
                                   → _before_step → _after_step → _end
                     → on_train_end
                     → on_valid_begin → each batch: on_valid_batch_begin → _after_pred → _after_loss → _end
                     → on_valid_end            (only with valid_data)
                     → the epoch's record is appended to ctx.history → on_epoch_end
                     → on_early_stopping       (when ctx.stop_training is honoured: never before min_epochs)
        on_interrupt (Ctrl-C)  →  on_fit_end  (always, in a finally; ctx.status tells how fit ended)

    A module's own ``step(ctx)`` replaces the default step: ``_after_pred`` / ``_after_loss`` do not fire,
    ``_before_backward`` / ``_before_step`` / ``_after_step`` fire inside ``ctx.backward`` /
    ``ctx.step_optimizer``.

    Callbacks run in ascending ``order`` (default 0); ties keep the order they were given in. Built-ins:
    TerminateOnNaN -1000, LimitBatches / FastDevRun / OverfitBatches -900, GradientAccumulation -500,
    MetricsCallback -100, Mixup 0, ProgressPrinter 50, GradientClip 100, EMA 300, LRScheduler 500, SWA 550,
    CSVLogger and TensorBoard 600, KeepBestModel 700, LRRecorder and OptunaPruning 900, ResumeFromCheckpoint 999,
    EarlyStopping 1000, ModelCheckpoint 1100, AutoResume 1200: metrics before yours,
    yours before the scheduler, loggers and checkpoints, so that a checkpoint sees the epoch's final state.
    Those last three set ``runs_last = True``: they run after every other callback whatever its ``order``
    (and among themselves by ``order``).
    A callback with state implements ``state_dict()`` / ``load_state_dict()`` and checkpoints store it.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> class PrintLoss(ln.Callback):
    ...     def on_epoch_end(self, ctx):
    ...         print(ctx.epoch, ctx.history[-1]["train_loss"])
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((torch.randn(64, 3), torch.randn(64, 1)), epochs=2, verbose=False,
    ...                    callbacks=[PrintLoss()])  # doctest: +ELLIPSIS
    1 ...
    2 ...
    """

    order: int = 0
    runs_last: bool = False  # after all callbacks without it, whatever their order (stopping and checkpoints)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    if TYPE_CHECKING:  # the hooks are set on the class below (no-ops); declared here for type checkers
        def on_fit_begin(self, ctx: Context) -> None: ...
        def on_epoch_begin(self, ctx: Context) -> None: ...
        def on_train_begin(self, ctx: Context) -> None: ...
        def on_train_batch_begin(self, ctx: Context) -> None: ...
        def on_train_batch_after_pred(self, ctx: Context) -> None: ...
        def on_train_batch_after_loss(self, ctx: Context) -> None: ...
        def on_train_batch_before_backward(self, ctx: Context) -> None: ...
        def on_train_batch_before_step(self, ctx: Context) -> None: ...
        def on_train_batch_after_step(self, ctx: Context) -> None: ...
        def on_train_batch_end(self, ctx: Context) -> None: ...
        def on_train_end(self, ctx: Context) -> None: ...
        def on_valid_begin(self, ctx: Context) -> None: ...
        def on_valid_batch_begin(self, ctx: Context) -> None: ...
        def on_valid_batch_after_pred(self, ctx: Context) -> None: ...
        def on_valid_batch_after_loss(self, ctx: Context) -> None: ...
        def on_valid_batch_end(self, ctx: Context) -> None: ...
        def on_valid_end(self, ctx: Context) -> None: ...
        def on_epoch_end(self, ctx: Context) -> None: ...
        def on_fit_end(self, ctx: Context) -> None: ...
        def on_early_stopping(self, ctx: Context) -> None: ...
        def on_interrupt(self, ctx: Context) -> None: ...
        def on_predict_begin(self, ctx: Context) -> None: ...
        def on_predict_batch_begin(self, ctx: Context) -> None: ...
        def on_predict_batch_end(self, ctx: Context) -> None: ...
        def on_predict_end(self, ctx: Context) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _noop(ctx: Context) -> None:
    pass


for _hook in HOOKS:
    setattr(Callback, _hook, _noop)


# Exceptions that carry a decision (stop, prune, interrupt) or a clear error pass through callbacks unchanged.
_PASS_THROUGH = (FitDecision, LanternaError, KeyboardInterrupt, SystemExit)


def _guarded(cb: Callback, hook: str, fn: Callable[[Context], None]) -> Callable[[Context], None]:
    name = type(cb).__name__

    def call(ctx: Context) -> None:
        try:
            fn(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as e:
            raise CallbackError(f"Callback {name} raised in {hook}: {type(e).__name__}: {e}") from e

    return call


class Hooks:
    """For every hook, the tuple of callables of the callbacks that implement it (others cost nothing).

    ``hooks.on_train_batch_end(ctx)`` calls each in order; ``hooks.has("on_train_batch_end")`` tells if any.
    """

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = sorted(callbacks, key=lambda cb: (getattr(cb, "runs_last", False), getattr(cb, "order", 0)))
        self.table: dict[str, tuple[Callable[[Context], None], ...]] = {}
        for hook in HOOKS:
            fns = tuple(
                _guarded(cb, hook, getattr(cb, hook))
                for cb in self.callbacks
                if getattr(type(cb), hook, _noop) is not _noop
            )
            self.table[hook] = fns
            setattr(self, hook, self._dispatcher(fns))

    @staticmethod
    def _dispatcher(fns: tuple[Callable[[Context], None], ...]) -> Callable[[Context], None]:
        if not fns:
            return _noop
        if len(fns) == 1:
            return fns[0]

        def dispatch(ctx: Context) -> None:
            for fn in fns:
                fn(ctx)

        return dispatch

    def has(self, hook: str) -> bool:
        return bool(self.table[hook])

    def describe(self) -> str:
        """Which callbacks run at each hook (fastai's ``show_training_loop``)."""
        lines = []
        for hook in HOOKS:
            names = [type(cb).__name__ for cb in self.callbacks if getattr(type(cb), hook, _noop) is not _noop]
            if names:
                lines.append(f"{hook}: {', '.join(names)}")
        return "\n".join(lines)
