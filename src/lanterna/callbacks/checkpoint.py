"""Checkpoints: :class:`ModelCheckpoint` (luz's ``luz_callback_model_checkpoint``) and :class:`AutoResume`
(continue a killed fit exactly where it stopped, and handle SIGTERM preemption).

Both write the one checkpoint format of :mod:`lanterna.io.checkpoint`: a file that loads with
``torch.load(path, weights_only=True)`` into a dict whose ``"model"`` entry is the model's ``state_dict()``,
with the optimizers, schedulers, grad scaler, epoch, global step, every RNG state (and the DataLoader /
sampler generators), the callbacks' state, the history, a format version and a content checksum.

Orders at epoch end: ... ``EarlyStopping`` (1000) → ``ModelCheckpoint`` (1100) → ``AutoResume`` (1200): a
checkpoint sees the epoch's final state (scheduler step, early-stopping counters included).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
import string
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from ..core.callback import Callback
from ..core.context import Context
from ..data.sources import BatchSource, TensorBatches
from ..errors import CheckpointError, LanternaError, ModelMismatchError, MonitorError
from ..io.artifact import encode_json, import_path, load_weights_strict
from ..io.atomic import TEMP_MARKER, explain_write_error, fsync_dir, sweep_temp_files
from ..io.checkpoint import save_checkpoint, scan_checkpoints, verify_checkpoint
from ..io.rng import capture_rng_state, restore_rng_state
from .monitor import Monitor, available_monitors

__all__ = ["ModelCheckpoint", "AutoResume", "training_state", "restore_training_state", "data_generators",
           "safe_name"]

_END = object()
PREEMPTION_EXIT_CODE = 143  # 128 + SIGTERM: what schedulers (SLURM, Kubernetes) read as "terminated, requeue"


# ---------------------------------------------------------------------------- state of a fit


def data_generators(ctx: Context) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects the data sources draw from (a DataLoader's ``generator``, a sampler's
    ``generator``, the fast path's loader/sampler generators), by a stable name. The global generators are
    captured separately."""
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()

    def walk(obj: Any, name: str, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, _ResumedEpoch):  # the same names inside a resumed epoch as outside
            walk(obj.source, name, depth)
            return
        if isinstance(obj, torch.Generator):
            if not any(g is obj for g in found.values()):
                found[name] = obj
            return
        if not isinstance(obj, (BatchSource, DataLoader, Sampler)):
            return
        for attr, value in sorted(vars(obj).items()):
            if isinstance(value, (torch.Generator, BatchSource, DataLoader, Sampler)):
                walk(value, f"{name}.{attr}", depth + 1)

    walk(getattr(ctx, "train_data", None), "train", 0)
    walk(getattr(ctx, "valid_data", None), "valid", 0)
    return found


def _callback_key(cb: Callback, counts: dict[str, int]) -> str:
    name = type(cb).__qualname__
    counts[name] = counts.get(name, 0) + 1
    return name if counts[name] == 1 else f"{name}#{counts[name]}"


def _callbacks(ctx: Context) -> list[tuple[str, Callback]]:
    hooks = getattr(ctx, "hooks", None)
    counts: dict[str, int] = {}
    return [(_callback_key(cb, counts), cb) for cb in (hooks.callbacks if hooks is not None else [])]


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _param_shapes(opt: torch.optim.Optimizer) -> list[list[list[int]]]:
    return [[list(p.shape) for p in g["params"]] for g in opt.param_groups]


def _module_meta(ctx: Context) -> dict[str, Any]:
    setup = getattr(ctx, "setup", None)
    meta: dict[str, Any] = {"module": import_path(type(ctx.model)) if ctx.model is not None else None,
                            "optimizers": {name: _class_name(opt) for name, opt in ctx.optimizers.items()},
                            "param_shapes": {name: _param_shapes(opt) for name, opt in ctx.optimizers.items()},
                            "schedulers": [_class_name(s) for s in getattr(ctx, "schedulers", None) or []]}
    for key in ("hparams", "opt_hparams"):
        try:
            meta[key] = encode_json(dict(getattr(setup, key, {}) or {}), key)
        except ValueError:
            meta[key] = None
    return meta


