"""``ln.tune``: run an Optuna study over setups, with a shared SQLite storage by default (docs/models.md)."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..callbacks.monitor import resolve_mode
from ..callbacks.optuna_pruning import OptunaPruning, import_optuna
from ..errors import LanternaError, MonitorError, NonFiniteLossError
from .study import _check_direction, _open_study, _space_error

__all__ = ["tune"]

_FIT_KEYS = ("data", "epochs", "valid_data", "callbacks", "verbose", "accelerator", "dataloader_options", "seed")


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
    load_if_exists: bool = False,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    catch: Sequence[type[BaseException]] = (NonFiniteLossError,),
    **fit_kwargs: Any,
) -> Any:
    """Run a new Optuna study (or, with ``load_if_exists=True``, join one) whose trials fit setups; returns the
    ``optuna.Study``.

    ``objective(trial)`` suggests hyperparameters and returns what to fit: an ``ln.Setup``; or a dict with a
    ``"setup"`` key plus ``fit`` arguments for this trial (``{"setup": s, "dataloader_options": {...}}``); or
    ``(setup, fit_kwargs)``. It may also return a number, which is then the trial's value as in plain Optuna.
    ``data`` and ``**fit_kwargs`` (``valid_data=``, ``epochs=``, ``callbacks=`` ...) are the fit arguments
    shared by all trials (callbacks are copied per trial); fit is silent unless ``verbose=True``.

    The trial's value is the ``monitor`` quantity of the history: its best epoch (``value="best"``, by
    ``mode``) or the last (``value="last"``). The study's direction follows ``mode`` (``valid_acc`` is
    maximised, ``valid_loss`` minimised) unless ``direction`` is given: with ``mode="auto"`` it is read from the
    metric behind the monitor (its ``higher_is_better``), so the objective is called once on a throwaway trial to
    see the setup's metrics (nothing is fitted; ``*_loss`` monitors, ``mode="min"``/``"max"`` and ``direction=``
    need no such call). With ``prune=True`` an
    :class:`~lanterna.callbacks.OptunaPruning` callback reports the value every epoch, so the study's
    ``pruner`` (Optuna's default ``MedianPruner``, or e.g. ``optuna.pruners.MedianPruner(n_startup_trials=5)``)
    can stop bad trials early. A trial whose loss becomes NaN/Inf is recorded FAILED and the study goes on.

    A run never joins an existing study by accident: an existing ``study_name`` (default: the objective's name)
    is an error unless ``load_if_exists=True``, and joining a study whose direction differs, or whose trials
    suggest a parameter with another distribution (range, step, log scale, choices) or no parameter in common
    with this objective's first trial, is an error naming both (checked before that trial's fit).

    Parallel search: the storage defaults to a SQLite file in the working directory, opened by
    :func:`storage` (WAL, lock timeout, heartbeats, retries of trials whose worker died). Start the same
    script with ``load_if_exists=True`` in several processes: they join the study named ``study_name`` and share
    its trials. ``n_trials`` counts this process's trials; ``max_trials`` caps the study's finished (complete or
    pruned) trials over all workers; ``timeout`` bounds this process's time in seconds. A study file that is
    damaged or read-only is an error naming it.

    Args:
        objective: ``trial -> Setup`` (or a dict / tuple with fit arguments, or a number).
        data: the training data shared by all trials.
        n_trials: this process's number of trials (a positive integer).
        max_trials: the study's cap on finished trials over all workers (a positive integer).
        timeout: seconds this process runs trials for (> 0).
        monitor: the history key that is the trial's value.
        mode: ``"auto"``, ``"min"`` or ``"max"`` for ``monitor``.
        value: ``"best"`` (the monitor's best epoch) or ``"last"``.
        prune: report every epoch to the study's pruner.
        study_name: the study (default: the objective's function name, ``"lanterna"`` for a lambda).
        storage: a SQLite path, a database URL, ``":memory:"`` or an Optuna storage (default
            :data:`DEFAULT_STORAGE`).
        direction: ``"minimize"`` / ``"maximize"``; default from ``monitor`` and ``mode``.
        sampler: an Optuna sampler for this process.
        pruner: an Optuna pruner for this process.
        load_if_exists: join the study when it exists (same direction and search space), instead of an error.
        heartbeat_interval: see :func:`storage`.
        grace_period: see :func:`storage`.
        max_retry: see :func:`storage`.
        catch: exceptions that fail a trial without ending the study.
        **fit_kwargs: fit's arguments for every trial.

    Returns:
        The ``optuna.Study`` with this run's trials (and any other worker's).

    Raises:
        LanternaError: when an argument is invalid (no ``n_trials`` / ``max_trials`` / ``timeout`` limit, an
            unknown option ...), the study exists and ``load_if_exists`` is False, the study joined has another
            direction or search space, or its storage is damaged or read-only.
        MonitorError: when ``mode`` is not ``"auto"``, ``"min"`` or ``"max"``.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x = torch.randn(200, 4); y = (x[:, 0] > 0).long()
    >>> def objective(trial):
    ...     return (ln.setup(nn.Linear, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
    ...                      metrics=[ln.metrics.Accuracy()])
    ...             .set_hparams(in_features=4, out_features=2)
    ...             .set_opt_hparams(lr=trial.suggest_float("lr", 1e-3, 1.0, log=True)))
    >>> study = ln.tune(objective, (x, y), valid_data=0.2, epochs=2, monitor="valid_acc", n_trials=3,
    ...                 storage="tune.db", verbose=False)
    >>> study.direction.name, len(study.trials), list(study.best_params)
    ('MAXIMIZE', 3, ['lr'])
    >>> study = ln.tune(objective, (x, y), valid_data=0.2, epochs=2, monitor="valid_acc", n_trials=2,
    ...                 storage="tune.db", verbose=False, load_if_exists=True)  # another process may run it too
    >>> len(study.trials)
    5
    """
    optuna = import_optuna()
    if not callable(objective):
        raise LanternaError(f"tune(objective, ...): objective must be a function trial -> Setup, got {objective!r}.")
    if value not in ("best", "last"):
        raise LanternaError(f"tune(value={value!r}): use 'best' (the best epoch) or 'last' (the final epoch).")
    if n_trials is None and max_trials is None and timeout is None:
        raise LanternaError("tune() needs a limit: n_trials=... (this process), max_trials=... (the whole study) "
                            "or timeout=... seconds.")
    for key, limit in (("n_trials", n_trials), ("max_trials", max_trials)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
            raise LanternaError(f"tune({key}={limit!r}): {key} must be a positive whole number (or None), "
                                f"e.g. {key}=20.")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not 0 < timeout < math.inf):
        raise LanternaError(f"tune(timeout={timeout!r}): timeout must be a positive number of seconds (or None), "
                            "e.g. timeout=3600.")
    if not isinstance(load_if_exists, bool):
        raise LanternaError(f"tune(load_if_exists={load_if_exists!r}): use True (join an existing study) or False.")
    unknown = set(fit_kwargs) - set(_FIT_KEYS)
    if unknown:
        raise LanternaError(f"tune() got unknown arguments {sorted(unknown)}; besides its own options it takes "
                            f"fit's arguments {list(_FIT_KEYS)}.")
    from ..callbacks.auto_resume import AutoResume

    if any(isinstance(cb, AutoResume) for cb in fit_kwargs.get("callbacks") or []):
        raise LanternaError(
            "tune(callbacks=[AutoResume(...)]) would resume each trial from another trial's state. Return it from "
            "the objective with a folder per trial instead: {'setup': ..., 'callbacks': "
            "[ln.callbacks.AutoResume(f'resume/{trial.number}')]}."
        )
    if mode not in ("min", "max", "auto"):
        raise MonitorError(f"tune(mode={mode!r}): use 'auto', 'min' or 'max'.")
    if direction is not None and direction not in ("minimize", "maximize"):
        raise LanternaError(f"tune(direction={direction!r}): use 'minimize' or 'maximize'.")
    shared = {"verbose": False, **fit_kwargs}
    if data is not None:
        shared["data"] = data
    given_mode = None if direction is None else ("max" if direction == "maximize" else "min")
    if direction is None:
        direction = "maximize" if _probe_mode(objective, shared, monitor, mode) == "max" else "minimize"
    if study_name is None:
        name = getattr(objective, "__name__", "")
        study_name = name if name and name != "<lambda>" else "lanterna"

    study, where = _open_study(study_name, storage, direction, sampler, pruner, load_if_exists,
                               heartbeat_interval, grace_period, max_retry)
    _check_direction(study, direction, where, monitor, mode, given_mode is not None)

    first = [True]

    def run_trial(trial: Any) -> float:
        try:
            spec = objective(trial)
        except ValueError as e:  # Optuna refuses some changes itself (another log scale or kind for a name)
            if not str(e).startswith("Cannot set different"):
                raise
            raise _space_error(study, trial, where, str(e).rstrip(".")) from e  # type: ignore[misc]
        if first[0]:  # before this process's first fit: the search space must be the study's
            first[0] = False
            error = _space_error(study, trial, where)
            if error is not None:
                raise error
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return float(spec)
        setup, kwargs = _fit_spec(spec, shared)
        trial_mode = _trial_mode(monitor, mode, setup, given_mode)
        callbacks = [_copy(cb) for cb in kwargs.pop("callbacks", None) or []]
        if prune:
            callbacks.append(OptunaPruning(trial, monitor, trial_mode))
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
        return max(finite) if trial_mode == "max" else min(finite)

    run_trial.__name__ = study_name
    callbacks = []
    if max_trials is not None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(int(max_trials), states=states))
        if _count(study, states) >= max_trials:
            return study
    study.optimize(run_trial, n_trials=n_trials, timeout=timeout, catch=tuple(catch), callbacks=callbacks)
    return study


# ---------------------------------------------------------------------------- helpers


def _probe_mode(objective: Callable[[Any], Any], shared: Mapping[str, Any], monitor: str, mode: str) -> str:
    """``"min"``/``"max"`` for ``monitor``: from the name when it tells (a loss, an explicit mode), else from the
    metrics of the setup the objective returns for a throwaway in-memory trial (nothing is fitted)."""
    with contextlib.suppress(MonitorError):
        return resolve_mode(monitor, mode)
    optuna = import_optuna()
    with _quiet_optuna():
        trial = optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                    sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    spec = objective(trial)
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        raise LanternaError(
            f"tune(monitor={monitor!r}, mode={mode!r}): the objective returns a number, so no metric tells whether "
            "to minimise or maximise it. Pass direction='minimize' or direction='maximize'."
        )
    setup, _ = _fit_spec(spec, shared)
    return resolve_mode(monitor, mode, metrics=setup.metrics)


def _trial_mode(monitor: str, mode: str, setup: Any, given_mode: str | None) -> str:
    """The monitor's direction for this trial's setup; the study's, when the user gave one and the metric
    cannot tell (a ``ctx.log`` value)."""
    try:
        return resolve_mode(monitor, mode, metrics=setup.metrics)
    except MonitorError:
        if given_mode is None:
            raise
        return given_mode


@contextlib.contextmanager
def _quiet_optuna() -> Any:
    optuna = import_optuna()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


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
