"""The loss: one callable, several matched to outputs with weights, or the module's own ``loss``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LanternaError

__all__ = ["build_loss", "loss_denominator", "per_sample_loss"]

LossFn = Callable[[Any, Any], Tensor]


def build_loss(loss: Any, loss_weights: Any, model: nn.Module, custom_step: bool) -> LossFn | None:
    """Return ``(pred, target) -> scalar`` for the setup's ``loss`` and ``loss_weights``."""
    multi = isinstance(loss, (Mapping, Sequence)) and not isinstance(loss, str)
    if loss_weights is not None and not multi:
        raise LanternaError(
            "loss_weights weighs the losses of a multi-output model, so loss must be a list (or dict) with one "
            "loss per output, e.g. loss=[nn.MSELoss(), nn.MSELoss()], loss_weights=[0.8, 0.2]. "
            "Drop loss_weights for a single loss."
        )
    if loss is None:
        own = getattr(model, "loss", None)
        if callable(own) and not isinstance(own, Tensor):
            return own
        if custom_step:
            return None
        raise LanternaError(
            "No loss: pass loss=... to ln.setup (e.g. loss=nn.MSELoss()) or define loss(self, pred, target) "
            "on the module."
        )
    if isinstance(loss, Mapping):
        for key, part in loss.items():
            _check_callable(part, f"loss[{key!r}]")
        return _dict_loss(dict(loss), loss_weights)
    if isinstance(loss, Sequence) and not isinstance(loss, str):
        if not loss:
            raise LanternaError("loss is an empty list; give one loss per output.")
        for i, part in enumerate(loss):
            _check_callable(part, f"loss[{i}]")
        return _list_loss(list(loss), loss_weights)
    _check_callable(loss, "loss")
    return loss


def _check_callable(loss: Any, where: str) -> None:
    if isinstance(loss, type):
        raise LanternaError(f"{where}={loss.__name__} is a class; pass an instance, e.g. {where}={loss.__name__}().")
    if not callable(loss):
        raise LanternaError(f"{where} must be callable (pred, target) -> tensor; got {type(loss).__name__}.")


def _list_loss(losses: list[LossFn], weights: Any) -> LossFn:
    n = len(losses)
    w = [1.0] * n if weights is None else list(weights)
    if len(w) != n:
        raise LanternaError(f"loss_weights has {len(w)} entries but loss has {n}; give one weight per loss.")

    def multi_loss(pred: Any, target: Any) -> Tensor:
        if not isinstance(pred, (tuple, list)) or len(pred) != n:
            got = f"a {type(pred).__name__} of {len(pred)} outputs" if isinstance(pred, (tuple, list)) else (
                f"a single {type(pred).__name__}")
            raise LanternaError(
                f"loss is a list of {n} losses but the model returned {got}. Return one output per loss "
                "(a tuple) or pass as many losses as outputs."
            )
        targets = target if isinstance(target, (tuple, list)) else [target] * n
        if len(targets) != n:
            raise LanternaError(f"{n} outputs but {len(targets)} targets; give one target per output or one shared.")
        total = w[0] * losses[0](pred[0], targets[0])
        for i in range(1, n):
            total = total + w[i] * losses[i](pred[i], targets[i])
        return total

    multi_loss.parts = losses  # type: ignore[attr-defined]
    return multi_loss


def _dict_loss(losses: dict[str, LossFn], weights: Any) -> LossFn:
    w = {k: 1.0 for k in losses} if weights is None else dict(weights)
    if set(w) != set(losses):
        raise LanternaError(f"loss_weights keys {sorted(w)} do not match loss keys {sorted(losses)}.")

    def multi_loss(pred: Any, target: Any) -> Tensor:
        if not isinstance(pred, Mapping) or not set(losses) <= set(pred):
            got = sorted(pred) if isinstance(pred, Mapping) else type(pred).__name__
            raise LanternaError(f"loss is a dict over outputs {sorted(losses)} but the model returned {got}.")
        total = None
        for k, fn in losses.items():
            t = target[k] if isinstance(target, Mapping) else target
            term = w[k] * fn(pred[k], t)
            total = term if total is None else total + term
        return total  # type: ignore[return-value]

    multi_loss.parts = losses  # type: ignore[attr-defined]
    return multi_loss


