"""One CSV row per epoch, the history keys as columns."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..errors import LanternaError
from ..io.atomic import atomic_write_bytes, explain_write_error

__all__ = ["CSVLogger"]


class CSVLogger(Callback):
    """Write each epoch's history record (``epoch, lr, train_loss, …, valid_loss, …, epoch_time``) as a row
    of ``path`` (order 600: after the scheduler step, before checkpoints and early stopping).

    A new fit overwrites the file; a resumed fit (``ctx.start_epoch > 0``, e.g. with ``AutoResume``) appends
    to it, first dropping rows of epochs after the resumed one (an epoch that was logged but not
    checkpointed is trained again), or, when the file is missing, first writing the restored history.
    A key that appears in a later epoch adds a column (the file is rewritten once with the wider header).
    The file is closed after every row, so it is complete whenever fit stops. Only the main process writes.

    Args:
        path: the CSV file; its folder is created.
        separator: the field delimiter.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> fitted = setup.fit((x, y), epochs=2, verbose=False, callbacks=[ln.callbacks.CSVLogger("logs/history.csv")])
    >>> lines = open("logs/history.csv").read().splitlines()
    >>> lines[0], len(lines)
    ('epoch,lr,train_loss,epoch_time', 3)
    """

    order = 600

    def __init__(self, path: str | os.PathLike[str], separator: str = ",") -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise LanternaError(f"CSVLogger(path={path!r}): give a file path (str or pathlib.Path).")
        self.path = Path(path)
        if self.path.is_dir():
            raise LanternaError(f"CSVLogger: {str(self.path)!r} is a folder; give a file path such as "
                                f"{str(self.path / 'history.csv')!r}.")
        self.separator = separator
        self._fields: list[str] | None = None

    def on_fit_begin(self, ctx: Context) -> None:
        self._fields = None  # decided at the first epoch end, when a resume has restored start_epoch
        if ctx.is_main:
            self._check_writable()

    def on_epoch_end(self, ctx: Context) -> None:
        if not ctx.is_main:
            return
        record = ctx.history[-1]
        if self._fields is None:
            self._start(ctx)
        assert self._fields is not None
        new = [k for k in record if k not in self._fields]
        if new:
            rows = self._read()
            self._fields += new
            self._rewrite(rows)
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=self._fields, delimiter=self.separator).writerow(
            {k: _cell(v) for k, v in record.items()})
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("a", newline="", encoding="utf-8") as f:
                f.write(line.getvalue())
        except OSError as e:
            with contextlib.suppress(OSError):  # no half-written row: the rows already there stay valid
                os.truncate(self.path, size)
            raise self._write_error(e) from e

    # ------------------------------------------------------------------ file handling
    def _check_writable(self) -> None:
        """Fail before training, not after the first epoch: create the folder and the temp file the rows go
        through (an existing log is opened for appending, never truncated: a resume keeps it)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", encoding="utf-8"):
                pass
            tmp.unlink()
            if self.path.exists():
                with self.path.open("a", encoding="utf-8"):
                    pass
        except OSError as e:
            blocker = next((p for p in self.path.parents if p.exists()), None)
            cause = (f"{str(blocker)!r} is a file, not a folder" if blocker is not None and not blocker.is_dir()
                     else f"{type(e).__name__}: {e.strerror or e}")
            raise LanternaError(
                f"CSVLogger cannot write {str(self.path)!r} ({cause}). Give a path in a folder you can write to, "
                "e.g. CSVLogger('logs/history.csv')."
            ) from e

    def _start(self, ctx: Context) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = ctx.start_epoch
        if start > 0 and self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=self.separator)
                self._fields = list(reader.fieldnames or ["epoch"])
                rows = list(reader)
            kept = [r for r in rows if _epoch_of(r) <= start]
            if len(kept) != len(rows) or not rows:
                self._rewrite(kept)
            return
        earlier = [r for r in ctx.history[:-1] if int(r.get("epoch", 0)) <= start] if start > 0 else []
        self._fields = []
        for rec in earlier + [ctx.history[-1]]:
            self._fields += [k for k in rec if k not in self._fields]
        self._rewrite([{k: _cell(v) for k, v in r.items()} for r in earlier])

    def _read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter=self.separator))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self._fields or ["epoch"], delimiter=self.separator)
        writer.writeheader()
        writer.writerows(rows)
        try:  # the previous file stays whole if this fails (a full disk), and no temp file is left
            atomic_write_bytes(self.path, text.getvalue().encode("utf-8"))
        except OSError as e:
            raise self._write_error(e) from e

    def _write_error(self, e: OSError) -> LanternaError:
        return LanternaError(f"CSVLogger could not write {str(self.path)!r}: {explain_write_error(e)}. The rows "
                             "written before are kept.")

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)  # full precision, round-trips through float()
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def _epoch_of(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("epoch") or 0))
    except ValueError:
        return 0
