"""The state of a fit, in one place: :func:`training_state` gathers it from ``ctx`` into a checkpoint dict,
:func:`restore_training_state` checks a checkpoint dict against ``ctx`` and loads it.

The state is a registry of named parts (:data:`PARTS`): each has a name (its key in the checkpoint dict,
the format of :mod:`lanterna.io.checkpoint`), how to save it, how to check a saved one against this fit
(a list of differences, empty when it fits) and how to load it. Every check runs before any load, so a
refused checkpoint changes nothing. The parts of a phase under way (:data:`PHASE_PARTS`: the epoch's
record, the ``ctx.log`` sums, the callbacks' phase state) are what a mid-epoch checkpoint adds.

>>> from lanterna.core.state import PARTS
>>> [part.name for part in PARTS][:4]
['model', 'optimizers', 'schedulers', 'scaler']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..data.resume import source_generators
from ..errors import CheckpointError, ModelMismatchError
from ..io.checkpoint import save_checkpoint
from ..io.encoding import encode_json
from ..io.model_meta import describe_module
from ..io.resolve import load_weights_strict
from ..io.rng import capture_rng_state, restore_rng_state
from .callback import Callback
from .context import Context

__all__ = ["Part", "PARTS", "PHASE_PARTS", "training_state", "restore_training_state", "phase_state",
           "restore_phase_state", "data_generators", "keyed_callbacks", "write_checkpoint"]


@dataclass(frozen=True)
class Part:
    """One named part of a fit's state.

    Args:
        name: its key in the checkpoint dict.
        save: ``ctx -> value`` (draws from no random generator).
        check: ``(ctx, state) -> differences`` (empty when the saved part fits this fit), or None.
        load: ``(ctx, value, where) -> None`` (``value`` is ``state.get(name)``), or None for parts only
            read by whoever resumes (the epoch, the metadata).

    >>> from lanterna.core.state import Part
    >>> Part("step", save=lambda ctx: ctx.step).name
    'step'
    """

    name: str
    save: Callable[[Context], Any]
    check: Callable[[Context, dict[str, Any]], list[str]] | None = None
    load: Callable[[Context, Any, str], None] | None = None


# ---------------------------------------------------------------------------- helpers


def data_generators(ctx: Context) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects the fit's data sources draw from, by a stable name
    (:func:`lanterna.data.resume.source_generators` of ``train_data`` and ``valid_data``).

    >>> # the generators AutoResume restores at a mid-epoch resume:  restore_rng_state(rng, data_generators(ctx))
    """
    return source_generators({"train": ctx.train_data, "valid": ctx.valid_data})


def keyed_callbacks(ctx: Context) -> list[tuple[str, Callback]]:
    """The fit's callbacks with the keys their state is stored under: the class name, ``Name#2`` for the
    second of a class.

    >>> # {key: cb.state_dict() for key, cb in keyed_callbacks(ctx)}
    """
    hooks = ctx.hooks
    counts: dict[str, int] = {}
    out = []
    for cb in hooks.callbacks if hooks is not None else []:
        name = type(cb).__qualname__
        counts[name] = counts.get(name, 0) + 1
        out.append((name if counts[name] == 1 else f"{name}#{counts[name]}", cb))
    return out


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _param_shapes(opt: torch.optim.Optimizer) -> list[list[list[int]]]:
    return [[list(p.shape) for p in g["params"]] for g in opt.param_groups]


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _meta(ctx: Context) -> dict[str, Any]:
    """The module's description (:func:`lanterna.io.model_meta.describe_module`, hparams JSON-encoded, None
    when they cannot be stored) and what the setup checks of a resume compare."""
    meta = describe_module(ctx.setup, ctx.model)
    for key in ("hparams", "opt_hparams"):
        try:
            meta[key] = encode_json(meta[key], key)
        except ValueError:
            meta[key] = None
    meta["optimizers"] = {name: _class_name(opt) for name, opt in ctx.optimizers.items()}
    meta["param_shapes"] = {name: _param_shapes(opt) for name, opt in ctx.optimizers.items()}
    meta["schedulers"] = [_class_name(s) for s in ctx.schedulers or []]
    return meta


