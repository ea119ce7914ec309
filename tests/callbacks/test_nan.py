"""TerminateOnNaN (on by default): a non-finite loss stops fit before that batch's optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import linear_setup
from torch import nn

import lanterna as ln


class PoisonBatch(ln.Callback):
    """Replaces the input of one batch by a constant; snapshots the weights after every batch."""

    def __init__(self, epoch: int, batch: int, value: float) -> None:
        self.epoch, self.batch, self.value = epoch, batch, value
        self.last_state = None
        self.statuses: list[str] = []

    def on_train_batch_begin(self, ctx):
        if (ctx.epoch, ctx.iter) == (self.epoch, self.batch):
            ctx.input = torch.full_like(ctx.input, self.value)

    def on_train_batch_end(self, ctx):
        self.last_state = copy.deepcopy(ctx.model.state_dict())

    def on_fit_end(self, ctx):
        self.statuses.append(ctx.status)


# an input of 1e30 gives a finite prediction whose square overflows float32: an Inf loss
@pytest.mark.parametrize(("value", "kind"), [(float("nan"), "NaN"), (1e30, "Inf")])
def test_non_finite_loss_stops_with_epoch_and_batch_named(value, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x.sum(1, keepdim=True)
    model = nn.Linear(3, 1)
    poison = PoisonBatch(epoch=2, batch=3, value=value)
    with pytest.raises(ln.NonFiniteLossError, match=rf"The training loss is {kind} at epoch 2, batch 3;"):
        ln.setup(model, loss=nn.MSELoss()).fit((x, y), epochs=5, verbose=False, callbacks=[poison],
                                               dataloader_options={"batch_size": 16})
    # the weights are those of the last good step (epoch 2, batch 2), all finite
    state = model.state_dict()
    assert all(torch.equal(state[k], poison.last_state[k]) for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert poison.statuses == ["failed"]


def test_can_be_disabled():
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=2, verbose=False, dataloader_options={"batch_size": 16},
        callbacks=[ln.callbacks.TerminateOnNaN(enabled=False), PoisonBatch(1, 1, float("nan"))])
    assert fitted.status == "completed" and len(fitted.history) == 2


# ---------------------------------------------------------------------------- from issue 11


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
        linear_setup(loss=SqrtAtZero(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.1).fit(
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
        linear_setup(loss=NanInEpoch2()).fit((x, y), epochs=3, verbose=False, dataloader_options={"batch_size": 16})
    assert [r["epoch"] for r in info.value.fitted.history] == [1]


def test_gradient_check_can_be_turned_off():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    # without it the NaN gradient is applied, and only the next batch's loss shows it
    with pytest.raises(ln.NonFiniteLossError, match="loss is NaN at epoch 1, batch 4") as info:
        linear_setup(loss=SqrtAtZero()).fit((x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16},
                                    callbacks=[ln.callbacks.TerminateOnNaN(check_gradients=False)])
    assert not torch.isfinite(info.value.fitted.model.weight).all()


# ---------------------------------------------------------------------------- decided on the device (issue 15)
# On an accelerator the guard reads nothing per batch: the checks set a flag on the device that fused optimizers
# read as GradScaler's found_inf, and the stop surfaces at the end of the training phase. Fused optimizers skip
# the same way on the CPU, so the path is forced there (TerminateOnNaN._on_device) and checked bit for bit.


class SqrtAtCall:
    """MSE plus sqrt(0·Σpred) at one training call (validation calls are not counted): a finite loss whose
    gradient is NaN at that batch only."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, pred, target):
        self.calls += pred.requires_grad
        loss = F.mse_loss(pred, target)
        return loss + torch.sqrt(pred.sum() * 0.0) if self.calls == self.at else loss


class Record(ln.Callback):
    """The training batches run per epoch, the epochs validated, and the weights after given batches."""

    def __init__(self, keep=()):
        self.keep, self.states, self.batches, self.validated = set(keep), {}, {}, []

    def on_train_batch_end(self, ctx):
        self.batches[ctx.epoch] = ctx.iter
        if (ctx.epoch, ctx.iter) in self.keep:
            self.states[(ctx.epoch, ctx.iter)] = copy.deepcopy(ctx.model.state_dict())

    def on_valid_begin(self, ctx):
        self.validated.append(ctx.epoch)


def _on_device() -> ln.callbacks.TerminateOnNaN:
    guard = ln.callbacks.TerminateOnNaN()
    guard._on_device = True
    return guard


