"""The learning-rate range test (Smith 2015; fastai's ``lr_find``, luz's ``lr_finder``)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..callbacks.nan import TerminateOnNaN
from ..core.accelerator import Accelerator
from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError

__all__ = ["lr_finder", "LRFinderResult"]


class LRFinderResult:
    """What :func:`lr_finder` found: the learning rates tried and the (smoothed) loss at each.

    ``.df`` is a pandas DataFrame with columns ``lr``, ``loss`` (exponentially smoothed, bias-corrected) and
    ``raw_loss``; ``.plot()`` draws loss against learning rate on a log axis; ``.suggestion`` is a learning
    rate inside the longest stretch where the smoothed loss keeps falling (:meth:`suggest` has others).

    Args:
        lrs: the learning rates tried, in order.
        losses: the smoothed loss at each rate.
        raw_losses: the batch loss at each rate, as measured.
        diverged: whether the sweep stopped early because the loss diverged.

    >>> from lanterna.tuning.lr_finder import LRFinderResult
    >>> r = LRFinderResult([1e-3, 1e-2, 1e-1], [1.0, 0.5, 2.0], [1.0, 0.4, 3.0], diverged=True)
    >>> r.lrs, r.diverged
    ([0.001, 0.01, 0.1], True)
    """

    def __init__(self, lrs: Sequence[float], losses: Sequence[float], raw_losses: Sequence[float], *,
                 diverged: bool = False) -> None:
        self.lrs = [float(v) for v in lrs]
        self.losses = [float(v) for v in losses]
        self.raw_losses = [float(v) for v in raw_losses]
        self.diverged = diverged
        self.suggestion: float | None = self.suggest()

    @property
    def df(self) -> Any:
        """pandas DataFrame with columns ``lr``, ``loss``, ``raw_loss``, one row per step."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("LRFinderResult.df needs pandas: pip install 'lanterna[pandas]'. The values are "
                              "also in .lrs, .losses and .raw_losses.") from e
        return pd.DataFrame({"lr": self.lrs, "loss": self.losses, "raw_loss": self.raw_losses})

    def suggest(self, method: str = "valley") -> float | None:
        """A learning rate read off the smoothed curve; None when there are fewer than 5 points.

        ``"valley"`` (default, fastai's): the longest stretch over which the loss keeps falling, and a point
        a little past its first half — robust to the bumps of a noisy curve. ``"steepest"``: where the loss
        falls fastest per unit of log learning rate, before its minimum (skipping the first tenth).
        ``"minimum"``: a tenth of the learning rate at the minimum of the loss.
        """
        n = len(self.losses)
        if n < 5:
            return None
        losses = np.asarray(self.losses)
        i_min = int(np.argmin(losses))
        if method == "minimum":
            return self.lrs[i_min] / 10
        if method == "valley":
            # longest decreasing subsequence ending at each point; the valley is the longest one
            lds = [1] * n
            start = end = 0
            for i in range(1, n):
                for j in range(i):
                    if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                        lds[i] = lds[j] + 1
                if lds[end] < lds[i]:
                    end = i
                    start = end - lds[end]
            third = (end - start) / 3
            return self.lrs[min(n - 1, max(0, start + int(third) + int(third / 2)))]
        if method != "steepest":
            raise LanternaError(f"suggest(method={method!r}): use 'valley', 'steepest' or 'minimum'.")
        skip = min(10, n // 10)
        if i_min - skip < 2:
            return self.lrs[i_min] / 10
        slopes = np.gradient(losses, np.log10(np.asarray(self.lrs)))
        return self.lrs[skip + int(np.argmin(slopes[skip:i_min + 1]))]

    def plot(self, *, skip_end: int = 0, suggestion: bool = True) -> Any:
        """A matplotlib Figure: smoothed loss against learning rate (log scale), the suggestion marked; in a
        notebook it is shown once, by the cell's result.

        Args:
            skip_end: leave out the last ``skip_end`` steps (where the loss shoots up).
            suggestion: mark :attr:`suggestion` on the curve.
        """
        from ..plotting import new_figure

        end = len(self.lrs) - skip_end if skip_end else len(self.lrs)
        fig = new_figure((6, 4))
        ax = fig.subplots()
        ax.plot(self.lrs[:end], self.losses[:end], label="smoothed loss")
        ax.plot(self.lrs[:end], self.raw_losses[:end], alpha=0.3, label="loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        if suggestion and self.suggestion is not None:
            i = self.lrs.index(self.suggestion) if self.suggestion in self.lrs else None
            if i is not None:
                ax.plot([self.suggestion], [self.losses[i]], "o", color="red",
                        label=f"suggestion: {self.suggestion:.2e}")
            else:
                ax.axvline(self.suggestion, color="red", linestyle="--", label=f"suggestion: {self.suggestion:.2e}")
        ax.legend()
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        if not self.lrs:
            return "LRFinderResult(no steps)"
        sug = f"{self.suggestion:.2e}" if self.suggestion is not None else "none"
        how = ", stopped: loss diverged" if self.diverged else ""
        return (f"LRFinderResult({len(self.lrs)} steps, lr {self.lrs[0]:.1e} → {self.lrs[-1]:.1e}{how}; "
                f"suggested lr: {sug})")


class _Sweep(Callback):
    """Sets an exponentially growing learning rate on every batch, records the loss, stops at the end of the
    sweep or when the smoothed loss diverges. Reads the losses from the device every ``sync_every`` steps."""

    order = -900

    def __init__(self, start_lr: float, end_lr: float, steps: int, beta: float, diverge: float) -> None:
        self.start_lr, self.steps, self.beta, self.diverge = start_lr, steps, beta, diverge
        self.ratio = (end_lr / start_lr) ** (1.0 / max(steps - 1, 1))
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.pending: list[Tensor] = []
        self.avg = 0.0
        self.best = math.inf
        self.diverged = False

    def on_fit_begin(self, ctx: Context) -> None:
        self.sync_every = 1 if ctx.device.type == "cpu" else 10

    def on_train_batch_begin(self, ctx: Context) -> None:
        lr = self.start_lr * self.ratio ** len(self.lrs)
        for opt in ctx.optimizers.values():
            for group in opt.param_groups:
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
        self.lrs.append(lr)

    def on_train_batch_end(self, ctx: Context) -> None:
        if ctx.loss is None:
            raise LanternaError("lr_finder needs the loss of every training batch; a custom step(ctx) must set "
                                "ctx.loss (a scalar tensor).")
        self.pending.append(ctx.loss.detach().float().reshape(()))
        if len(self.lrs) >= self.steps or len(self.pending) >= self.sync_every:
            self._consume(ctx)

    def _consume(self, ctx: Context) -> None:
        values = torch.stack(self.pending).cpu().tolist() if self.pending else []
        self.pending = []
        for v in values:
            i = len(self.raw)
            if not math.isfinite(v):
                self.diverged = True
                break
            self.avg = self.beta * self.avg + (1 - self.beta) * v
            s = self.avg / (1 - self.beta ** (i + 1))
            self.raw.append(v)
            self.smoothed.append(s)
            self.best = min(self.best, s)
            if i > 0 and s > self.diverge * self.best:
                self.diverged = True
                break
        if self.diverged or len(self.raw) >= self.steps:
            ctx.stop()

    def on_train_end(self, ctx: Context) -> None:
        if self.pending:
            self._consume(ctx)


def lr_finder(
    setup: Any,
    data: Any,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    steps: int = 100,
    *,
    smooth: float = 0.98,
    diverge: float = 4.0,
    accelerator: Accelerator | None = None,
    dataloader_options: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] | None = None,
    seed: int | None = None,
) -> LRFinderResult:
    """Train for ``steps`` batches while the learning rate grows exponentially from ``start_lr`` to
    ``end_lr``, and record the loss (luz's ``lr_finder``).

    The data cycles if ``steps`` exceeds one epoch; the sweep stops early when the smoothed loss exceeds
    ``diverge`` times its minimum or becomes NaN/Inf. Every param group of every optimizer gets the swept
    rate. It leaves no trace: the setup is immutable, a module instance given to ``ln.setup`` gets its
    weights, buffers, gradients, device and train/eval mode back, and the global random generators are
    restored. ``data`` takes every form of ``fit``.

    Args:
        setup: the ``ln.setup(...)`` to sweep (with its hparams set).
        data: the training data, in any form ``fit`` takes.
        start_lr: the first learning rate (> 0).
        end_lr: the last learning rate (above ``start_lr``).
        steps: the number of batches (learning rates) tried, at least 2.
        smooth: the factor of the exponential smoothing of the loss, in [0, 1).
        diverge: stop when the smoothed loss exceeds this many times its minimum (> 1).
        accelerator: where to train; default ``ln.Accelerator()``.
        dataloader_options: ``DataLoader`` arguments, as in ``fit``.
        callbacks: callbacks run during the sweep, as in ``fit``.
        seed: seeds the model's initialisation and the data order, as in ``fit``.

    Returns:
        An :class:`~lanterna.tuning.LRFinderResult` with the rates, the losses and a ``suggestion``.

    Raises:
        LanternaError: when ``setup`` is not a Setup, an argument is out of range (``start_lr >= end_lr``,
            ``steps < 2`` ...), or a custom ``step(ctx)`` does not set ``ctx.loss``.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x = torch.randn(256, 3); y = x.sum(1, keepdim=True)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> result = ln.lr_finder(setup, (x, y), steps=50)
    >>> len(result.df) <= 50
    True
    """
    for name, v in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise LanternaError(f"lr_finder({name}={v!r}): learning rates must be positive numbers.")
    if start_lr >= end_lr:
        raise LanternaError(f"lr_finder: start_lr={start_lr} must be below end_lr={end_lr}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise LanternaError(f"lr_finder(steps={steps!r}): need an integer of at least 2 (100 is typical).")
    if not 0 <= smooth < 1:
        raise LanternaError(f"lr_finder(smooth={smooth!r}): the smoothing factor lies in [0, 1) (0.98 is usual).")
    if diverge <= 1:
        raise LanternaError(f"lr_finder(diverge={diverge!r}): must exceed 1 (stop when loss > diverge × best).")
    if not hasattr(setup, "fit") or not hasattr(setup, "build_model"):
        raise LanternaError(f"lr_finder() needs an ln.setup(...) Setup, got {type(setup).__name__}.")

    sweep = _Sweep(float(start_lr), float(end_lr), steps, float(smooth), float(diverge))
    quiet = (dataclasses.replace(setup, metrics=None)  # type: ignore[type-var]
             if dataclasses.is_dataclass(setup) else setup)
    instance = setup.module if isinstance(setup.module, nn.Module) else None
    saved = _ModelState(instance) if instance is not None else None
    devices = _cuda_devices(accelerator)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            quiet.fit(  # type: ignore[union-attr]
                data, epochs=steps, callbacks=[TerminateOnNaN(enabled=False), *(callbacks or []), sweep],
                verbose=False, accelerator=accelerator, dataloader_options=dataloader_options, seed=seed,
            )
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if saved is not None:
            saved.restore()
    n = len(sweep.raw)
    return LRFinderResult(sweep.lrs[:n], sweep.smoothed, sweep.raw, diverged=sweep.diverged)


class _ModelState:
    """A copy of everything fit may change on a module instance."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = model.training
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
                      for n, p in model.named_parameters()}

    def restore(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict(keep_vars=True).items():
                v.data = self.state[k]  # same Parameter objects, original values and devices
        for n, p in self.model.named_parameters():
            p.grad = self.grads.get(n)
        self.model.train(self.training)


def _cuda_devices(accelerator: Accelerator | None) -> list[int]:
    if not torch.cuda.is_available():
        return []
    dev = accelerator.device if accelerator is not None else torch.device("cuda", torch.cuda.current_device())
    return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
