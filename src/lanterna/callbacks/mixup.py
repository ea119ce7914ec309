"""``Mixup``: luz's ``luz_callback_mixup`` with ``nn_mixup_loss`` (Zhang et al., "mixup: Beyond Empirical Risk
Minimization"), through the ``ctx.input`` / ``ctx.loss_fn`` a callback may replace."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.callback import Callback
from ..core.checks import check_broadcast, check_loss_inputs, describe
from ..core.context import Context
from ..errors import LanternaError

__all__ = ["Mixup", "MixupLoss"]


def _accepts_reduction(fn: Any) -> bool:
    try:
        return "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class MixupLoss:
    """The loss of a mixed batch (luz's ``nn_mixup_loss``): per sample ``λᵢ·l(predᵢ, yᵢ) + (1−λᵢ)·l(predᵢ,
    y[perm]ᵢ)``, reduced as the wrapped loss reduces (mean or sum). For ``CrossEntropyLoss`` / ``NLLLoss`` with
    class ``weight=`` or ignored targets the mean is the weighted one, ``Σ mixed / Σ mixed weights``, so that
    ``λ = 1`` gives exactly the wrapped loss. :class:`Mixup` sets ``lam`` and ``perm`` before each batch.

    Args:
        loss: a torch loss module (its ``reduction`` is read; a copy computes per-sample values) or a function
            that accepts ``reduction="none"``.

    >>> import torch
    >>> from torch import nn
    >>> from lanterna.callbacks.mixup import MixupLoss
    >>> mix = MixupLoss(nn.MSELoss())
    >>> mix.lam, mix.perm = torch.tensor([1.0, 1.0]), torch.tensor([1, 0])
    >>> float(mix(torch.zeros(2), torch.tensor([1.0, 3.0])))  # λ = 1: the plain loss
    5.0
    """

    def __init__(self, loss: Callable[..., Tensor]) -> None:
        self.loss = loss
        self.lam: Tensor | None = None
        self.perm: Tensor | None = None
        self._checked = False
        self._denominator: Callable[[Tensor], Tensor] | None = None
        if isinstance(loss, nn.modules.loss._Loss):
            self.reduction = loss.reduction
            per_sample = copy.copy(loss)  # shares the loss's buffers (class weights); only reduction differs
            per_sample.reduction = "none"
            self._per_sample: Callable[[Any, Any], Tensor] = per_sample
            if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)):
                self._denominator = self._class_weights
        elif getattr(loss, "parts", None) is None and _accepts_reduction(loss):
            self.reduction = "mean"
            self._per_sample = lambda pred, target: loss(pred, target, reduction="none")
        else:
            raise LanternaError(
                f"Mixup needs the loss of each sample, but the loss {getattr(loss, '__name__', type(loss).__name__)} "
                "gives only the batch's value (it is not a torch loss and takes no reduction= argument"
                + (", and a list or dict of losses cannot be mixed" if getattr(loss, "parts", None) is not None
                   else "") + "). Use a torch loss (e.g. nn.CrossEntropyLoss()), or give your loss a "
                "reduction='none' argument that returns one value per sample."
            )
        if self.reduction not in ("mean", "sum"):
            raise LanternaError(f"Mixup: the loss has reduction={self.reduction!r}; it must reduce the batch to one "
                                "value: use reduction='mean' (the default) or 'sum'.")

    def _class_weights(self, target: Tensor) -> Tensor:
        loss: Any = self.loss
        keep = target != loss.ignore_index
        if loss.weight is None:
            return keep.to(torch.get_default_dtype())
        return loss.weight[target.masked_fill(~keep, 0)] * keep

    def __call__(self, pred: Any, target: Any) -> Tensor:
        lam, perm = self.lam, self.perm
        if lam is None or perm is None:
            raise LanternaError("MixupLoss was called before Mixup drew the batch's mixing weights; use it "
                                "through ln.callbacks.Mixup.")
        if not self._checked:  # the wrapped loss's first-batch checks (shapes it would silently broadcast)
            check_loss_inputs(self.loss, pred, target)
            check_broadcast(self.loss, pred, target)
        other = target[perm]
        l1, l2 = self._per_sample(pred, target), self._per_sample(pred, other)
        if not self._checked:
            n = lam.shape[0]
            if not isinstance(l1, Tensor) or l1.dim() == 0 or l1.shape[0] != n:
                shape = tuple(l1.shape) if isinstance(l1, Tensor) else type(l1).__name__
                raise LanternaError(f"Mixup: the loss with reduction='none' returned {shape} for a batch of {n} "
                                    "samples; it must return one value per sample (first dimension the batch).")
            self._checked = True
        w = lam.view(-1, *([1] * (l1.dim() - 1))).to(l1.dtype)
        mixed = w * l1 + (1 - w) * l2
        if self.reduction == "sum":
            return mixed.sum()
        if self._denominator is not None and not target.is_floating_point():
            d1, d2 = self._denominator(target), self._denominator(other)
            return mixed.sum() / (w * d1 + (1 - w) * d2).sum()
        return mixed.mean()


def _mix(x: Any, lam: Tensor, perm: Tensor) -> Any:
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise LanternaError(
                f"Mixup mixes the input with a shuffled copy of itself, which needs floating-point tensors; the "
                f"input holds {describe(x)}. Convert it (x.float()), or for token ids mix embeddings in a custom "
                "step(ctx) instead."
            )
        w = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return w * x + (1 - w) * x[perm]
    if isinstance(x, Mapping):
        return {k: _mix(v, lam, perm) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_mix(v, lam, perm) for v in x)
    raise LanternaError(f"Mixup cannot mix an input of type {type(x).__name__}; give tensors (or a tuple / dict "
                        "of tensors).")


class Mixup(Callback):
    """luz's mixup: each training batch's input is mixed with a shuffled copy of itself and the loss mixes the
    two targets' losses; validation, evaluate and predict are untouched.

    For a batch of ``n`` samples: ``b ~ Beta(α, α)`` per sample, ``λ = max(b, 1 − b)`` (the original sample
    keeps the larger share), ``perm = torch.randperm(n)``; the model sees ``λ·x + (1−λ)·x[perm]`` and the loss
    is ``mean(λ·loss(pred, y) + (1−λ)·loss(pred, y[perm]))`` over the per-sample losses (:class:`MixupLoss`).
    ``λ`` and ``perm`` are drawn on ``ctx.device`` from torch's generator, so a fit with ``seed=`` is
    reproducible. Training metrics compare the predictions on the mixed input with the original targets.

    The loss must give per-sample values: any torch loss, or a function taking ``reduction="none"``.

    Args:
        alpha: the Beta distribution's parameter (> 0); small values mix little.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> setup = ln.setup(nn.Linear, loss=nn.CrossEntropyLoss()).set_hparams(in_features=4, out_features=3)
    >>> fitted = setup.fit((x, y), epochs=2, seed=0, verbose=False, callbacks=[ln.callbacks.Mixup(alpha=0.4)])
    >>> len(fitted.history)
    2
    """

    def __init__(self, alpha: float = 0.4) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise LanternaError(f"Mixup(alpha={alpha!r}): alpha is the Beta distribution's parameter and must be a "
                                "number > 0, e.g. Mixup(alpha=0.4).")
        self.alpha = float(alpha)
        self._beta: torch.distributions.Beta | None = None
        self._loss: MixupLoss | None = None
        self._original: Any = None

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha})"

    def on_fit_begin(self, ctx: Context) -> None:
        if ctx.custom_step:
            raise LanternaError(
                f"Mixup replaces the input and the loss of the default training step, but "
                f"{type(ctx.model).__name__} has its own step(ctx). Mix the batch inside step() instead, or remove "
                "step() and pass loss=... to ln.setup."
            )
        a = torch.tensor(self.alpha, device=ctx.device)
        self._beta = torch.distributions.Beta(a, a, validate_args=False)
        self._wrap(ctx.loss_fn)

    def _wrap(self, loss: Any) -> MixupLoss:
        if self._loss is None or self._loss.loss is not loss:
            if loss is None:
                raise LanternaError("Mixup: there is no loss to mix. Pass loss=... to ln.setup.")
            self._loss = MixupLoss(loss)
        return self._loss

    def on_train_begin(self, ctx: Context) -> None:
        self._original = ctx.loss_fn
        ctx.loss_fn = self._wrap(ctx.loss_fn)

    def on_train_batch_begin(self, ctx: Context) -> None:
        loss, beta = self._loss, self._beta
        assert loss is not None and beta is not None
        n, device = ctx.batch_size, ctx.device
        b = beta.sample((n,))
        lam = torch.maximum(b, 1 - b)
        perm = torch.randperm(n, device=device)
        ctx.input = _mix(ctx.input, lam, perm)
        loss.lam, loss.perm = lam, perm

    def on_train_end(self, ctx: Context) -> None:
        if ctx.loss_fn is self._loss:
            ctx.loss_fn = self._original

    def on_fit_end(self, ctx: Context) -> None:
        self.on_train_end(ctx)  # a fit that stopped mid-epoch leaves the original loss too
