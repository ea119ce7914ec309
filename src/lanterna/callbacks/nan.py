"""Stop on a non-finite loss before the optimizer step that it would poison.

On the CPU the loss and the gradient flag are read at every step (plain memory reads). On CUDA, with optimizers
that can skip a step on the device, the decision is taken there (:class:`_DeviceGuard`): no synchronisation per
batch, the stop surfaced at the end of the training phase (docs/performance.md, "GPU path").
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..core.callback import Callback
from ..core.context import Context
from ..core.fused import skips_on_device
from ..errors import NonFiniteLossError

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """On by default: a NaN/Inf training loss raises :class:`NonFiniteLossError` before backward, and a NaN/Inf
    gradient (of a finite loss: ``sqrt`` at 0, ``log`` of 0 ...) raises it before the optimizer step, so the
    parameters keep the values of the last good step. The error's ``.fitted`` is the Fitted at that step. Disable
    with ``callbacks=[ln.callbacks.TerminateOnNaN(enabled=False)]``, or keep only the loss check with
    ``check_gradients=False``.

    The loss check reads the loss once per batch; the gradient check runs torch's fused non-finite check (the one
    ``GradScaler`` uses) over the gradients about to be applied and reads its flag. On CPU both reads are plain
    memory reads through NumPy views of small buffers (no tensor method reads them, so the hot path's no-read
    tests hold). On CUDA, when every optimizer can skip a step on the device (torch's fused Adam,
    AdamW, SGD, Adagrad: lanterna builds Adam/AdamW/SGD fused on CUDA unless told otherwise), nothing is read
    per batch: both checks set a flag on the device that the optimizers read as ``GradScaler``'s ``found_inf``,
    so the bad step and every later one are skipped there, and the error is raised at the end of that epoch's
    training phase, naming the same epoch and batch, with the weights of the last good step. (Callbacks keep
    running until then: a per-batch LR schedule goes on stepping, an EMA keeps averaging the unchanged
    weights.) With other optimizers, and on other accelerators, each check waits for the step's kernels
    (docs/performance.md, "GPU path").
    Under 16-bit mixed precision the gradient check is left to the grad scaler, which skips steps with
    non-finite gradients, and the loss is read at every batch.

    Args:
        enabled: False turns both checks off.
        check_gradients: False turns the gradient check off (it reads every gradient once per optimizer step).

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> setup.fit((x, y * float("nan")), epochs=1, verbose=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lanterna.errors.NonFiniteLossError: The training loss is NaN at epoch 1, batch 1; ...
    >>> fitted = setup.fit((x, y * float("nan")), epochs=1, verbose=False,
    ...                    callbacks=[ln.callbacks.TerminateOnNaN(enabled=False)])
    >>> fitted.history[0]["train_loss"]
    nan
    """

    order = -1000
    #: None: decide on the device on CUDA (when the optimizers can skip there); True: that path on any device,
    #: the CPU included (tests: fused CPU optimizers skip the same way); False: read every step everywhere.
    _on_device: bool | None = None

    def __init__(self, enabled: bool = True, check_gradients: bool = True) -> None:
        self.enabled = enabled
        self.check_gradients = check_gradients
        self._guard: _DeviceGuard | None = None
        self._decided_on_device = False  # the last fit's path (kept after it, for tests)
        self._new_buffer()

    def __repr__(self) -> str:
        return f"TerminateOnNaN(enabled={self.enabled}, check_gradients={self.check_gradients})"

    def _new_buffer(self) -> None:
        self._host = torch.zeros((), dtype=torch.float64)
        self._view = self._host.numpy()  # shares the buffer's memory
        self._found = torch.zeros(1)  # the fused check's flag on the CPU (per device: _flags)
        self._found_view = self._found.numpy()
        self._one = torch.ones(1)
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._param_cache: dict[Any, tuple[list[torch.Tensor], bool]] = {}

    def on_fit_begin(self, ctx: Context) -> None:
        self._new_buffer()  # a deep copy of the callback would have split the view from its buffer
        self._guard = _DeviceGuard.for_fit(ctx, self._on_device) if self.enabled else None
        self._decided_on_device = self._guard is not None

    def on_train_begin(self, ctx: Context) -> None:
        if self._guard is not None:
            self._guard.begin(ctx.num_batches)

    def on_train_end(self, ctx: Context) -> None:
        if self._guard is not None:  # the end of the phase: a natural synchronisation point (core/sync.py)
            self._guard.surface(ctx)

    def on_fit_end(self, ctx: Context) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.release(ctx)

    def on_train_batch_before_backward(self, ctx: Context) -> None:
        if not self.enabled:
            return
        if self._guard is not None:
            self._guard.check_loss(ctx.backward_loss, ctx.iter)
            return
        loss = ctx.backward_loss.detach()
        if loss.device.type == "cpu" and loss.numel() == 1:  # a plain read: ~2 µs instead of 10
            self._host.copy_(loss)
            finite = math.isfinite(self._view[()])
        else:  # on an accelerator this waits for the step's kernels (see docs/performance.md)
            finite = bool(torch.isfinite(loss).all())
        if not finite:
            kind = "NaN" if bool(torch.isnan(loss.detach()).any()) else "Inf"
            raise NonFiniteLossError(_loss_message(kind, ctx.epoch, ctx.iter))

    def on_train_batch_before_step(self, ctx: Context) -> None:
        if not (self.enabled and self.check_gradients) or ctx.scaler is not None:
            return
        if self._guard is not None:
            self._guard.check_gradients(self._params_of(ctx, ctx.current_opt)[0], ctx.iter)
            return
        params, on_cpu = self._params_of(ctx, ctx.current_opt)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if ctx.world.shards_parameters:  # FSDP: each rank holds a shard of every gradient; the ranks agree
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            if ctx.world.any(self._found_on_devices(local)):
                self._raise_gradient(ctx, grads, local)
            return
        if on_cpu:
            found = self._found
            found.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
            if self._found_view[0] == 0:
                return
        elif not self._found_on_devices(grads):
            return
        self._raise_gradient(ctx, grads)

    def _params_of(self, ctx: Context, name: str | None) -> tuple[list[torch.Tensor], bool]:
        """The parameters the optimizer(s) about to step hold (all of them when ``name`` is None), and whether
        all are on the CPU; cached per optimizer name for the fit (a parameter group added during a fit is
        left to the loss check; the next fit includes it)."""
        cached = self._param_cache.get(name)
        if cached is None:
            opts = ctx.optimizers.values() if name is None else (ctx.optimizers[name],)
            params = [p for o in opts for group in o.param_groups for p in group["params"]]
            cached = self._param_cache[name] = (params, all(p.device.type == "cpu" for p in params))
        return cached

    def _found_on_devices(self, grads: list[torch.Tensor]) -> bool:
        """The fused check per device; one read of the flags (a synchronisation on accelerators)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        flags = []
        for device, group in by_device.items():
            if device not in self._flags:
                self._flags[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
            found, one = self._flags[device]
            found.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
            flags.append(found.to("cpu", non_blocking=False))
        return bool(torch.cat(flags).any())

    def _raise_gradient(self, ctx: Context, grads: list[torch.Tensor],
                        local: list[torch.Tensor] | None = None) -> None:
        bad = {id(g) for g, part in zip(grads, local or grads) if not bool(torch.isfinite(part).all())}
        names = [n for n, p in ctx.model.named_parameters() if p.grad is not None and id(p.grad) in bad]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        loss = ctx.loss
        loss_text = f" (the loss, {float(loss.detach()):.6g}, is finite)" if loss is not None else ""
        raise NonFiniteLossError(_gradient_message(ctx.epoch, ctx.iter, loss_text + (f", in {shown}" if shown else "")))


_LOSS_FIX = ("Lower the learning rate, clip gradients (ln.callbacks.GradientClip) or check the data for NaN/Inf "
             "values.")
_GRADIENT_FIX = ("A finite loss with a non-finite gradient comes from operations whose derivative is infinite where "
                 "they are evaluated (sqrt or pow of 0, log of 0, division by 0, acos at ±1): add an epsilon there "
                 "(torch.sqrt(x + 1e-12)), clip gradients (ln.callbacks.GradientClip), or lower the learning rate.")
_STOPPED = ("training stopped before this batch's optimizer step, so the weights are those of the last good step "
            "(the error's .fitted). ")
_ON_DEVICE = ("(Decided on the {device} device: that step and the later ones of the epoch were skipped there, and "
              "the stop surfaced at the end of the epoch's training batches.) ")


def _loss_message(kind: str, epoch: int, batch: int, device: str | None = None) -> str:
    where = _ON_DEVICE.format(device=device) if device else ""
    return f"The training loss is {kind} at epoch {epoch}, batch {batch}; {_STOPPED}{where}{_LOSS_FIX}"


def _gradient_message(epoch: int, batch: int, detail: str, device: str | None = None) -> str:
    where = _ON_DEVICE.format(device=device) if device else ""
    return f"The gradient is NaN/Inf at epoch {epoch}, batch {batch}{detail}; {_STOPPED}{where}{_GRADIENT_FIX}"


class _DeviceGuard:
    """The NaN guard decided on the device, for one fit.

    ``found`` (a float32 0-dim tensor on the device) becomes 1 at the first non-finite loss or gradient and stays
    1 for the rest of the fit: torch's fused non-finite check (``GradScaler``'s kernel) only ever sets it. Every
    optimizer holds it as ``found_inf``, the attribute ``GradScaler`` gives fused optimizers, so from that step on
    each step is skipped on the device (the fused kernels leave parameters and state untouched, step counters
    put back). Per batch of the epoch, ``losses`` keeps the loss checked and ``flags`` the flag after the
    gradient check: at the end of the training phase one read of ``found`` (and, after a bad step, of those two)
    says whether, where and why to stop — the first batch whose loss is non-finite or whose flag is set."""

    def __init__(self, device: torch.device, optimizers: list[torch.optim.Optimizer]) -> None:
        self.device = device
        self.found = torch.zeros((), device=device)  # float32: what the fused kernels read
        self.one = torch.ones((), device=device)
        # the batches' losses in float64: a float64 model's finite loss may not fit float32
        self.losses = torch.zeros(64, device=device, dtype=torch.float64)
        self.flags = torch.zeros(64, device=device)
        self.saved = [(opt, opt.__dict__.get("found_inf")) for opt in optimizers]
        for opt in optimizers:
            opt.found_inf = self.found  # type: ignore[attr-defined]

    @classmethod
    def for_fit(cls, ctx: Context, on_device: bool | None) -> _DeviceGuard | None:
        """The guard for this fit, or None where the step-by-step read is kept: devices other than CUDA (the CPU
        unless forced; MPS and others, where torch's fused check and kernels are not all there), a GradScaler (it
        sets and removes ``found_inf`` at each step), FSDP (each rank would decide on its own shard of the
        gradients), an optimizer that cannot skip on the device, parameters off the fit's device."""
        device = ctx.device
        if on_device is False or (device.type != "cuda" and not on_device):
            return None
        if ctx.scaler is not None or getattr(ctx.accelerator, "strategy", None) == "fsdp":
            return None
        opts = list(ctx.optimizers.values())
        if not opts or not all(skips_on_device(opt) for opt in opts):
            return None
        if any(p.device != device for opt in opts for g in opt.param_groups for p in g["params"]):
            return None
        return cls(device, opts)

    def begin(self, num_batches: int | None) -> None:
        """At the start of a training phase: room for its batches (grown on the way when their number is
        unknown)."""
        if num_batches is not None and num_batches > self.losses.numel():
            self._grow(num_batches)

    def _grow(self, n: int) -> None:
        size = max(n, 2 * self.losses.numel())
        self.losses = torch.cat([self.losses, self.losses.new_zeros(size - self.losses.numel())])
        self.flags = torch.cat([self.flags, self.flags.new_zeros(size - self.flags.numel())])

    def check_loss(self, loss: torch.Tensor, batch: int) -> None:
        """Set ``found`` when ``loss`` is not finite, keeping it as the batch's loss (two kernels, no read)."""
        if batch > self.losses.numel():
            self._grow(batch)
        value = loss.detach()
        slot = self.losses[batch - 1]
        slot.copy_(value.reshape(()) if value.numel() == 1 else value.sum())
        torch._amp_foreach_non_finite_check_and_unscale_([slot], self.found, self.one)

    def check_gradients(self, params: list[torch.Tensor], batch: int) -> None:
        """Set ``found`` when a gradient of ``params`` is not finite; keep the flag as the batch's."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
        if batch > self.flags.numel():
            self._grow(batch)
        self.flags[batch - 1].copy_(self.found)

    def _first_bad(self, n: int) -> tuple[int, float] | None:
        """(batch, its loss) of the first bad batch among the first ``n`` of the epoch, or None."""
        losses, flags = self.losses[:n].tolist(), self.flags[:n].tolist()
        for i, (loss, flag) in enumerate(zip(losses, flags)):
            if not math.isfinite(loss) or flag:
                return i + 1, loss
        return None

    def surface(self, ctx: Context) -> None:
        """End of a training phase: raise :class:`NonFiniteLossError` when a step was bad, on every rank."""
        found = bool(self.found)
        if not ctx.world.any(found):
            return
        if not found:
            raise NonFiniteLossError(
                f"The training loss or a gradient became NaN/Inf on another process in epoch {ctx.epoch}; training "
                f"stopped there before the bad optimizer step, so the weights are those of the last good step (the "
                f"error's .fitted). {_LOSS_FIX}")
        raise NonFiniteLossError(self._message(ctx))

    def _message(self, ctx: Context) -> str:
        device = self.device.type
        bad = self._first_bad(ctx.iter)
        if bad is None:  # pragma: no cover - found set by a step outside the training batches
            return (f"The training loss or a gradient became NaN/Inf in epoch {ctx.epoch}; {_STOPPED}"
                    f"{_ON_DEVICE.format(device=device)}{_LOSS_FIX}")
        batch, loss = bad
        if not math.isfinite(loss):
            return _loss_message("NaN" if math.isnan(loss) else "Inf", ctx.epoch, batch, device)
        return _gradient_message(ctx.epoch, batch, f" (the loss, {loss:.6g}, is finite)", device)

    def release(self, ctx: Context) -> None:
        """At the end of the fit: the optimizers' ``found_inf`` as it was. A fit that ended inside an epoch
        (Ctrl-C, ``ctx.stop()``) after a bad step warns: its weights are those of the last good step."""
        for opt, previous in self.saved:
            if previous is None:
                opt.__dict__.pop("found_inf", None)
            else:
                opt.found_inf = previous  # type: ignore[attr-defined]
        if ctx.status != "failed" and bool(self.found):
            warnings.warn(self._message(ctx).replace("training stopped", "the fit ended", 1)
                          .replace(" (the error's .fitted)", ""), RuntimeWarning, stacklevel=2)

