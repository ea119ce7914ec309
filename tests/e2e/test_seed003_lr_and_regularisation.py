"""Seed 003, the d2l training notes: learning-rate schedulers (per epoch, on plateau, per batch), finding a
learning rate, weight decay on chosen parameter groups, and dropout off in evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    Net,
    luz_net_setup,
    make_luz_data,
)
from torch import nn

import lanterna as ln


def test_lr_schedulers_epoch_plateau_and_per_batch():
    x, y = make_luz_data(128)
    sgd = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(d_in=3, d_hidden=8, d_out=1)

    f = sgd.set_opt_hparams(lr=0.1).fit(
        (x, y), epochs=3, verbose=False,
        callbacks=[ln.callbacks.LRScheduler(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9)])
    assert [h["lr"] for h in f.history] == pytest.approx([0.1, 0.09, 0.081])

    seen = []

    class SpyPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics, *args, **kwargs):
            seen.append(float(metrics))
            return super().step(metrics, *args, **kwargs)

    f = sgd.set_opt_hparams(lr=0.05).fit((x, y), epochs=3, verbose=False,
                                         callbacks=[ln.callbacks.LRScheduler(SpyPlateau, patience=0)])
    assert seen == pytest.approx([h["train_loss"] for h in f.history])  # no validation: train_loss

    seen.clear()
    f = sgd.set_opt_hparams(lr=0.05).fit((x, y), epochs=3, valid_data=0.25, verbose=False,
                                         callbacks=[ln.callbacks.LRScheduler(SpyPlateau, patience=0)])
    assert seen == pytest.approx([h["valid_loss"] for h in f.history])  # default monitor valid_loss

    seen.clear()
    f = sgd.set_opt_hparams(lr=0.05).fit(
        (x, y), epochs=2, valid_data=0.25, verbose=False,
        callbacks=[ln.callbacks.LRScheduler(SpyPlateau, monitor="train_loss", patience=0)])
    assert seen == pytest.approx([h["train_loss"] for h in f.history])

    lrs = []

    class BatchLR(ln.Callback):
        def on_train_batch_begin(self, ctx):
            lrs.append(ctx.opt.param_groups[0]["lr"])

    n_batches = math.ceil(128 / 32)
    sgd.set_opt_hparams(lr=0.1).fit(
        (x, y), epochs=2, verbose=False,
        callbacks=[BatchLR(), ln.callbacks.LRScheduler(torch.optim.lr_scheduler.OneCycleLR,
                                                       call_on="on_train_batch_end", max_lr=0.1,
                                                       total_steps=2 * n_batches)])
    assert len(lrs) == 2 * n_batches and len(set(lrs)) == len(lrs)  # changes every batch


def test_lr_finder_cycles_data_and_leaves_setup_untouched():
    x, y = make_luz_data(64)  # 2 batches per epoch
    s = luz_net_setup()
    res = ln.lr_finder(s, (x, y), start_lr=1e-5, end_lr=1.0, steps=20)
    df = res.df
    assert {"lr", "loss"} <= set(df.columns)
    assert len(df) > 2  # more steps than one epoch of batches
    assert df["lr"].is_monotonic_increasing
    assert isinstance(res.suggestion, float) and 1e-5 <= res.suggestion <= 1.0
    assert res.plot().__class__.__name__ == "Figure"
    a = s.fit((x, y), epochs=1, seed=0, verbose=False)
    b = luz_net_setup().fit((x, y), epochs=1, seed=0, verbose=False)
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"])
    assert a.opt_hparams == {"lr": 0.01}


def test_lr_finder_stops_early_when_loss_diverges():
    x, y = make_luz_data(256)
    s = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(d_in=3, d_hidden=32, d_out=1)
    res = ln.lr_finder(s, (x, y), start_lr=1e-4, end_lr=1e4, steps=100)
    assert len(res.df) < 100


def test_weight_decay_param_groups_via_set_optimizers():
    """Seed 003: weight decay on the weight only, bias untouched, via per-parameter groups."""

    class Linreg(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(20, 1)

        def forward(self, x):
            return self.net(x)

        def set_optimizers(self, lr=0.01, wd=0.0):
            return torch.optim.SGD([{"params": self.net.weight, "weight_decay": wd}, {"params": self.net.bias}],
                                   lr=lr)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 20, generator=g)
    y = x @ torch.full((20, 1), 0.01) + 0.05 + 0.01 * torch.randn(40, 1, generator=g)
    groups = {}

    class Spy(ln.Callback):
        def on_fit_begin(self, ctx):
            groups["wd"] = [pg["weight_decay"] for pg in ctx.opt.param_groups]

    s = ln.setup(Linreg, loss=nn.MSELoss())
    torch.manual_seed(0)
    f0 = s.set_opt_hparams(lr=0.03, wd=0.0).fit((x, y), epochs=10, verbose=False, seed=0)
    f3 = s.set_opt_hparams(lr=0.03, wd=3.0).fit((x, y), epochs=10, verbose=False, seed=0, callbacks=[Spy()])
    assert groups["wd"] == [3.0, 0]
    assert f3.model.net.weight.norm() < 0.5 * f0.model.net.weight.norm()
    assert f3.opt_hparams == {"lr": 0.03, "wd": 3.0}


def test_predict_is_in_eval_mode_and_deterministic_with_dropout():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 1))

        def forward(self, x):
            return self.net(x)

    modes = []

    class Mode(ln.Callback):
        def on_train_batch_begin(self, ctx):
            modes.append(("train", ctx.model.training))

        def on_valid_batch_begin(self, ctx):
            modes.append(("valid", ctx.model.training))

    x, y = make_luz_data(64)
    f = ln.setup(Drop, loss=nn.MSELoss()).fit((x, y), epochs=1, valid_data=0.25, verbose=False, callbacks=[Mode()])
    assert ("train", True) in modes and ("valid", False) in modes and ("valid", True) not in modes
    torch.testing.assert_close(f.predict(x), f.predict(x), rtol=0, atol=0)
    assert f.evaluate((x, y)).metrics["loss"] == pytest.approx(f.evaluate((x, y)).metrics["loss"], rel=0)
