"""TerminateOnNaN (on by default): a non-finite loss stops fit before that batch's optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
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
