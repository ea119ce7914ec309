"""ln.lr_finder (issue 4, API.md §10): exponential sweep, smoothed loss, divergence stop, data cycling, a sane
suggestion on the luz toy regression, and no trace left on the setup or the model."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln


def toy(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return make_luz_data(n, seed)


def test_sweep_on_the_toy_regression_suggests_a_sane_learning_rate():
    x, y = toy()
    result = ln.lr_finder(ln.setup(Net, loss=nn.MSELoss()), (x, y), seed=0)
    df = result.df
    assert list(df.columns) == ["lr", "loss", "raw_loss"]
    assert len(df) == 100  # 32 batches per epoch: the data was cycled
    lrs = df["lr"].to_numpy()
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1.0)
    ratios = lrs[1:] / lrs[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)  # exponential
    assert 1e-4 <= result.suggestion <= 1e-1
    # the loss is smoothed: exponential average with bias correction
    raw = df["raw_loss"].to_numpy()
    avg, beta = 0.0, 0.98
    for i, v in enumerate(raw[:5]):
        avg = beta * avg + (1 - beta) * v
        assert df["loss"][i] == pytest.approx(avg / (1 - beta ** (i + 1)), rel=1e-9)
    assert "suggested lr" in repr(result)


def test_stops_when_the_loss_diverges():
    x, y = toy(256)
    result = ln.lr_finder(ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD), (x, y),
                          start_lr=1e-4, end_lr=100.0, steps=200, seed=0)
    assert result.diverged
    assert len(result.lrs) < 200
    assert all(math.isfinite(v) for v in result.losses)
    best = min(result.losses)
    assert result.losses[-1] > 4 * best  # stopped at the first point past 4x the best
    assert all(v <= 4 * min(result.losses[: i + 1]) for i, v in enumerate(result.losses[:-1]))


def test_leaves_a_module_instance_and_the_global_rng_unchanged():
    x, y = toy(256)
    model = Net()
    model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    py, npy = random.getstate(), np.random.get_state()
    setup = ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD)
    result = ln.lr_finder(setup, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), steps=30,
                          end_lr=10.0)
    assert len(result.lrs) > 5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy[1])
    assert setup.module is model and setup.opt_hparams == {}
    # the setup still trains normally afterwards
    fitted = setup.set_opt_hparams(lr=0.05).fit((x, y), epochs=5, verbose=False)
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"]


def test_every_param_group_of_every_optimizer_gets_the_swept_rate():
    seen: list[list[float]] = []

    class Watch(ln.Callback):
        def on_train_batch_before_step(self, ctx):
            seen.append([g["lr"] for opt in ctx.optimizers.values() for g in opt.param_groups])

    class TwoOpts(Net):
        def set_optimizers(self, lr=1e-3):
            return {"a": torch.optim.SGD(self.net[0].parameters(), lr=lr),
                    "b": torch.optim.Adam(self.net[2].parameters(), lr=lr)}

    x, y = toy(128)
    result = ln.lr_finder(ln.setup(TwoOpts, loss=nn.MSELoss()), (x, y), start_lr=1e-5, end_lr=1e-2, steps=12,
                          callbacks=[Watch()])
    assert len(seen) == 12 and len(result.lrs) == 12
    for lrs, lr in zip(seen, result.lrs):
        assert lrs == [lr, lr]


def test_plot_is_a_matplotlib_figure_on_a_log_axis():
    x, y = toy(128)
    result = ln.lr_finder(ln.setup(Net, loss=nn.MSELoss()), (x, y), steps=20, seed=1)
    fig = result.plot()
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate"


def test_other_suggestions_and_too_short_curves():
    r = ln.tuning.LRFinderResult([1e-3, 1e-2], [1.0, 0.5], [1.0, 0.5])
    assert r.suggestion is None
    lrs = list(np.logspace(-6, 0, 40))
    losses = [2.0] * 10 + list(np.linspace(2.0, 0.5, 20)) + list(np.linspace(0.6, 5.0, 10))
    r = ln.tuning.LRFinderResult(lrs, losses, losses)
    assert lrs[10] <= r.suggestion <= lrs[29]
    assert r.suggest("minimum") == pytest.approx(lrs[29] / 10)
    assert lrs[10] <= r.suggest("steepest") <= lrs[29]
    with pytest.raises(ln.LanternaError, match="valley"):
        r.suggest("median")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_lr": 0.0}, "positive"),
        ({"start_lr": 1.0, "end_lr": 0.1}, "below end_lr"),
        ({"steps": 1}, "at least 2"),
        ({"smooth": 1.0}, "smoothing"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    x, y = toy(64)
    with pytest.raises(ln.LanternaError, match=match):
        ln.lr_finder(ln.setup(Net, loss=nn.MSELoss()), (x, y), **kwargs)


def test_a_custom_step_without_loss_is_an_error():
    class NoLoss(Net):
        def step(self, ctx):
            loss = ((self(ctx.input) - ctx.target) ** 2).mean()
            if ctx.training:
                ctx.backward(loss)
                ctx.step_optimizer()

    x, y = toy(64)
    with pytest.raises(ln.LanternaError, match="must set ctx.loss"):
        ln.lr_finder(ln.setup(NoLoss), (x, y), steps=5)