def _versions(ctx: Context) -> dict[str, str]:
    return {"lanterna": __version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------- checks


def _model_differences(ctx: Context, state: dict[str, Any]) -> list[str]:
    expected = ctx.model.state_dict()
    saved: Any = state.get("model") if isinstance(state.get("model"), dict) else {}
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
    live = [_class_name(s) for s in ctx.schedulers or []]
    saved_states = state.get("schedulers") or []
    saved = (state.get("meta") or {}).get("schedulers")
    if len(saved_states) == len(live) and (saved is None or list(saved) == live):
        return []

    def shown(names: list[str] | None, n: int) -> str:
        if names is None:
            return f"{n} scheduler{'s' * (n != 1)}"
        return ", ".join(x.rsplit(".", 1)[-1] for x in names) or "none"

    return [f"schedulers: saved {shown(saved, len(saved_states))}, this fit {shown(live, len(live))}"]


# ---------------------------------------------------------------------------- loads


def _load_model(ctx: Context, saved: Any, where: str) -> None:
    try:
        load_weights_strict(ctx.model, saved, where=f"checkpoint {where}")
    except ModelMismatchError as e:
        raise ModelMismatchError(f"{e} (The checkpoint is {where}; delete it to start afresh.)") from None


def _load_optimizers(ctx: Context, saved: Any, where: str) -> None:
    for name, opt in ctx.optimizers.items():
        try:
            opt.load_state_dict((saved or {})[name])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"The optimizer {name!r} state in {where} does not fit this fit's optimizer ({e}). Resume with the "
                "same optimizer and parameters, or delete the checkpoint to start afresh."
            ) from None


def _load_schedulers(ctx: Context, saved: Any, where: str) -> None:
    for sched, sd in zip(ctx.schedulers or [], saved or []):
        sched.load_state_dict(sd)


def _load_scaler(ctx: Context, saved: Any, where: str) -> None:
    if ctx.scaler is not None and saved is not None:
        ctx.scaler.load_state_dict(saved)


def _load_step(ctx: Context, saved: Any, where: str) -> None:
    ctx.step = int(saved or 0)


def _load_history(ctx: Context, saved: Any, where: str) -> None:
    ctx.history[:] = [dict(r) for r in saved or []]


def _load_rng(ctx: Context, saved: Any, where: str) -> None:
    if saved is not None:
        restore_rng_state(saved, data_generators(ctx))


def _save_callbacks(ctx: Context) -> dict[str, Any]:
    return {key: sd for key, cb in keyed_callbacks(ctx) if (sd := cb.state_dict())}


def _load_callbacks(ctx: Context, saved: Any, where: str) -> None:
    for key, cb in keyed_callbacks(ctx):
        if key in (saved or {}):
            cb.load_state_dict(saved[key])


PARTS: tuple[Part, ...] = (
    Part("model", lambda ctx: ctx.model.state_dict(), _model_differences, _load_model),
    Part("optimizers", lambda ctx: {n: opt.state_dict() for n, opt in ctx.optimizers.items()},
         _optimizer_differences, _load_optimizers),
    Part("schedulers", lambda ctx: [s.state_dict() for s in ctx.schedulers or []], _scheduler_differences,
         _load_schedulers),
    Part("scaler", lambda ctx: ctx.scaler.state_dict() if ctx.scaler is not None else None, load=_load_scaler),
    Part("epoch", lambda ctx: int(ctx.epoch)),  # the resume continues after it (AutoResume sets start_epoch)
    Part("step", lambda ctx: int(ctx.step), load=_load_step),
    Part("stop_training", lambda ctx: bool(ctx.stop_training)),
    Part("history", lambda ctx: [dict(r) for r in ctx.history], load=_load_history),
    Part("rng", lambda ctx: capture_rng_state(data_generators(ctx)), load=_load_rng),
    Part("callbacks", _save_callbacks, load=_load_callbacks),
    Part("meta", _meta),
    Part("versions", _versions),
)
"""The parts of a fit's state, in the order of the checkpoint dict."""


