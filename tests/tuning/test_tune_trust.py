"""ln.tune never does something silently wrong (issue 11): bad limits, a damaged or read-only study file, joining an
existing study by accident, or with another direction or search space, are clear errors before any training; the
direction with mode="auto" comes from the metric's own higher_is_better. Real Optuna on real SQLite files."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lanterna as ln

optuna = pytest.importorskip("optuna")

sys.path.insert(0, str(Path(__file__).parent))
from optuna_worker import Clf  # noqa: E402

torchmetrics = pytest.importorskip("torchmetrics")


def blobs(n: int = 90):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(3, 4, generator=g)[y] * 3 + torch.randn(n, 4, generator=g)
    return (x[: n * 2 // 3], y[: n * 2 // 3]), (x[n * 2 // 3:], y[n * 2 // 3:])


def square(trial):
    return trial.suggest_float("x", -1, 1) ** 2


def clf(trial):
    return (ln.setup(Clf, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()])
            .set_hparams(n_hidden=trial.suggest_int("n_hidden", 4, 32))
            .set_opt_hparams(lr=trial.suggest_float("lr", 1e-3, 1e-1, log=True)))


class CountFits(ln.Callback):
    fits: list[int] = []  # a class attribute: tune copies callbacks per trial

    def on_fit_begin(self, ctx):
        CountFits.fits.append(1)


@pytest.fixture(autouse=True)
def _no_fits_yet():
    CountFits.fits.clear()


def _trials(db: Path, name: str) -> list:
    return optuna.load_study(study_name=name, storage=ln.tuning.storage(db)).trials


# ---------------------------------------------------------------------------- limits (18)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_trials": -1}, r"tune\(n_trials=-1\): .*positive whole number"),
    ({"n_trials": 0}, r"tune\(n_trials=0\): .*positive whole number"),
    ({"n_trials": 2.5}, r"tune\(n_trials=2.5\)"),
    ({"n_trials": True}, r"tune\(n_trials=True\)"),
    ({"n_trials": "3"}, r"tune\(n_trials='3'\)"),
    ({"max_trials": 0}, r"tune\(max_trials=0\): .*positive whole number"),
    ({"timeout": 0}, r"tune\(timeout=0\): .*positive number of seconds"),
    ({"timeout": -5.0}, r"tune\(timeout=-5.0\)"),
    ({"timeout": float("nan")}, r"tune\(timeout=nan\)"),
    ({"timeout": "60"}, r"tune\(timeout='60'\)"),
])
def test_non_positive_or_non_integer_limits_are_refused(tmp_path, kwargs, message):
    db = tmp_path / "limits.db"
    with pytest.raises(ln.LanternaError, match=message):
        ln.tune(square, storage=db, **kwargs)
    assert not db.exists()  # refused before any storage is touched


def test_valid_limits_still_run_that_many_trials(tmp_path):
    db = tmp_path / "ok.db"
    assert len(ln.tune(square, n_trials=2, storage=db).trials) == 2
    assert len(ln.tune(square, n_trials=1, timeout=30, storage=db, study_name="t").trials) == 1


# ---------------------------------------------------------------------------- damaged / read-only files (17)


def test_a_corrupt_sqlite_file_is_a_quick_clear_error_naming_it(tmp_path):
    db = tmp_path / "random.db"
    db.write_bytes(random.Random(0).randbytes(8192))
    before = db.read_bytes()
    for call in (lambda: ln.tune(square, n_trials=1, storage=db), lambda: ln.tuning.storage(db)):
        start = time.monotonic()
        with pytest.raises(ln.LanternaError, match=rf"{db}.* is not a SQLite database") as err:
            call()
        assert time.monotonic() - start < 2.0  # no retries for an error that is not "database is locked"
        assert "file is not a database" in str(err.value)  # the cause
    assert db.read_bytes() == before  # untouched


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` read-only for this user: permission bits, or (for root, who ignores them) immutable."""
    path.chmod(0o444)
    immutable = False
    try:
        if os.access(path, os.W_OK):  # root
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                                 capture_output=True).returncode != 0:
                pytest.skip("cannot make a file read-only for this user (root without chattr +i)")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o644)


def test_a_read_only_sqlite_file_is_a_quick_clear_error_naming_it(tmp_path):
    db = tmp_path / "ro.db"
    ln.tune(square, n_trials=2, storage=db, study_name="ro")
    with read_only(db):
        start = time.monotonic()
        with pytest.raises(ln.LanternaError, match=rf"{db}.* is read-only") as err:
            ln.tune(square, n_trials=1, storage=db, study_name="ro", load_if_exists=True)
        assert time.monotonic() - start < 2.0
        assert "another storage" in str(err.value)
    assert len(_trials(db, "ro")) == 2


def test_a_folder_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ln.LanternaError, match=r"taken.* is a file, not a folder"):
        ln.tune(square, n_trials=1, storage=tmp_path / "taken" / "study.db")


# ---------------------------------------------------------------------------- joining a study (21)


def test_an_existing_study_name_is_an_error_unless_load_if_exists(tmp_path):
    db = tmp_path / "s.db"
    first = [t.params for t in ln.tune(square, n_trials=2, storage=db).trials]
    start = time.monotonic()
    with pytest.raises(ln.LanternaError, match=r"study 'square' already exists in .*s\.db.*load_if_exists=True.*"
                                               r"study_name="):
        ln.tune(square, n_trials=2, storage=db)
    assert time.monotonic() - start < 2.0
    assert len(_trials(db, "square")) == 2
    joined = ln.tune(square, n_trials=3, storage=db, load_if_exists=True)
    assert [t.number for t in joined.trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in joined.trials[:2]] == first


