"""Issue #11, the core step: validation checked before training, any loss shape-checked, NaN gradients caught
before the step (with the Fitted so far), exact epoch losses for weighted means, a replaced ``ctx.loss_fn``,
accumulation on data without a length, frozen models, custom steps in evaluate, predict callbacks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lanterna as ln
from lanterna.callbacks.progress import LiveProgress
from lanterna.core.checks import first_batch
from lanterna.data import LoaderBatches, make_source


class RecordBatches(ln.Callback):
    def __init__(self):
        self.train_batches = 0

    def on_train_batch_begin(self, ctx):
        self.train_batches += 1


def _lin(**kw):
    return ln.setup(nn.Linear, loss=kw.pop("loss", nn.MSELoss()), **kw).set_hparams(in_features=3, out_features=1)


# ---------------------------------------------------------------------------- 10: validation and any loss


def test_validation_target_shape_is_checked_before_training():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    rec = RecordBatches()
    with pytest.raises(ln.ShapeMismatchError, match=r"\(16,\).*unsqueeze"):
        _lin().fit((x, y), valid_data=(x[:16], y[:16, 0]), epochs=2, verbose=False, callbacks=[rec])
    assert rec.train_batches == 0  # refused before the first training step


def test_validation_feature_count_is_checked_before_training():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    rec = RecordBatches()
    with pytest.raises(ln.ModelCallError, match=r"first valid batch.*tensor\(16, 5\)"):
        _lin().fit((x, y), valid_data=(torch.randn(16, 5), y[:16]), epochs=2, verbose=False, callbacks=[rec])
    assert rec.train_batches == 0


class PidDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.pids = x, y, set()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.pids.add(os.getpid())
        return self.x[i], self.y[i]


def test_the_first_validation_batch_is_read_in_process_and_leaves_every_generator_alone():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    ds = PidDataset(x, y)
    gen = torch.Generator().manual_seed(5)
    dl = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, generator=gen)
    src = LoaderBatches(dl)
    cpu, own = torch.get_rng_state(), gen.get_state()
    batch = first_batch(src)
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(gen.get_state(), own)
    assert ds.pids == {os.getpid()} and dl._iterator is None  # no worker was started
    assert batch[0].shape == (8, 3)
    tensors = make_source((x, y), train=False, options={"batch_size": 16}, what="data")
    cpu = torch.get_rng_state()
    assert torch.equal(first_batch(tensors)[0], x[:16])
    assert torch.equal(torch.get_rng_state(), cpu)  # a TensorBatches iteration draws a seed, given back


def test_a_plain_function_loss_that_broadcasts_is_refused():
    x, y = torch.randn(64, 3), torch.randn(64)
    with pytest.raises(ln.ShapeMismatchError, match=r"broadcasts them to \(32, 32\)"):
        _lin(loss=lambda p, t: ((p - t) ** 2).mean()).fit((x, y), epochs=1, verbose=False)


def test_a_plain_function_loss_that_reshapes_itself_is_accepted():
    x, y = torch.randn(64, 3), torch.randn(64)
    fitted = _lin(loss=lambda p, t: ((p.squeeze(1) - t) ** 2).mean()).fit((x, y), epochs=1, verbose=False)
    assert len(fitted.history) == 1


# ---------------------------------------------------------------------------- 12: NaN gradient, .fitted


class SqrtAtZero:
    """MSE plus sqrt(0·Σpred) from the third call on: the loss stays finite, its gradient is NaN."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pred, target):
        self.calls += 1
        loss = F.mse_loss(pred, target)
        if self.calls >= 3:
            loss = loss + torch.sqrt(pred.sum() * 0.0)
        return loss


