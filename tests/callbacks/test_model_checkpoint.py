"""ModelCheckpoint (issue 3): one file per improvement like luz's, templates and single files, what a checkpoint
holds, errors before the first batch, safe names and paths, write failures, and the defaults without validation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MLPClassifier, Net, luz_net_setup, make_blobs, make_luz_data, same_weights
from torch import nn

import lanterna as ln
from lanterna.io import load_checkpoint

# ---------------------------------------------------------------------------- ModelCheckpoint


def test_seed_000_callbacks_example_one_file_per_improvement(luz_split, luz_setup, tmp_path):
    train_dl, valid_dl, test_dl = luz_split
    folder = tmp_path / "models"
    checkpoint = ln.callbacks.ModelCheckpoint(path=f"{folder}/", save_best_only=True)
    fitted = luz_setup.fit(
        train_dl, epochs=200, valid_data=valid_dl, seed=1, verbose=False,
        callbacks=[checkpoint, ln.callbacks.EarlyStopping(patience=10), ln.callbacks.KeepBestModel()],
    )
    assert fitted.status == "stopped_early"
    expected, best = [], None
    for rec in fitted.history:
        if best is None or rec["valid_loss"] < best:
            best = rec["valid_loss"]
            expected.append(f"epoch-{rec['epoch']:02d}-valid_loss-{rec['valid_loss']:.3f}.pt")
    assert sorted(os.listdir(folder)) == sorted(expected)
    assert checkpoint.best_path.name == expected[-1]
    # the best file reloads into a fresh model with the predictions of the best epoch (KeepBestModel's)
    ckpt = torch.load(checkpoint.best_path, weights_only=True)
    fresh = Net(3, 32, 1)
    fresh.load_state_dict(ckpt["model"])
    x = test_dl.dataset[:][0]
    with torch.no_grad():
        assert torch.equal(fresh(x), fitted.predict(x))
    assert ckpt["callbacks"]["EarlyStopping"]["wait"] == 0
    assert ckpt["epoch"] == int(checkpoint.best_path.name[6:8]) and len(ckpt["history"]) == ckpt["epoch"]


def test_every_epoch_template_and_single_file(tmp_path):
    x, y = make_luz_data(120)
    setup = ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1)
    every = ln.callbacks.ModelCheckpoint(tmp_path / "all", monitor="train_loss")
    template = ln.callbacks.ModelCheckpoint(str(tmp_path / "tpl" / "e{epoch:02d}-{train_loss:.2f}.pt"),
                                            monitor="train_loss")
    single = ln.callbacks.ModelCheckpoint(tmp_path / "last.pt", monitor="train_loss")
    fitted = setup.fit((x, y), epochs=3, verbose=False, callbacks=[every, template, single])
    assert len(os.listdir(tmp_path / "all")) == 3
    names = sorted(os.listdir(tmp_path / "tpl"))
    assert [n[:4] for n in names] == ["e01-", "e02-", "e03-"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and same_weights(fitted.model, _loaded(last["model"]))


def _loaded(state):
    model = Net(3, 8, 1)
    model.load_state_dict(state)
    return model


class CountBatches(ln.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_begin(self, ctx):
        self.n += 1


def test_unknown_monitor_and_unwritable_folder_fail_before_the_first_batch(tmp_path):
    x, y = make_luz_data(60)
    setup = ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1)
    counter = CountBatches()
    with pytest.raises(ln.MonitorError, match=r"Unknown monitor 'valid_los'.*valid_loss"):
        setup.fit((x, y), epochs=2, valid_data=0.2, seed=0, verbose=False, callbacks=[
            counter, ln.callbacks.ModelCheckpoint(tmp_path / "c", monitor="valid_los")])
    with pytest.raises(ln.MonitorError, match="valid_\\* names need valid_data"):  # the default falls back instead
        setup.fit((x, y), epochs=2, verbose=False, callbacks=[
            counter, ln.callbacks.ModelCheckpoint(tmp_path, monitor="valid_loss", save_best_only=True)])
    with pytest.raises(ln.MonitorError, match=r"template.*nope"):
        setup.fit((x, y), epochs=2, verbose=False, callbacks=[
            counter, ln.callbacks.ModelCheckpoint(str(tmp_path / "{nope}.pt"), monitor="train_loss")])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for cb in (ln.callbacks.ModelCheckpoint(blocker / "ckpts", monitor="train_loss"),
               ln.callbacks.AutoResume(blocker / "resume")):
        with pytest.raises(ln.CheckpointError, match="cannot write to"):
            setup.fit((x, y), epochs=2, verbose=False, callbacks=[counter, cb])
    assert counter.n == 0


# ---------------------------------------------------------------------------- trust (issue 11)

SRC = str(Path(__file__).resolve().parents[2] / "src")
X, Y = make_luz_data(120)
SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _setup(**kw):
    return ln.setup(Net, loss=nn.MSELoss(), **kw).set_hparams(d_in=3, d_hidden=8, d_out=1)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- bug 5: names stay in their folder


class HostileLog(nn.Module):
    """A custom step that logs a name made to climb out of the checkpoint folder, and a text history entry."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

    def step(self, ctx):
        loss = F.mse_loss(self(ctx.input), ctx.target)
        if ctx.training:
            ctx.backward(loss)
            ctx.step_optimizer()
        ctx.log("../../../x", loss)
        ctx.loss = loss


