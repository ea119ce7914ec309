"""``ln.tune``: run an Optuna study over setups, with a shared SQLite storage by default (seed 004)."""

from __future__ import annotations

import copy
import inspect
import math
import os
import random
import sqlite3
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..callbacks.monitor import Monitor
from ..callbacks.optuna_pruning import OptunaPruning, import_optuna
from ..errors import LanternaError, MonitorError, NonFiniteLossError

__all__ = ["tune", "storage", "DEFAULT_STORAGE"]

#: Where ``tune`` keeps its studies unless told otherwise: a SQLite file in the working directory.
DEFAULT_STORAGE = "sqlite:///lanterna_tune.db"

_JITTER = random.Random()  # its own generator: waiting must not move the user's random state

_FIT_KEYS = ("data", "epochs", "valid_data", "callbacks", "verbose", "accelerator", "dataloader_options", "seed")


def storage(
    url: str | os.PathLike[str] | None = None,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    timeout: float = 60.0,
) -> Any:
    """An Optuna ``RDBStorage`` that several processes can share safely.

    ``url`` is a database URL or the path of a SQLite file (default :data:`DEFAULT_STORAGE`). For SQLite the
    file is put in WAL mode (readers never block the writer) and connections wait up to ``timeout`` seconds
    for a lock instead of failing with "database is locked". Heartbeats are on: a trial whose process died
    (killed, out of memory, node lost) stops beating and, ``grace_period`` seconds later (default twice the
    interval), the next trial started by any worker marks it FAILED and enqueues a retry with the same
    parameters (at most ``max_retry`` times). ``heartbeat_interval=None`` turns that off.

    SQLite suits processes on one machine (a local disk; not NFS). For several machines use a server
    database: ``storage("postgresql://user:pw@host/db")``. ``":memory:"`` gives Optuna's in-memory storage
    (one process, nothing kept).

    >>> import lanterna as ln
    >>> st = ln.tuning.storage("studies/mnist.db")  # doctest: +SKIP
    >>> study = optuna.create_study(study_name="mnist", storage=st, load_if_exists=True)  # doctest: +SKIP
    """
    optuna = import_optuna()
    if url is not None and os.fspath(url) == ":memory:":  # one process: no database, no heartbeats
        return optuna.storages.InMemoryStorage()
    url = _url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = _sqlite_path(url)
        if path is not None:
            _enable_wal(path, timeout)
        engine_kwargs = {"connect_args": {"timeout": float(timeout)}}
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental by Optuna
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        if heartbeat_interval is not None:
            kwargs["heartbeat_interval"] = int(heartbeat_interval)
            kwargs["grace_period"] = int(grace_period) if grace_period is not None else None
            if max_retry:
                retry = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                         or optuna.storages.RetryFailedTrialCallback)
                params = inspect.signature(optuna.storages.RDBStorage).parameters
                key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else (
                    "failed_trial_callback")
                kwargs[key] = retry(max_retry=int(max_retry))
        return _retry_locked(lambda: optuna.storages.RDBStorage(url, **kwargs))


