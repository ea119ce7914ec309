"""The ``ctx`` object: the state a fit shares with its callbacks (luz's context).

``Context`` holds declared state only; behaviour lives in the objects that own it: the batch's step in
:class:`~lanterna.core.step.Stepper` (``ctx.backward`` / ``ctx.step_optimizer`` delegate to it), the processes in
``ctx.world`` (:mod:`lanterna.core.world`), the epoch's values in the metrics callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LanternaError
from .events import StopTraining
from .world import Local

__all__ = ["Context"]


@dataclasses.dataclass(eq=False)
class Context:
    """Everything a callback may read or change during fit (docs/callbacks.md, "What ctx carries").

    ``fit`` makes it; a callback reads it and may set ``stop_training``, ``loss_fn`` or ``backward_loss``.
    By group: what is trained (``model`` ... ``custom_step``), data and bounds (``train_data`` ...
    ``num_batches``), where the loop is (``epoch`` ... ``current_opt``), the batch (``batch`` ... ``batch_size``),
    what is recorded (``metrics`` ... ``hooks``) and the processes (``world`` ... ``stepper``).

    Attributes:
        model: the model being trained (the bare module).
        forward_model: what the training batches go through (the compiled or DDP-wrapped model).
        eval_forward_model: what validates (under DDP the bare module); None: ``forward_model``.
        optimizers: the optimizers by name (``ctx.opt`` when there is one).
        schedulers: the learning-rate schedulers.
        scaler: the ``torch.amp.GradScaler`` under ``precision="16-mixed"``, else None.
        loss_fn: the loss; a callback may replace it and the next loss uses it.
        accelerator: the :class:`~lanterna.Accelerator` of the run.
        device: where the model and the batches are.
        setup: the ``ln.Setup`` being fitted (None for a loaded model's predict / evaluate).
        custom_step: the module has its own ``step(ctx)``.
        train_data: the training batches' source.
        valid_data: the validation batches' source, or None.
        valid_name: the name of the validation set: ``"valid"``, ``"test"`` in evaluate.
        min_epochs: no stop (early stopping, ``stop_training``) before this epoch.
        max_epochs: the last epoch.
        start_epoch: the epoch a resumed run starts after (0 for a new run).
        num_batches: the number of batches of the phase under way; None when unknown.
        epoch: the current epoch (1-based).
        iter: the current batch of the phase (1-based).
        step: the optimizer steps so far.
        training: the training phase is under way (False while validating).
        set_name: ``"train"``, or the validation set's name.
        status: ``"running"``, then ``"completed"``, ``"stopped_early"``, ``"stopped"``, ``"interrupted"`` or
            ``"failed"``.
        stop_training: set by a callback: stop after this epoch (never before ``min_epochs``).
        interrupted: Ctrl-C was pressed: stop after this batch.
        accumulating: this batch's optimizer step is deferred (:class:`~lanterna.callbacks.GradientAccumulation`).
        current_opt: the optimizer ``ctx.step_optimizer`` is stepping (None: all).
        batch: the batch as the data gave it.
        input: the model's input of the batch, on the device.
        target: the batch's target, on the device.
        pred: the model's output for the batch.
        loss: the batch's loss (None from batch begin until it is computed).
        loss_weight: the denominator of the batch's mean loss when it is not the batch size (a 0-dim tensor).
        backward_loss: what ``ctx.backward`` differentiates; a callback may rescale it.
        sample_weight: the batch's sample weights (``fit(sample_weight=...)``), on the device.
        batch_size: the number of samples in the batch.
        metrics: the metric objects by set (``"train"``, ``"valid"``).
        metric_names: the metrics' history keys by set.
        display_names: the console name of each history key.
        history: one dict per finished epoch.
        record: the current epoch's entry of the history.
        verbose: fit prints progress.
        hooks: the callbacks of the run, in order.
        world: the processes: ``rank``, ``world_size``, ``is_main`` (``dist`` under torchrun).
        rank: this process's rank (-1: taken from ``world``).
        world_size: the number of processes (-1: taken from ``world``).
        is_main: this is rank 0 (None: taken from ``world``).
        stepper: the batch's mechanics (backward, optimizer step), used by ``ctx.backward``.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> from lanterna.core.context import Context
    >>> class LogGradNorm(ln.Callback):
    ...     def on_train_batch_before_step(self, ctx):
    ...         norms = [p.grad.norm() for p in ctx.model.parameters() if p.grad is not None]
    ...         ctx.log("grad_norm", torch.stack(norms).norm())
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((torch.randn(64, 3), torch.randn(64, 1)), epochs=1, verbose=False,
    ...                    callbacks=[LogGradNorm()])
    >>> fitted.history[0]["train_grad_norm"] > 0
    True
    >>> Context(device=torch.device("cpu")).epoch
    0
    """

    # ------------------------------------------------------------------ what is trained
    # model, forward_model, backward_loss: None only before fit sets them (typed as set: what hooks read)
    model: nn.Module = None  # type: ignore[assignment]
    forward_model: Callable[..., Any] = None  # type: ignore[assignment]  # the compiled / DDP-wrapped model that trains
    eval_forward_model: Callable[..., Any] | None = None  # what validates (DDP: the bare module); None: forward_model
    optimizers: dict[str, torch.optim.Optimizer] = dataclasses.field(default_factory=dict)
    schedulers: list[Any] = dataclasses.field(default_factory=list)
    scaler: Any = None  # torch.amp.GradScaler under precision="16-mixed"
    loss_fn: Callable[..., Tensor] | None = None  # a callback may replace it; the next loss uses it
    accelerator: Any = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    setup: Any = None  # the ln.Setup being fitted (None for a loaded model's predict / evaluate)
    custom_step: bool = False
    # ------------------------------------------------------------------ data and bounds
    train_data: Any = None  # batch sources (lanterna.data)
    valid_data: Any = None
    valid_name: str = "valid"  # "test" in evaluate
    min_epochs: int = 0
    max_epochs: int = 0
    start_epoch: int = 0  # > 0 when resumed
    num_batches: int | None = None  # of the phase under way; None when unknown
    # ------------------------------------------------------------------ where the loop is
    epoch: int = 0
    iter: int = 0
    step: int = 0
    training: bool = False
    set_name: str = "train"
    status: str = "running"  # "completed", "stopped_early", "stopped", "interrupted", "failed"
    stop_training: bool = False  # set by a callback: stop after this epoch (never before min_epochs)
    interrupted: bool = False  # Ctrl-C: stop after this batch
    accumulating: bool = False  # this batch's optimizer step is deferred (GradientAccumulation)
    current_opt: str | None = None  # the optimizer ctx.step_optimizer is stepping (None: all)
    # ------------------------------------------------------------------ the batch
    batch: Any = None
    input: Any = None
    target: Any = None
    pred: Any = None
    loss: Tensor | None = None  # None from batch begin until the loss is computed
    # the denominator of the batch's mean loss when it is not the batch size (a 0-dim tensor on the device:
    # Σ class weights of the targets for CrossEntropyLoss(weight=...), the non-ignored count for ignore_index)
    loss_weight: Tensor | None = None
    backward_loss: Tensor = None  # type: ignore[assignment]  # what ctx.backward differentiates; a callback may rescale it
    sample_weight: Tensor | None = None  # the batch's sample weights (fit(sample_weight=...)), on the device
    batch_size: int = 0
    # ------------------------------------------------------------------ what is recorded
    metrics: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: {"train": [], "valid": []})
    metric_names: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {"train": [], "valid": []})
    display_names: dict[str, str] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    verbose: bool = True
    hooks: Any = None  # core.callback.Hooks
    # ------------------------------------------------------------------ the processes
    world: Local = dataclasses.field(default_factory=Local)
    rank: int = -1  # -1: taken from the world
    world_size: int = -1
    is_main: bool = None  # type: ignore[assignment]  # None: taken from the world (__post_init__)
    stepper: Any = dataclasses.field(default=None, repr=False)  # core.step.Stepper: the batch's mechanics
    _logs: dict[str, list[Any]] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rank < 0:
            self.rank = self.world.rank
        if self.world_size < 0:
            self.world_size = self.world.world_size
        if self.is_main is None:
            self.is_main = self.world.is_main

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

    @property
    def dist(self) -> Any:
        """The distributed world under torchrun (``integrations.distributed.Distributed``), else None."""
        return self.world if self.world.distributed else None

    # ------------------------------------------------------------------ ctx.log
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

    def logs_state(self) -> dict[str, list[Any]]:
        """The ``ctx.log`` sums of the phase under way, ``name -> [weighted sum, weight]`` (a mid-epoch
        checkpoint stores them)."""
        return {name: list(slot) for name, slot in self._logs.items()}

    def load_logs_state(self, state: dict[str, list[Any]]) -> None:
        """Put back :meth:`logs_state` (tensors moved to ``ctx.device``)."""
        self._logs = {name: [v.to(self.device) if isinstance(v, Tensor) else v, w] for name, (v, w) in state.items()}

    def phase_context(self, training: bool) -> contextlib.AbstractContextManager[Any]:
        """Context around a phase's batches (DDP's join() for uneven shards; nothing otherwise)."""
        return self.world.phase_context(training)

    # ------------------------------------------------------------------ for custom steps (the Stepper does it)
    def forward(self, inputs: Any) -> Any:
        """Run the model on a batch input (autocast applied per the accelerator's precision)."""
        return self.stepper.forward(inputs)

    def backward(self, loss: Tensor) -> None:
        """Backward pass (scaled under 16-bit mixed precision); fires ``on_train_batch_before_backward``."""
        self.stepper.backward(loss)

    def step_optimizer(self, name: str | None = None) -> None:
        """Step one optimizer (all when ``name`` is None) and zero its gradients; fires
        ``on_train_batch_before_step`` / ``on_train_batch_after_step``. While ``ctx.accumulating``
        (GradientAccumulation between optimizer steps) it does nothing: the gradients keep adding up."""
        self.stepper.step_optimizer(name)

    def unscale_gradients(self) -> None:
        """Unscale gradients in place under 16-bit mixed precision (before clipping)."""
        self.stepper.unscale_gradients()

    def stop(self) -> None:
        """End fit now (not only after this epoch)."""
        raise StopTraining()