class TextInHistory(ln.Callback):
    def on_epoch_end(self, ctx):
        ctx.history[-1]["tag"] = "../../../escaped/" + "\x00é"


def test_a_logged_name_and_field_values_never_leave_the_checkpoint_folder(tmp_path):
    base = tmp_path / "a" / "b" / "c"
    folder = base / "ckpt"
    by_name = ln.callbacks.ModelCheckpoint(folder, monitor="train_../../../x", mode="min")
    by_field = ln.callbacks.ModelCheckpoint(str(base / "tpl" / "{tag}-{epoch:/>4}.pt"), monitor="train_loss",
                                            mode="min")
    fitted = ln.setup(HostileLog).fit((X, Y), epochs=2, verbose=False,
                                      callbacks=[TextInHistory(), by_name, by_field])
    losses = [r["train_../../../x"] for r in fitted.history]
    assert [p.relative_to(tmp_path).as_posix() for p in _files(tmp_path)] == sorted(
        [f"a/b/c/ckpt/epoch-{e:02d}-train_.._.._.._x-{v:.3f}.pt" for e, v in zip((1, 2), losses)]
        + [f"a/b/c/tpl/_._.._.._escaped___-___{e}.pt" for e in (1, 2)])
    assert all(set(p.name) <= SAFE for p in _files(tmp_path))
    assert by_name.saved == [folder / f"epoch-{e:02d}-train_.._.._.._x-{v:.3f}.pt" for e, v in zip((1, 2), losses)]
    assert load_checkpoint(by_field.last_path)["epoch"] == 2


def test_a_template_that_climbs_out_of_its_folder_is_refused_before_training(tmp_path):
    counter = CountBatches()
    cb = ln.callbacks.ModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch}" / ".." / ".." / "out.pt"),
                                      monitor="train_loss")
    with pytest.raises(ln.CheckpointError, match=r"outside the folder .*ckpt"):
        _setup().fit((X, Y), epochs=2, verbose=False, callbacks=[counter, cb])
    assert counter.n == 0 and not (tmp_path / "out.pt").exists()


def test_odd_characters_in_the_users_own_paths_are_kept(tmp_path):
    odd = tmp_path / "odd dir ü [1] #%&'"
    folder_cb = ln.callbacks.ModelCheckpoint(odd / "all", monitor="train_loss")
    template_cb = ln.callbacks.ModelCheckpoint(str(odd / "a{{b}}" / "e{epoch}.pt"), monitor="train_loss")
    file_cb = ln.callbacks.ModelCheckpoint(odd / "last one.pt", monitor="train_loss")
    fitted = _setup().fit((X, Y), epochs=2, verbose=False, callbacks=[folder_cb, template_cb, file_cb])
    loss = [r["train_loss"] for r in fitted.history]
    assert _files(odd) == sorted([odd / "all" / f"epoch-{e:02d}-train_loss-{v:.3f}.pt" for e, v in zip((1, 2), loss)]
                                 + [odd / "a{b}" / "e1.pt", odd / "a{b}" / "e2.pt", odd / "last one.pt"])
    assert load_checkpoint(odd / "last one.pt")["epoch"] == 2


