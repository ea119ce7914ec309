"""First-batch checks: clear errors instead of tracebacks from deep inside torch (docs/models.md, "Data forms")."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import LanternaError, ModelCallError, ShapeMismatchError, TargetDtypeError

__all__ = ["check_model_call", "check_loss_inputs", "check_broadcast", "check_trainable_loss", "check_first_batch",
           "first_batch", "describe"]

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
    args: tuple[Any, ...]
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


def check_broadcast(loss_fn: Callable[..., Any], pred: Any, target: Any) -> None:
    """For a loss lanterna does not know (a plain function, a lambda): refuse shapes it silently broadcasts.

    When output and target have different shapes that broadcast to a bigger one (``(32, 1)`` against
    ``(32,)`` → ``(32, 32)``), the loss is run once more (no gradient) watching torch's operations: an operation
    that combines a tensor of the output's shape with one of the target's shape into that bigger shape is the
    silent broadcast. A loss that reshapes its inputs itself (``p.squeeze(1) - t``) passes; an intended outer
    operation is written with explicit views (``t.view(1, -1)``) and passes too.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or pred.shape == target.shape:
        return
    if getattr(loss_fn, "parts", None) is not None or _known(loss_fn):
        return
    try:
        shape = torch.broadcast_shapes(pred.shape, target.shape)
    except RuntimeError:
        return
    if math.prod(shape) <= max(pred.numel(), target.numel()):
        return
    watch = _BroadcastWatch(pred.shape, target.shape, shape)
    try:
        with torch.no_grad(), watch:
            loss_fn(pred.detach(), target)
    except Exception:  # noqa: BLE001 - the loss ran once already; a failure here tells nothing
        return
    if not watch.seen:
        return
    fix = ("y.unsqueeze(1) (or y.view(-1, 1))" if pred.dim() == target.dim() + 1
           else "y.squeeze(1), or an output of the target's shape" if target.dim() == pred.dim() + 1
           else "reshape the target to the output's shape")
    raise ShapeMismatchError(
        f"Model output {describe(pred)} and target {describe(target)} have different shapes, and the loss "
        f"{_loss_name(loss_fn)} broadcasts them to {tuple(shape)} ({watch.seen}): its value mixes every output "
        f"with every target and is wrong. Make the shapes equal: {fix}."
    )


class _BroadcastWatch(TorchDispatchMode):
    """Notes the first operation that combines tensors of two given shapes into their broadcast shape."""

    def __init__(self, a: torch.Size, b: torch.Size, out: torch.Size) -> None:
        super().__init__()
        self.shapes, self.out = {tuple(a), tuple(b)}, tuple(out)
        self.seen = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if not self.seen and isinstance(result, Tensor) and tuple(result.shape) == self.out:
            shapes = {tuple(a.shape) for a in args if isinstance(a, Tensor)}
            if shapes == self.shapes:
                self.seen = f"in {getattr(func, '__name__', func)}".split(".")[0]
        return result


def check_trainable_loss(model: nn.Module, loss: Any) -> None:
    """The first training loss must carry a gradient, else backward fails deep inside autograd."""
    if not isinstance(loss, Tensor) or loss.requires_grad:
        return
    n_params = sum(1 for _ in model.parameters())
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if n_params and not trainable:
        why = (f"every parameter of {type(model).__name__} is frozen (requires_grad=False), so there is nothing "
               "to train. Unfreeze the parameters to train (p.requires_grad_(True)), e.g. the last layer's.")
    elif not n_params:
        why = f"{type(model).__name__} has no parameters, so there is nothing to train."
    else:
        why = ("the loss does not depend on any trainable parameter: it was detached (.detach(), .item(), "
               "torch.no_grad() or a NumPy round trip in forward or in the loss). Compute it from the model's "
               "output with torch operations.")
    raise LanternaError(f"The training loss has no gradient: {why}")


def _known(loss_fn: Any) -> bool:
    return (isinstance(loss_fn, nn.Module) and isinstance(loss_fn, _ELEMENTWISE + _CLASS_INDEX)) or (
        loss_fn in _ELEMENTWISE_FN or loss_fn in _CLASS_INDEX_FN)


def explain_loss_failure(loss_fn: Callable[..., Any], pred: Any, target: Any, err: Exception) -> LanternaError:
    """Wrap an error raised by the loss on the first batch into one that names the inputs."""
    return LanternaError(
        f"The loss {_loss_name(loss_fn)} failed on the first batch with model output {describe(pred)} and "
        f"target {describe(target)}: {type(err).__name__}: {err}. Check that the output and target match "
        "what the loss expects (shape, dtype, one output per loss)."
    )


def first_batch(source: Any) -> Any:
    """The first batch of a batch source, or None when it cannot be had cheaply (an IterableDataset, an empty
    source). Every random generator is left as it was (the global ones and the source's own), so the run that
    follows draws exactly the numbers it would have drawn; a loader's worker processes are not started (the batch
    is collated in this process)."""
    from ..data import LoaderBatches, move_to

    generators = _source_generators(source)
    saved = [g.get_state() for g in generators]
    cpu_state = torch.get_rng_state()
    try:
        if isinstance(source, LoaderBatches):
            dl = source.loader
            if isinstance(dl.dataset, torch.utils.data.IterableDataset):
                return None
            indices = next(iter(dl.batch_sampler if dl.batch_sampler is not None else dl.sampler), None)
            if indices is None:
                return None
            if dl.batch_sampler is not None:
                batch = dl.collate_fn([dl.dataset[i] for i in indices])
            else:
                batch = dl.collate_fn(dl.dataset[indices])
            device = source.device
            return batch if device is None or device.type == "cpu" else move_to(batch, device)
        return next(iter(source), None)
    finally:
        torch.set_rng_state(cpu_state)
        for g, state in zip(generators, saved):
            g.set_state(state)


def _source_generators(source: Any) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    objs = [source, getattr(source, "loader", None)]
    loader = objs[1]
    if loader is not None:
        objs += [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for obj in objs:
        for name in ("generator", "loader_generator", "sampler_generator"):
            g = getattr(obj, name, None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
    return found


def check_first_batch(ctx: Any, source: Any) -> None:
    """Run the first batch of ``source`` (validation data) through forward and the loss checks before training
    starts, so a wrong shape or feature count is an error now, not after a whole training epoch. No gradient,
    eval mode; the model (its buffers too) and every random generator are left as they were."""
    batch = first_batch(source)
    if batch is None:
        return
    from ..data import batch_size_of, split_batch

    weight = None
    if source.weighted:
        batch, weight = batch
    inputs, target = split_batch(batch)
    model = ctx.model
    training, mode = ctx.training, model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # a forward with side effects (counters)
    ctx.training, ctx.set_name, ctx.sample_weight = False, ctx.valid_name, weight
    ctx.batch_size = batch_size_of(inputs)  # an empty batch would skip the loss's checks (LossComputer)
    model.eval()
    try:
        with torch.no_grad():
            pred = ctx.stepper.forward(inputs)
            if ctx.loss_fn is not None and target is not None:
                ctx.stepper.loss(pred, target)
    finally:
        ctx.training = training
        model.train(mode)
        ctx.loss_weight = ctx.sample_weight = None
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
