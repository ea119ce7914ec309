"""Gradient accumulation: one optimizer step every N batches, as if the batches were one."""

from __future__ import annotations

import torch

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError

__all__ = ["GradientAccumulation"]


class GradientAccumulation(Callback):
    """Add up the gradients of ``n_batches`` consecutive training batches and step the optimizers once.

    Each batch's loss is divided by the number of batches in its group before backward, so with a
    mean-reduced loss and equal batch sizes one step equals a step on one batch ``n_batches`` times larger.
    Groups restart every epoch; a last, shorter group of an epoch is stepped at its end and averaged over its
    own size (on data without a length, whose last group cannot be known in advance, its gradient is rescaled
    from ``1/n_batches`` to ``1/size`` before the step). Reported losses and metrics are the unscaled per-batch
    values; ``ctx.step`` counts optimizer steps.

    It composes with the rest: gradient clipping and ``on_train_batch_before_step`` / ``_after_step`` hooks
    run only on the real steps (on the accumulated gradient), 16-bit mixed precision keeps one scaler update
    per step, per-batch LR schedulers step with the optimizer, and a custom ``step(ctx)`` calling
    ``ctx.backward`` / ``ctx.step_optimizer`` accumulates the same way (``ctx.accumulating`` tells it when the
    step is deferred). Under DDP the batches whose step is deferred skip the gradient all-reduce (as
    ``DDP.no_sync`` does): one all-reduce per optimizer step; where shards end unevenly, the last group of an
    epoch syncs every batch so that all ranks agree.

    Args:
        n_batches: the number of batches whose gradients make one optimizer step (a positive integer).

    Raises:
        LanternaError: when ``n_batches`` is not a positive integer.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> acc = setup.fit((x, y), epochs=2, seed=0, verbose=False, dataloader_options={"batch_size": 16},
    ...                 callbacks=[ln.callbacks.GradientAccumulation(4)])  # batch_size=16 trains like 64
    >>> big = setup.fit((x, y), epochs=2, seed=0, verbose=False, dataloader_options={"batch_size": 64})
    >>> torch.allclose(acc.model.weight, big.model.weight, atol=1e-6)
    True
    """

    order = -500  # decide before other batch-begin hooks whether this batch steps

    def __init__(self, n_batches: int) -> None:
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
            raise LanternaError(f"GradientAccumulation(n_batches={n_batches!r}): give a positive integer number "
                                "of batches per optimizer step, e.g. GradientAccumulation(4).")
        self.n_batches = n_batches
        self._scale = 1.0
        self._in_group = 0  # batches accumulated in the current group
        self._common: int | None = None  # under DDP: batches that every rank has this epoch

    def __repr__(self) -> str:
        return f"GradientAccumulation(n_batches={self.n_batches})"

    def on_train_begin(self, ctx: Context) -> None:
        # the batches every process has this epoch (DDP: uneven shards); one process: all of them
        self._common = None if ctx.num_batches is None else ctx.world.min_int(ctx.num_batches)

    def on_train_batch_begin(self, ctx: Context) -> None:
        i = ctx.iter - 1
        start = i - i % self.n_batches
        total = ctx.num_batches
        size = self.n_batches if total is None else min(self.n_batches, total - start)
        ctx.accumulating = i - start + 1 < size
        self._in_group = i - start + 1
        self._scale = 1.0 / size
        # DDP: skip the gradient all-reduce only inside groups that are whole on every rank (nothing locally)
        ctx.world.set_grad_sync(not (ctx.accumulating and self._common is not None
                                     and start + self.n_batches <= self._common))

    def on_train_batch_before_backward(self, ctx: Context) -> None:
        if self._scale != 1.0:
            ctx.backward_loss = ctx.backward_loss * self._scale

    def on_train_end(self, ctx: Context) -> None:
        ctx.world.set_grad_sync(True)
        if ctx.accumulating:  # data of unknown length ended inside a group: step on what was accumulated
            ctx.accumulating = False
            k = self._in_group
            if k < self.n_batches:  # each loss was divided by n_batches: make it the mean over the k batches
                grads = [p.grad for opt in ctx.optimizers.values() for g in opt.param_groups for p in g["params"]
                         if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, self.n_batches / k)
            ctx.step_optimizer()
            ctx.step += 1
        ctx.accumulating = False

    def on_fit_end(self, ctx: Context) -> None:
        ctx.accumulating = False
