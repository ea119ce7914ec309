"""ModelCheckpoint (issue 3) and AutoResume (issue 5), in-process: files, resume parity, SIGTERM, damage,
a full disk, a NaN stop and clean-up. The subprocess kill tests live in tests/reliability/."""

from __future__ import annotations

import copy
import errno
import os
import pathlib
import signal

import pytest
import torch
from conftest import Canary, Net, NoisyDataset, make_luz_data
from torch import nn
from torch.utils.data import DataLoader

import lanterna as ln
from lanterna.io import checkpoint as ckpt_io
from lanterna.io import load_checkpoint

TIMING = ("epoch_time",)


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
    assert last["epoch"] == 3 and _same_weights(fitted.model, _loaded(last["model"]))


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


# ---------------------------------------------------------------------------- AutoResume: parity


class Crash(ln.Callback):
    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def on_train_batch_end(self, ctx):
        if (ctx.epoch, ctx.iter) == self.at:
            raise RuntimeError("simulated crash")


class Sigterm(ln.Callback):
    """Sends this process a real SIGTERM in the middle of a batch's hooks."""

    def __init__(self, epoch, batch, phase="train"):
        self.at, self.phase = (epoch, batch), phase

    def on_train_batch_end(self, ctx):
        if self.phase == "train" and (ctx.epoch, ctx.iter) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_valid_batch_end(self, ctx):
        if self.phase == "valid" and (ctx.epoch, ctx.iter) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class LogPred(ln.Callback):
    def on_train_batch_end(self, ctx):
        ctx.log("pred_mean", ctx.pred.mean())


X, Y = make_luz_data(300)


def _fit(kind, callbacks=(), epochs=5, seed=3, **kw):
    setup = ln.setup(Canary, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()])
    if kind == "memory":
        data = {"data": (X, Y), "valid_data": 0.2, "seed": seed}
    else:
        torch.manual_seed(seed)
        data = {"data": DataLoader(NoisyDataset(X[:240], Y[:240]), batch_size=32, shuffle=True),
                "valid_data": DataLoader(NoisyDataset(X[240:], Y[240:]), batch_size=25), "seed": seed}
    sched = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.05, call_on="on_train_batch_end")
    return setup.fit(epochs=epochs, verbose=False, callbacks=[sched, LogPred(), *callbacks], **{**data, **kw})


@pytest.fixture(scope="module")
def reference():
    return {kind: _fit(kind) for kind in ("memory", "loader")}


def _assert_same(fitted, ref):
    assert _strip(fitted.history) == _strip(ref.history)
    assert _same_weights(fitted.model, ref.model)
    assert int(fitted.model.calls) == int(ref.model.calls)


@pytest.mark.parametrize("kind", ["memory", "loader"])
def test_crash_then_rerun_matches_the_uninterrupted_run(kind, reference, tmp_path):
    folder = tmp_path / "resume"
    for at in ((2, 3), (4, 1)):
        with pytest.raises(ln.CallbackError, match="simulated crash"):
            _fit(kind, [ln.callbacks.AutoResume(folder), Crash(*at)])
        assert folder.is_dir()
    auto = ln.callbacks.AutoResume(folder)
    fitted = _fit(kind, [auto])
    assert auto.resumed_from is not None and auto.resumed_from.name == "resume-epoch-0003.pt"
    _assert_same(fitted, reference[kind])
    assert not folder.exists()  # a completed fit removes its resume state


def test_saving_resume_state_does_not_perturb_the_run(reference, tmp_path):
    _assert_same(_fit("memory", [ln.callbacks.AutoResume(tmp_path / "r")]), reference["memory"])