def tune(
    objective: Callable[[Any], Any],
    data: Any = None,
    *,
    n_trials: int | None = None,
    max_trials: int | None = None,
    timeout: float | None = None,
    monitor: str = "valid_loss",
    mode: str = "auto",
    value: str = "best",
    prune: bool = True,
    study_name: str | None = None,
    storage: Any = None,
    direction: str | None = None,
    sampler: Any = None,
    pruner: Any = None,
    load_if_exists: bool = True,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    catch: Sequence[type[BaseException]] = (NonFiniteLossError,),
    **fit_kwargs: Any,
) -> Any:
    """Run (or join) an Optuna study whose trials fit setups; returns the ``optuna.Study``.

    ``objective(trial)`` suggests hyperparameters and returns what to fit: an ``ln.Setup``; or a dict with a
    ``"setup"`` key plus ``fit`` arguments for this trial (``{"setup": s, "dataloader_options": {...}}``); or
    ``(setup, fit_kwargs)``. It may also return a number, which is then the trial's value as in plain Optuna.
    ``data`` and ``**fit_kwargs`` (``valid_data=``, ``epochs=``, ``callbacks=`` ...) are the fit arguments
    shared by all trials (callbacks are copied per trial); fit is silent unless ``verbose=True``.

    The trial's value is the ``monitor`` quantity of the history: its best epoch (``value="best"``, by
    ``mode``) or the last (``value="last"``). The study's direction follows ``mode`` (``valid_acc`` is
    maximised, ``valid_loss`` minimised) unless ``direction`` is given. With ``prune=True`` an
    :class:`~lanterna.callbacks.OptunaPruning` callback reports the value every epoch, so the study's
    ``pruner`` (Optuna's default ``MedianPruner``, or e.g. ``optuna.pruners.MedianPruner(n_startup_trials=5)``)
    can stop bad trials early. A trial whose loss becomes NaN/Inf is recorded FAILED and the study goes on.

    Parallel search (seed 004): the storage defaults to a SQLite file in the working directory, opened by
    :func:`storage` (WAL, lock timeout, heartbeats, retries of trials whose worker died). Start the same
    script in several processes: they join the study named ``study_name`` (default: the objective's name)
    and share its trials. ``n_trials`` counts this process's trials; ``max_trials`` caps the study's finished
    (complete or pruned) trials over all workers.

    >>> import lanterna as ln
    >>> def objective(trial):
    ...     return (ln.setup(Net, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
    ...                      metrics=[ln.metrics.Accuracy()])
    ...             .set_hparams(n_hidden=trial.suggest_int("n_hidden", 20, 300))
    ...             .set_opt_hparams(lr=trial.suggest_float("lr", 1e-5, 1e-1, log=True)))
    >>> study = ln.tune(objective, train_dl, valid_data=valid_dl, epochs=10, monitor="valid_acc",
    ...                 n_trials=20)  # doctest: +SKIP
    >>> study.best_params  # doctest: +SKIP
    {'n_hidden': 116, 'lr': 0.0852...}
    """
    optuna = import_optuna()
    if not callable(objective):
        raise LanternaError(f"tune(objective, ...): objective must be a function trial -> Setup, got {objective!r}.")
    if value not in ("best", "last"):
        raise LanternaError(f"tune(value={value!r}): use 'best' (the best epoch) or 'last' (the final epoch).")
    if n_trials is None and max_trials is None and timeout is None:
        raise LanternaError("tune() needs a limit: n_trials=... (this process), max_trials=... (the whole study) "
                            "or timeout=... seconds.")
    unknown = set(fit_kwargs) - set(_FIT_KEYS)
    if unknown:
        raise LanternaError(f"tune() got unknown arguments {sorted(unknown)}; besides its own options it takes "
                            f"fit's arguments {list(_FIT_KEYS)}.")
    from ..callbacks.checkpoint import AutoResume

    if any(isinstance(cb, AutoResume) for cb in fit_kwargs.get("callbacks") or []):
        raise LanternaError(
            "tune(callbacks=[AutoResume(...)]) would resume each trial from another trial's state. Return it from "
            "the objective with a folder per trial instead: {'setup': ..., 'callbacks': "
            "[ln.callbacks.AutoResume(f'resume/{trial.number}')]}."
        )
    mon = Monitor(monitor, mode)
    if direction is None:
        direction = "maximize" if mon.mode == "max" else "minimize"
    elif direction not in ("minimize", "maximize"):
        raise LanternaError(f"tune(direction={direction!r}): use 'minimize' or 'maximize'.")
    if study_name is None:
        name = getattr(objective, "__name__", "")
        study_name = name if name and name != "<lambda>" else "lanterna"
    st = storage if storage is not None and not isinstance(storage, (str, os.PathLike)) else _storage_fn(
        storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry)
    study = _retry_locked(lambda: optuna.create_study(
        study_name=study_name, storage=st, direction=direction, sampler=sampler, pruner=pruner,
        load_if_exists=load_if_exists))

    shared = {"verbose": False, **fit_kwargs}
    if data is not None:
        shared["data"] = data

    def run_trial(trial: Any) -> float:
        spec = objective(trial)
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return float(spec)
        setup, kwargs = _fit_spec(spec, shared)
        callbacks = [_copy(cb) for cb in kwargs.pop("callbacks", None) or []]
        if prune:
            callbacks.append(OptunaPruning(trial, monitor, mode))
        if "data" not in kwargs:
            raise LanternaError("tune(): no training data; pass it as tune(objective, data, ...) or return it "
                                "from the objective as {'setup': ..., 'data': ...}.")
        train_data = kwargs.pop("data")
        fitted = setup.fit(train_data, callbacks=callbacks, **kwargs)
        history = fitted.history
        trial.set_user_attr("history", [_jsonable(rec) for rec in history])
        values = [float(rec[monitor]) for rec in history if monitor in rec]
        if not values:
            names = sorted(history[-1]) if history else []
            raise MonitorError(f"tune(monitor={monitor!r}): not in the history; available: {names}.")
        if value == "last":
            return values[-1]
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return float("nan")
        return max(finite) if mon.mode == "max" else min(finite)

    run_trial.__name__ = study_name
    callbacks = []
    if max_trials is not None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(int(max_trials), states=states))
        if _count(study, states) >= max_trials:
            return study
    study.optimize(run_trial, n_trials=n_trials, timeout=timeout, catch=tuple(catch), callbacks=callbacks)
    return study