def test_paths_restored_from_a_checkpoint_outside_the_folder_are_dropped(tmp_path):
    cb = ln.callbacks.ModelCheckpoint(tmp_path / "ckpt", monitor="train_loss")
    inside = str(tmp_path / "ckpt" / "epoch-01-train_loss-0.500.pt")
    with pytest.warns(UserWarning, match=r"outside .*ckpt.*ignored"):
        cb.load_state_dict({"best": 0.5, "best_path": "/etc/passwd", "last_path": inside,
                            "saved": [inside, str(tmp_path / "ckpt" / ".." / "x.pt")]})
    assert cb.best_path is None and cb.last_path == Path(inside) and cb.saved == [Path(inside)]


# ---------------------------------------------------------------------------- bug 23 and odd paths


@pytest.mark.parametrize("make", [lambda p: ln.callbacks.AutoResume(p), lambda p: ln.callbacks.ModelCheckpoint(p)])
@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_path_is_refused(make, empty, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ln.LanternaError, match="empty"):
        make(empty)
    assert not any(tmp_path.iterdir())


def test_an_existing_file_where_a_folder_is_expected_is_explained_before_training(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    counter = CountBatches()
    for cb in (ln.callbacks.AutoResume(blocker), ln.callbacks.ModelCheckpoint(blocker, monitor="train_loss")):
        with pytest.raises(ln.CheckpointError, match=r"results' is an existing file, not a folder"):
            _setup().fit((X, Y), epochs=2, verbose=False, callbacks=[counter, cb])
    assert counter.n == 0 and blocker.read_text() == "not a folder"


def _read_only_folder(tmp_path):
    """A folder this process cannot write to: a read-only tmpfs as root (root ignores file modes)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.name == "posix" and os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(folder)],
                          capture_output=True).returncode:
            pytest.skip("mount -t tmpfs is not allowed here")
        return folder, "read-only file system", lambda: subprocess.run(["umount", str(folder)], check=False)
    folder.chmod(0o555)
    return folder, "permission denied", lambda: folder.chmod(0o755)


def test_a_read_only_folder_is_found_before_training(tmp_path):
    folder, words, undo = _read_only_folder(tmp_path)
    counter = CountBatches()
    try:
        for cb in (ln.callbacks.ModelCheckpoint(folder, monitor="train_loss"),
                   ln.callbacks.ModelCheckpoint(str(folder / "e{epoch}" / "m.pt"), monitor="train_loss"),
                   ln.callbacks.ModelCheckpoint(folder / "best.pt", monitor="train_loss"),
                   ln.callbacks.AutoResume(folder / "resume")):
            with pytest.raises(ln.CheckpointError, match=rf"cannot write to '{folder}.*{words}"):
                _setup().fit((X, Y), epochs=2, verbose=False, callbacks=[counter, cb])
        assert counter.n == 0
    finally:
        undo()


# ---------------------------------------------------------------------------- bug 6: a real file size limit

_CHILD = """
import json, os, resource, signal, sys
sys.path.insert(0, {src!r})
sys.path.insert(0, {tests!r})
import torch
from torch import nn
import lanterna as ln
from lanterna.io import load_checkpoint
from conftest import Net, make_luz_data

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, not a kill
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)


class LimitAt(ln.Callback):
    def on_epoch_end(self, ctx):  # before the checkpoints (runs_last): epoch 2's write hits the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048 if ctx.epoch == 2 else soft, hard))


x, y = make_luz_data(60)
out = {{}}
for name, cb in (("ModelCheckpoint", ln.callbacks.ModelCheckpoint({best!r}, monitor="train_loss")),
                 ("AutoResume", ln.callbacks.AutoResume({resume!r}))):
    try:
        ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=64, d_out=1).fit(
            (x, y), epochs=3, verbose=False, callbacks=[LimitAt(), cb])
        out[name] = {{"error": None}}
    except Exception as e:
        out[name] = {{"error": type(e).__name__, "message": str(e)}}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
