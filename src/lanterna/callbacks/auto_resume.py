"""``AutoResume``: continue a killed fit exactly where it stopped, and handle SIGTERM preemption.

Its checkpoints are the format of :class:`~lanterna.callbacks.ModelCheckpoint` (the state of
:func:`lanterna.core.state.training_state`, plus the position and phase state of a mid-epoch stop); the rest
of an interrupted epoch is :class:`lanterna.data.resume.SkipBatches`.

Orders at epoch end: ... ``EarlyStopping`` (1000) → ``ModelCheckpoint`` (1100) → ``AutoResume`` (1200): a
checkpoint sees the epoch's final state (scheduler step, early-stopping counters included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..core.state import data_generators, phase_state, restore_phase_state, restore_training_state, write_checkpoint
from ..data.resume import SkipBatches, data_fingerprint
from ..errors import CheckpointError, LanternaError
from ..io.atomic import TEMP_MARKER, fsync_dir, sweep_temp_files
from ..io.checkpoint import check_writable, scan_checkpoints, verify_checkpoint
from ..io.checkpoint import remove_checkpoint as remove
from ..io.rng import capture_rng_state, restore_rng_state
from .model_checkpoint import path_argument

__all__ = ["AutoResume", "PREEMPTION_EXIT_CODE"]

PREEMPTION_EXIT_CODE = 143  # 128 + SIGTERM: what schedulers (SLURM, Kubernetes) read as "terminated, requeue"


class AutoResume(Callback):
    """Make a fit restartable: run the same script again after a crash, a kill or a preemption, and it
    continues where the last checkpoint left it, ending with the same weights and history as an
    uninterrupted run (same seed; bit-identical on CPU). Order 1200: the last callback at every hook.

    - After every epoch a checkpoint (the format of :class:`ModelCheckpoint`) is written atomically to the
      folder ``path``; the ``keep_last`` newest (by recorded step) are kept, never fewer than one whole one.
    - At the start of fit, temp files of killed writes are swept, the newest checkpoint that passes its
      checksum is loaded (a damaged one is reported with a warning, renamed ``*.damaged`` and the previous
      one used), and training continues from it: model, optimizers, schedulers, grad scaler, history,
      callbacks' state (early-stopping counters, best values), global step and every RNG state.
    - SIGTERM (a scheduler's preemption): the current training step is finished, a checkpoint is written
      (mid-epoch: the restarted run skips the batches already trained, in the same shuffled order) and the
      process exits with status 143 so the job can be requeued. During validation, the epoch is finished
      first.
    - After a fit that completes or stops early the folder's checkpoints are removed, so the next run
      starts fresh; after a crash, a NaN stop, Ctrl-C, a ``StopTraining`` or a preemption they are kept.

    With ``valid_data`` given as a fraction, pass ``seed=`` to fit: the split is drawn before any callback
    runs, so without a seed the restarted run would hold out other samples (AutoResume warns when the data
    differs from the checkpoint's).

    Args:
        path: the folder for the resume state (created).
        keep_last: how many checkpoints to keep (>= 1; 2 lets a damaged newest one fall back).
        handle_sigterm: install the SIGTERM handler (main thread only).

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> class Crash(ln.Callback):
    ...     def on_epoch_end(self, ctx):
    ...         if ctx.epoch == 2:
    ...             raise RuntimeError("power cut")
    >>> try:
    ...     setup.fit((x, y), epochs=4, seed=0, verbose=False,
    ...               callbacks=[ln.callbacks.AutoResume("runs/exp1/resume"), Crash()])
    ... except ln.CallbackError:
    ...     pass
    >>> resumed = setup.fit((x, y), epochs=4, seed=0, verbose=False,  # the same script, run again
    ...                     callbacks=[ln.callbacks.AutoResume("runs/exp1/resume")])
    >>> whole = setup.fit((x, y), epochs=4, seed=0, verbose=False)
    >>> len(resumed.history), torch.equal(resumed.model.weight, whole.model.weight)
    (4, True)
    """

    order = 1200
    runs_last = True

    def __init__(self, path: str | os.PathLike[str] = "checkpoints/resume/", keep_last: int = 2,
                 handle_sigterm: bool = True) -> None:
        path = path_argument(path, "AutoResume", "a folder path")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise LanternaError(f"AutoResume(keep_last={keep_last!r}): keep at least one checkpoint (an int >= 1).")
        self.path = Path(path)
        self.keep_last = keep_last
        self.handle_sigterm = handle_sigterm
        self.resumed_from: Path | None = None
        self.preempted = False
        self._kept: list[tuple[int, int, Path]] = []
        self._sigterm = False
        self._prev_handler: Any = None
        self._pending: dict[str, Any] | None = None
        self._epoch_rng: dict[str, Any] | None = None
        self._wrapped: SkipBatches | None = None
        self._fingerprint: dict[str, Any] = {}
        self._done_before = 0

    def __repr__(self) -> str:
        return f"AutoResume({str(self.path)!r}, keep_last={self.keep_last})"

    # ------------------------------------------------------------------ start
    def on_fit_begin(self, ctx: Context) -> None:
        self._sigterm = self.preempted = False
        self.resumed_from, self._pending, self._wrapped, self._kept = None, None, None, []
        main = ctx.is_main
        if main:
            check_writable(self.path, "AutoResume")
            sweep_temp_files(self.path)
        self._fingerprint = data_fingerprint({"train": ctx.train_data, "valid": ctx.valid_data})
        found = self._latest(rename_damaged=main, sharded=ctx.world.checkpoints)
        if found is not None:
            path, state = found
            self._resume(ctx, path, state)
        if self.handle_sigterm:
            self._install_sigterm()

    def _latest(self, rename_damaged: bool, sharded: Any = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest whole checkpoint (files; folders of ``sharded``, the FSDP store, when given)."""
        damaged: list[tuple[Path, str]] = []
        scan, verify = ((sharded.scan, sharded.verify) if sharded is not None
                        else (scan_checkpoints, verify_checkpoint))
        candidates = scan(self.path, on_damaged=lambda p, e: damaged.append((p, str(e))), pattern="resume-*.pt")
        chosen: tuple[Path, dict[str, Any]] | None = None
        for info in candidates:
            if chosen is None:
                try:
                    verify(info.state, info.path)
                except CheckpointError as e:
                    damaged.append((info.path, str(e)))
                    continue
                chosen = (info.path, info.state)
            self._kept.append((info.step, info.epoch, info.path))
        if sharded is not None:  # FSDP: every rank checks the same folders; none is set aside while one still reads
            sharded.world.barrier()
        for path, reason in damaged:
            fallback = (f"resuming from {chosen[0].name} (epoch {chosen[1].get('epoch')})" if chosen
                        else "no whole checkpoint is left, so training starts afresh")
            warnings.warn(f"AutoResume: {reason} It is set aside as {path.name}.damaged; {fallback}.",
                          stacklevel=2)
            if rename_damaged:
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".damaged"))
        if damaged and rename_damaged:
            fsync_dir(self.path)
        self._kept = [k for k in self._kept if k[2].exists()]
        return chosen

    def _resume(self, ctx: Context, path: Path, state: dict[str, Any]) -> None:
        position = state.get("position")
        if ctx.world.checkpoints is not None:  # FSDP: each rank loads its shards now
            state = ctx.world.checkpoints.load(ctx, path, state)
        restore_training_state(ctx, state, where=str(path), rng=position is None, folder=self.path)
        epoch = int(state.get("epoch", 0))
        ctx.start_epoch = epoch
        ctx.epoch = epoch
        if position is not None:
            self._pending = state  # the rest is put back at the resumed epoch's on_train_begin
        elif state.get("stop_training") and epoch >= ctx.min_epochs:
            ctx.start_epoch = max(epoch, ctx.max_epochs)  # it had stopped early; nothing is left to train
        self.resumed_from = path
        if any(getattr(getattr(src, "loader", None), "persistent_workers", False)
               for src in (ctx.train_data, ctx.valid_data)):
            warnings.warn(
                "AutoResume: a DataLoader with persistent_workers=True draws its workers' seeds once per "
                "process, so the resumed run's shuffling and worker randomness differ from an uninterrupted "
                "run's. Use persistent_workers=False for an exact resume.", stacklevel=2)
        saved_fp = state.get("data") or {}
        if saved_fp and saved_fp != self._fingerprint:
            warnings.warn(
                "AutoResume: the training/validation data differ from those of the run that wrote "
                f"{path.name}, so the resumed run cannot match an uninterrupted one. With valid_data given as a "
                "fraction, pass seed= to fit so that every run holds out the same samples.",
                stacklevel=2,
            )
        if ctx.verbose and ctx.is_main:
            where = (f"epoch {position['epoch']}, after batch {position['batch']}" if position
                     else f"the end of epoch {epoch}")
            print(f"Resuming from {path} ({where}).", flush=True)

    # ------------------------------------------------------------------ mid-epoch state
    def on_epoch_begin(self, ctx: Context) -> None:
        if self._pending is not None:  # before run_phase picks the source: the rest of the interrupted epoch
            done = int(self._pending["position"]["batch"])
            rng, generators = self._pending["rng"], data_generators(ctx)
            self._wrapped = SkipBatches(ctx.train_data, done, lambda: restore_rng_state(rng, generators))
            ctx.train_data = self._wrapped

    def on_train_begin(self, ctx: Context) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            # Put back what the interrupted run had at this point: callbacks' on_epoch_begin/on_train_begin
            # have run again, so their effects are overwritten by the saved state.
            restore_training_state(ctx, pending, where=str(self.resumed_from), rng=False, folder=self.path)
            restore_phase_state(ctx, pending, where=str(self.resumed_from))
            restore_rng_state(pending["epoch_rng"], data_generators(ctx))
            self._epoch_rng, self._done_before = pending["epoch_rng"], int(pending["position"]["batch"])
            return
        self._done_before = 0
        if self.handle_sigterm:
            self._epoch_rng = capture_rng_state(data_generators(ctx))

    def on_train_batch_end(self, ctx: Context) -> None:
        if not self._sigterm or ctx.world.distributed:  # under DDP the ranks agree at the epoch's end
            return
        n = ctx.num_batches
        if ctx.accumulating or n is None or ctx.iter >= n or self._epoch_rng is None:
            return  # finish the gradient-accumulation group, or the epoch (its last batch, unknown length)
        done = self._done_before + ctx.iter
        extra = {
            "epoch": ctx.epoch - 1,
            "position": {"epoch": ctx.epoch, "batch": done},
            "epoch_rng": self._epoch_rng,
            **phase_state(ctx),
        }
        path = self._save(ctx, f"resume-epoch-{ctx.epoch:04d}-batch-{done:07d}.pt", extra)
        self._exit(f"epoch {ctx.epoch}, after batch {done}", path)

    # ------------------------------------------------------------------ end of epoch
    def on_epoch_end(self, ctx: Context) -> None:
        if self._wrapped is not None:
            ctx.train_data = self._wrapped.source
            self._wrapped = None
        path = self._save(ctx, f"resume-epoch-{ctx.epoch:04d}.pt", {})
        stop = self._sigterm
        if self.handle_sigterm:
            stop = ctx.world.any(stop)  # DDP: a collective, every rank calls it every epoch
        if stop:
            self._exit(f"the end of epoch {ctx.epoch}", path)

    def _save(self, ctx: Context, name: str, extra: dict[str, Any]) -> Path | None:
        path = write_checkpoint(ctx, self.path / name, data=self._fingerprint, **extra)  # FSDP: every rank
        if path is None or not ctx.is_main:
            return None
        epoch = int(extra.get("epoch", ctx.epoch))
        self._kept = [k for k in self._kept if k[2] != path] + [(int(ctx.step), epoch, path)]
        self._rotate()
        return path

    def _rotate(self) -> None:
        self._kept.sort(key=lambda k: (k[0], k[1]))
        old, self._kept = self._kept[: -self.keep_last], self._kept[-self.keep_last :]
        for _, _, p in old:  # the newest file is complete and durable before any older one goes
            remove(p)
        if old:
            fsync_dir(self.path)

    # ------------------------------------------------------------------ SIGTERM
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, frame: Any) -> None:
            self._sigterm = True

        self._prev_handler = signal.signal(signal.SIGTERM, handle)

    def _exit(self, where: str, path: Path | None) -> None:
        self.preempted = True
        print(f"\nSIGTERM received: saved a checkpoint at {where}"
              + (f" to {path}" if path is not None else "")
              + f"; exiting with status {PREEMPTION_EXIT_CODE}. Run the same command again to resume.",
              file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTION_EXIT_CODE)

    # ------------------------------------------------------------------ end
    def on_fit_end(self, ctx: Context) -> None:
        if self._prev_handler is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None
        if self._wrapped is not None:
            ctx.train_data = self._wrapped.source
            self._wrapped = None
        if ctx.status in ("completed", "stopped_early") and not self.preempted and ctx.is_main:
            self.clear()

    def clear(self) -> None:
        """Remove this folder's checkpoints (and leftovers of killed writes); the folder too when empty."""
        folder = self.path
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            name = entry.name
            ours = (name.startswith("resume-") and name.endswith((".pt", ".pt.damaged"))) or TEMP_MARKER in name
            if ours:
                remove(entry)  # a file, or the folder of a sharded (FSDP) checkpoint
        fsync_dir(folder)
        with contextlib.suppress(OSError):
            folder.rmdir()
        self._kept = []
