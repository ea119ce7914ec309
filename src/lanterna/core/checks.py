"""First-batch checks: clear errors instead of tracebacks from deep inside torch (API.md §2)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LanternaError, ModelCallError, ShapeMismatchError, TargetDtypeError

__all__ = ["check_model_call", "check_loss_inputs", "describe"]

_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                nn.SoftMarginLoss)
_ELEMENTWISE_FN = {F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                   F.binary_cross_entropy_with_logits}
_BCE = (nn.BCELoss, nn.BCEWithLogitsLoss)
_BCE_FN = {F.binary_cross_entropy, F.binary_cross_entropy_with_logits}
_CLASS_INDEX = (nn.CrossEntropyLoss, nn.NLLLoss)
_CLASS_INDEX_FN = {F.cross_entropy, F.nll_loss}


def describe(obj: Any) -> str:
    """Short description of a batch part: shapes and dtypes."""
    if isinstance(obj, Tensor):
        return f"tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def _loss_name(fn: Any) -> str:
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", type(fn).__name__)


def check_model_call(model: nn.Module, inputs: Any) -> None:
    """Raise :class:`ModelCallError` when ``forward`` cannot bind the batch input."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return
    if isinstance(inputs, Mapping):
        args, kwargs, tried = (), dict(inputs), f"model(**input) with keyword inputs {', '.join(map(str, inputs))}"
    elif isinstance(inputs, (tuple, list)):
        plural = "s" if len(inputs) != 1 else ""
        args, kwargs, tried = tuple(inputs), {}, f"model(*inputs) with {len(inputs)} positional input{plural}"
    else:
        args, kwargs, tried = (inputs,), {}, "model(x) with 1 positional input"
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ModelCallError(
            f"{type(model).__name__}.forward{sig} cannot take the batch input: tried {tried} ({e}). "
            f"The input was {describe(inputs)}. A batch (x, y) calls model(x); (x1, x2, y) calls model(x1, x2); "
            "a dict input calls model(**input). Change forward's arguments or how the data is structured."
        ) from None


def check_loss_inputs(loss_fn: Callable[..., Any], pred: Any, target: Any) -> None:
    """Refuse a target dtype the loss cannot take and shapes it would silently broadcast."""
    parts = getattr(loss_fn, "parts", None)
    if parts is not None:
        if isinstance(parts, Mapping) and isinstance(pred, Mapping):
            for k, fn in parts.items():
                if k in pred:
                    check_loss_inputs(fn, pred[k], target[k] if isinstance(target, Mapping) else target)
        elif isinstance(pred, (tuple, list)) and len(pred) == len(parts):
            targets = target if isinstance(target, (tuple, list)) else [target] * len(parts)
            for fn, p, t in zip(parts, pred, targets):
                check_loss_inputs(fn, p, t)
        return
    if isinstance(pred, (tuple, list, Mapping)) and (
        isinstance(loss_fn, nn.modules.loss._Loss) or getattr(loss_fn, "__module__", None) == F.__name__
    ):
        raise LanternaError(
            f"The model returned {len(pred)} outputs {describe(pred)} but the loss is a single "
            f"{_loss_name(loss_fn)}, which takes one tensor. Pass one loss per output, e.g. "
            f"loss=[{_loss_name(loss_fn)}(), ...] with loss_weights=[0.8, 0.2, ...], or return one tensor."
        )
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        return
    name = _loss_name(loss_fn)
    is_mod = isinstance(loss_fn, nn.Module)
    if ((is_mod and isinstance(loss_fn, _BCE)) or loss_fn in _BCE_FN) and not target.is_floating_point():
        raise TargetDtypeError(
            f"{name} needs a floating-point target of 0/1 values, but the target is {describe(target)}. "
            "Convert it: y = y.float()."
        )
    if (is_mod and isinstance(loss_fn, _CLASS_INDEX)) or loss_fn in _CLASS_INDEX_FN:
        if target.is_floating_point() and target.shape != pred.shape:
            raise TargetDtypeError(
                f"{name} takes class indices as an integer (int64) target, but the target is {describe(target)}. "
                "Convert it: y = y.long()" + (" and drop the extra dimension: y = y.squeeze(1)."
                                              if target.dim() == pred.dim() else ".")
            )
        if not target.is_floating_point() and target.dim() == pred.dim() and pred.dim() > 1:
            raise ShapeMismatchError(
                f"{name}: class-index target {describe(target)} has as many dimensions as the scores "
                f"{describe(pred)}. Class indices need shape (N,): use y.squeeze(1)."
            )
        return
    if ((is_mod and isinstance(loss_fn, _ELEMENTWISE)) or loss_fn in _ELEMENTWISE_FN) and pred.shape != target.shape:
        try:
            shape = tuple(torch.broadcast_shapes(pred.shape, target.shape))
            effect = f"{name} would broadcast them to {shape} and compute a wrong loss"
        except RuntimeError:
            effect = f"{name} cannot combine them"
        fix = ""
        if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
            fix = " Make them equal: give the target a trailing dimension (y.unsqueeze(1) or y.view(-1, 1))"
            fix += " or squeeze the output (pred.squeeze(1))."
        elif target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
            fix = " Make them equal: y.squeeze(1), or output shape (N, 1)."
        else:
            fix = " Make the model's output shape equal the target's."
        raise ShapeMismatchError(
            f"Model output {describe(pred)} and target {describe(target)} have different shapes; {effect}.{fix}"
        )


def explain_loss_failure(loss_fn: Callable[..., Any], pred: Any, target: Any, err: Exception) -> LanternaError:
    """Wrap an error raised by the loss on the first batch into one that names the inputs."""
    return LanternaError(
        f"The loss {_loss_name(loss_fn)} failed on the first batch with model output {describe(pred)} and "
        f"target {describe(target)}: {type(err).__name__}: {err}. Check that the output and target match "
        "what the loss expects (shape, dtype, one output per loss)."
    )
