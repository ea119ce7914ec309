"""First-batch checks (core/checks.py): validation data checked before training without touching any
generator, and any loss shape-checked (a plain function that broadcasts is refused)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import linear_setup
from torch.utils.data import DataLoader

import lanterna as ln
from lanterna.core.checks import first_batch
from lanterna.data import LoaderBatches, make_source


class RecordBatches(ln.Callback):
    def __init__(self):
        self.train_batches = 0

    def on_train_batch_begin(self, ctx):
        self.train_batches += 1


class PidDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.pids = x, y, set()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.pids.add(os.getpid())
        return self.x[i], self.y[i]


def test_validation_target_shape_is_checked_before_training():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    rec = RecordBatches()
    with pytest.raises(ln.ShapeMismatchError, match=r"\(16,\).*unsqueeze"):
        linear_setup().fit((x, y), valid_data=(x[:16], y[:16, 0]), epochs=2, verbose=False, callbacks=[rec])
    assert rec.train_batches == 0  # refused before the first training step


def test_validation_feature_count_is_checked_before_training():
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    rec = RecordBatches()
    with pytest.raises(ln.ModelCallError, match=r"first valid batch.*tensor\(16, 5\)"):
        linear_setup().fit((x, y), valid_data=(torch.randn(16, 5), y[:16]), epochs=2, verbose=False, callbacks=[rec])
    assert rec.train_batches == 0


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
        linear_setup(loss=lambda p, t: ((p - t) ** 2).mean()).fit((x, y), epochs=1, verbose=False)


def test_a_plain_function_loss_that_reshapes_itself_is_accepted():
    x, y = torch.randn(64, 3), torch.randn(64)
    fitted = linear_setup(loss=lambda p, t: ((p.squeeze(1) - t) ** 2).mean()).fit((x, y), epochs=1, verbose=False)
    assert len(fitted.history) == 1
