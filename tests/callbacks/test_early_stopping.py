"""EarlyStopping: luz's rules on the chapter's toy regression (seed 000)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import frozen_setup, make_luz_data
from torch import nn

import lanterna as ln


def _best_epoch(values: list[float], min_delta: float = 0.0, baseline: float | None = None) -> int:
    """The last epoch that improved on the running best by more than min_delta (0: none did)."""
    best, best_epoch = baseline, 0
    for epoch, v in enumerate(values, 1):
        if best is None or v < best - min_delta:
            best, best_epoch = v, epoch
    return best_epoch


def test_stops_patience_epochs_after_the_best_and_prints_luz_line(luz_setup, luz_split, capsys):
    train_dl, valid_dl, _ = luz_split
    fitted = luz_setup.set_opt_hparams(lr=0.05).fit(
        train_dl, epochs=200, valid_data=valid_dl, seed=1,
        callbacks=[ln.callbacks.EarlyStopping(patience=4)])
    n = len(fitted.history)
    valid = [r["valid_loss"] for r in fitted.history]
    assert fitted.status == "stopped_early" and n < 200
    assert n == _best_epoch(valid) + 4
    assert min(valid[-4:]) >= min(valid)  # the last 4 epochs did not improve
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"Early stopping at epoch {n} of 200"
    assert out[-3].startswith("Train metrics: Loss: ") and out[-2].startswith("Valid metrics: Loss: ")
    # it stopped at the noise floor: the chapter's noise has variance 1
    assert valid[-1] == pytest.approx(1.0, abs=0.35)


def test_min_delta_counts_only_real_improvements(luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split
    cb = ln.callbacks.EarlyStopping(patience=2, min_delta=0.05)
    fitted = luz_setup.set_opt_hparams(lr=0.05).fit(train_dl, epochs=100, valid_data=valid_dl, seed=2,
                                                    callbacks=[cb], verbose=False)
    valid = [r["valid_loss"] for r in fitted.history]
    assert len(valid) == _best_epoch(valid, min_delta=0.05) + 2
    assert cb.best_epoch == _best_epoch(valid, min_delta=0.05)
    assert cb.best == valid[cb.best_epoch - 1]


def test_baseline_must_be_beaten(luz_setup, luz_split, capsys):
    train_dl, valid_dl, _ = luz_split
    # an MSE of 0 can never be beaten: every epoch counts as not improving
    fitted = luz_setup.fit(train_dl, epochs=50, valid_data=valid_dl, seed=0,
                           callbacks=[ln.callbacks.EarlyStopping(patience=3, baseline=0.0)])
    assert len(fitted.history) == 3
    assert capsys.readouterr().out.splitlines()[-1] == "Early stopping at epoch 3 of 50"
    # a reachable baseline: the best is counted from the first epoch that beats it
    fitted = luz_setup.set_opt_hparams(lr=0.05).fit(
        train_dl, epochs=100, valid_data=valid_dl, seed=0, verbose=False,
        callbacks=[ln.callbacks.EarlyStopping(patience=3, baseline=2.0)])
    valid = [r["valid_loss"] for r in fitted.history]
    assert len(valid) == _best_epoch(valid, baseline=2.0) + 3


def test_never_stops_before_min_epochs(luz_setup, luz_split, capsys):
    train_dl, valid_dl, _ = luz_split
    fitted = luz_setup.fit(train_dl, epochs=(6, 50), valid_data=valid_dl, seed=0,
                           callbacks=[ln.callbacks.EarlyStopping(patience=2, baseline=0.0)])
    assert len(fitted.history) == 6 and fitted.status == "stopped_early"
    assert capsys.readouterr().out.splitlines()[-1] == "Early stopping at epoch 6 of 50"


def test_max_mode_on_accuracy_and_train_monitor(clf_setup, clf_data):
    x, y = clf_data
    cb = ln.callbacks.EarlyStopping(monitor="train_acc", patience=2)
    fitted = clf_setup.fit((x, y), epochs=60, seed=0, callbacks=[cb], verbose=False)
    assert cb.mode == "max"  # read from the metric's higher_is_better at fit begin
    acc = [r["train_acc"] for r in fitted.history]
    best = max(range(len(acc)), key=lambda i: (acc[i], -i)) + 1  # first epoch reaching the maximum
    assert len(acc) == best + 2 and cb.best == max(acc)


def test_bad_input_is_refused_before_the_first_batch(luz_setup, luz_data):
    batches = []

    class Count(ln.Callback):
        def on_train_batch_begin(self, ctx):
            batches.append(ctx.iter)

    with pytest.raises(ln.MonitorError, match=r"Unknown monitor 'valid_mse'\. Available: train_loss, train_mae, "
                                              r"valid_loss, valid_mae"):
        luz_setup.fit(luz_data, valid_data=0.2, callbacks=[ln.callbacks.EarlyStopping("valid_mse"), Count()],
                      verbose=False)
    with pytest.raises(ln.MonitorError, match="valid_data"):
        luz_setup.fit(luz_data, callbacks=[ln.callbacks.EarlyStopping(), Count()], verbose=False)
    assert batches == []
    with pytest.raises(ln.MonitorError, match="mode='best'"):
        ln.callbacks.EarlyStopping(mode="best")
    with pytest.raises(ln.LanternaError, match="patience"):
        ln.callbacks.EarlyStopping(patience=-1)


def test_state_dict_round_trips_through_a_weights_only_load(tmp_path, luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split
    cb = ln.callbacks.EarlyStopping(patience=50)
    luz_setup.fit(train_dl, epochs=3, valid_data=valid_dl, callbacks=[cb], verbose=False)
    torch.save(cb.state_dict(), tmp_path / "es.pt")
    other = ln.callbacks.EarlyStopping(patience=50)
    other.load_state_dict(torch.load(tmp_path / "es.pt", weights_only=True))
    assert other.state_dict() == cb.state_dict() and other.best == cb.best


def test_custom_step_logged_monitor_is_checked_after_the_first_epoch():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def step(self, ctx):
            ctx.pred = self.lin(ctx.input)
            ctx.loss = ((ctx.pred - ctx.target) ** 2).mean()
            ctx.log("custom", ctx.loss.detach())
            if ctx.training:
                ctx.backward(ctx.loss)
                ctx.step_optimizer()

    x = torch.randn(32, 2)
    y = x.sum(1, keepdim=True)
    fitted = ln.setup(Custom).fit((x, y), epochs=3, verbose=False,
                                  callbacks=[ln.callbacks.EarlyStopping("train_custom", patience=5, mode="min")])
    assert len(fitted.history) == 3
    with pytest.raises(ln.MonitorError, match="train_nope.*train_custom"):
        ln.setup(Custom).fit((x, y), epochs=3, verbose=False,
                             callbacks=[ln.callbacks.EarlyStopping("train_nope", mode="min")])
    # a ctx.log value has no known direction: mode="auto" is refused before training
    with pytest.raises(ln.MonitorError, match=r"'train_custom'.*Pass mode='min' or mode='max'"):
        ln.setup(Custom).fit((x, y), epochs=3, verbose=False,
                             callbacks=[ln.callbacks.EarlyStopping("train_custom")])


def test_early_stopping_defaults_and_epoch_lines_with_min_max(capsys):
    """EarlyStopping() defaults: monitor valid_loss, patience 0 → stops at the first epoch that does not improve."""
    x, y = make_luz_data(128)
    xv, yv = make_luz_data(64, seed=1)
    es = ln.callbacks.EarlyStopping()
    fired = []

    class OnES(ln.Callback):
        def on_early_stopping(self, ctx):
            fired.append(ctx.epoch)

    f = frozen_setup().fit((x, y), epochs=10, valid_data=(xv, yv), callbacks=[es, OnES()])
    out = capsys.readouterr().out
    assert len(f.history) == 2 and fired == [2]
    assert "Epoch 1/10" in out and "Early stopping at epoch 2 of 10" in out

    f = frozen_setup().fit((x, y), epochs=(3, 10), valid_data=(xv, yv), callbacks=[ln.callbacks.EarlyStopping()])
    out = capsys.readouterr().out
    assert re.findall(r"^Epoch \d+/\d+$", out, re.M) == ["Epoch 1/10", "Epoch 2/10", "Epoch 3/10"]
    assert out.rstrip().endswith("Early stopping at epoch 3 of 10")