def test_joining_a_study_with_the_other_direction_is_an_error_naming_both(tmp_path):
    db = tmp_path / "dir.db"
    old = optuna.create_study(study_name="clf", storage=ln.tuning.storage(db), direction="maximize")
    old.enqueue_trial({"n_hidden": 8, "lr": 0.01})
    old.optimize(lambda trial: 0.9 if clf(trial) is not None else 0.0, n_trials=1)  # one complete trial
    train, valid = blobs()
    with pytest.raises(ln.LanternaError, match=r"study 'clf' .*maximizes.*this run minimizes.*monitor='valid_loss'"):
        ln.tune(clf, train, valid_data=valid, epochs=1, n_trials=1, storage=db, study_name="clf",
                load_if_exists=True, callbacks=[CountFits()])
    assert CountFits.fits == [] and len(_trials(db, "clf")) == 1


def test_joining_a_study_with_another_search_space_is_an_error_naming_both_before_fitting(tmp_path):
    db = tmp_path / "space.db"
    train, valid = blobs()
    old = ln.tune(clf, train, valid_data=valid, epochs=1, n_trials=2, monitor="valid_loss", storage=db,
                  study_name="s", seed=0)
    best = old.best_params

    def narrower(trial, log=True):  # same names, another range for lr
        return (ln.setup(Clf, loss=nn.CrossEntropyLoss())
                .set_hparams(n_hidden=trial.suggest_int("n_hidden", 4, 32))
                .set_opt_hparams(lr=trial.suggest_float("lr", 0.5, 1.0, log=log)))

    def linear(trial):  # lr without the log scale: Optuna itself refuses it, mid-objective
        return narrower(trial, log=False)

    def other(trial):  # nothing in common
        return ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(
            in_features=4, out_features=trial.suggest_int("width", 1, 3))

    cases = ((narrower, r"lr: float in \[0.5, 1.0\] log.*\(lr differs\)"),
             (linear, r"\(Cannot set different log configuration to the same parameter name\)"),
             (other, r"width: int in \[1, 3\].*\(no parameter in common\)"))
    for objective, theirs in cases:
        with pytest.raises(ln.LanternaError, match=r"study 's' .*searches .*lr: float in \[0.001, 0.1\] log.*"
                                                   r"this objective suggests .*" + theirs) as err:
            ln.tune(objective, train, valid_data=valid, epochs=1, n_trials=2, storage=db, study_name="s",
                    load_if_exists=True, callbacks=[CountFits()])
        assert "n_hidden: int in [4, 32]" in str(err.value)
    assert CountFits.fits == []  # refused at the first trial, before its fit
    study = optuna.load_study(study_name="s", storage=ln.tuning.storage(db))
    assert study.best_params == best
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2 and len(states) == 5  # the refused: FAIL
    assert set(states[2:]) == {optuna.trial.TrialState.FAIL}


def test_joining_with_the_same_space_and_direction_adds_trials(tmp_path):
    db = tmp_path / "same.db"
    train, valid = blobs()
    ln.tune(clf, train, valid_data=valid, epochs=1, n_trials=1, monitor="valid_acc", storage=db, seed=0)
    study = ln.tune(clf, train, valid_data=valid, epochs=1, n_trials=2, monitor="valid_acc", storage=db,
                    load_if_exists=True, seed=0, callbacks=[CountFits()])
    assert len(study.trials) == 3 and CountFits.fits == [1, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_a_conditional_search_space_may_take_a_new_branch(tmp_path):
    db = tmp_path / "cond.db"

    def conditional(trial):
        kind = trial.suggest_categorical("kind", ["a", "b"])
        return trial.suggest_float("xa", 0, 1) if kind == "a" else trial.suggest_int("nb", 1, 3)

    study = optuna.create_study(study_name="conditional", storage=ln.tuning.storage(db))
    study.enqueue_trial({"kind": "a"})
    study.optimize(conditional, n_trials=1)
    study.enqueue_trial({"kind": "b"})
    joined = ln.tune(conditional, n_trials=1, storage=db, load_if_exists=True)
    assert [t.params["kind"] for t in joined.trials] == ["a", "b"]
    assert joined.trials[1].state == optuna.trial.TrialState.COMPLETE


# ---------------------------------------------------------------------------- direction from the metric (8)


def test_mode_auto_reads_a_torchmetrics_metrics_higher_is_better(tmp_path):
    db = tmp_path / "tm.db"
    train, valid = blobs()

    def objective(trial):
        return (ln.setup(Clf, loss=nn.CrossEntropyLoss(),
                         metrics=[torchmetrics.classification.MulticlassAccuracy(num_classes=3)])
                .set_opt_hparams(lr=trial.suggest_float("lr", 1e-3, 1e-1, log=True)))

    study = ln.tune(objective, train, valid_data=valid, epochs=3, n_trials=2, monitor="valid_multiclassaccuracy",
                    storage=db, seed=0, prune=False)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in study.trials:
        accs = [h["valid_multiclassaccuracy"] for h in t.user_attrs["history"]]
        assert len(accs) == 3 and t.value == max(accs)  # the best epoch is the highest accuracy
    assert study.study_name == "objective" and len(study.trials) == 2  # the direction probe left no trial


def test_mode_auto_for_a_number_objective_needs_a_direction(tmp_path):
    with pytest.raises(ln.LanternaError, match=r"monitor='valid_acc'.*returns a number.*direction="):
        ln.tune(square, n_trials=1, monitor="valid_acc", storage=tmp_path / "n.db")
    study = ln.tune(square, n_trials=1, monitor="valid_acc", direction="maximize", storage=tmp_path / "n.db")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