out["best_epoch"] = load_checkpoint({best!r})["epoch"]
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_a_file_size_limit_during_fit_is_a_checkpoint_error_and_leaves_the_previous_file(tmp_path):
    best, resume = tmp_path / "best.pt", tmp_path / "resume"
    code = _CHILD.format(src=SRC, tests=str(Path(__file__).resolve().parents[1]), best=str(best),
                         resume=str(resume))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, path in (("ModelCheckpoint", best), ("AutoResume", resume / "resume-epoch-0002.pt")):
        assert out[name]["error"] == "CheckpointError", out[name]
        assert str(path) in out[name]["message"] and "file size limit" in out[name]["message"]
        assert "enforce fail" not in out[name]["message"]
    assert out["best_epoch"] == 1  # the previous file survives, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "resume"]
    assert [p.name for p in resume.iterdir()] == ["resume-epoch-0001.pt"]  # and no temp file anywhere
    load_checkpoint(resume / "resume-epoch-0001.pt")


# ---------------------------------------------------------------------------- bug 19c: no validation data


def test_default_modelcheckpoint_without_validation_falls_back_to_train_loss(tmp_path):
    for kw in ({}, {"monitor": "valid_loss"}, {"save_best_only": True}):
        folder = tmp_path / f"c{len(kw)}{'best' if kw.get('save_best_only') else ''}"
        cb = ln.callbacks.ModelCheckpoint(folder, **kw)
        with pytest.warns(UserWarning, match=r"no validation data.*'valid_loss'.*'train_loss'"):
            fitted = _setup().fit((X, Y), epochs=3, verbose=False, callbacks=[cb])
        loss = [r["train_loss"] for r in fitted.history]
        best_only = kw.get("save_best_only")
        kept = [e for e in (1, 2, 3) if not best_only or loss[e - 1] == min(loss[:e])]
        assert sorted(p.name for p in folder.iterdir()) == [f"epoch-{e:02d}-train_loss-{loss[e - 1]:.3f}.pt"
                                                             for e in kept]
        assert cb.monitor.name == "train_loss"


def test_an_explicit_valid_monitor_for_the_best_model_still_needs_validation(tmp_path):
    counter = CountBatches()
    with pytest.raises(ln.MonitorError, match=r"valid_\* names need valid_data"):
        _setup().fit((X, Y), epochs=2, verbose=False, callbacks=[
            counter, ln.callbacks.ModelCheckpoint(tmp_path, monitor="valid_loss", save_best_only=True)])
    assert counter.n == 0
    # with validation data the fallback does not happen, even for a callback that fell back in an earlier fit
    cb = ln.callbacks.ModelCheckpoint(tmp_path / "v")
    with pytest.warns(UserWarning, match="no validation data"):
        _setup().fit((X, Y), epochs=1, verbose=False, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = _setup().fit((X, Y), epochs=1, valid_data=0.25, seed=0, verbose=False, callbacks=[cb])
    assert cb.monitor.name == "valid_loss" and cb.last_path.name == (
        f"epoch-01-valid_loss-{fitted.history[0]['valid_loss']:.3f}.pt")


def test_model_checkpoint_folder_names_like_luz_and_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False,
                            callbacks=[ln.callbacks.ModelCheckpoint()])
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".pt")
    assert len(files) == 2
    for name, h in zip(files, f.history, strict=True):
        assert f"{h['epoch']:02d}" in name and "valid_loss" in name
        assert f"{h['valid_loss']:.3f}" in name or f"{h['valid_loss']:.4f}" in name, name


def test_model_checkpoint_mode_auto_maximises_accuracy(tmp_path):
    x, y = make_blobs(120)
    s = (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                  metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.0))
    # frozen weights: valid_acc constant → only the first epoch is 'best'
    s.fit((x, y), epochs=3, valid_data=0.25, verbose=False,
          callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmp_path / "a"), monitor="valid_acc", save_best_only=True)])
    assert len([p for p in (tmp_path / "a").iterdir() if p.suffix == ".pt"]) == 1
    f = s.set_opt_hparams(lr=0.05).fit(
        (x, y), epochs=4, valid_data=0.25, verbose=False, seed=0,
        callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmp_path / "b"), monitor="valid_acc", save_best_only=True)])
    best, expected = -math.inf, 0
    for h in f.history:
        if h["valid_acc"] > best:
            best, expected = h["valid_acc"], expected + 1
    assert len([p for p in (tmp_path / "b").iterdir() if p.suffix == ".pt"]) == expected
