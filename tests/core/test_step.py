"""The Stepper (core/step.py): exact epoch losses for weighted-mean losses, a ``ctx.loss_fn`` replaced by a
callback, and clear errors for a model with every parameter frozen or a detached loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import linear_setup
from torch import nn

import lanterna as ln


class ZeroLoss(ln.Callback):
    """Replaces the loss from the second epoch on by one that is 0 (luz's mixup pattern of replacing it)."""

    def on_epoch_begin(self, ctx):
        if ctx.epoch == 2:
            base = ctx.loss_fn
            ctx.loss_fn = lambda p, t: base(p, t) * 0.0


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


def test_a_callback_that_replaces_the_loss_fn_is_used():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    one = linear_setup().fit((x, y), epochs=1, seed=0, verbose=False)
    two = linear_setup(optimizer=torch.optim.SGD).fit((x, y), epochs=2, seed=0, verbose=False, callbacks=[ZeroLoss()])
    assert two.history[1]["train_loss"] == 0.0
    ref = linear_setup(optimizer=torch.optim.SGD).fit((x, y), epochs=1, seed=0, verbose=False)
    for p, q in zip(two.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)  # the zero loss of epoch 2 moved nothing (plain SGD)
    assert one.history[0]["train_loss"] > 0


def test_a_model_with_every_parameter_frozen_is_a_clear_error():
    model = nn.Linear(3, 1).requires_grad_(False)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    with pytest.raises(ln.LanternaError, match="frozen.*requires_grad"):
        ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.1).fit(
            (x, y), epochs=1, verbose=False)


def test_a_detached_loss_is_a_clear_error():
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    with pytest.raises(ln.LanternaError, match="detached"):
        linear_setup(loss=lambda p, t: F.mse_loss(p, t).detach()).fit((x, y), epochs=1, verbose=False)
