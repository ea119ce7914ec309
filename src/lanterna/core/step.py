"""The life of a batch after the loop hands it over: forward → loss → backward → optimizer step (the
:class:`Stepper`), or a module's own ``step(ctx)``; the first-batch checks of forward and loss."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import Tensor

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
from .losses import loss_denominator, per_sample_loss
from .sync import allowed_sync

__all__ = ["Stepper", "Forward", "LossComputer", "zero_grad"]


class Forward:
    """``inputs -> pred`` with autocast. The first call in training and the first out of it (validation,
    evaluate, predict) check that forward can take the input, so a wrong validation batch is caught too."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.train_fwd = ctx.forward_model
        self.eval_fwd = ctx.eval_forward_model or ctx.forward_model  # DDP: validate on the bare module
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
        with allowed_sync():  # the first batch's checks: a natural synchronisation point
            return self._checked_first(inputs, training)

    def _checked_first(self, inputs: Any, training: bool) -> Any:
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
    also sets ``ctx.loss_weight``, the batch's denominator, so the epoch's loss is exact. With sample weights
    (``ctx.sample_weight``) the loss is computed per sample and weighted (:func:`.losses.per_sample_loss`)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.autocast = ctx.accelerator.autocast if ctx.accelerator.amp_dtype is not None else None
        self.fn: Any = None  # the loss the checks below were made for
        self.checked: set[bool] = set()
        self.denominator: Any = None
        self.per_sample: tuple[Any, Any] | None = None  # (loss, its per-sample form) under sample weights

    def __call__(self, pred: Any, target: Any) -> Any:
        ctx = self.ctx
        if ctx.batch_size == 0:  # a rank keeping step with the others (integrations/even_batches.py)
            return _zero_loss(pred)
        fn = ctx.loss_fn
        if fn is not self.fn or ctx.training not in self.checked:
            return self._first(fn, pred, target)
        if ctx.sample_weight is not None:
            return self._weighted(pred, target, ctx.sample_weight)
        if self.autocast is not None:
            with self.autocast():
                loss = fn(pred, target)
        else:
            loss = fn(pred, target)
        if self.denominator is not None:
            ctx.loss_weight = self.denominator(target)
        return loss

    def _weighted(self, pred: Any, target: Any, weight: Tensor) -> Tensor:
        """``Σ w·l / Σ w·d`` over the batch's samples (``d``: a sample's share of the loss's mean, its element
        count or class weights); ``ctx.loss_weight`` is ``Σ w·d``, so the epoch's value is exact too."""
        if self.per_sample is None or self.per_sample[0] is not self.fn:
            self.per_sample = (self.fn, per_sample_loss(self.fn))
        per_sample = self.per_sample[1]
        if self.autocast is not None:
            with self.autocast():
                num, den = per_sample(pred, target)
        else:
            num, den = per_sample(pred, target)
        w = weight.to(num.dtype)
        total = (w * den).sum()
        self.ctx.loss_weight = total
        return (w * num).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)  # all weights 0: a loss of 0

    def _first(self, fn: Any, pred: Any, target: Any) -> Any:
        with allowed_sync():  # the first batch's checks: a natural synchronisation point
            return self._checked_first(fn, pred, target)

    def _checked_first(self, fn: Any, pred: Any, target: Any) -> Any:
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


_BASE_ZERO_GRAD = torch.optim.Optimizer.zero_grad


def _zero_loss(pred: Any) -> Tensor:
    """A loss of 0 tied to every floating output, so that backward reaches every parameter with a zero gradient
    (an empty batch: the mean of nothing would be NaN)."""
    if isinstance(pred, Tensor):
        return pred.sum() * 0.0 if pred.is_floating_point() else pred.new_zeros((), dtype=torch.float32)
    parts = list(pred.values()) if isinstance(pred, dict) else list(pred) if isinstance(pred, (tuple, list)) else []
    losses = [_zero_loss(p) for p in parts if isinstance(p, (Tensor, dict, tuple, list))]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def zero_grad(opt: torch.optim.Optimizer) -> None:
    """``opt.zero_grad(set_to_none=True)``. For optimizers that keep torch's implementation, the same loop
    without its profiler range, which costs ~10 µs a step on CPU — as much as a small model's step."""
    if type(opt).zero_grad is not _BASE_ZERO_GRAD or torch.autograd.profiler._is_profiler_enabled:
        opt.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