def test_on_device_a_nan_gradient_skips_that_step_and_the_rest_and_stops_at_the_epoch_end():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    guard, record = _on_device(), Record()
    with pytest.raises(ln.NonFiniteLossError,
                       match=r"The gradient is NaN/Inf at epoch 2, batch 3 \(the loss, [\d.]+, is finite\); training "
                             r"stopped before this batch's optimizer step.*Decided on the cpu device") as info:
        linear_setup(loss=SqrtAtCall(at=4 + 3)).set_opt_hparams(fused=True).fit(
            (x, y), epochs=3, seed=0, verbose=False, valid_data=(x[:16], y[:16]), callbacks=[guard, record],
            dataloader_options={"batch_size": 16, "shuffle": False})
    assert guard._decided_on_device
    assert record.batches == {1: 4, 2: 4} and record.validated == [1]  # epoch 2 ran to its end, then stopped
    fitted = info.value.fitted
    assert [r["epoch"] for r in fitted.history] == [1]
    # a hand loop with the same fused Adam, stopped before that step: 4 + 2 good steps
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    opt = torch.optim.Adam(ref.parameters(), fused=True)
    for lo in (0, 16, 32, 48, 0, 16):
        opt.zero_grad()
        F.mse_loss(ref(x[lo:lo + 16]), y[lo:lo + 16]).backward()
        opt.step()
    for p, q in zip(fitted.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    ours = fitted.optimizers["opt"]
    for p, q in zip(fitted.model.parameters(), ref.parameters()):  # Adam's moments and step count too
        assert all(torch.equal(ours.state[p][k], opt.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert not hasattr(ours, "found_inf")  # the optimizer is given back as it was
    # the epoch before the bad step is the plain path's, to the bit
    plain = linear_setup().set_opt_hparams(fused=True).fit(
        (x, y), epochs=1, seed=0, verbose=False, valid_data=(x[:16], y[:16]),
        dataloader_options={"batch_size": 16, "shuffle": False})
    assert fitted.history[0]["train_loss"] == plain.history[0]["train_loss"]
    assert fitted.history[0]["valid_loss"] == plain.history[0]["valid_loss"]


@pytest.mark.parametrize(("value", "kind"), [(float("nan"), "NaN"), (1e30, "Inf")])
def test_on_device_a_non_finite_loss_goes_through_the_same_flag(value, kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x.sum(1, keepdim=True)
    model = nn.Linear(3, 1)
    record = Record(keep=[(2, 2)])
    with pytest.raises(ln.NonFiniteLossError, match=rf"The training loss is {kind} at epoch 2, batch 3;"):
        ln.setup(model, loss=nn.MSELoss()).set_opt_hparams(fused=True).fit(
            (x, y), epochs=5, verbose=False, callbacks=[_on_device(), PoisonBatch(2, 3, value), record],
            dataloader_options={"batch_size": 16})
    assert record.batches[2] == 4  # not stopped at the batch: at the end of the epoch's training batches
    state = model.state_dict()
    assert all(torch.equal(state[k], record.states[(2, 2)][k]) for k in state)


def test_on_device_with_an_optimizer_that_cannot_skip_there_the_step_by_step_read_is_kept():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    guard, record = _on_device(), Record()
    with pytest.raises(ln.NonFiniteLossError, match=r"gradient is NaN/Inf at epoch 1, batch 3.*, in weight"):
        linear_setup(loss=SqrtAtCall(at=3)).fit((x, y), epochs=2, verbose=False, callbacks=[guard, record],
                                                 dataloader_options={"batch_size": 16})
    assert not guard._decided_on_device and record.batches == {1: 2}  # stopped at the batch itself


def test_on_device_a_fit_ended_inside_the_epoch_after_a_bad_step_warns_and_keeps_the_good_weights():
    class StopAt(ln.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.iter == 3:
                ctx.stop()

    x, y = torch.randn(64, 3), torch.randn(64, 1)
    model = nn.Linear(3, 1)
    record = Record(keep=[(1, 1)])
    with pytest.warns(RuntimeWarning, match=r"gradient is NaN/Inf at epoch 1, batch 2 .*the fit ended before"):
        fitted = ln.setup(model, loss=SqrtAtCall(at=2)).set_opt_hparams(fused=True).fit(
            (x, y), epochs=2, verbose=False, callbacks=[_on_device(), record, StopAt()],
            dataloader_options={"batch_size": 16})
    assert fitted.status == "stopped"
    assert all(torch.equal(v, record.states[(1, 1)][k]) for k, v in model.state_dict().items())
