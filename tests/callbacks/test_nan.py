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