def test_a_nan_gradient_of_a_finite_loss_stops_before_the_step_with_the_fitted_so_far():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    with pytest.raises(ln.NonFiniteLossError, match=r"gradient is NaN/Inf at epoch 1, batch 3.*is finite") as info:
        _lin(loss=SqrtAtZero(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.1).fit(
            (x, y), epochs=2, seed=0, verbose=False, dataloader_options={"batch_size": 16, "shuffle": False})
    fitted = info.value.fitted
    assert isinstance(fitted, ln.Fitted) and fitted.history == []
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for lo in (0, 16):  # the two good steps
        opt.zero_grad()
        F.mse_loss(ref(x[lo:lo + 16]), y[lo:lo + 16]).backward()
        opt.step()
    for p, q in zip(fitted.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert torch.isfinite(p).all()


def test_a_nan_loss_error_carries_the_fitted_with_the_finished_epochs():
    class NanInEpoch2:
        def __init__(self):
            self.calls = 0

        def __call__(self, p, t):
            self.calls += 1
            return F.mse_loss(p, t) * (float("nan") if self.calls > 4 else 1.0)

    x, y = torch.randn(64, 3), torch.randn(64, 1)
    with pytest.raises(ln.NonFiniteLossError, match="loss is NaN at epoch 2, batch 1") as info:
        _lin(loss=NanInEpoch2()).fit((x, y), epochs=3, verbose=False, dataloader_options={"batch_size": 16})
    assert [r["epoch"] for r in info.value.fitted.history] == [1]


def test_gradient_check_can_be_turned_off():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    # without it the NaN gradient is applied, and only the next batch's loss shows it
    with pytest.raises(ln.NonFiniteLossError, match="loss is NaN at epoch 1, batch 4") as info:
        _lin(loss=SqrtAtZero()).fit((x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16},
                                    callbacks=[ln.callbacks.TerminateOnNaN(check_gradients=False)])
    assert not torch.isfinite(info.value.fitted.model.weight).all()


# ---------------------------------------------------------------------------- 13: exact weighted means


@pytest.mark.parametrize("loss", [
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0, 0.5])),
    nn.CrossEntropyLoss(ignore_index=-100),
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0, 0.5]), ignore_index=1),
], ids=["weight", "ignore_index", "both"])
def test_epoch_loss_of_a_weighted_mean_loss_equals_the_whole_set_value(loss):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=g)
    y = torch.randint(0, 3, (100,), generator=g)
    y[::7] = -100 if loss.ignore_index == -100 else y[::7]
    fitted = ln.setup(nn.Linear, loss=loss).set_hparams(in_features=4, out_features=3).fit(
        (x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16})
    with torch.no_grad():
        whole = float(loss(fitted.model(x), y))
    got = fitted.evaluate((x, y), dataloader_options={"batch_size": 16})["loss"]
    assert got == pytest.approx(whole, rel=1e-6)
    with torch.no_grad():
        mean_of_batches = sum(float(loss(fitted.model(x[i:i + 16]), y[i:i + 16])) * len(y[i:i + 16])
                              for i in range(0, 100, 16)) / 100
    assert abs(mean_of_batches - whole) > 1e-4  # the sample-count average the fix replaces is wrong here


# ---------------------------------------------------------------------------- 14: ctx.loss_fn replaced


class ZeroLoss(ln.Callback):
    """Replaces the loss from the second epoch on by one that is 0 (luz's mixup pattern of replacing it)."""

    def on_epoch_begin(self, ctx):
        if ctx.epoch == 2:
            base = ctx.loss_fn
            ctx.loss_fn = lambda p, t: base(p, t) * 0.0


def test_a_callback_that_replaces_the_loss_fn_is_used():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    one = _lin().fit((x, y), epochs=1, seed=0, verbose=False)
    two = _lin(optimizer=torch.optim.SGD).fit((x, y), epochs=2, seed=0, verbose=False, callbacks=[ZeroLoss()])
    assert two.history[1]["train_loss"] == 0.0
    ref = _lin(optimizer=torch.optim.SGD).fit((x, y), epochs=1, seed=0, verbose=False)
    for p, q in zip(two.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)  # the zero loss of epoch 2 moved nothing (plain SGD)
    assert one.history[0]["train_loss"] > 0


# ---------------------------------------------------------------------------- 15: accumulation, no length


class Stream(IterableDataset):
    def __init__(self, x, y, bs):
        self.x, self.y, self.bs = x, y, bs

    def __iter__(self):
        for i in range(0, len(self.x), self.bs):
            yield self.x[i:i + self.bs], self.y[i:i + self.bs]


class StepCount(ln.Callback):
    def on_train_end(self, ctx):
        self.step = ctx.step