@pytest.mark.parametrize("kind", ["memory", "loader"])
def test_sigterm_finishes_the_step_saves_mid_epoch_and_exits_143(kind, reference, tmp_path):
    folder = tmp_path / "resume"
    with pytest.raises(SystemExit) as info:
        _fit(kind, [ln.callbacks.AutoResume(folder), Sigterm(3, 2)])
    assert info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed
    mid = folder / "resume-epoch-0003-batch-0000002.pt"
    state = load_checkpoint(mid)
    assert state["position"] == {"epoch": 3, "batch": 2} and state["epoch"] == 2
    # during validation the epoch is finished first
    with pytest.raises(SystemExit):
        _fit(kind, [ln.callbacks.AutoResume(folder), Sigterm(4, 1, phase="valid")])
    assert load_checkpoint(folder / "resume-epoch-0004.pt")["epoch"] == 4
    with pytest.raises(SystemExit):  # again inside the resumed epoch, mid-epoch
        _fit(kind, [ln.callbacks.AutoResume(folder), Sigterm(5, 3)])
    auto = ln.callbacks.AutoResume(folder)
    fitted = _fit(kind, [auto])
    assert auto.resumed_from.name == "resume-epoch-0005-batch-0000003.pt"
    _assert_same(fitted, reference[kind])


def test_gradient_accumulation_group_is_finished_before_a_mid_epoch_checkpoint(tmp_path):
    def fit(*cbs):
        return ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1).fit(
            (X, Y), epochs=3, seed=0, verbose=False, dataloader_options={"batch_size": 20},
            callbacks=[ln.callbacks.GradientAccumulation(4), *cbs])

    ref = fit()
    folder = tmp_path / "r"
    with pytest.raises(SystemExit):
        fit(ln.callbacks.AutoResume(folder), Sigterm(2, 6))
    assert [p.name for p in folder.glob("*batch*")] == ["resume-epoch-0002-batch-0000008.pt"]
    resumed = fit(ln.callbacks.AutoResume(folder))
    assert _strip(resumed.history) == _strip(ref.history) and _same_weights(resumed.model, ref.model)


# ---------------------------------------------------------------------------- damage and disks


def _crash_twice(folder):
    for at in ((2, 2), (3, 2)):
        with pytest.raises(ln.CallbackError):
            _fit("memory", [ln.callbacks.AutoResume(folder), Crash(*at)])
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["resume-epoch-0001.pt", "resume-epoch-0002.pt"]
    return folder / "resume-epoch-0002.pt"


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p):
    data = bytearray(p.read_bytes())
    raw = load_checkpoint(p)["model"]["net.0.weight"].numpy().tobytes()
    at = bytes(data).find(raw[:32]) + 3
    data[at] ^= 0x40
    p.write_bytes(bytes(data))


def _empty(p):
    p.write_bytes(b"")


def _no_checksum(p):
    raw = torch.load(p, weights_only=True)
    del raw["integrity"]
    torch.save(raw, p)


@pytest.mark.parametrize("damage", [_truncate, _flip, _empty, _no_checksum])
def test_damaged_latest_falls_back_to_the_previous_good_one(damage, reference, tmp_path):
    folder = tmp_path / "resume"
    latest = _crash_twice(folder)
    damage(latest)
    with pytest.raises(ln.DamagedCheckpointError):
        load_checkpoint(latest)
    auto = ln.callbacks.AutoResume(folder)
    with pytest.warns(UserWarning, match=r"resume-epoch-0002\.pt.*resuming from resume-epoch-0001\.pt"):
        fitted = _fit("memory", [auto])
    assert auto.resumed_from.name == "resume-epoch-0001.pt"
    _assert_same(fitted, reference["memory"])


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    folder = tmp_path / "resume"
    real_save = torch.save
    calls = {"n": 0}
    previous = folder / "resume-epoch-0002.pt"
    before = {}

    def save_or_fail(obj, f):
        calls["n"] += 1
        if calls["n"] == 3:  # the third epoch's checkpoint hits a full disk half-way
            before["bytes"] = previous.read_bytes()
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ckpt_io.torch, "save", save_or_fail)
    with pytest.raises(ln.CheckpointError, match="No space left on device"):
        _fit("memory", [ln.callbacks.AutoResume(folder)])
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["resume-epoch-0001.pt", "resume-epoch-0002.pt"]
    assert previous.read_bytes() == before["bytes"]  # byte-identical, and no temp file left
    load_checkpoint(previous)
    _assert_same(_fit("memory", [ln.callbacks.AutoResume(folder)]), reference["memory"])


