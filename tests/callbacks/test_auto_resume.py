"""AutoResume (issue 5), in-process: resume parity, SIGTERM, damage, a full disk, a NaN stop, clean-up, and a
resume of another setup refused before anything is loaded. The subprocess kill tests live in tests/reliability/."""

from __future__ import annotations

import copy
import errno
import os
import pathlib
import signal

import pytest
import torch
from conftest import Canary, Net, NoisyDataset, frozen_setup, luz_net_setup, make_luz_data, same_weights
from torch import nn
from torch.utils.data import DataLoader

import lanterna as ln
from lanterna.io import checkpoint as ckpt_io
from lanterna.io import load_checkpoint

TIMING = ("epoch_time",)


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]



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
    assert same_weights(fitted.model, ref.model)
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
    assert _strip(resumed.history) == _strip(ref.history) and same_weights(resumed.model, ref.model)


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


# ---------------------------------------------------------------------------- another setup on resume (issue 11)

XS, YS = make_luz_data(120)


def _setup(**kw):
    return ln.setup(Net, loss=nn.MSELoss(), **kw).set_hparams(d_in=3, d_hidden=8, d_out=1)


class Grab(ln.Callback):
    """Copies the live model and optimizer states at fit begin, just before AutoResume (order 1200)."""

    order, runs_last = 1199, True

    def on_fit_begin(self, ctx):
        self.ctx = ctx
        self.model = copy.deepcopy(ctx.model.state_dict())
        self.opts = {k: copy.deepcopy(o.state_dict()) for k, o in ctx.optimizers.items()}
        self.step = ctx.step


class TwoGroups(Net):
    def set_optimizers(self, lr=0.01):
        return torch.optim.Adam([{"params": self.net[0].parameters()},
                                 {"params": self.net[2].parameters(), "lr": lr / 10}], lr=lr)


class Reversed(Net):
    def set_optimizers(self, lr=0.01):
        return torch.optim.Adam(list(self.parameters())[::-1], lr=lr)


def _written_by_adam(tmp_path, **kw):
    folder = tmp_path / "resume"
    with pytest.raises(ln.CallbackError, match="simulated crash"):
        _setup(optimizer=torch.optim.Adam, **kw).fit((XS, YS), epochs=3, verbose=False,
                                                     callbacks=[ln.callbacks.AutoResume(folder), Crash(2, 1)])
    return folder


def _refused(setup, folder, match, callbacks=()):
    grab = Grab()
    with pytest.raises(ln.CheckpointError, match=match) as info:
        setup.fit((XS, YS), epochs=3, verbose=False, callbacks=[grab, *callbacks, ln.callbacks.AutoResume(folder)])
    state = grab.ctx.model.state_dict()
    assert all(torch.equal(state[k], grab.model[k]) for k in state)  # nothing was loaded
    for name, opt in grab.ctx.optimizers.items():
        assert opt.state_dict() == grab.opts[name]
    assert grab.ctx.step == grab.step and grab.ctx.history == []
    assert "resume-epoch-0001.pt" in str(info.value) and "same setup" in str(info.value)
    assert f"remove the folder '{folder}'" in str(info.value)
    return info.value


def test_resuming_an_adam_checkpoint_with_sgd_is_refused_before_anything_is_loaded(tmp_path):
    folder = _written_by_adam(tmp_path)
    _refused(_setup(optimizer=torch.optim.SGD).set_opt_hparams(lr=0.01, momentum=0.9), folder,
             r"optimizer 'opt': saved torch\.optim\.adam\.Adam, this fit torch\.optim\.sgd\.SGD")
    # the same setup still resumes from it
    fitted = _setup(optimizer=torch.optim.Adam).fit((XS, YS), epochs=3, verbose=False,
                                                    callbacks=[ln.callbacks.AutoResume(folder)])
    assert [r["epoch"] for r in fitted.history] == [1, 2, 3]


def test_other_param_groups_and_schedulers_are_refused(tmp_path):
    folder = _written_by_adam(tmp_path)
    two = ln.setup(TwoGroups, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1)
    _refused(two, folder, r"param groups: saved 1 \(4 parameters\), this fit 2 \(2, 2 parameters\)")
    backwards = ln.setup(Reversed, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1)
    _refused(backwards, folder, r"parameters in another order .*group 0, parameter 0: saved \(8, 3\), this fit \(1,\)")
    step_lr = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1)
    _refused(_setup(optimizer=torch.optim.Adam), folder, r"schedulers: saved none, this fit StepLR",
             callbacks=[step_lr])


def test_an_old_checkpoint_without_the_optimizer_class_is_checked_by_its_hyperparameters(tmp_path):
    folder = _written_by_adam(tmp_path)
    path = folder / "resume-epoch-0001.pt"
    raw = load_checkpoint(path)
    del raw["meta"]["optimizers"]
    ln.io.save_checkpoint(path, raw)
    _refused(_setup(optimizer=torch.optim.SGD).set_opt_hparams(lr=0.01), folder,
             r"optimizer 'opt'.*hyperparameters.*betas.*momentum")


def test_another_architecture_is_refused_and_changes_nothing(tmp_path):
    folder = _written_by_adam(tmp_path)
    grab = Grab()
    with pytest.raises(ln.ModelMismatchError, match=r"net\.0\.weight: saved \(8, 3\), this model \(4, 3\)"):
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam).set_hparams(d_in=3, d_hidden=4, d_out=1).fit(
            (XS, YS), epochs=3, verbose=False, callbacks=[grab, ln.callbacks.AutoResume(folder)])
    state = grab.ctx.model.state_dict()
    assert all(torch.equal(state[k], grab.model[k]) for k in state)


def test_auto_resume_state_kept_after_nan_and_removed_after_early_stop(tmp_path):
    x, y = make_luz_data(64)
    state = tmp_path / "state"

    class PoisonAt2(ln.Callback):
        def on_train_batch_after_loss(self, ctx):
            if ctx.epoch == 2:
                ctx.loss = ctx.loss * float("nan")

    with pytest.raises(Exception, match=r"NaN|Inf|nan"):
        luz_net_setup().fit((x, y), epochs=3, verbose=False, callbacks=[ln.callbacks.AutoResume(state), PoisonAt2()])
    assert state.exists() and any(p.is_file() for p in state.rglob("*"))

    state2 = tmp_path / "state2"
    f = frozen_setup().fit((x, y), epochs=10, valid_data=0.25, verbose=False,
                           callbacks=[ln.callbacks.AutoResume(state2), ln.callbacks.EarlyStopping(patience=1)])
    assert len(f.history) == 2
    assert not state2.exists() or not any(p.is_file() for p in state2.rglob("*"))
