"""Stop on a non-finite loss before the optimizer step that it would poison."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.callback import Callback
from ..core.context import Context
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
    tests hold); on an accelerator each waits for the step's kernels (docs/performance.md). Under 16-bit mixed
    precision the gradient check is left to the grad scaler, which skips steps with non-finite gradients.

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

    def __init__(self, enabled: bool = True, check_gradients: bool = True) -> None:
        self.enabled = enabled
        self.check_gradients = check_gradients
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

    def on_train_batch_before_backward(self, ctx: Context) -> None:
        if not self.enabled:
            return
        loss = ctx.backward_loss.detach()
        if loss.device.type == "cpu" and loss.numel() == 1:  # a plain read: ~2 µs instead of 10
            self._host.copy_(loss)
            finite = math.isfinite(self._view[()])
        else:  # on an accelerator this waits for the step's kernels (see docs/performance.md)
            finite = bool(torch.isfinite(loss).all())
        if not finite:
            kind = "NaN" if bool(torch.isnan(loss.detach()).any()) else "Inf"
            raise NonFiniteLossError(
                f"The training loss is {kind} at epoch {ctx.epoch}, batch {ctx.iter}; training stopped before "
                "this batch's optimizer step, so the weights are those of the last good step (the error's .fitted). "
                "Lower the learning rate, clip gradients (ln.callbacks.GradientClip) or check the data for NaN/Inf "
                "values."
            )

    def on_train_batch_before_step(self, ctx: Context) -> None:
        if not (self.enabled and self.check_gradients) or ctx.scaler is not None:
            return
        params, on_cpu = self._params_of(ctx, ctx.current_opt)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
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

    def _raise_gradient(self, ctx: Context, grads: list[torch.Tensor]) -> None:
        bad = {id(g) for g in grads if not bool(torch.isfinite(g).all())}
        names = [n for n, p in ctx.model.named_parameters() if p.grad is not None and id(p.grad) in bad]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        loss = ctx.loss
        loss_text = f" (the loss, {float(loss.detach()):.6g}, is finite)" if loss is not None else ""
        raise NonFiniteLossError(
            f"The gradient is NaN/Inf at epoch {ctx.epoch}, batch {ctx.iter}{loss_text}"
            + (f", in {shown}" if shown else "")
            + "; training stopped before this batch's optimizer step, so the weights are those of the last good "
            "step (the error's .fitted). A finite loss with a non-finite gradient comes from operations whose "
            "derivative is infinite where they are evaluated (sqrt or pow of 0, log of 0, division by 0, acos at "
            "±1): add an epsilon there (torch.sqrt(x + 1e-12)), clip gradients (ln.callbacks.GradientClip), or lower "
            "the learning rate."
        )
