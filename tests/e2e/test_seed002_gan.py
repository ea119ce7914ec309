"""Seed 002, the GAN of "PyTorch for deep learning": a generator and a discriminator with two optimizers in a
custom step(ctx), a scheduler on one of them, and the losses the step logs (shown, recorded and monitored)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    history_keys,
    luz_net_setup,
    make_luz_data,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln


class TinyGAN(nn.Module):
    """Seed 002's GAN in one dimension: a generator and a discriminator, two optimizers, a custom step."""

    def __init__(self, latent: int = 2) -> None:
        super().__init__()
        self.latent = latent
        self.gen = nn.Linear(latent, 1)
        self.disc = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
        self.objective = nn.BCELoss()

    def forward(self, z):
        return self.gen(z)

    def set_optimizers(self, lr: float = 1e-2):
        return {"gen": torch.optim.Adam(self.gen.parameters(), lr=lr),
                "disc": torch.optim.Adam(self.disc.parameters(), lr=lr)}

    def step(self, ctx):
        real = ctx.input
        assert isinstance(real, torch.Tensor) and ctx.target is None
        n = real.shape[0]
        ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
        fake = self.gen(torch.randn(n, self.latent))
        if ctx.training:
            ctx.optimizers["disc"].zero_grad()
        d_loss = self.objective(self.disc(real), ones) + self.objective(self.disc(fake.detach()), zeros)
        if ctx.training:
            d_loss.backward()
            ctx.optimizers["disc"].step()
            ctx.optimizers["gen"].zero_grad()
        g_loss = self.objective(self.disc(fake), ones)
        if ctx.training:
            g_loss.backward()
            ctx.optimizers["gen"].step()
        ctx.log("d_loss", d_loss.detach())
        ctx.log("g_loss", g_loss.detach().item())
        ctx.loss = (d_loss + g_loss).detach()
        ctx.pred = fake.detach()


def test_gan_custom_step_two_optimizers_and_scheduler_on_one(capsys):
    torch.manual_seed(0)
    real = torch.randn(256, 1) * 0.5 + 3.0
    dl = DataLoader(TensorDataset(real), batch_size=32, shuffle=True)  # batches of one item: real samples
    gen0 = None

    class Snap(ln.Callback):
        def on_fit_begin(self, ctx):
            nonlocal gen0
            gen0 = {k: v.clone() for k, v in ctx.model.state_dict().items()}
            assert set(ctx.optimizers) == {"gen", "disc"}

    sched = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, opt_name="gen", step_size=1, gamma=0.5)
    f = ln.setup(TinyGAN).set_opt_hparams(lr=0.01).fit(
        dl, epochs=3, valid_data=DataLoader(TensorDataset(real[:64]), batch_size=32), callbacks=[Snap(), sched])
    out = capsys.readouterr().out
    assert "Epoch 3/3" in out and "Train metrics: Loss: " in out
    got = history_keys(f.history[0])
    assert got == {"epoch", "epoch_time", "lr_gen", "lr_disc", "train_loss", "train_d_loss", "train_g_loss",
                    "valid_loss", "valid_d_loss", "valid_g_loss"}, got
    assert [h["lr_gen"] for h in f.history] == pytest.approx([0.01, 0.005, 0.0025])
    assert [h["lr_disc"] for h in f.history] == pytest.approx([0.01] * 3)
    for h in f.history:
        assert h["train_loss"] == pytest.approx(h["train_d_loss"] + h["train_g_loss"], rel=1e-4)
    sd = f.model.state_dict()
    assert not torch.equal(sd["gen.weight"], gen0["gen.weight"])
    assert not torch.equal(sd["disc.0.weight"], gen0["disc.0.weight"])


def test_ctx_log_from_a_callback_and_monitor_on_custom_name():
    class GradNorm(ln.Callback):
        def on_train_batch_before_step(self, ctx):
            norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in ctx.model.parameters()))
            ctx.log("grad_norm", norm)

    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=3, verbose=False, callbacks=[GradNorm()])
    assert "train_grad_norm" in f.history[0] and f.history[0]["train_grad_norm"] > 0
    assert "grad_norm" in set(f.metrics_df().metric)

    # names that only a custom step's ctx.log creates can be monitored (checked after the first epoch)
    real = torch.randn(64, 1) + 3.0
    stops = []

    class Seen(ln.Callback):
        def on_early_stopping(self, ctx):
            stops.append(ctx.epoch)

    g = ln.setup(TinyGAN).fit(TensorDataset(real), epochs=3, verbose=False,
                              callbacks=[ln.callbacks.EarlyStopping(monitor="train_g_loss", patience=5,
                                                                    baseline=-1.0), Seen()])
    assert len(g.history) == 3 and stops == []
    calls = []

    class CountEpochs(ln.Callback):
        def on_epoch_end(self, ctx):
            calls.append(ctx.epoch)

    with pytest.raises(Exception, match=r"train_g_loss"):
        ln.setup(TinyGAN).fit(TensorDataset(real), epochs=3, verbose=False,
                              callbacks=[CountEpochs(), ln.callbacks.EarlyStopping(monitor="train_g_los", mode="min")])
    assert calls in ([], [1])
