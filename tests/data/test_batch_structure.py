"""Batch structure: one-, two- and many-item batches; tuple inputs → model(*x), dict inputs → model(**x)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lanterna as ln
from lanterna.data import batch_size_of, call_model, move_to, split_batch


def test_split_batch_follows_the_contract():
    x, y, z = torch.zeros(4, 3), torch.ones(4), torch.full((4, 2), 2.0)
    assert split_batch(x) == (x, None)
    d = {"a": x}
    assert split_batch(d) == (d, None)
    inp, tgt = split_batch((x,))
    assert inp is x and tgt is None
    inp, tgt = split_batch((x, y))
    assert inp is x and tgt is y
    inp, tgt = split_batch([x, z, y])
    assert isinstance(inp, tuple) and inp[0] is x and inp[1] is z and tgt is y
    inp, tgt = split_batch(((x, z), y))
    assert inp == (x, z) and tgt is y
    with pytest.raises(TypeError, match="batch must be a tensor"):
        split_batch("abc")


def test_call_model_spreads_tuples_and_dicts():
    seen = []

    def model(*args, **kwargs):
        seen.append((len(args), sorted(kwargs)))

    x = torch.zeros(2)
    call_model(model, x)
    call_model(model, (x, x, x))
    call_model(model, {"wide": x, "deep": x})
    assert seen == [(1, []), (3, []), (0, ["deep", "wide"])]


def test_batch_size_and_move_to_walk_nested_structures():
    batch = ({"a": torch.zeros(5, 2), "b": [torch.zeros(5)]}, torch.zeros(5))
    assert batch_size_of(batch) == 5
    moved = move_to(batch, torch.device("cpu"))
    assert isinstance(moved[0]["b"], list) and moved[0]["a"].shape == (5, 2)


class WideAndDeep(nn.Module):
    """Seed 004's two-input model."""

    def __init__(self):
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.out = nn.Linear(8 + 2, 1)

    def forward(self, x_wide, x_deep):
        return self.out(torch.cat([x_wide, self.deep(x_deep)], dim=1))


@pytest.fixture
def wide_deep_data():
    g = torch.Generator().manual_seed(0)
    xw, xd = torch.randn(96, 2, generator=g), torch.randn(96, 3, generator=g)
    y = xw.sum(1, keepdim=True) - xd[:, :1] + 0.1 * torch.randn(96, 1, generator=g)
    return xw, xd, y


def _fit(data, **kw):
    return ln.setup(WideAndDeep, loss=nn.MSELoss()).set_opt_hparams(lr=0.02).fit(
        data, epochs=3, verbose=False, seed=0, **kw)


def test_tuple_inputs_dict_inputs_and_three_item_batches_train_the_same(wide_deep_data):
    xw, xd, y = wide_deep_data
    as_tuple = _fit(((xw, xd), y))
    as_dict = _fit(({"x_wide": xw, "x_deep": xd}, y))
    three_items = _fit(TensorDataset(xw, xd, y))
    for other in (as_dict, three_items):
        for a, b in zip(as_tuple.model.state_dict().values(), other.model.state_dict().values()):
            assert torch.equal(a, b)
    assert as_tuple.history[-1]["train_loss"] < as_tuple.history[0]["train_loss"]
    with torch.no_grad():
        direct = as_tuple.model(xw, xd)
    # predict((a, b)) is an input a and an ignored target b, so several inputs go in a one-item tuple
    torch.testing.assert_close(as_tuple.predict(((xw, xd),)), direct)
    torch.testing.assert_close(as_tuple.predict(((xw, xd), y)), direct)
    torch.testing.assert_close(as_dict.predict({"x_wide": xw, "x_deep": xd}), direct)


class NamedInputs(Dataset):
    """Seed 004's WideAndDeepDataset: ``({"x_wide": ..., "x_deep": ...}, y)`` per item."""

    def __init__(self, xw, xd, y):
        self.xw, self.xd, self.y = xw, xd, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x_wide": self.xw[i], "x_deep": self.xd[i]}, self.y[i]


def test_a_dataset_of_dict_inputs_calls_model_with_keywords(wide_deep_data):
    xw, xd, y = wide_deep_data
    fitted = _fit(DataLoader(NamedInputs(xw, xd, y), batch_size=32, shuffle=True))
    reference = _fit(DataLoader(TensorDataset(xw, xd, y), batch_size=32, shuffle=True))
    for a, b in zip(fitted.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_one_item_batch_is_an_input_without_target_for_predict():
    model = nn.Linear(3, 1)
    fitted = ln.setup(model, loss=nn.MSELoss()).fit((torch.randn(8, 3), torch.randn(8, 1)), epochs=1, verbose=False)
    x = torch.randn(10, 3)
    with torch.no_grad():
        direct = fitted.model(x)
    torch.testing.assert_close(fitted.predict(TensorDataset(x)), direct)
    torch.testing.assert_close(fitted.predict(DataLoader(TensorDataset(x), batch_size=3)), direct)
    torch.testing.assert_close(fitted.predict(x), direct)


def test_a_one_item_batch_trains_with_a_custom_step():
    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(4, 2), nn.Linear(2, 4)

        def forward(self, x):
            return self.dec(self.enc(x))

        def step(self, ctx):
            assert ctx.target is None
            ctx.pred = self(ctx.input)
            ctx.loss = nn.functional.mse_loss(ctx.pred, ctx.input)
            if ctx.training:
                ctx.backward(ctx.loss)
                ctx.step_optimizer()

    x = torch.randn(64, 4)
    fitted = ln.setup(AutoEncoder).set_opt_hparams(lr=0.01).fit(TensorDataset(x), epochs=5, verbose=False, seed=0)
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"]


def test_multi_output_predictions_come_back_as_a_tuple():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    x, y = torch.randn(30, 3), torch.randn(30, 1)
    fitted = ln.setup(TwoHeads, loss=[nn.MSELoss(), lambda p, t: p.pow(2).mean()], loss_weights=[0.8, 0.2]).fit(
        (x, y), epochs=1, verbose=False)
    out = fitted.predict(x, dataloader_options={"batch_size": 7})
    assert isinstance(out, tuple) and out[0].shape == (30, 1) and out[1].shape == (30, 2)
