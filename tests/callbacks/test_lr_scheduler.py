"""LRScheduler: epoch and batch schedules, ReduceLROnPlateau fed the monitor, lr in history, resume state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import lanterna as ln


def _data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[0.2], [-1.3], [-0.5]]) + 0.1 * torch.randn(n, 1, generator=g)


def _setup(lr: float = 0.1, optimizer=torch.optim.SGD):
    return ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=optimizer).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=lr)


def test_exponential_lr_history_is_gamma_to_the_k():
    cb = ln.callbacks.LRScheduler(S.ExponentialLR, gamma=0.9)
    fitted = _setup(0.1).fit(_data(), epochs=6, callbacks=[cb], verbose=False)
    assert [r["lr"] for r in fitted.history] == pytest.approx([0.1 * 0.9**k for k in range(6)], rel=1e-12)
    assert fitted.optimizers["opt"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**6)
    assert fitted.context.schedulers == [cb.scheduler]


def test_one_cycle_lr_steps_every_batch_like_torch():
    seen = []

    class BatchLR(ln.Callback):
        def on_train_batch_begin(self, ctx):
            seen.append(ctx.opt.param_groups[0]["lr"])

    epochs, n, bs = 3, 64, 16  # 4 batches per epoch: total_steps = 12, filled in by lanterna
    cb = ln.callbacks.LRScheduler(S.OneCycleLR, call_on="on_train_batch_end", max_lr=0.5)
    fitted = _setup(0.01).fit(_data(n), epochs=epochs, callbacks=[cb, BatchLR()], verbose=False,
                              dataloader_options={"batch_size": bs})
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = S.OneCycleLR(ref_opt, max_lr=0.5, total_steps=epochs * n // bs)
    expected = []
    for _ in range(epochs * n // bs):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert seen == pytest.approx(expected, rel=1e-12)
    assert max(seen) > 0.45 and seen[0] == pytest.approx(0.5 / 25) and seen[-1] < 0.5 / 100
    # history holds the lr of each epoch's first batch
    assert [r["lr"] for r in fitted.history] == pytest.approx(expected[:: n // bs], rel=1e-12)
    # the per-batch hook is the scheduler's; epoch schedules never add one
    assert "LRScheduler" in fitted.context.hooks.describe().split("on_train_batch_end: ")[1].splitlines()[0]


def test_reduce_lr_on_plateau_reduces_when_the_monitor_stalls():
    # at lr 1e-6 the loss moves by far less than the scheduler's threshold (1e-4 relative): a plateau
    cb = ln.callbacks.LRScheduler(S.ReduceLROnPlateau, factor=0.5, patience=1)
    x, y = _data()
    fitted = _setup(1e-6).fit((x, y), epochs=7, valid_data=_data(32, 1), callbacks=[cb], verbose=False)
    lrs = [r["lr"] for r in fitted.history]
    assert cb.monitor.name == "valid_loss"
    # reference: torch's own scheduler fed the same monitored values
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-6)
    ref = S.ReduceLROnPlateau(ref_opt, factor=0.5, patience=1)
    expected = []
    for rec in fitted.history:
        expected.append(ref_opt.param_groups[0]["lr"])
        ref.step(rec["valid_loss"])
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] < lrs[0] / 3  # reduced at least twice


def test_reduce_lr_on_plateau_keeps_lr_while_improving_and_uses_train_loss_without_validation():
    cb = ln.callbacks.LRScheduler(S.ReduceLROnPlateau, factor=0.5, patience=0, threshold=0.0)
    fitted = _setup(0.05).fit(_data(), epochs=5, callbacks=[cb], verbose=False)
    assert cb.monitor.name == "train_loss"
    losses = [r["train_loss"] for r in fitted.history]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # still improving on this convex problem
    assert [r["lr"] for r in fitted.history] == [0.05] * 5


def test_reduce_lr_on_plateau_mode_follows_an_accuracy_monitor(clf_setup, clf_data):
    cb = ln.callbacks.LRScheduler(S.ReduceLROnPlateau, monitor="train_acc", patience=0)
    clf_setup.fit(clf_data, epochs=2, callbacks=[cb], verbose=False)
    assert cb.scheduler.mode == "max"


def test_several_optimizers_record_lr_per_name_and_opt_name_picks_one():
    class TwoOpts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

        def set_optimizers(self, lr=0.1):
            return {"a": torch.optim.SGD(self.a.parameters(), lr=lr),
                    "b": torch.optim.SGD(self.b.parameters(), lr=lr / 10)}

    setup = ln.setup(TwoOpts, loss=nn.MSELoss())
    fitted = setup.fit(_data(), epochs=3, verbose=False,
                       callbacks=[ln.callbacks.LRScheduler(S.StepLR, step_size=1, gamma=0.5, opt_name="b")])
    assert [r["lr_a"] for r in fitted.history] == pytest.approx([0.1] * 3)
    assert [r["lr_b"] for r in fitted.history] == pytest.approx([0.01, 0.005, 0.0025])
    assert "lr" not in fitted.history[0]
    with pytest.raises(ln.LanternaError, match=r"several optimizers \('a', 'b'\).*opt_name"):
        setup.fit(_data(), epochs=1, verbose=False, callbacks=[ln.callbacks.LRScheduler(S.StepLR, step_size=1)])
    with pytest.raises(ln.LanternaError, match=r"opt_name='c'.*'a', 'b'"):
        setup.fit(_data(), epochs=1, verbose=False,
                  callbacks=[ln.callbacks.LRScheduler(S.StepLR, step_size=1, opt_name="c")])


def test_bad_input_is_explained():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ln.LanternaError, match=r"instance of ExponentialLR; pass the class"):
        ln.callbacks.LRScheduler(S.ExponentialLR(opt, gamma=0.9))
    with pytest.raises(ln.LanternaError, match=r"instance of ReduceLROnPlateau; pass the class"):
        ln.callbacks.LRScheduler(S.ReduceLROnPlateau(opt))
    with pytest.raises(ln.LanternaError, match="call_on='on_batch_end'"):
        ln.callbacks.LRScheduler(S.StepLR, call_on="on_batch_end", step_size=1)
    with pytest.raises(ln.LanternaError, match="ReduceLROnPlateau needs"):
        ln.callbacks.LRScheduler(S.ReduceLROnPlateau, call_on="on_train_batch_end")
    with pytest.raises(ln.LanternaError, match=r"Could not create StepLR with \{'gamma': 0.5\}"):
        _setup().fit(_data(), epochs=1, verbose=False, callbacks=[ln.callbacks.LRScheduler(S.StepLR, gamma=0.5)])
    with pytest.raises(ln.MonitorError, match="Unknown monitor 'valid_acc'"):
        _setup().fit(_data(), epochs=1, valid_data=_data(16, 1), verbose=False,
                     callbacks=[ln.callbacks.LRScheduler(S.ReduceLROnPlateau, monitor="valid_acc")])


def test_state_dict_resumes_the_schedule(tmp_path):
    first = ln.callbacks.LRScheduler(S.ExponentialLR, gamma=0.5)
    fitted = _setup(0.1).fit(_data(), epochs=3, callbacks=[first], verbose=False)
    torch.save(first.state_dict(), tmp_path / "sched.pt")  # what a checkpoint stores
    state = torch.load(tmp_path / "sched.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 3

    # loaded before the fit (as a resume does): applied when the scheduler is created at fit begin
    resumed = ln.callbacks.LRScheduler(S.ExponentialLR, gamma=0.5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state

    class RestoreOptimizer(ln.Callback):
        order = -10

        def on_fit_begin(self, ctx):
            ctx.opt.load_state_dict(fitted.optimizers["opt"].state_dict())

    again = _setup(0.1).fit(_data(), epochs=2, callbacks=[resumed, RestoreOptimizer()], verbose=False)
    assert resumed.scheduler.last_epoch == 5
    assert [r["lr"] for r in again.history] == pytest.approx([0.1 * 0.5**3, 0.1 * 0.5**4])


def test_one_cycle_lr_steps_with_the_optimizer_under_gradient_accumulation():
    steps = []

    class CountSteps(ln.Callback):
        def on_train_batch_after_step(self, ctx):
            steps.append(ctx.opt.param_groups[0]["lr"])

    cb = ln.callbacks.LRScheduler(S.OneCycleLR, call_on="on_train_batch_end", max_lr=0.5)
    _setup(0.01).fit(_data(64), epochs=3, verbose=False, dataloader_options={"batch_size": 8},
                     callbacks=[ln.callbacks.GradientAccumulation(4), cb, CountSteps()])
    assert len(steps) == 3 * 2  # 8 batches per epoch, one optimizer step per 4
    assert cb.scheduler.total_steps == 6 and cb.scheduler.last_epoch == 6  # the whole cycle, no more