def test_accumulation_on_data_without_length_averages_the_short_last_group_by_its_size():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(80, 3, generator=g), torch.randn(80, 1, generator=g)  # 10 batches: groups 4, 4, 2
    counter = StepCount()
    dl = DataLoader(Stream(x, y, 8), batch_size=None)
    fitted = _lin(optimizer=torch.optim.SGD).set_opt_hparams(lr=0.1).fit(
        dl, epochs=1, seed=0, verbose=False, callbacks=[ln.callbacks.GradientAccumulation(4), counter])
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for lo, hi in ((0, 32), (32, 64), (64, 80)):
        opt.zero_grad()
        F.mse_loss(ref(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
    for p, q in zip(fitted.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert counter.step == 3  # optimizer steps, not batches


def test_ctx_step_counts_optimizer_steps_under_accumulation():
    x, y = torch.randn(80, 3), torch.randn(80, 1)
    counter = StepCount()
    _lin().fit((x, y), epochs=2, verbose=False, dataloader_options={"batch_size": 8},
               callbacks=[ln.callbacks.GradientAccumulation(4), counter])
    assert counter.step == 2 * 3


# ---------------------------------------------------------------------------- 17: frozen parameters


def test_a_model_with_every_parameter_frozen_is_a_clear_error():
    model = nn.Linear(3, 1).requires_grad_(False)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    with pytest.raises(ln.LanternaError, match="frozen.*requires_grad"):
        ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.1).fit(
            (x, y), epochs=1, verbose=False)


def test_a_detached_loss_is_a_clear_error():
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    with pytest.raises(ln.LanternaError, match="detached"):
        _lin(loss=lambda p, t: F.mse_loss(p, t).detach()).fit((x, y), epochs=1, verbose=False)


# ---------------------------------------------------------------------------- 20: the progress bar


def test_the_progress_bar_reads_the_loss_without_a_torch_warning(capsys):
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    bar = LiveProgress(refresh_per_second=1e9)  # refresh at every batch: the loss is read each time
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "requires_grad ... to a scalar" UserWarning fails the fit
        fitted = _lin().fit((x, y), epochs=1, verbose=True, callbacks=[bar], dataloader_options={"batch_size": 8})
    assert len(fitted.history) == 1


# ---------------------------------------------------------------------------- 22: evaluate with step(ctx)


class TwoLossStep(nn.Module):
    """A custom step that reports its loss and a logged value."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

    def step(self, ctx):
        ctx.pred = self(ctx.input)
        ctx.loss = F.mse_loss(ctx.pred, ctx.target)
        ctx.log("l1", F.l1_loss(ctx.pred, ctx.target))
        if ctx.training:
            ctx.backward(ctx.loss)
            ctx.step_optimizer()


def test_evaluate_runs_the_modules_own_step_and_reports_its_logs():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    fitted = ln.setup(TwoLossStep).fit((x, y), epochs=1, verbose=False)
    before = [p.detach().clone() for p in fitted.model.parameters()]
    ev = fitted.evaluate((x, y), metrics=[ln.metrics.MAE()])
    with torch.no_grad():
        pred = fitted.model(x)
    assert ev["loss"] == pytest.approx(float(F.mse_loss(pred, y)), rel=1e-5)
    assert ev["l1"] == pytest.approx(float(F.l1_loss(pred, y)), rel=1e-5)
    assert ev["mae"] == pytest.approx(float(F.l1_loss(pred, y)), rel=1e-5)
    assert all(torch.equal(a, p) for a, p in zip(before, fitted.model.parameters()))


class PredictHooks(ln.Callback):
    def __init__(self):
        self.seen = []

    def on_predict_begin(self, ctx):
        self.seen.append("begin")

    def on_predict_batch_begin(self, ctx):
        self.seen.append(("batch_begin", ctx.iter))

    def on_predict_batch_end(self, ctx):
        self.seen.append(("batch_end", tuple(ctx.pred.shape)))

    def on_predict_end(self, ctx):
        self.seen.append("end")


class ValidHooks(ln.Callback):
    def __init__(self):
        self.batches = 0

    def on_valid_batch_end(self, ctx):
        self.batches += 1


def test_predict_and_evaluate_fire_their_callbacks():
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    fitted = _lin().fit((x, y), epochs=1, verbose=False)
    hooks = PredictHooks()
    fitted.predict(x, callbacks=[hooks], dataloader_options={"batch_size": 32})
    assert hooks.seen == ["begin", ("batch_begin", 1), ("batch_end", (32, 1)), ("batch_begin", 2),
                          ("batch_end", (8, 1)), "end"]
    valid = ValidHooks()
    fitted.evaluate((x, y), callbacks=[valid], dataloader_options={"batch_size": 16})
    assert valid.batches == 3
