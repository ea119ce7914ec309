"""``ResumeFromCheckpoint``: luz's warm start — a new fit that begins from a :class:`ModelCheckpoint` file."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.callback import Callback
from ..core.context import Context
from ..core.state import PARTS
from ..errors import CheckpointError, ModelMismatchError
from ..io.checkpoint import load_checkpoint, scan_checkpoints
from .model_checkpoint import path_argument

__all__ = ["ResumeFromCheckpoint"]

_OPTIMIZER_PARTS = ("optimizers", "schedulers", "scaler", "step")


class ResumeFromCheckpoint(Callback):
    """Start a fit from a checkpoint written by :class:`ModelCheckpoint` (or :class:`AutoResume`): before the
    first epoch its model weights are loaded, and, when asked, the optimizer state with the schedulers', the
    grad scaler's and the step count (``restore_optimizer``), and the history (``restore_history``).

    Unlike :class:`AutoResume` this is a new fit: ``epochs`` epochs are trained under this fit's seed, and the
    callbacks' and random generators' states are not restored. With ``restore_history`` the checkpoint's history
    comes first and the new epochs are numbered on from its last one (as ``fitted.fit`` continues a fit);
    without it they are numbered from 1. Everything is checked before anything is loaded, so a checkpoint of
    another model (a :class:`ModelMismatchError`) or of another optimizer or schedulers (a
    :class:`CheckpointError`) changes nothing. Order 999: after the callbacks that build schedulers
    (:class:`LRScheduler`, 500), before :class:`AutoResume`, whose own resume wins.

    Args:
        path: a checkpoint file, or a folder of them (the latest, by recorded step, is used).
        restore_optimizer: also load the optimizers', schedulers' and grad scaler's state and the step count.
        restore_history: also load the history, and number the epochs on.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> ckpt = ln.callbacks.ModelCheckpoint("runs/warm/epoch-{epoch}.pt", monitor="train_loss")
    >>> first = setup.fit((x, y), epochs=2, seed=0, verbose=False, callbacks=[ckpt])
    >>> warm = ln.callbacks.ResumeFromCheckpoint(ckpt.last_path, restore_optimizer=True, restore_history=True)
    >>> more = setup.fit((x, y), epochs=3, seed=1, verbose=False, callbacks=[warm])
    >>> [h["epoch"] for h in more.history]
    [1, 2, 3, 4, 5]
    """

    order = 999

    def __init__(self, path: str | os.PathLike[str], restore_optimizer: bool = False,
                 restore_history: bool = False) -> None:
        self.path = Path(path_argument(path, "ResumeFromCheckpoint", "a checkpoint file or a folder of them"))
        self.restore_optimizer = bool(restore_optimizer)
        self.restore_history = bool(restore_history)
        self.loaded_from: Path | None = None

    def __repr__(self) -> str:
        return (f"ResumeFromCheckpoint({str(self.path)!r}, restore_optimizer={self.restore_optimizer}, "
                f"restore_history={self.restore_history})")

    def _file(self) -> Path:
        if not self.path.is_dir():
            return self.path

        def damaged(p: Path, e: CheckpointError) -> None:
            raise CheckpointError(f"ResumeFromCheckpoint: {e} Remove it from {str(self.path)!r} or name the "
                                  "checkpoint file to load.")

        found = scan_checkpoints(self.path, on_damaged=damaged)
        if not found:
            raise CheckpointError(f"ResumeFromCheckpoint: the folder {str(self.path)!r} holds no checkpoint (*.pt). "
                                  "Give the file a ModelCheckpoint wrote, e.g. its .last_path or .best_path.")
        return found[0].path

    def on_fit_begin(self, ctx: Context) -> None:
        if ctx.world.shards_parameters:
            raise CheckpointError(
                "ResumeFromCheckpoint under Accelerator(strategy='fsdp') is not supported: its checkpoints are "
                "sharded folders. Use ln.callbacks.AutoResume(folder) to continue an FSDP fit, or start from a "
                "model saved with fitted.save (ln.load(path).model as the module of ln.setup).")
        path = self._file()
        state = load_checkpoint(path)
        where = str(path)
        names = {"model", *(_OPTIMIZER_PARTS if self.restore_optimizer else ()),
                 *(("history",) if self.restore_history else ())}
        parts = [part for part in PARTS if part.name in names]
        fix = "Nothing was loaded."
        model_diff = parts[0].check(ctx, state) if parts[0].check is not None else []
        if model_diff:
            raise ModelMismatchError(f"ResumeFromCheckpoint: the checkpoint {where} does not fit "
                                     f"{type(ctx.model).__name__}: {'; '.join(model_diff)}. Give a checkpoint of "
                                     f"this model. {fix}")
        diff = [d for part in parts[1:] if part.check is not None for d in part.check(ctx, state)]
        if diff:
            raise CheckpointError(
                f"ResumeFromCheckpoint: the checkpoint {where} was written with another optimizer setup: "
                f"{'; '.join(diff)}. Use the same optimizer and LRScheduler callbacks, or restore_optimizer=False "
                f"to load only the weights. {fix}"
            )
        if self.restore_optimizer and state.get("scaler") is not None and ctx.scaler is None:
            raise CheckpointError(f"ResumeFromCheckpoint: the checkpoint {where} holds a grad scaler "
                                  "(precision='16-mixed') and this fit has none. Fit with the same precision, or "
                                  f"restore_optimizer=False. {fix}")
        for part in parts:
            if part.load is not None:
                part.load(ctx, state.get(part.name), where)
        if self.restore_history and ctx.history:
            start = int(ctx.history[-1].get("epoch", len(ctx.history)))
            ctx.start_epoch = ctx.epoch = start
            ctx.min_epochs, ctx.max_epochs = ctx.min_epochs + start, ctx.max_epochs + start
        self.loaded_from = path
        if ctx.verbose and ctx.is_main:
            print(f"Warm start from {path}.", flush=True)