_storage_fn = storage


# ---------------------------------------------------------------------------- helpers


def _fit_spec(spec: Any, shared: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
        setup, extra = spec[0], dict(spec[1])
    elif isinstance(spec, Mapping):
        extra = dict(spec)
        if "setup" not in extra:
            raise LanternaError("The tune objective returned a dict without 'setup'; return {'setup': ln.setup(...)"
                                ".set_hparams(...), ...fit arguments}.")
        setup = extra.pop("setup")
    else:
        setup, extra = spec, {}
    if not (hasattr(setup, "fit") and hasattr(setup, "build_model")):
        raise LanternaError(
            f"The tune objective must return an ln.Setup (or {{'setup': ..., **fit_kwargs}}, or a number); "
            f"got {type(setup).__name__}."
        )
    unknown = set(extra) - set(_FIT_KEYS)
    if unknown:
        raise LanternaError(f"The tune objective returned unknown fit arguments {sorted(unknown)}; "
                            f"use {list(_FIT_KEYS)}.")
    return setup, {**shared, **extra}


def _copy(cb: Any) -> Any:
    try:
        return copy.deepcopy(cb)
    except Exception:  # an object that cannot be copied (a lock, a file): share it
        return cb


def _jsonable(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _count(study: Any, states: tuple[Any, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _url(url: str | os.PathLike[str] | None) -> str:
    if url is None:
        return DEFAULT_STORAGE
    text = os.fspath(url)
    if "://" in text:
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())


def _sqlite_path(url: str) -> Path | None:
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def _enable_wal(path: Path, timeout: float) -> None:
    """WAL mode is a property of the database file: set once, every later connection uses it."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def set_wal() -> None:
        con = sqlite3.connect(str(path), timeout=timeout)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()

    _retry_locked(set_wal)


def _retry_locked(fn: Callable[[], Any], attempts: int = 8) -> Any:
    """Run ``fn``, retrying when concurrent workers race to create the same tables or study."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            transient = type(e).__name__ in ("OperationalError", "IntegrityError", "DatabaseError") or (
                "locked" in str(e) or "already exists" in str(e))
            if not transient or i == attempts - 1:
                raise
            time.sleep(0.05 * (2 ** i) * (1 + _JITTER.random()))
    raise AssertionError("unreachable")
