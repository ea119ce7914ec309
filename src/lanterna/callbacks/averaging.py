"""Weight averaging on ``torch.optim.swa_utils``: an exponential moving average of the weights (:class:`EMA`)
and stochastic weight averaging (:class:`SWA`)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from ..core.callback import Callback
from ..core.context import Context
from ..data.structure import call_model, split_batch
from ..errors import CheckpointError, LanternaError

__all__ = ["EMA", "SWA"]


def _tensors(module: nn.Module, buffers: bool) -> list[Tensor]:
    """Parameters (then buffers), detached: the order ``AveragedModel.update_parameters`` pairs them in."""
    chain = itertools.chain(module.parameters(), module.buffers()) if buffers else module.parameters()
    return [t.detach() for t in chain]


def _averaged(ctx: Context, buffers: bool, **kwargs: Any) -> AveragedModel:
    if ctx.world.shards_parameters:  # FSDP: AveragedModel deep-copies the model, which FSDP forbids
        raise LanternaError(
            "EMA / SWA under Accelerator(strategy='fsdp') is not supported: the average would be a deep copy of "
            "the sharded model, which FSDP forbids. Use strategy='ddp' (the default under torchrun) with EMA / SWA, "
            "or drop the averaging callback.")
    # device=None: the copy stays on the model's device and the n_averaged counter on the CPU
    averaged = AveragedModel(ctx.model, use_buffers=buffers, **kwargs)
    averaged.eval()
    return averaged


def _load_averaged(averaged: AveragedModel, state: dict[str, Any], who: str) -> None:
    try:
        averaged.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{who}: the averaged weights in the checkpoint do not fit this model ({e}). Resume "
                              "with the same model, or delete the checkpoint to start afresh.") from None


def _copy_into_model(ctx: Context, averaged: AveragedModel) -> None:
    with torch.no_grad():
        torch._foreach_copy_(_tensors(ctx.model, True), _tensors(averaged.module, True))


class _Averaging(Callback):
    """What EMA and SWA share: a state loaded before the fit creates the average is kept until it does."""

    averaged: AveragedModel | None
    _pending: dict[str, Any] | None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.averaged is None:  # before fit begins: applied when the average is created
            self._pending = state
            return
        self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        raise TypeError(f"{type(self).__name__} must define _load")


class EMA(_Averaging):
    """An exponential moving average of the weights (torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``,
    parameters and buffers, as Lightning's ``EMAWeightAveraging``), ``W_ema ← decay·W_ema + (1−decay)·W``.

    - Updated after every ``every_n_steps``-th optimizer step (``on_train_batch_after_step``: under
      ``GradientAccumulation`` only the real steps count; a custom ``step(ctx)`` counts each
      ``ctx.step_optimizer`` call). The first update copies the weights (torch's rule); the update is a fused
      in-place lerp on the device, with no host synchronisation.
    - ``validate_with_ema=True``: the validation phase runs with the averaged weights (and buffers), swapped in
      at ``on_valid_begin`` and the training weights put back exactly at ``on_valid_end``, so ``valid_*``
      values in history are the EMA model's, and training goes on from the raw weights.
    - The average is part of the callback's state, so checkpoints hold it and ``AutoResume`` stays exact; the
      checkpoint's ``"model"`` entry is the training weights.
    - When fit ends (any way but an error) after at least one update, the averaged weights are copied into the
      model: ``fitted.model`` is the EMA model. ``.averaged`` is the ``AveragedModel``.

    Order 300: after your callbacks, before ``LRScheduler``; ``KeepBestModel`` (700) restores its copy after it
    at fit end, so do not combine the two unless you want the best epoch's raw weights.

    Args:
        decay: the weight of the past, in ``[0, 1]``.
        every_n_steps: update every this many optimizer steps (>= 1).
        validate_with_ema: validate with the averaged weights.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> ema = ln.callbacks.EMA(decay=0.9)
    >>> fitted = setup.fit((x, y), epochs=2, valid_data=0.25, seed=0, verbose=False, callbacks=[ema])
    >>> torch.equal(fitted.model.weight, ema.averaged.module.weight)
    True
    """

    order = 300

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, validate_with_ema: bool = True) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise LanternaError(f"EMA(decay={decay!r}): give a number in [0, 1], e.g. EMA(decay=0.999).")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise LanternaError(f"EMA(every_n_steps={every_n_steps!r}): give a positive integer, e.g. "
                                "EMA(every_n_steps=1).")
        if not isinstance(validate_with_ema, bool):
            raise LanternaError(f"EMA(validate_with_ema={validate_with_ema!r}): give True or False.")
        self.decay = float(decay)
        self.every_n_steps = every_n_steps
        self.validate_with_ema = validate_with_ema
        self.averaged: AveragedModel | None = None
        self.updates = 0  # how many times the average was updated (its n_averaged)
        self._steps = 0  # optimizer steps seen
        self._avg_fn = get_ema_multi_avg_fn(self.decay)
        self._groups: list[tuple[list[Tensor], list[Tensor]]] = []
        self._backup: list[Tensor] | None = None
        self._pending: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, every_n_steps={self.every_n_steps}, "
                f"validate_with_ema={self.validate_with_ema})")

    def on_fit_begin(self, ctx: Context) -> None:
        self.averaged = _averaged(ctx, True, multi_avg_fn=self._avg_fn)
        self.updates, self._steps, self._backup = 0, 0, None
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        # pairs grouped by device and dtype, as AveragedModel.update_parameters does (one fused lerp each)
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for a, m in zip(_tensors(self.averaged.module, True), _tensors(ctx.model, True), strict=True):
            pair = groups.setdefault((a.device, a.dtype), ([], []))
            pair[0].append(a)
            pair[1].append(m)
        self._groups = list(groups.values())

    def on_train_batch_after_step(self, ctx: Context) -> None:
        self._steps += 1
        if self._steps % self.every_n_steps:
            return
        # AveragedModel.update_parameters reads its n_averaged counter on the host (and copies it to the device)
        # at every call; the same update with a Python counter keeps the hot path free of synchronisation.
        if self.updates:
            for averaged, current in self._groups:
                self._avg_fn(averaged, current, None)  # in no_grad itself
        else:
            with torch.no_grad():
                for averaged, current in self._groups:
                    torch._foreach_copy_(averaged, current)
        self.updates += 1

    def _sync_counter(self) -> None:
        if self.averaged is not None:
            self.averaged.n_averaged.fill_(self.updates)  # a CPU tensor; kept up to date at epoch and fit end

    def on_train_end(self, ctx: Context) -> None:
        self._sync_counter()

    def on_valid_begin(self, ctx: Context) -> None:
        if self.validate_with_ema and self.averaged is not None and self._backup is None:
            live = _tensors(ctx.model, True)
            self._backup = [t.clone() for t in live]
            with torch.no_grad():
                torch._foreach_copy_(live, _tensors(self.averaged.module, True))

    def on_valid_end(self, ctx: Context) -> None:
        self._restore(ctx)

    def _restore(self, ctx: Context) -> None:
        if self._backup is not None:
            with torch.no_grad():
                torch._foreach_copy_(_tensors(ctx.model, True), self._backup)
            self._backup = None

    def on_fit_end(self, ctx: Context) -> None:
        self._restore(ctx)  # fit ended during validation
        self._sync_counter()
        if self.averaged is not None and self.updates and ctx.status != "failed":
            _copy_into_model(ctx, self.averaged)

    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            return {}
        self._sync_counter()  # a mid-epoch checkpoint (SIGTERM)
        return {"averaged": self.averaged.state_dict(), "updates": self.updates, "steps": self._steps}


    def _load(self, state: dict[str, Any]) -> None:
        _load_averaged(self.averaged, state["averaged"], "EMA")  # type: ignore[arg-type]
        self.updates = int(state.get("updates", 0))
        self._steps = int(state.get("steps", 0))


class _CallModel(nn.Module):
    """``update_bn`` calls ``model(batch[0])``: this calls the module with a batch input as lanterna does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: Any) -> Any:
        return call_model(self.module, inputs)


class SWA(_Averaging):
    """Stochastic weight averaging (torch's ``AveragedModel``, ``SWALR`` and ``update_bn``; Izmailov et al.
    2018), the recipe of torch's docs with ``start_epoch`` counted from 1:

    - From epoch ``start_epoch`` on, at each epoch's end the weights are added to an equal-weight average
      (``update_parameters``) and ``SWALR`` steps, annealing each optimizer's learning rate to ``swa_lr`` over
      ``anneal_epochs`` epochs (``anneal_strategy`` ``"cos"`` or ``"linear"``) and holding it there. The epoch
      ``start_epoch`` itself trains with the rate it had.
    - SWALR then owns the learning rate: an epoch-end ``LRScheduler`` keeps stepping but its change is undone
      (the order is 550, after the scheduler's 500); a per-batch schedule that changes the rate within an SWA
      epoch is an error.
    - When fit ends (any way but an error) with at least one epoch averaged, ``update_bn`` recomputes the
      BatchNorm statistics of the average with one pass over the training data (averaged over processes under
      DDP), and the averaged weights are copied into the model: ``fitted.model`` is the SWA model. Validation
      during fit uses the training weights.
    - The average and SWALR's state are checkpointed, so ``AutoResume`` stays exact. ``.averaged`` is the
      ``AveragedModel``.

    Args:
        swa_lr: the learning rate to anneal to (> 0), or one per parameter group.
        start_epoch: the first epoch averaged (1-based, at most the fit's epochs).
        anneal_epochs: epochs of annealing (>= 0; 0 sets ``swa_lr`` at once).
        anneal_strategy: ``"cos"`` or ``"linear"``.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(
    ...     in_features=3, out_features=1).set_opt_hparams(lr=0.1)
    >>> swa = ln.callbacks.SWA(swa_lr=0.05, start_epoch=3, anneal_epochs=2)
    >>> fitted = setup.fit((x, y), epochs=6, seed=0, verbose=False, callbacks=[swa])
    >>> int(swa.averaged.n_averaged), [round(h["lr"], 4) for h in fitted.history]
    (4, [0.1, 0.1, 0.1, 0.075, 0.05, 0.05])
    """

    order = 550

    def __init__(self, swa_lr: float | Sequence[float], start_epoch: int, anneal_epochs: int = 5,
                 anneal_strategy: Literal["cos", "linear"] = "cos") -> None:
        rates = list(swa_lr) if isinstance(swa_lr, (list, tuple)) else [swa_lr]
        if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0
                            for r in rates):
            raise LanternaError(f"SWA(swa_lr={swa_lr!r}): give a learning rate > 0 (or one per parameter group), "
                                "e.g. SWA(swa_lr=0.05, start_epoch=10).")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 1:
            raise LanternaError(f"SWA(start_epoch={start_epoch!r}): give the first epoch to average, an integer >= 1.")
        if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise LanternaError(f"SWA(anneal_epochs={anneal_epochs!r}): give an integer >= 0.")
        if anneal_strategy not in ("cos", "linear"):
            raise LanternaError(f"SWA(anneal_strategy={anneal_strategy!r}): give 'cos' or 'linear'.")
        self.swa_lr = swa_lr if isinstance(swa_lr, (list, tuple)) else float(swa_lr)  # type: ignore[arg-type]
        self.start_epoch = start_epoch
        self.anneal_epochs = anneal_epochs
        self.anneal_strategy = anneal_strategy
        self.averaged: AveragedModel | None = None
        self.schedulers: dict[str, SWALR] = {}
        self._lrs: dict[str, list[float]] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._pending: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"SWA(swa_lr={self.swa_lr}, start_epoch={self.start_epoch}, anneal_epochs={self.anneal_epochs}, "
                f"anneal_strategy={self.anneal_strategy!r})")

    def on_fit_begin(self, ctx: Context) -> None:
        if self.start_epoch > ctx.max_epochs:
            raise LanternaError(f"SWA(start_epoch={self.start_epoch}): fit runs {ctx.max_epochs} epochs, so nothing "
                                f"would be averaged. Use a start_epoch <= {ctx.max_epochs} or train longer.")
        self.averaged = _averaged(ctx, False)
        self._lrs, self._optimizers = {}, ctx.optimizers
        self.schedulers = self._make_schedulers()
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def _make_schedulers(self) -> dict[str, SWALR]:
        # Created up front as in torch's recipe (so they see the optimizer's steps); created, SWALR leaves the
        # rate as it is, except with anneal_epochs=0, which sets swa_lr at once: put back until start_epoch.
        kept = {name: [g["lr"] for g in opt.param_groups] for name, opt in self._optimizers.items()}
        schedulers = {name: SWALR(opt, self.swa_lr, anneal_epochs=self.anneal_epochs,  # type: ignore[arg-type]
                                  anneal_strategy=self.anneal_strategy) for name, opt in self._optimizers.items()}
        for name, opt in self._optimizers.items():
            for group, lr in zip(opt.param_groups, kept[name], strict=True):
                group["lr"] = lr
        return schedulers

    def _lr_of(self, ctx: Context) -> dict[str, list[float]]:
        return {name: [g["lr"] for g in opt.param_groups] for name, opt in ctx.optimizers.items()}

    def on_train_begin(self, ctx: Context) -> None:
        self._lrs = self._lr_of(ctx)

    def on_train_end(self, ctx: Context) -> None:
        lrs = self._lr_of(ctx)
        if ctx.epoch > self.start_epoch and lrs != self._lrs:
            raise LanternaError(f"SWA: the learning rate changed during epoch {ctx.epoch} ({self._lrs} → {lrs}), "
                                "while SWALR sets it from start_epoch on. A per-batch schedule (LRScheduler with "
                                "call_on='on_train_batch_end') cannot run during SWA; end it before start_epoch "
                                "or drop it.")
        self._lrs = lrs

    def on_epoch_end(self, ctx: Context) -> None:
        if ctx.epoch < self.start_epoch:
            return
        for name, opt in ctx.optimizers.items():  # undo an epoch-end scheduler's change: SWALR sets the rate
            for group, lr in zip(opt.param_groups, self._lrs.get(name, []), strict=False):
                group["lr"] = lr
        # once per epoch: its host read of n_averaged is harmless
        self.averaged.update_parameters(ctx.model)  # type: ignore[union-attr]
        for sched in self.schedulers.values():
            sched.step()

    def on_fit_end(self, ctx: Context) -> None:
        if self.averaged is None or ctx.status == "failed":
            return
        if int(self.averaged.n_averaged) == 0:
            if ctx.epoch > ctx.start_epoch:
                warnings.warn(f"SWA averaged nothing: fit ended at epoch {ctx.epoch}, before start_epoch "
                              f"{self.start_epoch}; the model keeps its trained weights.", stacklevel=2)
            return
        update_bn(self._inputs(ctx), _CallModel(self.averaged.module))
        self.averaged.eval()
        for m in self.averaged.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for t in (m.running_mean, m.running_var):  # the mean over processes (identity on one)
                    ctx.world.all_reduce_sum(t).div_(ctx.world_size)  # type: ignore[arg-type]
        _copy_into_model(ctx, self.averaged)

    def _inputs(self, ctx: Context) -> Iterator[list[Any]]:
        for batch in ctx.train_data:
            yield [split_batch(batch)[0]]  # update_bn takes element 0 of a list

    def state_dict(self) -> dict[str, Any]:
        if self.averaged is None:
            return {}
        return {"averaged": self.averaged.state_dict(),
                "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()}}


    def _load(self, state: dict[str, Any]) -> None:
        saved = state.get("schedulers") or {}
        if set(saved) != set(self.schedulers):
            raise CheckpointError(f"SWA: the checkpoint anneals the optimizers {sorted(saved)}, this fit has "
                                  f"{sorted(self.schedulers)}. Resume with the same setup, or delete the checkpoint "
                                  "to start afresh.")
        _load_averaged(self.averaged, state["averaged"], "SWA")  # type: ignore[arg-type]
        for name, sd in saved.items():
            self.schedulers[name].load_state_dict(sd)
