"""Optuna (issue 4, seed 004): OptunaPruning reports every epoch and prunes, ln.tune runs a study on a shared
SQLite storage — real Optuna, real SQLite files, real subprocesses (two workers on one study; a worker killed
mid-trial leaves a FAILED trial that is retried)."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lanterna as ln

optuna = pytest.importorskip("optuna")

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"
sys.path.insert(0, str(HERE))
from optuna_worker import Clf  # noqa: E402  (the model the subprocess workers tune too)


def blobs(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(3, 4, generator=g)[y] * 3 + torch.randn(n, 4, generator=g)
    return (x[: n * 4 // 5], y[: n * 4 // 5]), (x[n * 4 // 5:], y[n * 4 // 5:])


def clf_setup(trial):
    return (ln.setup(Clf, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()])
            .set_hparams(n_hidden=trial.suggest_int("n_hidden", 4, 32))
            .set_opt_hparams(lr=trial.suggest_float("lr", 1e-5, 1e-1, log=True)))


def test_five_trial_study_with_median_pruner_prunes_the_bad_trials(tmp_path):
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="clf", storage=ln.tuning.storage(db), direction="maximize")
    lrs = [0.05, 0.03, 1e-5, 0.05, 2e-5]  # a setup built to prune: two hopeless learning rates
    for lr in lrs:
        study.enqueue_trial({"n_hidden": 16, "lr": lr})
    train, valid = blobs()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, interval_steps=1)
    study = ln.tune(clf_setup, train, valid_data=valid, epochs=4, monitor="valid_acc", n_trials=5,
                    storage=db, study_name="clf", pruner=pruner, seed=0, load_if_exists=True)
    trials = study.trials
    assert len(trials) == 5 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == [1, 2, 3, 4]  # one report per epoch
            history = t.user_attrs["history"]
            assert [h["valid_acc"] for h in history] == [t.intermediate_values[e] for e in (1, 2, 3, 4)]
            assert t.value == max(h["valid_acc"] for h in history)  # value="best"
        else:
            assert t.params["lr"] < 1e-3 and len(t.intermediate_values) < 4
    assert study.best_params["lr"] >= 0.03 and study.best_value > 0.9


def test_pruning_callback_raises_trial_pruned_through_fit():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # prunes any positive loss
    trial = study.ask()
    train, valid = blobs(90)
    setup = ln.setup(Clf, loss=nn.CrossEntropyLoss())
    with pytest.raises(optuna.TrialPruned, match="epoch 1: valid_loss="):
        setup.fit(train, valid_data=valid, epochs=5, verbose=False,
                  callbacks=[ln.callbacks.OptunaPruning(trial, monitor="valid_loss")])
    frozen = study.trials[0]
    assert list(frozen.intermediate_values) == [1] and frozen.intermediate_values[1] > 0


def test_hand_written_objective_with_the_callback_seed_004_style():
    train, valid = blobs(150)

    def objective(trial):
        fitted = clf_setup(trial).fit(train, valid_data=valid, epochs=3, verbose=False, seed=0,
                                      callbacks=[ln.callbacks.OptunaPruning(trial, monitor="valid_acc")])
        return fitted.history[-1]["valid_acc"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=42))
    study.optimize(objective, n_trials=3)
    assert all(len(t.intermediate_values) == 3 for t in study.trials)


def test_direction_mismatch_warns_and_unknown_monitor_is_refused():
    train, valid = blobs(90)
    trial = optuna.create_study(direction="minimize").ask()
    with pytest.warns(UserWarning, match=r"minimizes but 'valid_acc'.*direction='maximize'"):
        ln.setup(Clf, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()]).fit(
            train, valid_data=valid, epochs=1, verbose=False,
            callbacks=[ln.callbacks.OptunaPruning(trial, monitor="valid_acc")])
    with pytest.raises(ln.MonitorError, match=r"Unknown monitor 'valid_acc'.*valid_loss"):
        ln.setup(Clf, loss=nn.CrossEntropyLoss()).fit(
            train, valid_data=valid, epochs=1, verbose=False,
            callbacks=[ln.callbacks.OptunaPruning(optuna.create_study().ask(), monitor="valid_acc")])
    with pytest.raises(TypeError, match="optuna Trial"):
        ln.callbacks.OptunaPruning("trial", monitor="valid_loss")


def test_a_diverging_trial_is_failed_and_the_study_goes_on(tmp_path):
    train, valid = blobs(90)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e3, log=True)
        loss = nn.CrossEntropyLoss() if lr < 1 else (lambda p, t: p.sum() * float("nan"))
        return ln.setup(Clf, loss=loss).set_opt_hparams(lr=lr)

    db = tmp_path / "nan.db"
    study = optuna.create_study(study_name="nan", storage=ln.tuning.storage(db))
    study.enqueue_trial({"lr": 100.0})
    study.enqueue_trial({"lr": 0.01})
    study = ln.tune(objective, train, valid_data=valid, epochs=2, n_trials=2, storage=db, study_name="nan",
                    load_if_exists=True)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


def test_objective_may_return_a_number_or_fit_arguments(tmp_path):
    train, valid = blobs(90)
    db = tmp_path / "misc.db"
    study = ln.tune(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3, storage=db)
    assert study.study_name == "lanterna" and len(study.trials) == 3
    assert study.direction == optuna.study.StudyDirection.MINIMIZE

    def with_batch_size(trial):
        return clf_setup(trial), {"dataloader_options": {"batch_size": trial.suggest_categorical("bs", [16, 64])},
                                  "epochs": 2}

    study = ln.tune(with_batch_size, train, valid_data=valid, n_trials=2, storage=db, value="last")
    assert study.study_name == "with_batch_size"
    assert all(len(t.user_attrs["history"]) == 2 for t in study.trials)
    assert all(t.value == t.user_attrs["history"][-1]["valid_loss"] for t in study.trials)


def test_max_trials_caps_the_whole_study(tmp_path):
    db = tmp_path / "cap.db"

    def square(trial):
        return trial.suggest_float("x", -1, 1) ** 2

    assert len(ln.tune(square, max_trials=3, storage=db).trials) == 3
    # a late worker finds the study done
    assert len(ln.tune(square, max_trials=3, storage=db, load_if_exists=True).trials) == 3
    assert len(ln.tune(square, max_trials=5, n_trials=10, storage=db, load_if_exists=True).trials) == 5


def test_tune_argument_errors_name_the_fix(tmp_path):
    db = tmp_path / "err.db"
    with pytest.raises(ln.LanternaError, match="needs a limit"):
        ln.tune(clf_setup, storage=db)
    with pytest.raises(ln.LanternaError, match=r"unknown arguments \['epoch'\]"):
        ln.tune(clf_setup, n_trials=1, epoch=3, storage=db)
    with pytest.raises(ln.LanternaError, match="must return an ln.Setup"):
        ln.tune(lambda trial: "nope", blobs(30)[0], n_trials=1, storage=db)
    with pytest.raises(ln.LanternaError, match=r"AutoResume.*folder per trial"):
        ln.tune(clf_setup, n_trials=1, storage=db, callbacks=[ln.callbacks.AutoResume(tmp_path / "r")])
    with pytest.raises(ln.LanternaError, match="use 'best'"):
        ln.tune(clf_setup, n_trials=1, value="mean", storage=db)


def test_storage_is_wal_with_heartbeats(tmp_path):
    db = tmp_path / "sub" / "wal.db"
    st = ln.tuning.storage(db, heartbeat_interval=5)
    assert db.exists()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st.get_heartbeat_interval() == 5
    assert ln.tuning.storage(db, heartbeat_interval=None).get_heartbeat_interval() is None
    study = ln.tune(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2, storage=":memory:")
    assert len(study.trials) == 2 and not (tmp_path / ":memory:").exists()


def test_missing_optuna_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    from lanterna.callbacks.optuna_pruning import import_optuna

    with pytest.raises(ImportError, match=r"pip install 'lanterna\[optuna\]'"):
        import_optuna()


# ---------------------------------------------------------------------------- several processes


def _worker(db: Path, study: str, n_trials: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(HERE / "optuna_worker.py"), str(db), study, str(n_trials), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path):
    db = tmp_path / "shared.db"
    procs = [_worker(db, "shared", 4), _worker(db, "shared", 4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    study = optuna.load_study(study_name="shared", storage=ln.tuning.storage(db))
    trials = study.trials
    assert len(trials) == 8
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert {t.user_attrs["pid"] for t in trials} == {p.pid for p in procs}
    assert len({t.number for t in trials}) == 8


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_worker_leaves_a_failed_trial_that_is_retried(tmp_path):
    db, marker = tmp_path / "kill.db", tmp_path / "running"
    hung = _worker(db, "kill", 3, "hang", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert hung.poll() is None, hung.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    hung.send_signal(signal.SIGKILL)
    hung.communicate()
    study = optuna.load_study(study_name="kill", storage=ln.tuning.storage(db, heartbeat_interval=1))
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # nobody knows yet that it died
    time.sleep(3)  # past the 2 s grace period since its last heartbeat
    train, valid = blobs(150)
    ln.tune(clf_setup, train, valid_data=valid, epochs=2, monitor="valid_acc", n_trials=2, storage=db,
            study_name="kill", heartbeat_interval=1, grace_period=2, load_if_exists=True)
    trials = optuna.load_study(study_name="kill", storage=ln.tuning.storage(db)).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or (
        optuna.storages.RetryFailedTrialCallback)
    retried = [t for t in trials if retry_cls.retried_trial_number(t) == 0]
    assert len(retried) == 1
    assert retried[0].state == optuna.trial.TrialState.COMPLETE and retried[0].params == trials[0].params
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    assert math.isfinite(retried[0].value)
