"""The loop: epochs=(min, max), seeding, history, ctx fields and hook order, end status, no per-batch syncs."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import Net, luz_net_setup, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lanterna as ln
from lanterna.core.callback import Hooks
from lanterna.core.events import HOOKS

TIMING = {"epoch_time"}


def luz(**opt):
    return ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_opt_hparams(**opt)


def no_timing(history):
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in history]


class StopEveryEpoch(ln.Callback):
    def on_epoch_end(self, ctx):
        ctx.stop_training = True


@pytest.mark.parametrize("epochs, expected, status", [((3, 10), 3, "stopped_early"), (5, 1, "stopped_early"),
                                                     ((1, 1), 1, "stopped_early")])
def test_stopping_never_happens_before_min_epochs(epochs, expected, status):
    x, y = make_luz_data(n=64)
    fitted = luz().fit((x, y), epochs=epochs, callbacks=[StopEveryEpoch()], verbose=False)
    assert len(fitted.history) == expected
    assert fitted.status == status


def test_epochs_as_a_pair_runs_to_max_without_a_stop():
    x, y = make_luz_data(n=64)
    fitted = luz().fit((x, y), epochs=(2, 4), verbose=False)
    assert [rec["epoch"] for rec in fitted.history] == [1, 2, 3, 4]
    assert fitted.status == "completed"


def test_stop_training_exception_ends_fit_at_once_and_returns_what_was_trained():
    class StopMidEpoch(ln.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.epoch == 2 and ctx.iter == 2:
                raise ln.StopTraining()

    x, y = make_luz_data(n=64)
    fitted = luz().fit((x, y), epochs=5, callbacks=[StopMidEpoch()], verbose=False)
    assert fitted.status == "stopped" and len(fitted.history) == 1
    assert fitted.predict(x).shape == (64, 1)


@pytest.mark.parametrize("kind", ["tensors", "dataloader", "dataset"])
def test_the_same_seed_gives_identical_weights_and_history(kind):
    x, y = make_luz_data(n=160)
    xv, yv = make_luz_data(n=40, seed=2)

    class Pairs(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    def data():
        return {"tensors": (x, y), "dataloader": DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                "dataset": Pairs()}[kind]

    s = luz(lr=0.01)
    a = s.fit(data(), valid_data=(xv, yv), epochs=3, verbose=False, seed=42)
    torch.randn(100)  # global RNG use between fits must not matter
    b = s.fit(data(), valid_data=(xv, yv), epochs=3, verbose=False, seed=42)
    c = s.fit(data(), valid_data=(xv, yv), epochs=3, verbose=False, seed=43)
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(p, q)
    assert no_timing(a.history) == no_timing(b.history)
    assert no_timing(a.history) != no_timing(c.history)


def test_history_records_every_epoch_and_the_fitted_model_is_in_eval_mode():
    x, y = make_luz_data(n=100)
    fitted = luz().fit((x, y), valid_data=(x[:30], y[:30]), epochs=3, verbose=False)
    assert [rec["epoch"] for rec in fitted.history] == [1, 2, 3]
    for rec in fitted.history:
        assert {"train_loss", "train_mae", "valid_loss", "valid_mae", "epoch_time"} <= set(rec)
        assert all(isinstance(v, (int, float)) for v in rec.values())
        assert rec["epoch_time"] > 0
    assert fitted.model.training is False


class Recorder(ln.Callback):
    """Records the hooks that fire, and what ctx holds at some of them."""

    def __init__(self):
        self.calls: list[str] = []
        self.seen: dict[str, object] = {}

    def __getattribute__(self, name):
        if name in HOOKS:
            def hook(ctx, _name=name):
                self.calls.append(_name)
                self.observe(_name, ctx)
            return hook
        return super().__getattribute__(name)

    def observe(self, name, ctx):
        if name == "on_train_batch_begin" and "begin" not in self.seen:
            self.seen["begin"] = (ctx.input.shape, ctx.target.shape, ctx.pred, ctx.epoch, ctx.iter, ctx.training,
                                  ctx.model.training, torch.is_grad_enabled())
        if name == "on_train_batch_after_loss" and "loss" not in self.seen:
            self.seen["loss"] = (ctx.pred.shape, ctx.loss.dim(), ctx.loss.requires_grad)
        if name == "on_valid_batch_end" and "valid" not in self.seen:
            self.seen["valid"] = (ctx.training, ctx.model.training, torch.is_grad_enabled(), ctx.loss.requires_grad)
        if name == "on_epoch_end":
            self.seen.setdefault("epoch_end", []).append((ctx.epoch, ctx.history[-1]["epoch"], len(ctx.history)))
        if name == "on_fit_end":
            self.seen["end"] = (ctx.status, ctx.max_epochs, ctx.device, ctx.opt is ctx.optimizers["opt"],
                                ctx.model.training)


def test_hooks_fire_in_the_documented_order_with_ctx_filled_in():
    x, y = make_luz_data(n=20)
    rec = Recorder()
    # the recorder overrides hooks dynamically, so Hooks must see them as implemented
    for name in HOOKS:
        setattr(Recorder, name, lambda self, ctx: None)
    try:
        luz().fit((x, y), valid_data=(x[:10], y[:10]), epochs=2, callbacks=[rec], verbose=False,
                  dataloader_options={"batch_size": 10})
    finally:
        for name in HOOKS:
            delattr(Recorder, name)
    train_batch = ["on_train_batch_begin", "on_train_batch_after_pred", "on_train_batch_after_loss",
                   "on_train_batch_before_backward", "on_train_batch_before_step", "on_train_batch_after_step",
                   "on_train_batch_end"]
    valid_batch = ["on_valid_batch_begin", "on_valid_batch_after_pred", "on_valid_batch_after_loss",
                   "on_valid_batch_end"]
    epoch = (["on_epoch_begin", "on_train_begin"] + train_batch * 2 + ["on_train_end", "on_valid_begin"]
             + valid_batch + ["on_valid_end", "on_epoch_end"])
    assert rec.calls == ["on_fit_begin"] + epoch * 2 + ["on_fit_end"]
    assert rec.seen["begin"] == (torch.Size([10, 3]), torch.Size([10, 1]), None, 1, 1, True, True, True)
    assert rec.seen["loss"] == (torch.Size([10, 1]), 0, True)
    assert rec.seen["valid"] == (False, False, False, False)
    assert rec.seen["epoch_end"] == [(1, 1, 1), (2, 2, 2)]
    assert rec.seen["end"] == ("completed", 2, torch.device("cpu"), True, False)


def test_on_fit_end_fires_when_training_fails():
    events = []

    class Boom(ln.Callback):
        def on_train_batch_end(self, ctx):
            raise ValueError("boom")

        def on_fit_end(self, ctx):
            events.append(ctx.status)

    x, y = make_luz_data(n=20)
    with pytest.raises(ln.CallbackError, match="Callback Boom raised in on_train_batch_end: ValueError: boom"):
        luz().fit((x, y), epochs=2, callbacks=[Boom()], verbose=False)
    assert events == ["failed"]


def test_callbacks_run_in_ascending_order():
    order = []

    def make(name, o):
        cb = type(name, (ln.Callback,), {"order": o, "on_epoch_end": lambda self, ctx: order.append(name)})
        return cb()

    x, y = make_luz_data(n=20)
    luz().fit((x, y), epochs=1, callbacks=[make("late", 10), make("early", -5), make("mid", 0), make("mid2", 0)],
              verbose=False)
    assert order == ["early", "mid", "mid2", "late"]


def test_a_hook_nobody_implements_costs_nothing():
    hooks = Hooks([ln.Callback()])
    assert not any(hooks.has(h) for h in HOOKS)
    assert hooks.on_train_batch_end is hooks.on_valid_batch_end  # the shared no-op


def test_ctx_log_lands_in_history_as_a_sample_weighted_epoch_mean():
    class LogBatchSize(ln.Callback):
        def on_train_batch_end(self, ctx):
            ctx.log("bs", torch.tensor(float(ctx.batch_size)))

    x, y = make_luz_data(n=25)
    fitted = luz().fit((x, y), epochs=1, callbacks=[LogBatchSize()], verbose=False,
                       dataloader_options={"batch_size": 10})
    # batches of 10, 10, 5 weighted by size: (10*10 + 10*10 + 5*5) / 25
    assert fitted.history[0]["train_bs"] == pytest.approx(225 / 25)


def test_no_per_batch_device_syncs_in_the_training_hot_path(monkeypatch):
    """lanterna's ``.item()`` / ``.tolist()`` / ``.cpu()`` calls must not grow with the number of batches.

    torch's own optimizers read their CPU step counters with ``.item()``; those calls are not counted. Nor is
    TerminateOnNaN, whose per-batch check before the optimizer step is documented (a plain read on CPU).
    """
    counts = {"n": 0}
    for name in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=original, **k):
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            if "/lanterna/" in caller:
                counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def syncs(n_batches):
        x, y = make_luz_data(n=8 * n_batches)
        counts["n"] = 0
        luz().fit((x, y), valid_data=(x, y), epochs=1, verbose=False, seed=0, dataloader_options={"batch_size": 8},
                  callbacks=[ln.callbacks.TerminateOnNaN(enabled=False)])
        return counts["n"]

    assert syncs(40) == syncs(4)


def test_seeded_fits_are_reproducible():
    x, y = make_luz_data(128)
    a = luz_net_setup().fit((x, y), epochs=3, valid_data=0.2, seed=123, verbose=False)
    b = luz_net_setup().fit((x, y), epochs=3, valid_data=0.2, seed=123, verbose=False)
    assert [h["valid_loss"] for h in a.history] == [h["valid_loss"] for h in b.history]
    torch.testing.assert_close(a.predict(x), b.predict(x), rtol=0, atol=0)
