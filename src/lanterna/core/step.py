"""The default step (forward → loss → backward → optimizer step), and a model's own ``step(ctx)``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ..data import call_model
from ..errors import LanternaError
from .checks import check_loss_inputs, check_model_call, explain_loss_failure
from .context import Context

__all__ = ["train_step", "valid_step", "custom_step", "make_forward", "make_loss"]


def make_forward(ctx: Context) -> Callable[[Any], Any]:
    """``inputs -> pred`` with autocast; the first call checks that forward can take the input."""
    model, fwd, autocast = ctx.model, ctx.forward_model, ctx.accelerator.autocast
    amp = ctx.accelerator.amp_dtype is not None

    def forward(inputs: Any) -> Any:
        if amp:
            with autocast():
                return call_model(fwd, inputs)
        return call_model(fwd, inputs)

    def first_forward(inputs: Any) -> Any:
        check_model_call(model, inputs)
        ctx._forward = forward
        return forward(inputs)

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
    ctx._did_backward = False
    ctx.model.step(ctx)
    if ctx.training and not ctx._did_backward and not getattr(ctx, "_warned_no_backward", False):
        if ctx.loss is not None and getattr(ctx.loss, "grad_fn", None) is not None and not any(
            p.grad is not None for p in ctx.model.parameters()
        ):
            ctx._warned_no_backward = True
            warnings.warn(
                "The module's step(ctx) computed a loss but never called backward: no parameter has a "
                "gradient. Call ctx.backward(loss) and ctx.step_optimizer() in step().",
                stacklevel=2,
            )
