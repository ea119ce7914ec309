"""Gradient-norm clipping before each optimizer step."""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError

__all__ = ["GradientClip"]


class GradientClip(Callback):
    """Clip the gradients' total norm to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``) at
    ``on_train_batch_before_step`` (order 100: after user callbacks at the default order, which so see the
    raw gradients; the last thing before the optimizer step).

    Only the parameters of the optimizer(s) about to step are clipped (one at a time in a GAN's
    ``ctx.step_optimizer("d")``). Under ``precision="16-mixed"`` the gradients are unscaled first, so
    ``max_norm`` is in the true gradient scale. No device synchronisation: the norm stays on the device.

    Args:
        max_norm: the largest total gradient norm allowed (a finite number > 0).
        norm_type: the p of the p-norm (``2``, ``1``, ``float("inf")`` or ``"inf"``).

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), 100 * torch.randn(64, 1)  # large gradients
    >>> model = nn.Linear(3, 1)
    >>> before = torch.cat([p.detach().flatten() for p in model.parameters()])
    >>> fitted = (ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=1.0)
    ...           .fit((x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 64},
    ...                callbacks=[ln.callbacks.GradientClip(max_norm=1.0)]))
    >>> after = torch.cat([p.detach().flatten() for p in fitted.model.parameters()])
    >>> round(float((after - before).norm()), 4)  # one SGD step of lr 1 along a gradient of norm 1
    1.0
    """

    order = 100

    def __init__(self, max_norm: float, norm_type: float | str = 2.0) -> None:
        norm = _number(max_norm)
        if norm is None or not (0 < norm < math.inf):
            raise LanternaError(f"GradientClip(max_norm={max_norm!r}): max_norm must be a positive finite number, "
                                "e.g. GradientClip(max_norm=1.0).")
        p = math.inf if isinstance(norm_type, str) and norm_type.strip().lower() == "inf" else _number(norm_type)
        if p is None or not p > 0:
            raise LanternaError(f"GradientClip(norm_type={norm_type!r}): norm_type must be a positive number (the p "
                                "of the p-norm, e.g. 2 or 1) or 'inf' / float('inf').")
        self.max_norm = norm
        self.norm_type = p
        self._params: dict[str | None, list[torch.Tensor]] = {}

    def on_fit_begin(self, ctx: Context) -> None:
        opts = ctx.optimizers
        self._opts: dict[str | None, list[torch.optim.Optimizer]] = {
            None: list(opts.values()), **{name: [opt] for name, opt in opts.items()}}
        self._params = {key: [p for opt in group for g in opt.param_groups for p in g["params"]]
                        for key, group in self._opts.items()}

    def on_train_batch_before_step(self, ctx: Context) -> None:
        key = ctx.current_opt
        if ctx.scaler is not None:
            for opt in self._opts[key]:
                # RuntimeError: already unscaled for this step (by the user or another callback)
                with contextlib.suppress(RuntimeError):
                    ctx.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(self._params[key], self.max_norm, norm_type=self.norm_type)

    def __repr__(self) -> str:
        return f"GradientClip(max_norm={self.max_norm}, norm_type={self.norm_type})"


def _number(value: object) -> float | None:
    """``value`` as a float when it is a real number (or a one-element tensor), else None; bools are not numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)
