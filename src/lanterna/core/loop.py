"""The training loop: epochs of a training phase and a validation phase, with hooks around each step."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..data import batch_size_of, split_batch
from ..data.prefetch import device_batches
from ..errors import DataError
from .context import Context
from .events import CancelFit, FitDecision, Interrupted
from .sync import allowed_sync

__all__ = ["fit_loop", "run_phase"]


def run_phase(ctx: Context, training: bool) -> None:
    """One pass over the training (``training=True``) or validation data. Its begin and end hooks are natural
    synchronisation points (:func:`.sync.allowed_sync`); its batches make none (docs/performance.md, "GPU path")."""
    hooks = ctx.hooks
    ctx.training = training
    ctx.set_name = "train" if training else ctx.valid_name
    source = ctx.train_data if training else ctx.valid_data
    ctx.num_batches = source.num_batches()
    ctx.model.train(training)
    if training:
        begin, b_begin, b_end, end = (hooks.on_train_begin, hooks.on_train_batch_begin,
                                      hooks.on_train_batch_end, hooks.on_train_end)
        step = ctx.stepper.train_batch
    else:
        begin, b_begin, b_end, end = (hooks.on_valid_begin, hooks.on_valid_batch_begin,
                                      hooks.on_valid_batch_end, hooks.on_valid_end)
        step = ctx.stepper.valid_batch
    weighted = source.weighted  # batches come as (batch, sample weights)
    ctx.sample_weight = None
    with allowed_sync():
        begin(ctx)
    i = 0
    local_stop = not ctx.world.distributed  # under DDP, Ctrl-C is agreed at epoch end: no rank waits for another
    # on CUDA: copies on a side stream, the epoch's first fetch marked (data/prefetch.py); elsewhere the source
    batches = device_batches(source, ctx.device) if ctx.device.type == "cuda" else source
    with torch.set_grad_enabled(training), ctx.phase_context(training):
        for i, batch in enumerate(batches, 1):
            ctx.iter = i
            if weighted:
                batch, ctx.sample_weight = batch
            ctx.batch = batch
            ctx.input, ctx.target = split_batch(batch)
            ctx.batch_size = batch_size_of(ctx.input)
            ctx.pred = ctx.loss = ctx.loss_weight = None
            b_begin(ctx)
            step()
            if training and not ctx.accumulating:
                ctx.step += 1  # optimizer steps: GradientAccumulation defers some
            b_end(ctx)
            if ctx.interrupted and local_stop:
                raise Interrupted()
    if i == 0 and (training or not ctx.world.distributed):  # a rank may hold no validation batch
        raise DataError(
            f"The {'training' if training else 'validation'} data yielded no batches. "
            "Check that it is not empty (and that drop_last does not drop everything)."
        )
    with allowed_sync():
        end(ctx)


def fit_loop(ctx: Context) -> None:
    """Run epochs ``ctx.start_epoch + 1 .. ctx.max_epochs``; ``ctx.status`` tells how it ended."""
    hooks = ctx.hooks
    with _sigint_handler(ctx):
        try:
            with allowed_sync():  # fit, epoch and phase boundaries are natural synchronisation points
                hooks.on_fit_begin(ctx)
            for epoch in range(ctx.start_epoch + 1, ctx.max_epochs + 1):
                ctx.epoch = epoch
                ctx.record = {"epoch": epoch}
                t0 = time.perf_counter()
                with allowed_sync():
                    ctx.train_data.set_epoch(epoch)
                    hooks.on_epoch_begin(ctx)
                run_phase(ctx, training=True)
                if ctx.valid_data is not None:
                    run_phase(ctx, training=False)
                ctx.record["epoch_time"] = time.perf_counter() - t0
                ctx.history.append(ctx.record)
                with allowed_sync():
                    hooks.on_epoch_end(ctx)
                    world = ctx.world  # every rank takes the same decision
                    ctx.interrupted = world.any(ctx.interrupted)
                    ctx.stop_training = world.any(ctx.stop_training)
                if ctx.interrupted:
                    raise Interrupted()
                if ctx.stop_training:
                    if epoch >= ctx.min_epochs:
                        ctx.status = "stopped_early"
                        with allowed_sync():
                            hooks.on_early_stopping(ctx)
                        break
                    ctx.stop_training = False  # early stopping may not stop before min_epochs
            else:
                ctx.status = "completed"
        except CancelFit as stop:
            ctx.status = stop.status
            if isinstance(stop, Interrupted):
                with allowed_sync():
                    hooks.on_interrupt(ctx)
        except FitDecision as decision:  # leaves fit (Optuna's pruning)
            ctx.status = decision.status
            raise
        except BaseException:
            ctx.status = "failed"
            raise
        finally:
            ctx.model.eval()
            with allowed_sync():
                hooks.on_fit_end(ctx)


@contextmanager
def _sigint_handler(ctx: Context) -> Iterator[None]:
    """First Ctrl-C: finish the current batch and return what was trained. Second: abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        if ctx.interrupted:
            raise KeyboardInterrupt
        ctx.interrupted = True
        if ctx.verbose:
            print("\nInterrupted: stopping after the current batch (press Ctrl-C again to abort).", flush=True)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
