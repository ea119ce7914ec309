"""EMA and SWA (issue 14, item 3) against hand-written torch loops on ``torch.optim.swa_utils``: the averaged
weights and BatchNorm buffers bit for bit, validation values computed with the EMA weights, the learning rates of
SWALR, exact resume after a crash and after a mid-epoch SIGTERM, and errors before training."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import make_luz_data
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln

SEED = 7
X, Y = make_luz_data(160)
TRAIN, VALID = TensorDataset(X[:128], Y[:128]), TensorDataset(X[128:], Y[128:])


class BNNet(nn.Module):
    """A BatchNorm in the middle, so buffers are averaged (EMA) and recomputed (SWA's update_bn)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _loaders():
    return DataLoader(TRAIN, batch_size=16, shuffle=True), DataLoader(VALID, batch_size=16)


def _fit(callbacks, epochs=4, lr=0.05, **kw):
    train, valid = _loaders()
    return ln.setup(BNNet, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=lr, momentum=0.9).fit(
        train, epochs=epochs, valid_data=valid, seed=SEED, verbose=False, callbacks=callbacks, **kw)


def _valid_loss(models, valid):
    """The validation loss of each model, over one pass of ``valid`` (each pass of a DataLoader draws a seed)."""
    totals = [0.0] * len(models)
    with torch.no_grad():
        for m in models:
            m.eval()
        for xb, yb in valid:
            for i, m in enumerate(models):
                totals[i] += float(F.mse_loss(m(xb), yb, reduction="sum"))
    return [t / len(valid.dataset) for t in totals]


def _assert_equal_states(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def _ema_by_hand(decay, every, epochs=4, accumulate=1):
    torch.manual_seed(SEED)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    train, valid = _loaders()
    steps, ema_losses, raw_losses = 0, [], []
    for _ in range(epochs):
        model.train()
        for i, (xb, yb) in enumerate(train, 1):
            (F.mse_loss(model(xb), yb) / accumulate).backward()
            if i % accumulate:
                continue
            opt.step()
            opt.zero_grad()
            steps += 1
            if steps % every == 0:
                ema.update_parameters(model)
        ema_loss, raw_loss = _valid_loss([ema, model], valid)
        ema_losses.append(ema_loss)
        raw_losses.append(raw_loss)
    return model, ema, ema_losses, raw_losses


@pytest.mark.parametrize("validate_with_ema", [True, False])
def test_ema_matches_the_hand_written_loop_and_validates_with_the_averaged_weights(validate_with_ema):
    _, ema, ema_losses, raw_losses = _ema_by_hand(decay=0.8, every=2)
    cb = ln.callbacks.EMA(decay=0.8, every_n_steps=2, validate_with_ema=validate_with_ema)
    fitted = _fit([cb])
    _assert_equal_states(fitted.model, ema.module)  # fitted.model holds the EMA (parameters and BN buffers)
    assert cb.updates == int(ema.n_averaged) == 4 * 8 // 2
    expected = ema_losses if validate_with_ema else raw_losses
    assert [h["valid_loss"] for h in fitted.history] == pytest.approx(expected, rel=1e-6)


def test_ema_with_gradient_accumulation_updates_only_on_real_steps():
    _, ema, ema_losses, _ = _ema_by_hand(decay=0.7, every=1, accumulate=2)
    cb = ln.callbacks.EMA(decay=0.7)
    fitted = _fit([ln.callbacks.GradientAccumulation(2), cb])
    assert cb.updates == 4 * 4
    _assert_equal_states(fitted.model, ema.module)
    assert [h["valid_loss"] for h in fitted.history] == pytest.approx(ema_losses, rel=1e-6)


def test_ema_swaps_the_training_weights_back_after_validation_exactly():
    """Validating with the EMA or with the raw weights, the training trajectory is the same: the swap puts back
    every bit."""
    swapped, kept = ln.callbacks.EMA(decay=0.9), ln.callbacks.EMA(decay=0.9, validate_with_ema=False)
    _fit([swapped])
    _fit([kept])
    _assert_equal_states(swapped.averaged, kept.averaged)


class CrashAt(ln.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("simulated crash")


class SigtermAt(ln.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_end(self, ctx):
        if (ctx.epoch, ctx.iter) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _history(fitted):
    return [(r["epoch"], r["lr"], r["train_loss"], r["valid_loss"]) for r in fitted.history]


@pytest.mark.parametrize("make", [lambda: ln.callbacks.EMA(decay=0.9, every_n_steps=3),
                                  lambda: ln.callbacks.SWA(swa_lr=0.02, start_epoch=2, anneal_epochs=2)],
                         ids=["ema", "swa"])
def test_autoresume_after_a_crash_and_a_mid_epoch_sigterm_is_bit_exact(make, tmp_path):
    sched = lambda: ln.callbacks.LRScheduler(ExponentialLR, gamma=0.9)  # noqa: E731
    ref = _fit([make(), sched()], epochs=5)
    folder = tmp_path / "resume"
    with pytest.raises(ln.CallbackError, match="simulated crash"):
        _fit([make(), sched(), ln.callbacks.AutoResume(folder), CrashAt(3)], epochs=5)
    with pytest.raises(SystemExit):  # preempted in epoch 4, after batch 5: a mid-epoch checkpoint
        _fit([make(), sched(), ln.callbacks.AutoResume(folder), SigtermAt(4, 5)], epochs=5)
    auto = ln.callbacks.AutoResume(folder)
    resumed = _fit([make(), sched(), auto], epochs=5)
    assert auto.resumed_from is not None and "batch" in auto.resumed_from.name
    assert _history(resumed) == _history(ref)
    _assert_equal_states(resumed.model, ref.model)


def _swa_by_hand(epochs, swa_lr, start, anneal, gamma=None, strategy="cos"):
    torch.manual_seed(SEED)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = ExponentialLR(opt, gamma=gamma) if gamma is not None else None
    swa_model = AveragedModel(model)
    swa_sched = SWALR(opt, swa_lr=swa_lr, anneal_epochs=anneal, anneal_strategy=strategy)
    train, valid = _loaders()
    lrs, valid_losses = [], []
    for epoch in range(1, epochs + 1):
        lrs.append(opt.param_groups[0]["lr"])
        model.train()
        for xb, yb in train:
            opt.zero_grad()
            F.mse_loss(model(xb), yb).backward()
            opt.step()
        valid_losses += _valid_loss([model], valid)
        if epoch >= start:
            swa_model.update_parameters(model)
            swa_sched.step()
        elif sched is not None:
            sched.step()
    update_bn(train, swa_model)
    return swa_model, lrs, valid_losses


@pytest.mark.parametrize("gamma, strategy", [(None, "cos"), (0.5, "linear")], ids=["alone", "after-exponential"])
def test_swa_matches_the_hand_written_recipe(gamma, strategy):
    swa_model, lrs, valid_losses = _swa_by_hand(6, swa_lr=0.01, start=3, anneal=2, gamma=gamma, strategy=strategy)
    cb = ln.callbacks.SWA(swa_lr=0.01, start_epoch=3, anneal_epochs=2, anneal_strategy=strategy)
    extra = [] if gamma is None else [ln.callbacks.LRScheduler(ExponentialLR, gamma=gamma)]
    fitted = _fit([*extra, cb], epochs=6)
    assert int(cb.averaged.n_averaged) == int(swa_model.n_averaged) == 4
    assert [h["lr"] for h in fitted.history] == pytest.approx(lrs, rel=1e-12)
    assert [h["valid_loss"] for h in fitted.history] == pytest.approx(valid_losses, rel=1e-6)  # training weights
    _assert_equal_states(fitted.model, swa_model.module)  # averaged weights, BN statistics from update_bn


def test_swa_start_after_the_last_epoch_is_an_error_before_training():
    with pytest.raises(ln.LanternaError, match=r"start_epoch=9.*4 epochs"):
        _fit([ln.callbacks.SWA(swa_lr=0.01, start_epoch=9)], epochs=4)


def test_a_per_batch_schedule_during_swa_is_an_error():
    sched = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, call_on="on_train_batch_end")
    with pytest.raises(ln.LanternaError, match="per-batch schedule"):
        _fit([sched, ln.callbacks.SWA(swa_lr=0.01, start_epoch=1)], epochs=3)


@pytest.mark.parametrize("build, name", [
    (lambda: ln.callbacks.EMA(decay=1.5), "decay"),
    (lambda: ln.callbacks.EMA(every_n_steps=0), "every_n_steps"),
    (lambda: ln.callbacks.EMA(validate_with_ema="yes"), "validate_with_ema"),
    (lambda: ln.callbacks.SWA(swa_lr=0, start_epoch=1), "swa_lr"),
    (lambda: ln.callbacks.SWA(swa_lr=0.1, start_epoch=0), "start_epoch"),
    (lambda: ln.callbacks.SWA(swa_lr=0.1, start_epoch=1, anneal_epochs=-1), "anneal_epochs"),
    (lambda: ln.callbacks.SWA(swa_lr=0.1, start_epoch=1, anneal_strategy="exp"), "anneal_strategy"),
])
def test_bad_arguments_are_errors_naming_them(build, name):
    with pytest.raises(ln.LanternaError, match=name):
        build()
