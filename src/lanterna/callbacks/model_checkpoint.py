"""``ModelCheckpoint`` (luz's ``luz_callback_model_checkpoint``): save the fit's state after each epoch, or
when the monitored value improves, to files whose names never leave their folder (:func:`safe_name`).

Each file is the one checkpoint format of :mod:`lanterna.io.checkpoint` (the state of
:func:`lanterna.core.state.training_state`): it loads with ``torch.load(path, weights_only=True)`` into a dict
whose ``"model"`` entry is the model's ``state_dict()``.
"""

from __future__ import annotations

import math
import os
import re
import string
import warnings
from pathlib import Path
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..core.state import write_checkpoint
from ..errors import CheckpointError, LanternaError, MonitorError
from ..io.atomic import TEMP_MARKER, sweep_temp_files
from ..io.checkpoint import check_writable
from .monitor import Monitor, available_monitors

__all__ = ["ModelCheckpoint", "safe_name", "path_argument"]


def path_argument(path: Any, who: str, what: str) -> str:
    """``path`` as a string, checked: a ``str`` or ``os.PathLike``, not empty (files would land in the working
    directory). ``who`` and ``what`` name the callback and the kind of path in the error.

    >>> from lanterna.callbacks.model_checkpoint import path_argument
    >>> path_argument("checkpoints/", "ModelCheckpoint", "a folder path")
    'checkpoints/'
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise LanternaError(f"{who}(path={path!r}): give {what} (str or pathlib.Path).")
    text = os.fspath(path)
    if not text.strip():
        raise LanternaError(
            f"{who}(path={text!r}): the path is empty, so the files would land in the working directory. Give "
            f"{what}, e.g. 'checkpoints/'."
        )
    return text


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(value: str) -> str:
    """``value`` made safe as a part of a file name: every character but ``A-Z a-z 0-9 . _ -`` becomes ``_``
    (path separators included), and a leading ``.`` too (no ``..`` component, no hidden file).

    Args:
        value: a monitor name or a template field's formatted value.

    >>> from lanterna.callbacks.model_checkpoint import safe_name
    >>> safe_name("train_../../../x"), safe_name(".."), safe_name("valid_loss")
    ('train_.._.._.._x', '_.', 'valid_loss')
    """
    text = _UNSAFE.sub("_", value)
    return "_" + text[1:] if text.startswith(".") else text


class _SafeFormatter(string.Formatter):
    """``str.format`` whose fields' values pass through :func:`safe_name`; the template's own text is kept."""

    def format_field(self, value: Any, format_spec: str) -> str:
        return safe_name(super().format_field(value, format_spec))


class _AnyField(dict):  # type: ignore[type-arg]
    """Template fields for a check before training when the names are not known yet (a custom step)."""

    def __missing__(self, key: str) -> float:
        return 0.0


class _DefaultMonitor(str):
    """The default ``monitor``, told apart from the same name given explicitly."""


_DEFAULT_MONITOR = _DefaultMonitor("valid_loss")


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


# ---------------------------------------------------------------------------- ModelCheckpoint


class ModelCheckpoint(Callback):
    """Save a checkpoint after each epoch, or only when ``monitor`` improves (order 1100: after every other
    callback but AutoResume, so the file holds the epoch's final state).

    ``path`` is a folder (``"checkpoints/"``: one file per saved epoch, named like luz's
    ``epoch-03-valid_loss-1.234.pt``), a file-name template (``"ckpt/epoch-{epoch:02d}.pt"``; fields:
    ``epoch``, ``step``, ``monitor`` (its value) and any history key such as ``valid_loss``), or a plain file
    name (``"best.pt"``, overwritten at each save). With ``save_best_only`` the first epoch is saved, then
    each epoch that improves on the best by more than ``min_delta``.

    File names never leave the folder: the monitor name and the template fields' values keep only
    ``A-Z a-z 0-9 . _ -`` (the rest becomes ``_``, see :func:`safe_name`), and a file that would resolve
    outside the folder is an error. Write ``{{`` and ``}}`` for literal braces in a template. Without
    validation data a ``valid_*`` monitor that only names the files (or the default monitor) falls back to
    ``train_*``, with a warning; a ``valid_*`` monitor given for ``save_best_only`` is an error.

    Each file is written atomically and loads with ``torch.load(path, weights_only=True)``: its ``"model"``
    entry is the state_dict (``model.load_state_dict(ckpt["model"])``); it also holds what a resume needs.
    ``.best_path`` / ``.last_path`` / ``.saved`` tell which files were written. Only the main process writes.

    Args:
        path: folder, template or file name.
        monitor: the history key deciding "best" (``"valid_loss"``, ``"train_loss"``, ``"valid_acc"`` ...).
        save_best_only: save only the first epoch and the improving ones.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (maximise accuracy/AUROC-like metrics, minimise the rest).
        min_delta: the smallest change that counts as an improvement.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> cb = ln.callbacks.ModelCheckpoint("checkpoints/", save_best_only=True)
    >>> fitted = setup.fit((x, y), epochs=3, valid_data=0.25, verbose=False, callbacks=[cb])
    >>> ckpt = torch.load(cb.best_path, weights_only=True)  # e.g. checkpoints/epoch-03-valid_loss-1.234.pt
    >>> sorted(ckpt["model"]), ckpt["epoch"] == min(fitted.history, key=lambda h: h["valid_loss"])["epoch"]
    (['bias', 'weight'], True)
    """

    order = 1100
    runs_last = True

    def __init__(
        self,
        path: str | os.PathLike[str] = "checkpoints/",
        monitor: str = _DEFAULT_MONITOR,
        save_best_only: bool = False,
        mode: str = "auto",
        min_delta: float = 0,
    ) -> None:
        self.path = path_argument(path, "ModelCheckpoint", "a folder, a file name or a template")
        try:
            parts = list(string.Formatter().parse(self.path))
        except ValueError as e:
            raise LanternaError(f"ModelCheckpoint(path={self.path!r}) is not a valid template: {e}. Write {{{{ and "
                                "}} for literal braces.") from None
        self._template = any(field is not None for _, field, _, _ in parts)
        self._plain = self.path if self._template else "".join(text for text, _, _, _ in parts)  # braces unescaped
        prefix = ""
        for text, field, _, _ in parts:
            prefix += text
            if field is not None:
                break
        self._prefix = prefix  # a template's literal text before its first field: the folder the user named
        self._requested = (monitor, mode, monitor is _DEFAULT_MONITOR)
        self.monitor = Monitor(str(monitor), mode, min_delta)
        self.save_best_only = bool(save_best_only)
        self.best_path: Path | None = None
        self.last_path: Path | None = None
        self.saved: list[Path] = []

    @property
    def mode(self) -> str:
        return self.monitor.mode

    def __repr__(self) -> str:
        return (f"ModelCheckpoint({self.path!r}, monitor={self.monitor.name!r}, save_best_only={self.save_best_only},"
                f" mode={self.mode!r}, min_delta={self.monitor.min_delta})")

    def _layout(self) -> tuple[str, Path]:
        """``("template"|"folder"|"file", folder)``."""
        if self._template:
            prefix = self._prefix
            return "template", Path(prefix) if prefix.endswith(("/", os.sep)) else Path(prefix).parent
        p = self._plain
        if p.endswith(("/", os.sep)) or Path(p).is_dir() or not Path(p).suffix:
            return "folder", Path(p)
        return "file", Path(p).parent

    def _fill(self, fields: dict[str, Any], folder: Path) -> Path:
        """The template filled with safe field values; an error if the file would lie outside ``folder``."""
        path = Path(_SafeFormatter().vformat(self.path, (), fields))
        base, target = folder.resolve(), path.resolve()
        if base not in target.parents or TEMP_MARKER in path.name:
            raise CheckpointError(
                f"ModelCheckpoint: the template {self.path!r} gives the file {str(path)!r}, which lies outside the "
                f"folder {str(folder)!r} that the template names (or is that folder). Keep '..' out of the part "
                "after the first field."
            )
        return path

    def _inside(self, saved: str | None, outside: list[str]) -> Path | None:
        if not saved:
            return None
        folder = self._layout()[1].resolve()
        if folder in Path(saved).resolve().parents:
            return Path(saved)
        outside.append(saved)
        return None

    def _fields(self, ctx: Context, value: float) -> dict[str, Any]:
        rec = ctx.history[-1] if ctx.history else {}
        return {**{k: v for k, v in rec.items() if isinstance(k, str)}, "epoch": ctx.epoch, "step": ctx.step,
                "monitor": value}

    def file_for(self, ctx: Context, value: float) -> Path:
        """The file this epoch is saved to."""
        kind, folder = self._layout()
        if kind == "folder":
            shown = "nan" if math.isnan(value) else f"{value:.3f}"
            return folder / f"epoch-{ctx.epoch:02d}-{safe_name(self.monitor.name)}-{shown}.pt"
        if kind == "file":
            return Path(self._plain)
        try:
            return self._fill(self._fields(ctx, value), folder)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise MonitorError(f"ModelCheckpoint path template {self.path!r} cannot be filled: {e!r}. Fields: "
                               f"{', '.join(sorted(self._fields(ctx, value)))}.") from None

    def _choose_monitor(self, ctx: Context) -> None:
        """Without validation data, a valid_* monitor that only names the files (or the default one) falls
        back to the training set's, as ReduceLROnPlateau does."""
        name, mode, default = self._requested
        name = str(name)
        if ctx.valid_data is None and name.startswith("valid_") and (default or not self.save_best_only):
            known = available_monitors(ctx)
            train = next((n for n in ("train_" + name[len("valid_"):], "train_loss") if n in known), None)
            if train is not None:
                role = "chooses the best epoch" if self.save_best_only else "only names the files"
                warnings.warn(
                    f"ModelCheckpoint: no validation data, so the monitor {name!r} is replaced by {train!r} (it "
                    f"{role}). Pass valid_data to fit, or monitor={train!r} to say so.", stacklevel=2)
                name = train
        if name != self.monitor.name:
            self.monitor = Monitor(name, mode, self.monitor.min_delta)

    def on_fit_begin(self, ctx: Context) -> None:
        self._choose_monitor(ctx)
        self.monitor.check_known(ctx)
        kind, folder = self._layout()
        if kind == "template":
            dummy = {**{k: 0.0 for k in available_monitors(ctx)}, "epoch": 1, "step": 1, "monitor": 0.0}
            try:
                self._fill(_AnyField(dummy) if ctx.custom_step else dummy, folder)
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise MonitorError(
                    f"ModelCheckpoint path template {self.path!r} uses {e!r}, which is not available. Fields: "
                    f"{', '.join(sorted(dummy))}. (Write {{{{ and }}}} for literal braces.)"
                ) from None
        # a fresh start; a resume (AutoResume runs after every other callback) then loads the saved state
        self.monitor.best, self.best_path, self.last_path, self.saved = None, None, None, []
        if ctx.is_main:
            check_writable(folder if str(folder) else Path("."), "ModelCheckpoint")
            sweep_temp_files(folder if str(folder) else Path("."))  # leftovers of a killed save

    def on_epoch_end(self, ctx: Context) -> None:
        value = self.monitor.value(ctx)
        improved = self.monitor.improves(value)
        if self.save_best_only and not improved:
            return
        path = self.file_for(ctx, value)
        if improved:
            self.best_path = path
        self.last_path = path
        if path not in self.saved:
            self.saved.append(path)
        write_checkpoint(ctx, path)  # rank 0's file; under FSDP every rank writes its shards

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.monitor.best, "best_path": None if self.best_path is None else str(self.best_path),
                "last_path": None if self.last_path is None else str(self.last_path),
                "saved": [str(p) for p in self.saved]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.best = state.get("best")
        outside: list[str] = []  # a path read from a file never points outside this callback's folder
        self.best_path = self._inside(state.get("best_path"), outside)
        self.last_path = self._inside(state.get("last_path"), outside)
        self.saved = [p for p in (self._inside(s, outside) for s in state.get("saved") or []) if p is not None]
        if outside:
            warnings.warn(f"ModelCheckpoint: the restored state names files outside {str(self._layout()[1])!r} "
                          f"({_few(sorted(set(outside)))}); they are ignored.", stacklevel=2)

