"""Console output in luz's form: ``Epoch 1/200`` / ``Train metrics: Loss: 2.5863 - MAE: 1.2832``.

A live progress bar (tqdm) inside each epoch on a terminal or in a notebook; plain lines elsewhere (CI logs,
files, SLURM): no carriage returns, never silent by default.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ..core.callback import Callback
from ..core.context import Context

__all__ = ["ProgressPrinter", "LiveProgress", "format_value", "metrics_line", "make_printer", "is_interactive"]


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


def is_interactive(stream: Any = None) -> bool:
    """True in a terminal or a Jupyter notebook."""
    stream = stream or sys.stdout
    if "ipykernel" in sys.modules:
        try:
            from IPython import get_ipython

            if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
                return True
        except Exception:
            pass
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class ProgressPrinter(Callback):
    """Prints ``Epoch i/N`` and the epoch's metric lines (order 50, after metrics, before early stopping)."""

    order = 50

    def on_epoch_begin(self, ctx: Context) -> None:
        print(f"Epoch {ctx.epoch}/{ctx.max_epochs}", flush=True)

    def on_epoch_end(self, ctx: Context) -> None:
        display = ctx.display_names
        sets = ["train"] + ([ctx.valid_name] if ctx.valid_data is not None else [])
        lines = [metrics_line(ctx.record, s, display) for s in sets]
        print("\n".join(line for line in lines if line), flush=True)


class LiveProgress(ProgressPrinter):
    """:class:`ProgressPrinter` plus a progress bar per phase, refreshed at most ``refresh_per_second``
    times per second (only then is the running loss read from the device)."""

    def __init__(self, refresh_per_second: float = 4.0) -> None:
        self.interval = 1.0 / refresh_per_second
        self.bar: Any = None

    def _begin(self, ctx: Context) -> None:
        from tqdm.auto import tqdm

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
            if ctx.loss is not None:
                self.bar.set_postfix_str(f"Loss: {format_value(float(ctx.loss.detach()))}", refresh=False)

    on_train_batch_end = _batch_end
    on_valid_batch_end = _batch_end

    def _end(self, ctx: Context) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = _end
    on_valid_end = _end
    on_fit_end = _end


def make_printer(verbose: bool | None) -> ProgressPrinter | None:
    """The default console callback for ``verbose`` (None = auto: live bar only when interactive)."""
    if verbose is False:
        return None
    return LiveProgress() if is_interactive() else ProgressPrinter()