def training_state(ctx: Context, **extra: Any) -> dict[str, Any]:
    """Everything a resume needs, from ``ctx``: model, optimizers, schedulers, scaler, epoch, step, RNG
    states, callback states, history. Draws nothing from any random generator.

    >>> # inside a callback:  save_checkpoint("ckpt.pt", training_state(ctx))
    """
    scaler = getattr(ctx, "scaler", None)
    states: dict[str, Any] = {}
    for key, cb in _callbacks(ctx):
        sd = cb.state_dict()
        if sd:
            states[key] = sd
    return {
        "model": ctx.model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in ctx.optimizers.items()},
        "schedulers": [s.state_dict() for s in (getattr(ctx, "schedulers", None) or [])],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(ctx.epoch),
        "step": int(ctx.step),
        "stop_training": bool(ctx.stop_training),
        "history": [dict(r) for r in ctx.history],
        "rng": capture_rng_state(data_generators(ctx)),
        "callbacks": states,
        "meta": _module_meta(ctx),
        "versions": {"lanterna": _lanterna_version(), "torch": torch.__version__},
        **extra,
    }


def _lanterna_version() -> str:
    from .. import __version__

    return __version__


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _model_differences(model: torch.nn.Module, saved: Any) -> list[str]:
    expected = model.state_dict()
    saved = saved if isinstance(saved, dict) else {}
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k}: saved {tuple(saved[k].shape)}, this model {tuple(expected[k].shape)}" for k in expected
              if isinstance(saved.get(k), torch.Tensor) and tuple(saved[k].shape) != tuple(expected[k].shape)]
    out = []
    if missing:
        out.append(f"missing in the checkpoint: {_few(missing)}")
    if unexpected:
        out.append(f"not in this model: {_few(unexpected)}")
    if shapes:
        out.append(f"different shapes: {_few(shapes)}")
    return out


def _group_sizes(groups: Any) -> list[int]:
    return [len(g.get("params") or []) for g in groups or []]


def _optimizer_differences(ctx: Context, state: dict[str, Any]) -> list[str]:
    saved_opts = state.get("optimizers") or {}
    if set(saved_opts) != set(ctx.optimizers):
        return [f"optimizers: saved {sorted(saved_opts)}, this fit {sorted(ctx.optimizers)}"]
    classes = (state.get("meta") or {}).get("optimizers") or {}
    shapes = (state.get("meta") or {}).get("param_shapes") or {}
    out = []
    for name, opt in ctx.optimizers.items():
        saved_groups = (saved_opts[name] or {}).get("param_groups") or []
        live = _class_name(opt)
        if name in classes and classes[name] != live:
            out.append(f"optimizer {name!r}: saved {classes[name]}, this fit {live}")
            continue
        if name not in classes:  # a checkpoint without the class: its hyperparameter names tell another class
            saved_keys = set().union(*(g.keys() for g in saved_groups)) - {"params"}
            live_keys = set().union(*(g.keys() for g in opt.param_groups)) - {"params"}
            if saved_keys - live_keys and live_keys - saved_keys:
                out.append(f"optimizer {name!r}: other hyperparameters (saved {sorted(saved_keys - live_keys)}, "
                           f"this fit {sorted(live_keys - saved_keys)}): another optimizer class")
                continue
        saved_sizes, live_sizes = _group_sizes(saved_groups), _group_sizes(opt.param_groups)
        if saved_sizes != live_sizes:
            out.append(f"optimizer {name!r} param groups: saved {len(saved_sizes)} "
                       f"({', '.join(map(str, saved_sizes))} parameters), this fit {len(live_sizes)} "
                       f"({', '.join(map(str, live_sizes))} parameters)")
        elif name in shapes and [list(map(list, g)) for g in shapes[name]] != _param_shapes(opt):
            at = next((i, j) for i, (a, b) in enumerate(zip(shapes[name], _param_shapes(opt)))
                      for j, (x, y) in enumerate(zip(a, b)) if list(x) != y)
            out.append(f"optimizer {name!r} parameters in another order or of other shapes (group {at[0]}, "
                       f"parameter {at[1]}: saved {tuple(shapes[name][at[0]][at[1]])}, this fit "
                       f"{tuple(opt.param_groups[at[0]]['params'][at[1]].shape)})")
    return out


