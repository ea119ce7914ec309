"""The default step (forward → loss → backward → optimizer step), and a model's own ``step(ctx)``."""

from __future__ import annotations

import warnings
from typing import Any

from ..data import call_model
from ..errors import LanternaError, ModelCallError
from .checks import (
    check_broadcast,
    check_loss_inputs,
    check_model_call,
    check_trainable_loss,
    describe,
    explain_loss_failure,
)
from .context import Context
from .losses import loss_denominator

__all__ = ["train_step", "valid_step", "custom_step", "make_forward", "make_loss", "Forward", "LossComputer"]


class Forward:
    """``inputs -> pred`` with autocast. The first call in training and the first out of it (validation,
    evaluate, predict) check that forward can take the input, so a wrong validation batch is caught too."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.train_fwd = ctx.forward_model
        self.eval_fwd = getattr(ctx, "eval_forward_model", None) or ctx.forward_model  # DDP: validate bare
        self.autocast = ctx.accelerator.autocast if ctx.accelerator.amp_dtype is not None else None
        self.checked: set[bool] = set()  # values of ctx.training already checked

    def __call__(self, inputs: Any) -> Any:
        training = self.ctx.training
        if training not in self.checked:
            return self._first(inputs, training)
        fwd = self.train_fwd if training else self.eval_fwd
        if self.autocast is not None:
            with self.autocast():
                return call_model(fwd, inputs)
        return call_model(fwd, inputs)

    def _first(self, inputs: Any, training: bool) -> Any:
        model = self.model
        check_model_call(model, inputs)
        self.checked.add(training)
        try:
            return self(inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            self.checked.discard(training)
            which = "first batch" if training else f"first {self.ctx.set_name} batch"
            raise ModelCallError(
                f"{type(model).__name__}'s forward failed on the {which}, whose input is {describe(inputs)}: "
                f"{type(e).__name__}: {e}. Check that the input's shape and dtype match what the model expects "
                "(e.g. the number of input features of its first layer)."
            ) from e


class LossComputer:
    """``(pred, target) -> loss`` with autocast, for ``ctx.loss_fn`` as it is at each call (a callback may
    replace it: luz's mixup pattern).

    The first call of a loss in training, and the first out of it, check shapes and dtypes (:mod:`.checks`).
    For losses that are weighted means inside a batch (CrossEntropyLoss with ``weight=`` or ignored targets) it
    also sets ``ctx.loss_weight``, the batch's denominator, so the epoch's loss is exact."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.autocast = ctx.accelerator.autocast if ctx.accelerator.amp_dtype is not None else None
        self.fn: Any = None  # the loss the checks below were made for
        self.checked: set[bool] = set()
        self.denominator: Any = None

    def __call__(self, pred: Any, target: Any) -> Any:
        ctx = self.ctx
        fn = ctx.loss_fn
        if fn is not self.fn or ctx.training not in self.checked:
            return self._first(fn, pred, target)
        if self.autocast is not None:
            with self.autocast():
                loss = fn(pred, target)
        else:
            loss = fn(pred, target)
        if self.denominator is not None:
            ctx.loss_weight = self.denominator(target)
        return loss

    def _first(self, fn: Any, pred: Any, target: Any) -> Any:
        ctx = self.ctx
        if fn is None:
            raise LanternaError("ctx.loss_fn is None: there is no loss to compute. Pass loss=... to ln.setup, or "
                                "define step(self, ctx) on the module.")
        if fn is not self.fn:
            self.fn, self.checked = fn, set()
        if target is None:
            raise LanternaError(
                "The batch has no target, so the loss cannot be computed. Pass (x, y), or define "
                "step(self, ctx) on the module for training without targets."
            )
        check_loss_inputs(fn, pred, target)
        self.denominator = loss_denominator(fn, target)
        self.checked.add(ctx.training)
        try:
            loss = self(pred, target)
        except LanternaError:
            self.checked.discard(ctx.training)
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            self.checked.discard(ctx.training)
            raise explain_loss_failure(fn, pred, target, e) from e
        if not hasattr(loss, "dim") or loss.dim() != 0:
            self.checked.discard(ctx.training)
            shape = tuple(loss.shape) if hasattr(loss, "shape") else type(loss).__name__
            raise LanternaError(
                f"The loss must return a scalar tensor, got {shape}. Use reduction='mean' (the default) "
                "or reduce it yourself."
            )
        check_broadcast(fn, pred, target)
        if ctx.training:
            check_trainable_loss(ctx.model, loss)
        return loss


def make_forward(ctx: Context) -> Forward:
    """The forward callable of ``ctx`` (see :class:`Forward`)."""
    return Forward(ctx)


def make_loss(ctx: Context) -> LossComputer:
    """The loss callable of ``ctx`` (see :class:`LossComputer`)."""
    return LossComputer(ctx)


def train_step(ctx: Context) -> None:
    """forward → loss → backward → step, with the batch hooks in between."""
    hooks = ctx.hooks
    ctx.pred = ctx._forward(ctx.input)
    hooks.on_train_batch_after_pred(ctx)
    ctx.loss = ctx._compute_loss(ctx.pred, ctx.target)
    hooks.on_train_batch_after_loss(ctx)
    ctx.backward(ctx.loss)
    ctx.step_optimizer()


def valid_step(ctx: Context) -> None:
    """forward → loss, no gradients."""
    hooks = ctx.hooks
    ctx.pred = ctx._forward(ctx.input)
    hooks.on_valid_batch_after_pred(ctx)
    if ctx.loss_fn is not None and ctx.target is not None:
        ctx.loss = ctx._compute_loss(ctx.pred, ctx.target)
        hooks.on_valid_batch_after_loss(ctx)


def custom_step(ctx: Context) -> None:
    """The module's own ``step(ctx)``; it sets ``ctx.pred`` / ``ctx.loss`` and calls ``ctx.backward`` and
    ``ctx.step_optimizer`` (or steps the optimizers itself)."""
    if not ctx.training:
        ctx.model.step(ctx)
        return
    ctx._did_backward = False
    watch = getattr(ctx, "_backward_watch", True)
    if watch is True:  # first training batch: find out whether step() trains anything
        watch = ctx._backward_watch = _BackwardWatch(ctx)
    ctx.model.step(ctx)
    if watch is not None:
        watch.check(ctx)
    if not ctx.accumulating:
        # Gradients no optimizer consumed in this batch (a generator's loss reaching the discriminator) must
        # not leak into the next batch's steps, as the per-iteration zero_grad() of a hand-written loop ensures.
        for opt in ctx.optimizers.values():
            opt.zero_grad(set_to_none=True)


class _BackwardWatch:
    """Warns once when a custom step trains nothing (no backward, no optimizer step); removed after the first
    batch that trains, so it costs nothing afterwards."""

    def __init__(self, ctx: Context) -> None:
        self.stepped = False
        self.handles = [opt.register_step_post_hook(self._on_step) for opt in ctx.optimizers.values()]

    def _on_step(self, *args: Any) -> None:
        self.stepped = True

    def check(self, ctx: Context) -> None:
        trained = ctx._did_backward or self.stepped or any(p.grad is not None for p in ctx.model.parameters())
        for h in self.handles:
            h.remove()
        ctx._backward_watch = None
        if not trained:
            warnings.warn(
                "The module's step(ctx) ran a training batch without calling backward: no parameter got a "
                "gradient and no optimizer stepped, so nothing was trained. Call ctx.backward(loss) and then "
                "ctx.step_optimizer() (or ctx.step_optimizer(name) per optimizer) in step() when ctx.training "
                "is True. (Warned once.)",
                stacklevel=2,
            )