def test_rotation_never_leaves_zero_whole_checkpoints(tmp_path, monkeypatch):
    folder = tmp_path / "resume"
    real_unlink = pathlib.Path.unlink
    checked = []

    def guarded_unlink(self, missing_ok=False):
        if self.parent == folder and self.suffix == ".pt":
            others = [p for p in folder.glob("resume-*.pt") if p != self]
            whole = []
            for p in others:
                try:
                    load_checkpoint(p)
                    whole.append(p)
                except ln.CheckpointError:
                    pass
            checked.append(len(whole))
            assert whole, "rotation would leave no whole checkpoint"
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", guarded_unlink)
    with pytest.raises(ln.CallbackError):
        _fit("memory", [ln.callbacks.AutoResume(folder, keep_last=1), Crash(4, 1)])
    assert checked and all(n >= 1 for n in checked)
    assert [p.name for p in folder.iterdir()] == ["resume-epoch-0003.pt"]


# ---------------------------------------------------------------------------- how fits end


class PoisonAt(ln.Callback):
    """Makes one batch's input NaN; keeps a copy of the weights after every optimizer step."""

    def __init__(self, epoch, batch):
        self.at, self.after_step = (epoch, batch), None

    def on_train_batch_begin(self, ctx):
        if (ctx.epoch, ctx.iter) == self.at:
            ctx.input = torch.full_like(ctx.input, float("nan"))

    def on_train_batch_after_step(self, ctx):
        self.after_step = copy.deepcopy(ctx.model.state_dict())


def test_nan_stop_keeps_weights_of_the_last_good_step_and_every_checkpoint(tmp_path):
    folder, best = tmp_path / "resume", tmp_path / "best"
    poison = PoisonAt(3, 4)
    setup = ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1)
    model_holder = {}

    class Grab(ln.Callback):
        def on_fit_begin(self, ctx):
            model_holder["model"] = ctx.model

    with pytest.raises(ln.NonFiniteLossError, match="epoch 3, batch 4"):
        setup.fit((X, Y), epochs=6, verbose=False, seed=0, callbacks=[
            poison, Grab(), ln.callbacks.AutoResume(folder),
            ln.callbacks.ModelCheckpoint(best, monitor="train_loss")])
    state = model_holder["model"].state_dict()
    assert all(torch.equal(state[k], poison.after_step[k]) for k in state)
    assert sorted(p.name for p in folder.iterdir()) == ["resume-epoch-0001.pt", "resume-epoch-0002.pt"]
    assert len(list(best.iterdir())) == 2


class StopAfter(ln.Callback):
    def __init__(self, epoch, how):
        self.epoch, self.how = epoch, how

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            if self.how == "early":
                ctx.stop_training = True
            else:
                ctx.interrupted = True  # what the first Ctrl-C sets


@pytest.mark.parametrize(("how", "status", "kept"), [("early", "stopped_early", False),
                                                     ("ctrl_c", "interrupted", True)])
def test_state_removed_after_early_stop_kept_after_ctrl_c(how, status, kept, tmp_path):
    folder = tmp_path / "resume"
    fitted = _fit("memory", [ln.callbacks.AutoResume(folder), StopAfter(2, how)])
    assert fitted.status == status
    assert folder.exists() == kept


def test_an_unseeded_split_is_reported_on_resume(tmp_path):
    folder = tmp_path / "resume"
    with pytest.raises(ln.CallbackError):
        _fit("memory", [ln.callbacks.AutoResume(folder), Crash(2, 1)], seed=None)
    torch.manual_seed(12345)  # another global RNG state: another validation split
    with pytest.warns(UserWarning, match="pass seed= to fit"):
        _fit("memory", [ln.callbacks.AutoResume(folder)], seed=None, epochs=2)


def test_a_checkpoint_of_another_architecture_is_explained(tmp_path):
    folder = tmp_path / "resume"
    with pytest.raises(ln.CallbackError):
        _fit("memory", [ln.callbacks.AutoResume(folder), Crash(2, 1)])
    with pytest.raises(ln.ModelMismatchError, match=r"net\.0\.weight.*delete it to start afresh"):
        ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=4, d_out=1).fit(
            (X, Y), epochs=2, verbose=False, callbacks=[ln.callbacks.AutoResume(folder)])