def _scheduler_differences(ctx: Context, state: dict[str, Any]) -> list[str]:
    live = [_class_name(s) for s in getattr(ctx, "schedulers", None) or []]
    saved_states = state.get("schedulers") or []
    saved = (state.get("meta") or {}).get("schedulers")
    if len(saved_states) == len(live) and (saved is None or list(saved) == live):
        return []

    def shown(names: list[str] | None, n: int) -> str:
        if names is None:
            return f"{n} scheduler{'s' * (n != 1)}"
        return ", ".join(x.rsplit(".", 1)[-1] for x in names) or "none"

    return [f"schedulers: saved {shown(saved, len(saved_states))}, this fit {shown(live, len(live))}"]


def restore_training_state(ctx: Context, state: dict[str, Any], *, where: str = "checkpoint",
                           rng: bool = True, folder: str | os.PathLike[str] | None = None) -> None:
    """Load a checkpoint's state into ``ctx`` (model, optimizers, schedulers, scaler, step, history, callback
    states and, with ``rng``, the RNG states).

    Everything is checked before anything is loaded, so a refused checkpoint changes nothing: another model
    (missing, unexpected or differently shaped entries) is a :class:`ModelMismatchError`; another optimizer
    class, other param groups or other schedulers a :class:`CheckpointError`, each saying what differs.

    Args:
        ctx: the fit's context.
        state: a checkpoint dict (:func:`lanterna.io.load_checkpoint`).
        where: the checkpoint's name, for messages.
        rng: restore the RNG states too.
        folder: the resume folder, named in the messages as the one to remove to start afresh.

    >>> # inside a callback's on_fit_begin:  restore_training_state(ctx, load_checkpoint("ckpt.pt"))
    """
    fix = ("Resume with the same setup, or delete it to start afresh"
           + (f" (AutoResume: remove the folder {os.fspath(folder)!r})" if folder is not None else "")
           + ". Nothing was loaded.")
    model_diff = _model_differences(ctx.model, state.get("model"))
    if model_diff:
        raise ModelMismatchError(f"The checkpoint {where} does not fit {type(ctx.model).__name__}: "
                                 f"{'; '.join(model_diff)}. {fix}")
    setup_diff = _optimizer_differences(ctx, state) + _scheduler_differences(ctx, state)
    if setup_diff:
        raise CheckpointError(f"The checkpoint {where} was written by another setup: {'; '.join(setup_diff)}. {fix}")
    try:
        load_weights_strict(ctx.model, state["model"], where=f"checkpoint {where}")
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{e} (The checkpoint is {where}; delete it to start afresh.)") from None
    saved_opts = state.get("optimizers") or {}
    for name, opt in ctx.optimizers.items():
        try:
            opt.load_state_dict(saved_opts[name])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"The optimizer {name!r} state in {where} does not fit this fit's optimizer ({e}). Resume with the "
                "same optimizer and parameters, or delete the checkpoint to start afresh."
            ) from None
    schedulers = getattr(ctx, "schedulers", None) or []
    for sched, sd in zip(schedulers, state.get("schedulers") or []):
        sched.load_state_dict(sd)
    scaler = getattr(ctx, "scaler", None)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    ctx.step = int(state.get("step", 0))
    ctx.history[:] = [dict(r) for r in state.get("history") or []]
    saved_cbs = state.get("callbacks") or {}
    for key, cb in _callbacks(ctx):
        if key in saved_cbs:
            cb.load_state_dict(saved_cbs[key])
    if rng and state.get("rng") is not None:
        restore_rng_state(state["rng"], data_generators(ctx))


def _data_fingerprint(ctx: Context) -> dict[str, Any]:
    """A cheap summary of the training/validation data (sizes, sums or subset indices), to tell a resumed
    run that its data differs from the one that wrote the checkpoint (e.g. an unseeded valid_data split)."""
    out: dict[str, Any] = {}
    for name in ("train", "valid"):
        src = getattr(ctx, f"{name}_data", None)
        if src is None:
            continue
        n = getattr(getattr(src, "sampler", None), "n", src.num_samples)  # a DDP shard counts its whole set
        h = hashlib.sha256(f"{type(src).__name__}|{n}".encode())
        inner = getattr(src, "source", src)
        if isinstance(inner, TensorBatches):
            with torch.no_grad():
                sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in inner.leaves]).cpu()
            h.update(sums.numpy().tobytes())
        else:
            dataset = getattr(getattr(inner, "loader", None), "dataset", None)
            if isinstance(dataset, Subset):
                h.update(torch.as_tensor(list(dataset.indices), dtype=torch.int64).numpy().tobytes())
        out[name] = h.hexdigest()[:16]
    return out


