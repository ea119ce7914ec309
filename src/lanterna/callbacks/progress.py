"""Console output in luz's form: ``Epoch 1/200`` / ``Train metrics: Loss: 2.5863 - MAE: 1.2832``.

A live progress bar (tqdm) inside each epoch on a terminal; in a Jupyter notebook one display per fit, updated in
place (a bar for the current epoch with the fit's ETA, above the lines), left holding only the lines; plain lines
elsewhere (CI logs, files, SLURM): no carriage returns, never silent by default.
"""

from __future__ import annotations

import html
import math
import sys
import time
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..core.sync import LatestValue

__all__ = ["ProgressPrinter", "LiveProgress", "NotebookProgress", "format_value", "metrics_line", "make_printer",
           "is_interactive", "in_notebook"]


def format_value(v: Any) -> str:
    """A value rounded to 4 decimals, printed without trailing zeros (R's way): 2.487, 1.26, 0.75, 1."""
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        s = f"{round(v, 4):.4f}".rstrip("0").rstrip(".")
        return "0" if s in ("-0", "") else s
    if isinstance(v, list):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def metrics_line(record: dict[str, Any], set_name: str, display: dict[str, str]) -> str | None:
    prefix = set_name + "_"
    parts = [f"{display.get(k[len(prefix):], k[len(prefix):])}: {format_value(v)}"
             for k, v in record.items() if k.startswith(prefix)]
    if not parts:
        return None
    title = {"train": "Train", "valid": "Valid"}.get(set_name, set_name.capitalize())
    return f"{title} metrics: " + " - ".join(parts)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (ipykernel), where output is shown as rich displays."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:
        return False


def is_interactive(stream: Any = None) -> bool:
    """True in a terminal or a Jupyter notebook."""
    stream = stream or sys.stdout
    if in_notebook():
        return True
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class ProgressPrinter(Callback):
    """Prints ``Epoch i/N`` and the epoch's metric lines (order 50, after metrics, before early stopping).

    ``verbose=True`` adds it (or a progress bar: :class:`LiveProgress`, ``NotebookProgress``) for you.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((torch.randn(8, 3), torch.randn(8, 1)), epochs=1, verbose=False,
    ...                    callbacks=[ln.callbacks.ProgressPrinter()])
    Epoch 1/1
    Train metrics: Loss: ...
    """

    order = 50

    def on_epoch_begin(self, ctx: Context) -> None:
        print(f"Epoch {ctx.epoch}/{ctx.max_epochs}", flush=True)

    def on_epoch_end(self, ctx: Context) -> None:
        print("\n".join(epoch_lines(ctx)), flush=True)


def epoch_lines(ctx: Context) -> list[str]:
    """The epoch's ``Train metrics: ...`` / ``Valid metrics: ...`` lines."""
    sets = ["train"] + ([ctx.valid_name] if ctx.valid_data is not None else [])
    lines = [metrics_line(ctx.record, s, ctx.display_names) for s in sets]
    return [line for line in lines if line]


class LiveProgress(ProgressPrinter):
    """:class:`ProgressPrinter` plus a progress bar per phase, refreshed at most ``refresh_per_second``
    times per second (only then is the running loss read; on CUDA without waiting for the device: the bar shows
    the loss of the latest batch whose copy to the host has completed, :class:`~lanterna.core.sync.LatestValue`).

    Args:
        refresh_per_second: the most times per second the bar is redrawn.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((torch.randn(8, 3), torch.randn(8, 1)), epochs=1, verbose=False,
    ...                    callbacks=[ln.callbacks.LiveProgress(refresh_per_second=2)])
    Epoch 1/1
    ...Train metrics: Loss: ...
    >>> len(fitted.history)
    1
    """

    def __init__(self, refresh_per_second: float = 4.0) -> None:
        self.interval = 1.0 / refresh_per_second
        self.bar: Any = None
        self._loss = LatestValue()

    def _begin(self, ctx: Context) -> None:
        from tqdm.std import tqdm  # a terminal's bar (notebooks get NotebookProgress)

        self.bar = tqdm(total=ctx.num_batches, leave=False, dynamic_ncols=True, file=sys.stdout,
                        desc="Train" if ctx.training else "Valid", mininterval=self.interval)
        self._shown = 0
        self._last = time.monotonic()

    on_train_begin = _begin
    on_valid_begin = _begin

    def _batch_end(self, ctx: Context) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.bar.update(ctx.iter - self._shown)
            self._shown = ctx.iter
            loss = self._loss.read(ctx.loss) if ctx.loss is not None else None
            if loss is not None:
                self.bar.set_postfix_str(f"Loss: {format_value(loss)}", refresh=False)

    on_train_batch_end = _batch_end
    on_valid_batch_end = _batch_end

    def _end(self, ctx: Context) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = _end
    on_valid_end = _end
    on_fit_end = _end


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + "{:02d}:{:02d}".format(*divmod(rest, 60))


