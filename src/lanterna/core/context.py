"""The ``ctx`` object: the single channel between the loop and callbacks (luz's context)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LanternaError
from .events import StopTraining

__all__ = ["Context"]

_BASE_ZERO_GRAD = torch.optim.Optimizer.zero_grad


def _zero_grad(opt: torch.optim.Optimizer) -> None:
    """``opt.zero_grad(set_to_none=True)``. For optimizers that keep torch's implementation, the same loop
    without its profiler range, which costs ~10 µs a step on CPU — as much as a small model's step."""
    if type(opt).zero_grad is not _BASE_ZERO_GRAD or torch.autograd.profiler._is_profiler_enabled:
        opt.zero_grad(set_to_none=True)
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


class Context:
    """Everything a callback may read or change during fit (API.md §6).

    Fields: ``model, optimizers, opt, loss_fn, input, target, pred, loss, epoch, max_epochs, min_epochs,
    iter, training, device, metrics, history, record`` (the current epoch's history entry), ``step``
    (global optimizer step count), ``batch_size``, ``schedulers``, ``scaler``, ``stop_training``.

    >>> import lanterna as ln
    >>> class LogGradNorm(ln.Callback):
    ...     def on_train_batch_before_step(self, ctx):
    ...         norms = [p.grad.norm() for p in ctx.model.parameters() if p.grad is not None]
    ...         ctx.log("grad_norm", torch.stack(norms).norm())
    """

    def __init__(self, **fields: Any) -> None:
        self.model: nn.Module | None = None
        self.forward_model: Callable[..., Any] | None = None  # compiled / DDP-wrapped model, when any
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: list[Any] = []
        self.scaler: Any = None
        self.loss_fn: Callable[..., Tensor] | None = None
        self.accelerator: Any = None
        self.device = torch.device("cpu")
        self.metrics: dict[str, list[Any]] = {"train": [], "valid": []}
        self.metric_names: dict[str, list[str]] = {"train": [], "valid": []}
        self.display_names: dict[str, str] = {}
        self.custom_step = False
        self.history: list[dict[str, Any]] = []
        self.record: dict[str, Any] = {}
        self.batch: Any = None
        self.input: Any = None
        self.target: Any = None
        self.pred: Any = None
        self.loss: Tensor | None = None
        # the denominator of the batch's mean loss when it is not the batch size (a 0-dim tensor on the device:
        # Σ class weights of the targets for CrossEntropyLoss(weight=...), the non-ignored count for ignore_index)
        self.loss_weight: Tensor | None = None
        self.batch_size = 0
        self.epoch = 0
        self.max_epochs = 0
        self.min_epochs = 0
        self.iter = 0
        self.step = 0
        self.training = False
        self.set_name = "train"
        self.stop_training = False
        self.accumulating = False  # True on batches whose optimizer step GradientAccumulation defers
        self.interrupted = False
        self.status = "running"
        self.num_batches: int | None = None
        self.train_data: Any = None
        self.valid_data: Any = None
        self.hooks: Any = None
        self.verbose = True
        self.dist: Any = None  # integrations.distributed.Distributed under torchrun, else None
        self.rank, self.world_size, self.is_main = 0, 1, True
        self._logs: dict[str, list[Any]] = {}
        for k, v in fields.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ conveniences
    @property
    def opt(self) -> torch.optim.Optimizer:
        """The optimizer when there is exactly one (keyed ``"opt"``)."""
        if "opt" in self.optimizers:
            return self.optimizers["opt"]
        if len(self.optimizers) == 1:
            return next(iter(self.optimizers.values()))
        raise AttributeError(
            f"ctx.opt: there are several optimizers {list(self.optimizers)}; use ctx.optimizers[name]."
        )

    def log(self, name: str, value: Tensor | float) -> None:
        """Record a scalar for this batch; its epoch mean (weighted by batch size) lands in history as
        ``<set>_<name>`` and is printed and logged like any metric."""
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise LanternaError(
                    f"ctx.log({name!r}, ...) needs a scalar, got a tensor of shape {tuple(value.shape)}. "
                    "Reduce it first, e.g. value.mean() or value.sum()."
                )
            value = value.detach().reshape(())
        elif not isinstance(value, (int, float)):
            raise LanternaError(
                f"ctx.log({name!r}, ...) needs a number or a scalar tensor, got {type(value).__name__}."
            )
        slot = self._logs.get(name)
        w = self.batch_size or 1
        if slot is None:
            self._logs[name] = [value * w, w]
        else:
            slot[0] = slot[0] + value * w
            slot[1] += w

    def pop_logs(self) -> dict[str, tuple[Tensor | float, int]]:
        """``name -> (weighted sum, total weight)`` of the values logged since the last call."""
        out = {name: (total, weight) for name, (total, weight) in self._logs.items()}
        self._logs = {}
        return out

    def phase_context(self, training: bool) -> contextlib.AbstractContextManager[Any]:
        """Context around a phase's batches (DDP's join() for uneven shards; nothing otherwise)."""
        return self.dist.phase_context(training) if self.dist is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ for custom steps
    def forward(self, inputs: Any) -> Any:
        """Run the model on a batch input (autocast applied per the accelerator's precision)."""
        return self._forward(inputs)

    def backward(self, loss: Tensor) -> None:
        """Backward pass (scaled under 16-bit mixed precision); fires ``on_train_batch_before_backward``."""
        self.backward_loss = loss
        self.hooks.on_train_batch_before_backward(self)
        loss = self.backward_loss  # a callback may rescale it (GradientAccumulation)
        self._did_backward = True
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step_optimizer(self, name: str | None = None) -> None:
        """Step one optimizer (all when ``name`` is None) and zero its gradients;
        fires ``on_train_batch_before_step`` / ``on_train_batch_after_step``. While ``ctx.accumulating``
        (GradientAccumulation between optimizer steps) it does nothing: the gradients keep adding up."""
        if self.accumulating:
            return
        if name is not None and name not in self.optimizers:
            raise LanternaError(
                f"ctx.step_optimizer({name!r}): there is no optimizer {name!r}; the optimizers are "
                f"{list(self.optimizers)} (the names of the dict set_optimizers returns)."
            )
        opts = self.optimizers if name is None else {name: self.optimizers[name]}
        self.current_opt = name
        self.hooks.on_train_batch_before_step(self)
        for opt in opts.values():
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
            _zero_grad(opt)
        if self.scaler is not None:
            self.scaler.update()
        self.hooks.on_train_batch_after_step(self)

    def unscale_gradients(self) -> None:
        """Unscale gradients in place under 16-bit mixed precision (before clipping)."""
        if self.scaler is not None:
            for opt in self.optimizers.values():
                with contextlib.suppress(RuntimeError):  # already unscaled for this step
                    self.scaler.unscale_(opt)

    def stop(self) -> None:
        """End fit now (not only after this epoch)."""
        raise StopTraining()