class Stepper:
    """The mechanics of one batch, built once per fit (and per predict / evaluate) and kept in ``ctx.stepper``:
    forward, loss, backward, optimizer step, zero-grad, unscale, the first-batch checks, and a module's own
    ``step(ctx)``. ``ctx.forward`` / ``ctx.backward`` / ``ctx.step_optimizer`` delegate here.

    The default training batch (:meth:`train_batch`)::

        pred = forward(input)             → on_train_batch_after_pred
        loss = loss_fn(pred, target)      → on_train_batch_after_loss
        backward(loss)                    → on_train_batch_before_backward (NaN check, accumulation scaling)
        step_optimizer()                  → on_train_batch_before_step (NaN gradients, clipping), step,
                                            zero_grad → on_train_batch_after_step

    Args:
        ctx: the fit's context (its model, optimizers, scaler, hooks and accelerator are used).

    >>> import torch
    >>> from lanterna.core.accelerator import Accelerator
    >>> from lanterna.core.context import Context
    >>> from lanterna.core.step import Stepper
    >>> model = torch.nn.Linear(3, 1)
    >>> ctx = Context(model=model, forward_model=model, accelerator=Accelerator(device="cpu"))
    >>> Stepper(ctx).forward(torch.zeros(2, 3)).shape
    torch.Size([2, 1])
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.forward = Forward(ctx)
        self.loss = LossComputer(ctx)
        own = ctx.custom_step
        self.train_batch = self._own_train_batch if own else self._train_batch
        self.valid_batch = self._own_valid_batch if own else self._valid_batch
        self._did_backward = False
        self._watch: _BackwardWatch | None | bool = True  # True: not yet created (first training batch)

    # ------------------------------------------------------------------ the default step
    def _train_batch(self) -> None:
        ctx = self.ctx
        hooks = ctx.hooks
        ctx.pred = self.forward(ctx.input)
        hooks.on_train_batch_after_pred(ctx)
        ctx.loss = self.loss(ctx.pred, ctx.target)
        hooks.on_train_batch_after_loss(ctx)
        self.backward(ctx.loss)
        self.step_optimizer()

    def _valid_batch(self) -> None:
        ctx = self.ctx
        hooks = ctx.hooks
        ctx.pred = self.forward(ctx.input)
        hooks.on_valid_batch_after_pred(ctx)
        if ctx.loss_fn is not None and ctx.target is not None:
            ctx.loss = self.loss(ctx.pred, ctx.target)
            hooks.on_valid_batch_after_loss(ctx)

    # ------------------------------------------------------------------ a module's own step(ctx)
    def _own_valid_batch(self) -> None:
        self.ctx.model.step(self.ctx)  # type: ignore[operator]

    def _own_train_batch(self) -> None:
        """The module's ``step(ctx)``: it sets ``ctx.pred`` / ``ctx.loss`` and calls ``ctx.backward`` and
        ``ctx.step_optimizer`` (or steps the optimizers itself)."""
        ctx = self.ctx
        self._did_backward = False
        watch = self._watch
        if watch is True:  # first training batch: find out whether step() trains anything
            watch = self._watch = _BackwardWatch(ctx)
        ctx.model.step(ctx)  # type: ignore[operator]
        if watch is not None:
            watch.check(ctx, self._did_backward)  # type: ignore[union-attr]
            self._watch = None
        if not ctx.accumulating:
            # Gradients no optimizer consumed in this batch (a generator's loss reaching the discriminator) must
            # not leak into the next batch's steps, as the per-iteration zero_grad() of a hand-written loop ensures.
            for opt in ctx.optimizers.values():
                opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the parts
    def backward(self, loss: Tensor) -> None:
        """Backward pass (scaled under 16-bit mixed precision); fires ``on_train_batch_before_backward``,
        whose callbacks may replace ``ctx.backward_loss`` (GradientAccumulation scales it)."""
        ctx = self.ctx
        ctx.backward_loss = loss
        ctx.hooks.on_train_batch_before_backward(ctx)
        loss = ctx.backward_loss
        self._did_backward = True
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step_optimizer(self, name: str | None = None) -> None:
        """Step one optimizer (all when ``name`` is None) and zero its gradients, between
        ``on_train_batch_before_step`` and ``on_train_batch_after_step``; nothing while ``ctx.accumulating``."""
        ctx = self.ctx
        if ctx.accumulating:
            return
        optimizers, scaler = ctx.optimizers, ctx.scaler
        if name is not None and name not in optimizers:
            raise LanternaError(
                f"ctx.step_optimizer({name!r}): there is no optimizer {name!r}; the optimizers are "
                f"{list(optimizers)} (the names of the dict set_optimizers returns)."
            )
        opts = optimizers.values() if name is None else (optimizers[name],)
        ctx.current_opt = name
        ctx.hooks.on_train_batch_before_step(ctx)
        for opt in opts:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
            zero_grad(opt)
        if scaler is not None:
            scaler.update()
        ctx.hooks.on_train_batch_after_step(ctx)

    def unscale_gradients(self) -> None:
        """Unscale gradients in place under 16-bit mixed precision (before clipping)."""
        scaler = self.ctx.scaler
        if scaler is not None:
            for opt in self.ctx.optimizers.values():
                with contextlib.suppress(RuntimeError):  # already unscaled for this step
                    scaler.unscale_(opt)


class _BackwardWatch:
    """Warns once when a custom step trains nothing (no backward, no optimizer step); removed after the first
    training batch, so it costs nothing afterwards."""

    def __init__(self, ctx: Context) -> None:
        self.stepped = False
        self.handles = [opt.register_step_post_hook(self._on_step) for opt in ctx.optimizers.values()]

    def _on_step(self, *args: Any) -> None:
        self.stepped = True

    def check(self, ctx: Context, did_backward: bool) -> None:
        trained = did_backward or self.stepped or any(p.grad is not None for p in ctx.model.parameters())
        for h in self.handles:
            h.remove()
        if not trained:
            warnings.warn(
                "The module's step(ctx) ran a training batch without calling backward: no parameter got a "
                "gradient and no optimizer stepped, so nothing was trained. Call ctx.backward(loss) and then "
                "ctx.step_optimizer() (or ctx.step_optimizer(name) per optimizer) in step() when ctx.training "
                "is True. (Warned once.)",
                stacklevel=2,
            )
