"""Creating or joining the Optuna study of ``ln.tune``, and the checks that a joined study is the same one:
its direction and its search space (docs/models.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..callbacks.optuna_pruning import import_optuna
from ..errors import LanternaError
from .study_storage import _check_writable, _describe_storage, _retry_locked, _sqlite_path, _storage_errors, _url
from .study_storage import storage as _storage_fn


def _open_study(study_name: str, storage: Any, direction: str, sampler: Any, pruner: Any, load_if_exists: bool,
                heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None) -> tuple[Any, str]:
    """Create the study ``study_name`` in ``storage`` (a path, URL, ``":memory:"`` or an Optuna storage), or join
    it when ``load_if_exists``; an existing study otherwise is an error. Returns the study and how errors name
    its storage."""
    optuna = import_optuna()
    where = _describe_storage(storage)
    if storage is None or isinstance(storage, (str, os.PathLike)) and os.fspath(storage) != ":memory:":
        url = _url(storage)
        _check_writable(_sqlite_path(url) if url.startswith("sqlite:") else None)
    with _storage_errors(where):
        st = storage if storage is not None and not isinstance(storage, (str, os.PathLike)) else _storage_fn(
            storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry)
        try:
            study = _retry_locked(lambda: optuna.create_study(
                study_name=study_name, storage=st, direction=direction, sampler=sampler, pruner=pruner,
                load_if_exists=load_if_exists))
        except optuna.exceptions.DuplicatedStudyError:
            raise LanternaError(
                f"A study {study_name!r} already exists in {where}. Pass load_if_exists=True to add trials to it "
                f"(same direction and search space), or another study_name=... for a new study."
            ) from None
    return study, where


def _check_direction(study: Any, direction: str, where: str, monitor: str, mode: str, given: bool) -> None:
    theirs = [d.name.lower() for d in study.directions]
    if theirs == [direction]:
        return
    shown = f"{theirs[0]}s" if len(theirs) == 1 else f"optimizes {theirs} (multi-objective)"
    why = f"direction={direction!r}" if given else f"monitor={monitor!r}, mode={mode!r}"
    raise LanternaError(
        f"The study {study.study_name!r} in {where} {shown}, but this run {direction}s ({why}). Join it with its "
        f"direction (direction={theirs[0]!r}, or a monitor and mode that {theirs[0]}), or pass another "
        "study_name=... for a new study."
    )


def _space_error(study: Any, trial: Any, where: str, reason: str | None = None) -> LanternaError | None:
    """This trial's parameters against those of the study's other live or finished trials: a parameter with
    another distribution, or no parameter in common, is another search space. (New parameters are allowed:
    a conditional search space can take a branch the study has not seen yet.) ``reason``: Optuna's own
    refusal of a parameter, then always an error."""
    mine = dict(trial.distributions)
    if not mine and reason is None:
        return None
    optuna = import_optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    theirs: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False, states=states):
        if t.number == trial.number:
            continue
        for name, dist in t.distributions.items():
            seen = theirs.setdefault(name, [])
            if dist not in seen:
                seen.append(dist)
    if not theirs and reason is None:
        return None
    differ = [name for name, dist in mine.items() if name in theirs and dist not in theirs[name]]
    if not differ and set(mine) & set(theirs) and reason is None:
        return None
    what = reason or (f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''}" if differ
                      else "no parameter in common")
    return LanternaError(
        f"The study {study.study_name!r} in {where} searches {_describe_space(theirs)}; this objective suggests "
        f"{_describe_space({k: [v] for k, v in mine.items()})} ({what}). Join it with the same search space, or "
        "pass another study_name=... for a new study."
    )


def _describe_space(space: Mapping[str, list[Any]]) -> str:
    return "{" + ", ".join(f"{name}: {' or '.join(_describe_dist(d) for d in dists)}"
                           for name, dists in space.items()) + "}"


def _describe_dist(dist: Any) -> str:
    choices = getattr(dist, "choices", None)
    if choices is not None:
        return f"one of {list(choices)}"
    if not hasattr(dist, "low"):
        return repr(dist)
    kind = "int" if type(dist).__name__.startswith("Int") else "float"
    step = getattr(dist, "step", None)
    text = f"{kind} in [{dist.low}, {dist.high}]" + (" log" if getattr(dist, "log", False) else "")
    return text + (f" step {step}" if step is not None and not (kind == "int" and step == 1) else "")
