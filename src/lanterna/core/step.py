"""The default step (forward → loss → backward → optimizer step), and a model's own ``step(ctx)``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ..data import call_model
from ..errors import LanternaError, ModelCallError
from .checks import check_loss_inputs, check_model_call, describe, explain_loss_failure
from .context import Context

__all__ = ["train_step", "valid_step", "custom_step", "make_forward", "make_loss"]


def make_forward(ctx: Context) -> Callable[[Any], Any]:
    """``inputs -> pred`` with autocast; the first call checks that forward can take the input."""
    model, train_fwd, autocast = ctx.model, ctx.forward_model, ctx.accelerator.autocast
    eval_fwd = getattr(ctx, "eval_forward_model", None) or train_fwd  # DDP: validate on the bare module
    amp = ctx.accelerator.amp_dtype is not None

    def forward(inputs: Any) -> Any:
        fwd = train_fwd if ctx.training else eval_fwd
        if amp:
            with autocast():
                return call_model(fwd, inputs)
        return call_model(fwd, inputs)

    def first_forward(inputs: Any) -> Any:
        check_model_call(model, inputs)
        try:
            pred = forward(inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ModelCallError(
                f"{type(model).__name__}'s forward failed on the first batch, whose input is {describe(inputs)}: "
                f"{type(e).__name__}: {e}. Check that the input's shape and dtype match what the model expects "
                "(e.g. the number of input features of its first layer)."
            ) from e
        ctx._forward = forward
        return pred

    return first_forward


def make_loss(ctx: Context) -> Callable[[Any, Any], Any]:
    """``(pred, target) -> loss`` with autocast; the first call checks shapes and dtypes."""
    loss_fn, autocast = ctx.loss_fn, ctx.accelerator.autocast
    amp = ctx.accelerator.amp_dtype is not None

    def compute(pred: Any, target: Any) -> Any:
        if amp:
            with autocast():
                return loss_fn(pred, target)
        return loss_fn(pred, target)

    def first_compute(pred: Any, target: Any) -> Any:
        if target is None:
            raise LanternaError(
                "The batch has no target, so the loss cannot be computed. Pass (x, y), or define "
                "step(self, ctx) on the module for training without targets."
            )
        check_loss_inputs(loss_fn, pred, target)
        try:
            loss = compute(pred, target)
        except LanternaError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise explain_loss_failure(loss_fn, pred, target, e) from e
        if not hasattr(loss, "dim") or loss.dim() != 0:
            shape = tuple(loss.shape) if hasattr(loss, "shape") else type(loss).__name__
            raise LanternaError(
                f"The loss must return a scalar tensor, got {shape}. Use reduction='mean' (the default) "
                "or reduce it yourself."
            )
        ctx._compute_loss = compute
        return loss

    return first_compute


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