class NotebookProgress(ProgressPrinter):
    """Jupyter's form of :class:`ProgressPrinter`: one display per fit, updated in place at most
    ``refresh_per_second`` times per second — a bar for the current phase with the whole fit's elapsed time and
    ETA, above luz's lines — and left holding only the lines, as plain text and HTML (no widget), so a saved
    notebook reads the same when reopened. The default printer in a notebook. On CUDA the running loss is read
    without waiting for the device (:class:`~lanterna.core.sync.LatestValue`).

    Args:
        refresh_per_second: how often the display (and the running loss, read from the device) is refreshed.

    >>> from lanterna.callbacks.progress import NotebookProgress
    >>> NotebookProgress(refresh_per_second=2).interval
    0.5
    """

    def __init__(self, refresh_per_second: float = 4.0) -> None:
        self.interval = 1.0 / refresh_per_second
        self.handle: Any = None
        self.lines: list[str] = []
        self.bar = ""
        self.fraction: tuple[int, int | None] = (0, None)
        self._loss = LatestValue()

    def on_fit_begin(self, ctx: Context) -> None:
        from IPython.display import display

        self.lines, self.bar = [], ""
        self.t0 = self._last = time.monotonic()
        self.epochs_done, self.epoch_t0, self.done_time = 0, self.t0, 0.0
        self.handle = display(self._bundle(), raw=True, display_id=True)

    def on_epoch_begin(self, ctx: Context) -> None:
        self.epoch_t0 = time.monotonic()
        self.lines.append(f"Epoch {ctx.epoch}/{ctx.max_epochs}")

    def _begin(self, ctx: Context) -> None:
        self._show(ctx, 0, force=self.epochs_done == 0 and ctx.training)  # the bar shows at once

    on_train_begin = _begin
    on_valid_begin = _begin

    def _batch_end(self, ctx: Context) -> None:
        self._show(ctx, ctx.iter)

    on_train_batch_end = _batch_end
    on_valid_batch_end = _batch_end

    def on_epoch_end(self, ctx: Context) -> None:
        self.lines += epoch_lines(ctx)
        self.epochs_done += 1
        self.done_time = time.monotonic() - self.t0
        self._show(ctx, ctx.num_batches or ctx.iter)

    def on_fit_end(self, ctx: Context) -> None:
        if self.handle is not None:
            self.bar = ""
            self.handle.update(self._bundle(), raw=True)  # the lines only: what a reopened notebook shows
            self.handle = None

    def _show(self, ctx: Context, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.handle is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        total = ctx.num_batches
        phase = "Train" if ctx.training else "Valid"
        value = self._loss.read(ctx.loss) if ctx.loss is not None and done else None
        loss = f" - Loss: {format_value(value)}" if value is not None else ""
        # the fit's ETA: the mean epoch time so far (in the first epoch: its training share so far)
        elapsed, in_epoch = now - self.t0, now - self.epoch_t0
        if self.epochs_done:
            per_epoch = self.done_time / self.epochs_done
        else:
            fraction = (done / total if total else 0.0) if ctx.training else 1.0
            per_epoch = in_epoch / fraction if fraction else math.nan
        left = max(per_epoch - in_epoch, 0.0) + per_epoch * (ctx.max_epochs - ctx.epoch)
        eta = _clock(left) if math.isfinite(left) else "?"
        count = f"{done}/{total}" if total else f"{done}"
        self.bar = (f"Epoch {ctx.epoch}/{ctx.max_epochs} {phase}: {count}{loss} "
                    f"[{_clock(elapsed)} elapsed, ETA {eta}]")
        self.fraction = (done, total)
        self.handle.update(self._bundle(), raw=True)

    def _bundle(self) -> dict[str, str]:
        text = "\n".join(self.lines)
        if not self.bar:
            return {"text/plain": text}  # rendered like printed lines; half the size of text + HTML
        done, total = self.fraction
        value = f' value="{done}" max="{total}"' if total else ""
        bar = (f'<div><progress{value} style="width:40%;vertical-align:middle"></progress> '
               f"<code>{html.escape(self.bar)}</code></div>")
        return {"text/plain": self.bar + ("\n" + text if text else ""),
                "text/html": bar + (f"<pre>{html.escape(text)}</pre>" if text else "")}


def make_printer(verbose: bool | None) -> ProgressPrinter | None:
    """The default console callback for ``verbose`` (None = auto: a live bar only when interactive; in a
    Jupyter notebook one display updated in place)."""
    if verbose is False:
        return None
    if in_notebook():
        return NotebookProgress()
    return LiveProgress() if is_interactive() else ProgressPrinter()
