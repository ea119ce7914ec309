"""Fitted (results.py): predict on the data forms a user passes after fit, and the callbacks predict and
evaluate fire."""

from __future__ import annotations

import torch
from conftest import linear_setup, luz_net_setup, make_luz_data
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln


def test_predict_on_bare_tensor_batches_and_dataset():
    x, y = make_luz_data(70)
    f = luz_net_setup().fit((x, y), epochs=1, verbose=False)
    with torch.no_grad():
        ref = f.model(x)
    torch.testing.assert_close(f.predict(DataLoader(x, batch_size=16)), ref)  # bare tensor batches: inputs
    torch.testing.assert_close(f.predict(TensorDataset(x)), ref)
    torch.testing.assert_close(f.predict(TensorDataset(x, y)), ref)
    torch.testing.assert_close(f.predict(x.numpy()), ref)


# ---------------------------------------------------------------------------- from issue 11


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
    fitted = linear_setup().fit((x, y), epochs=1, verbose=False)
    hooks = PredictHooks()
    fitted.predict(x, callbacks=[hooks], dataloader_options={"batch_size": 32})
    assert hooks.seen == ["begin", ("batch_begin", 1), ("batch_end", (32, 1)), ("batch_begin", 2),
                          ("batch_end", (8, 1)), "end"]
    valid = ValidHooks()
    fitted.evaluate((x, y), callbacks=[valid], dataloader_options={"batch_size": 16})
    assert valid.batches == 3
