"""TensorBoard logging in Keras's layout: ``<log_dir>/train`` and ``<log_dir>/valid`` runs, one scalar per
metric per epoch, so each chart overlays training and validation (one "Training vs. Validation Loss" chart).

tensorboard is an optional dependency (``pip install 'lanterna[tensorboard]'``), imported only when a
:class:`TensorBoard` callback is created.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError

__all__ = ["TensorBoard", "default_log_dir"]

_INSTALL = "TensorBoard logging needs the tensorboard package: pip install 'lanterna[tensorboard]'"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from e
    return SummaryWriter


def default_log_dir(root: str | os.PathLike[str] = "runs") -> Path:
    """``runs/<Mon DD_HH-MM-SS>_<host>``, SummaryWriter's default, made unique within ``root``.

    >>> from lanterna.integrations.tensorboard import default_log_dir
    >>> str(default_log_dir()).startswith("runs")
    True
    """
    base = Path(root) / f"{datetime.now().strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}_{i}")
    return path


class TensorBoard(Callback):
    """Log the history to TensorBoard at each epoch end (order 600: after the scheduler step, before
    checkpoints and early stopping).

    Layout (Keras's): ``<log_dir>/train`` holds ``loss``, each training metric (``acc``, ``mae`` …) and
    ``ctx.log`` value and the learning rate ``lr`` (``lr_<name>`` for several optimizers);
    ``<log_dir>/valid`` holds the validation ``loss`` and metrics. The step is the epoch. Point TensorBoard
    at ``log_dir`` (``tensorboard --logdir runs``) and each chart shows the train and valid curves together.
    A metric with several values (per class) is written as ``<name>/<i>``.

    Writers are created at the first epoch end, so a resumed fit (``AutoResume``) writes into the same
    ``log_dir`` with a purge step that hides points of epochs trained again. Only the main process writes.

    Args:
        log_dir: the run folder; default ``runs/<timestamp>_<host>`` (like ``SummaryWriter``), a new one
            for every fit. Give it explicitly to resume into the same run.
        histogram_freq: every that many epochs, weight histograms (``weights/<param>``) and the gradients of
            the epoch's last batch (``gradients/<param>``) in ``train/``; 0 (default) for none.
        hparams: also write the fit's hparams and opt_hparams for TensorBoard's HPARAMS tab, with the
            monitored quantities (``train/loss``, ``valid/acc`` …) as its metrics.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((x, y), epochs=2, valid_data=0.25, verbose=False,
    ...                    callbacks=[ln.callbacks.TensorBoard(log_dir="runs/demo", histogram_freq=1)])
    >>> train = EventAccumulator("runs/demo/train").Reload()
    >>> [e.step for e in train.Scalars("loss")], "weights/weight" in train.Tags()["histograms"]
    ([1, 2], True)
    >>> [round(e.value, 5) for e in EventAccumulator("runs/demo/valid").Reload().Scalars("loss")] == [
    ...     round(h["valid_loss"], 5) for h in fitted.history]
    True
    """

    order = 600

    def __init__(
        self, log_dir: str | os.PathLike[str] | None = None, *, histogram_freq: int = 0, hparams: bool = False
    ) -> None:
        self._writer_cls = _summary_writer()
        if int(histogram_freq) != histogram_freq or histogram_freq < 0:
            raise LanternaError(
                f"TensorBoard(histogram_freq={histogram_freq!r}): give an integer >= 0 (0 = none)."
            )
        self.given_log_dir = None if log_dir is None else Path(log_dir)
        self.log_dir: Path | None = self.given_log_dir
        self.histogram_freq = int(histogram_freq)
        self.hparams = bool(hparams)
        self._writers: dict[str, Any] = {}
        self._grads: dict[str, Any] = {}
        self._purge: dict[str, int] | None = None
        self._active = True
        if self.histogram_freq:
            # Only then is the per-batch hook implemented, so plain scalar logging costs nothing per batch.
            self.__class__ = _TensorBoardWithGradients

    # ------------------------------------------------------------------ fit
    def on_fit_begin(self, ctx: Context) -> None:
        self._active = bool(ctx.is_main)
        self._writers = {}
        self._grads = {}
        self._purge = None  # decided at the first epoch end, once a resume has run
        if self._active:
            self.log_dir = self.given_log_dir if self.given_log_dir is not None else default_log_dir()

    def on_epoch_end(self, ctx: Context) -> None:
        if not self._active:
            return
        if self._purge is None:
            self._start(ctx)
        record = ctx.history[-1]
        epoch = int(record.get("epoch", ctx.epoch))
        train = self._writer("train")
        for key, value in record.items():
            if key.startswith("valid_"):
                writer, tag = self._writer("valid"), key[len("valid_"):]
            elif key.startswith("train_"):
                writer, tag = train, key[len("train_"):]
            elif key == "lr" or key.startswith("lr_"):
                writer, tag = train, key
            else:  # epoch, epoch_time: bookkeeping, not a curve to overlay
                continue
            _add_scalars(writer, tag, value, epoch)
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            for name, p in ctx.model.named_parameters():
                train.add_histogram(f"weights/{name}", p.detach(), epoch)
            for name, g in self._grads.items():
                train.add_histogram(f"gradients/{name}", g, epoch)
        self._grads = {}
        for w in self._writers.values():
            w.flush()

    def on_fit_end(self, ctx: Context) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
        self._grads = {}

    # ------------------------------------------------------------------ helpers
    def _start(self, ctx: Context) -> None:
        start = ctx.start_epoch
        self._purge = {"purge_step": start + 1} if start > 0 else {}
        if self.hparams and start == 0:
            self._write_hparams(ctx)

    def _writer(self, run: str) -> Any:
        """The run's writer, created on first use (no ``valid/`` folder for a fit without validation)."""
        writer = self._writers.get(run)
        if writer is None:
            assert self.log_dir is not None and self._purge is not None
            writer = self._writers[run] = self._writer_cls(log_dir=str(self.log_dir / run), **self._purge)
        return writer

    def _write_hparams(self, ctx: Context) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hp

        from ..callbacks.monitor import available_monitors

        setup = ctx.setup
        values: dict[str, Any] = {}
        if setup is not None:
            values.update(setup.hparams)
            values.update({f"opt_{k}": v for k, v in setup.opt_hparams.items()})
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}
        metrics = [hp.Metric(name.split("_", 1)[1], group=name.split("_", 1)[0])
                   for name in available_monitors(ctx)]
        root = self._writer_cls(log_dir=str(self.log_dir))
        file_writer = root._get_file_writer()
        file_writer.add_summary(hp.hparams_config_pb(hparams=[hp.HParam(k) for k in values], metrics=metrics))
        file_writer.add_summary(hp.hparams_pb(values, start_time_secs=time.time()))
        self._writers["hparams"] = root

    def __repr__(self) -> str:
        return f"TensorBoard(log_dir={str(self.log_dir) if self.log_dir else None!r})"


class _TensorBoardWithGradients(TensorBoard):
    """:class:`TensorBoard` with ``histogram_freq``: also keeps the gradients of each histogram epoch's last
    batch (unscaled under 16-mixed), taken just before the optimizer step."""

    _capture = False

    def on_epoch_begin(self, ctx: Context) -> None:
        self._capture = self._active and ctx.epoch % self.histogram_freq == 0

    def on_train_batch_before_step(self, ctx: Context) -> None:
        if not self._capture or (ctx.num_batches is not None and ctx.iter != ctx.num_batches):
            return
        if ctx.scaler is not None:
            ctx.unscale_gradients()
        for name, p in ctx.model.named_parameters():
            if p.grad is not None:
                self._grads[name] = p.grad.detach().clone()


# Errors and Hooks.describe() name the callback by its class: keep the public name.
_TensorBoardWithGradients.__name__ = _TensorBoardWithGradients.__qualname__ = "TensorBoard"


def _add_scalars(writer: Any, tag: str, value: Any, step: int) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        writer.add_scalar(tag, float(value), step)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _add_scalars(writer, f"{tag}/{i}", v, step)