def loss_denominator(loss: Any, target: Any) -> Callable[[Tensor], Tensor] | None:
    """``target -> Σ weights`` for a loss whose batch value is a weighted mean over the batch's targets
    (``CrossEntropyLoss`` / ``NLLLoss`` with class indices: ``Σ w[y]·l / Σ w[y]`` over the targets that are not
    ``ignore_index``), so that the epoch's loss can be ``Σ loss·denominator / Σ denominator``, the whole-set
    value. None when the batch size already is the denominator (every other loss).

    >>> import torch
    >>> from torch import nn
    >>> from lanterna.core.losses import loss_denominator
    >>> weigh = loss_denominator(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])), torch.tensor([0, 1]))
    >>> float(weigh(torch.tensor([1, 1, -100])))
    6.0
    """
    if not isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)) or loss.reduction != "mean":
        return None
    if not isinstance(target, Tensor) or target.is_floating_point():
        return None  # class probabilities: a plain mean over the batch
    ignore, weight = loss.ignore_index, loss.weight
    if weight is None:
        return lambda t: torch.count_nonzero(t != ignore)  # ~3 µs a batch

    def weighted(t: Tensor) -> Tensor:
        keep = t != ignore
        return (weight.index_select(0, t.masked_fill(~keep, 0).reshape(-1)) * keep.reshape(-1)).sum()

    return weighted


def per_sample_loss(loss: Any) -> Callable[[Any, Any], tuple[Tensor, Tensor]]:
    """``(pred, target) -> (per-sample loss sums (N,), per-sample shares (N,))`` for ``sample_weight``: a torch
    loss runs with ``reduction="none"`` (a copy of it); a sample's share is its element count, or for
    CrossEntropyLoss / NLLLoss with class indices its targets' class weights (ignored targets count 0), so that
    ``Σ l / Σ share`` is the loss's own mean and ``Σ w·l / Σ w·share`` its weighted mean. A plain function must
    take ``reduction="none"``.

    >>> import torch
    >>> from torch import nn
    >>> from lanterna.core.losses import per_sample_loss
    >>> num, den = per_sample_loss(nn.MSELoss())(torch.zeros(2, 3), torch.ones(2, 3))
    >>> num.tolist(), den.tolist()
    ([3.0, 3.0], [3.0, 3.0])
    """
    if getattr(loss, "parts", None) is not None:
        raise LanternaError("sample_weight with several losses (one per output) is not supported: weigh the "
                            "samples in a custom step(ctx), or train with one loss.")
    name = type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", type(loss).__name__)
    if isinstance(loss, nn.modules.loss._Loss):
        per = copy.copy(loss)
        per.reduction = "none"
        class_index = isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss))

        def call(pred: Any, target: Any) -> Tensor:
            return per(pred, target)
    else:
        class_index = False

        def call(pred: Any, target: Any) -> Tensor:
            try:
                return loss(pred, target, reduction="none")
            except TypeError as e:
                raise LanternaError(
                    f"sample_weight needs the loss per sample, but the loss {name} does not take reduction='none' "
                    f"({e}). Give it a reduction argument (def loss(pred, target, reduction='mean')) that returns one "
                    "value per sample for 'none', or use a torch loss."
                ) from None

    def per_sample(pred: Any, target: Any) -> tuple[Tensor, Tensor]:
        values = call(pred, target)
        n = pred.shape[0] if isinstance(pred, Tensor) else None
        if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != n:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise LanternaError(f"sample_weight needs the loss per sample: {name} with reduction='none' returned "
                                f"{shape}, not values of first dimension {n} (one row per sample).")
        num = values.reshape(n, -1).sum(1)
        if class_index and not target.is_floating_point():
            keep = target != loss.ignore_index
            share = keep.to(num.dtype)
            if loss.weight is not None:
                share = loss.weight.index_select(0, target.masked_fill(~keep, 0).reshape(-1)).reshape(
                    target.shape) * keep
            den = share.reshape(n, -1).sum(1)
        else:
            den = torch.full((n,), float(values[0].numel()), dtype=num.dtype, device=num.device)
        return num, den

    return per_sample
