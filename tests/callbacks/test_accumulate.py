"""Gradient accumulation (callbacks/accumulate.py) on data without a length, and ``ctx.step`` counting optimizer
steps under accumulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import linear_setup
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lanterna as ln


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
    fitted = linear_setup(optimizer=torch.optim.SGD).set_opt_hparams(lr=0.1).fit(
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
    linear_setup().fit((x, y), epochs=2, verbose=False, dataloader_options={"batch_size": 8},
               callbacks=[ln.callbacks.GradientAccumulation(4), counter])
    assert counter.step == 2 * 3