def training_state(ctx: Context, *, skip: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """Everything a resume needs, from ``ctx`` (every part of :data:`PARTS`: model, optimizers, schedulers,
    scaler, epoch, step, RNG states and data generators, callback states, history, metadata), then
    ``extra``. Draws nothing from any random generator.

    Args:
        ctx: the fit's context.
        skip: names of parts left out (a sharded checkpoint writes the model and optimizers itself).
        extra: more entries (they replace parts of the same name).

    >>> # inside a callback:  save_checkpoint("ckpt.pt", training_state(ctx))
    """
    return {**{part.name: part.save(ctx) for part in PARTS if part.name not in skip}, **extra}


def write_checkpoint(ctx: Context, path: str | os.PathLike[str], **extra: Any) -> Path | None:
    """Write :func:`training_state` (with ``extra``) as a checkpoint at ``path``: one file written by rank 0
    (:func:`lanterna.io.checkpoint.save_checkpoint`; other ranks write nothing and get None), or, when the ranks
    hold parts of the state (FSDP), a folder written by all of them (``ctx.world.checkpoints``). Every rank
    calls it.

    Args:
        ctx: the fit's context.
        path: the checkpoint's path.
        extra: more entries for the state.

    Returns:
        the path written, or None on a rank that writes nothing.

    >>> # inside a callback's on_epoch_end:  write_checkpoint(ctx, "ckpt/last.pt")
    """
    sharded = ctx.world.checkpoints
    if sharded is not None:
        state = training_state(ctx, skip=("model", "optimizers"), **extra)  # those two: each rank its shards
        return sharded.save(ctx, path, state)  # type: ignore[no-any-return]
    if not ctx.is_main:
        return None
    return save_checkpoint(path, training_state(ctx, **extra))


def restore_training_state(ctx: Context, state: dict[str, Any], *, where: str = "checkpoint",
                           rng: bool = True, folder: str | os.PathLike[str] | None = None) -> None:
    """Load a checkpoint's state into ``ctx`` (model, optimizers, schedulers, scaler, step, history, callback
    states and, with ``rng``, the RNG states; the epoch is left to the caller).

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
    model_diff = _model_differences(ctx, state)  # first, with its own error: the other checks need the model
    if model_diff:
        raise ModelMismatchError(f"The checkpoint {where} does not fit {type(ctx.model).__name__}: "
                                 f"{'; '.join(model_diff)}. {fix}")
    setup_diff = [d for part in PARTS if part.check is not None and part.name != "model"
                  for d in part.check(ctx, state)]
    if setup_diff:
        raise CheckpointError(f"The checkpoint {where} was written by another setup: {'; '.join(setup_diff)}. {fix}")
    for part in PARTS:
        if part.load is not None and (rng or part.name != "rng"):
            part.load(ctx, state.get(part.name), where)


# ---------------------------------------------------------------------------- a phase under way


def _save_phase_states(ctx: Context) -> dict[str, Any]:
    return {key: cb.phase_state_dict() for key, cb in keyed_callbacks(ctx)  # type: ignore[attr-defined]
            if callable(getattr(cb, "phase_state_dict", None))}


def _load_record(ctx: Context, saved: Any, where: str) -> None:
    ctx.record.clear()
    ctx.record.update(saved or {})


def _load_logs(ctx: Context, saved: Any, where: str) -> None:
    ctx.load_logs_state(saved or {})


def _load_phase_states(ctx: Context, saved: Any, where: str) -> None:
    for key, cb in keyed_callbacks(ctx):
        if key in (saved or {}) and callable(getattr(cb, "load_phase_state_dict", None)):
            cb.load_phase_state_dict(saved[key])  # type: ignore[attr-defined]


PHASE_PARTS: tuple[Part, ...] = (
    Part("record", lambda ctx: dict(ctx.record), load=_load_record),
    Part("logs", lambda ctx: ctx.logs_state(), load=_load_logs),
    Part("phase_states", _save_phase_states, load=_load_phase_states),
)
"""What a phase under way adds to the state: the epoch's record, the ``ctx.log`` sums, the callbacks'
``phase_state_dict()`` (the metrics' running sums)."""


def phase_state(ctx: Context) -> dict[str, Any]:
    """The state of the phase under way (every part of :data:`PHASE_PARTS`), for a mid-epoch checkpoint.

    >>> from lanterna.core.state import PHASE_PARTS
    >>> [part.name for part in PHASE_PARTS]
    ['record', 'logs', 'phase_states']
    """
    return {part.name: part.save(ctx) for part in PHASE_PARTS}


def restore_phase_state(ctx: Context, state: dict[str, Any], *, where: str = "checkpoint") -> None:
    """Put back :func:`phase_state` (after the phase's ``on_*_begin`` hooks ran again: their effects are
    overwritten).

    Args:
        ctx: the fit's context.
        state: a checkpoint dict holding the entries of :func:`phase_state`.
        where: the checkpoint's name, for messages.
    """
    for part in PHASE_PARTS:
        if part.load is not None:
            part.load(ctx, state.get(part.name), where)