# ---------------------------------------------------------------------------- writing helpers


def _check_writable(folder: Path, who: str) -> None:
    """Create ``folder`` and prove a file can be written there, before training starts."""
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            f"{who}: {str(folder)!r} is an existing file, not a folder. Give a folder path, or remove or rename "
            "the file (checked before training, so no epoch is lost)."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{TEMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(
            f"{who} cannot write to {str(folder)!r}: {explain_write_error(e)} (checked before training, so no "
            "epoch is lost)."
        ) from e


def _path_arg(path: Any, who: str, what: str) -> str:
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


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _is_main(ctx: Context) -> bool:
    return bool(getattr(ctx, "is_main", True))


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

    >>> import lanterna as ln
    >>> cb = ln.callbacks.ModelCheckpoint("checkpoints/", save_best_only=True)
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
        self.path = _path_arg(path, "ModelCheckpoint", "a folder, a file name or a template")
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
                self._fill(_AnyField(dummy) if getattr(ctx, "custom_step", False) else dummy, folder)
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise MonitorError(
                    f"ModelCheckpoint path template {self.path!r} uses {e!r}, which is not available. Fields: "
                    f"{', '.join(sorted(dummy))}. (Write {{{{ and }}}} for literal braces.)"
                ) from None
        if getattr(ctx, "start_epoch", 0) == 0:
            self.monitor.best, self.best_path, self.last_path, self.saved = None, None, None, []
        if _is_main(ctx):
            _check_writable(folder if str(folder) else Path("."), "ModelCheckpoint")
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
        if _is_main(ctx):
            save_checkpoint(path, training_state(ctx))

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


# ---------------------------------------------------------------------------- AutoResume


class _ResumedEpoch(BatchSource):
    """The rest of an epoch interrupted after ``done`` training batches: the wrapped source is iterated
    from the start (drawing the epoch's shuffle exactly as before), the first ``done`` batches are
    dropped, then the RNG states of the moment of the interruption are put back."""

    def __init__(self, source: BatchSource, done: int, rng: dict[str, Any],
                 generators: dict[str, torch.Generator]) -> None:
        self.source, self.done, self.rng, self.generators = source, done, rng, generators
        self.num_samples = source.num_samples

    def num_batches(self) -> int | None:
        n = self.source.num_batches()
        return None if n is None else n - self.done

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def to_device(self, device: torch.device) -> BatchSource:
        self.source.to_device(device)
        return self

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.source)
        for i in range(self.done):
            if next(it, _END) is _END:
                raise CheckpointError(
                    f"The checkpoint was taken after batch {self.done} of an epoch, but the training data now has "
                    f"only {i} batches per epoch. Resume with the same data, or delete the resume folder."
                )
        restore_rng_state(self.rng, self.generators)
        yield from it


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

    >>> import lanterna as ln
    >>> cb = ln.callbacks.AutoResume("runs/exp1/resume")
    """

    order = 1200
    runs_last = True

    def __init__(self, path: str | os.PathLike[str] = "checkpoints/resume/", keep_last: int = 2,
                 handle_sigterm: bool = True) -> None:
        path = _path_arg(path, "AutoResume", "a folder path")
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
        self._wrapped: _ResumedEpoch | None = None
        self._fingerprint: dict[str, Any] = {}
        self._done_before = 0

    def __repr__(self) -> str:
        return f"AutoResume({str(self.path)!r}, keep_last={self.keep_last})"

    # ------------------------------------------------------------------ start
    def on_fit_begin(self, ctx: Context) -> None:
        self._sigterm = self.preempted = False
        self.resumed_from, self._pending, self._wrapped, self._kept = None, None, None, []
        main = _is_main(ctx)
        if main:
            _check_writable(self.path, "AutoResume")
            sweep_temp_files(self.path)
        self._fingerprint = _data_fingerprint(ctx)
        found = self._latest(rename_damaged=main)
        if found is not None:
            path, state = found
            self._resume(ctx, path, state)
        if self.handle_sigterm:
            self._install_sigterm()

    def _latest(self, rename_damaged: bool) -> tuple[Path, dict[str, Any]] | None:
        damaged: list[tuple[Path, str]] = []
        candidates = scan_checkpoints(self.path, on_damaged=lambda p, e: damaged.append((p, str(e))),
                                      pattern="resume-*.pt")
        chosen: tuple[Path, dict[str, Any]] | None = None
        for info in candidates:
            if chosen is None:
                try:
                    verify_checkpoint(info.state, info.path)
                except CheckpointError as e:
                    damaged.append((info.path, str(e)))
                    continue
                chosen = (info.path, info.state)
            self._kept.append((info.step, info.epoch, info.path))
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
        if ctx.verbose and _is_main(ctx):
            where = (f"epoch {position['epoch']}, after batch {position['batch']}" if position
                     else f"the end of epoch {epoch}")
            print(f"Resuming from {path} ({where}).", flush=True)

    # ------------------------------------------------------------------ mid-epoch state
    def on_epoch_begin(self, ctx: Context) -> None:
        if self._pending is not None:  # before run_phase picks the source: the rest of the interrupted epoch
            done = int(self._pending["position"]["batch"])
            self._wrapped = _ResumedEpoch(ctx.train_data, done, self._pending["rng"], data_generators(ctx))
            ctx.train_data = self._wrapped

    def on_train_begin(self, ctx: Context) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            # Put back what the interrupted run had at this point: callbacks' on_epoch_begin/on_train_begin
            # have run again, so their effects are overwritten by the saved state.
            restore_training_state(ctx, pending, where=str(self.resumed_from), rng=False, folder=self.path)
            ctx.record.clear()
            ctx.record.update(pending.get("record") or {})
            ctx._logs = {k: [_to(v[0], ctx.device), v[1]] for k, v in (pending.get("logs") or {}).items()}
            phases = pending.get("phase_states") or {}
            for key, cb in _callbacks(ctx):
                if key in phases and callable(getattr(cb, "load_phase_state_dict", None)):
                    cb.load_phase_state_dict(phases[key])
            restore_rng_state(pending["epoch_rng"], data_generators(ctx))
            self._epoch_rng, self._done_before = pending["epoch_rng"], int(pending["position"]["batch"])
            return
        self._done_before = 0
        if self.handle_sigterm:
            self._epoch_rng = capture_rng_state(data_generators(ctx))

    def on_train_batch_end(self, ctx: Context) -> None:
        if not self._sigterm or getattr(ctx, "dist", None) is not None:
            return
        n = ctx.num_batches
        if ctx.accumulating or n is None or ctx.iter >= n or self._epoch_rng is None:
            return  # finish the gradient-accumulation group, or the epoch (its last batch, unknown length)
        done = self._done_before + ctx.iter
        extra = {
            "epoch": ctx.epoch - 1,
            "position": {"epoch": ctx.epoch, "batch": done},
            "epoch_rng": self._epoch_rng,
            "record": dict(ctx.record),
            "logs": {k: list(v) for k, v in getattr(ctx, "_logs", {}).items()},
            "phase_states": {key: cb.phase_state_dict() for key, cb in _callbacks(ctx)
                             if callable(getattr(cb, "phase_state_dict", None))},
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
        if getattr(ctx, "dist", None) is not None and self.handle_sigterm:
            stop = ctx.dist.any(stop)  # a collective: every rank calls it every epoch
        if stop:
            self._exit(f"the end of epoch {ctx.epoch}", path)

    def _save(self, ctx: Context, name: str, extra: dict[str, Any]) -> Path | None:
        if not _is_main(ctx):
            return None
        path = self.path / name
        state = training_state(ctx, data=self._fingerprint, **extra)
        save_checkpoint(path, state)
        self._kept = [k for k in self._kept if k[2] != path] + [(int(state["step"]), int(state["epoch"]), path)]
        self._rotate()
        return path

    def _rotate(self) -> None:
        self._kept.sort(key=lambda k: (k[0], k[1]))
        old, self._kept = self._kept[: -self.keep_last], self._kept[-self.keep_last :]
        for _, _, p in old:  # the newest file is complete and durable before any older one goes
            with contextlib.suppress(OSError):
                p.unlink()
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
        if ctx.status in ("completed", "stopped_early") and not self.preempted and _is_main(ctx):
            self.clear()

    def clear(self) -> None:
        """Remove this folder's checkpoints (and leftovers of killed writes); the folder too when empty."""
        folder = self.path
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            name = entry.name
            ours = (name.startswith("resume-") and name.endswith((".pt", ".pt.damaged"))) or TEMP_MARKER in name
            if ours and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        fsync_dir(folder)
        with contextlib.suppress(OSError):
            folder.rmdir()
        self._kept = []
