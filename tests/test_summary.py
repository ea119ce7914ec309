"""ln.summary / fitted.summary: hand-counted parameters, real output shapes, frozen and shared parameters,
tuple and dict inputs, no side effects on the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lanterna as ln


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


# by hand: Linear(3, 8) 3*8+8 = 32, BatchNorm1d(8) 8+8 = 16, Linear(8, 2) 8*2+2 = 18
COUNTS = {"encoder": 48, "encoder.0": 32, "encoder.1": 16, "encoder.2": 0, "head": 18}


def test_nested_model_counts_and_shapes():
    s = ln.summary(Nested(), torch.randn(5, 3))
    assert [(r.name, r.type, r.params) for r in s.rows] == [
        ("encoder", "Sequential", 48), ("encoder.0", "Linear", 32), ("encoder.1", "BatchNorm1d", 16),
        ("encoder.2", "ReLU", 0), ("head", "Linear", 18)]
    assert [tuple(r.output_shape) for r in s.rows] == [(5, 8), (5, 8), (5, 8), (5, 8), (5, 2)]
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == (66, 66, 0)
    assert (s.input_shape, s.output_shape) == ((5, 3), (5, 2))
    # 66 float32 parameters + running_mean/var (2 * 8 float32) + num_batches_tracked (one int64)
    assert s.size_bytes == 66 * 4 + 16 * 4 + 8
    assert s.size_mb == pytest.approx(336 / 1e6)
    assert str(s) == repr(s) == "\n".join([
        "Model: Nested",
        "Input: [5, 3] → output: [5, 2]",
        "─" * 55,
        "Name       Type         Output shape  Params  Trainable",
        "─" * 55,
        "encoder    Sequential   [5, 8]            48  yes",
        "encoder.0  Linear       [5, 8]            32  yes",
        "encoder.1  BatchNorm1d  [5, 8]            16  yes",
        "encoder.2  ReLU         [5, 8]             0  -",
        "head       Linear       [5, 2]            18  yes",
        "─" * 55,
        "Total params: 66",
        "Trainable params: 66",
        "Non-trainable params: 0",
        "Size (parameters and buffers): 0.00034 MB",
    ])


def test_depth_limits_rows_not_totals():
    s = ln.summary(Nested(), torch.randn(2, 3), depth=1)
    assert [(r.name, r.params) for r in s.rows] == [("encoder", 48), ("head", 18)]
    assert s.total_params == 66
    with pytest.raises(ValueError, match="depth=0"):
        ln.summary(Nested(), depth=0)


def test_frozen_layers():
    model = Nested()
    model.encoder[0].requires_grad_(False)
    s = ln.summary(model)
    trainable = {r.name: (r.trainable_params, r.trainable) for r in s.rows}
    assert trainable == {"encoder": (16, "partial"), "encoder.0": (0, "no"), "encoder.1": (16, "yes"),
                         "encoder.2": (0, "-"), "head": (18, "yes")}
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == (66, 34, 32)
    assert "Non-trainable params: 32" in str(s)
    assert "Output shape  " not in str(s) and "pass example_input" in str(s)  # no column: said, not guessed
    assert all(r.output_shape is None for r in s.rows)


def test_shared_parameters_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, i):
            return self.out(self.emb(i))

    s = ln.summary(Tied(), torch.tensor([[1, 2, 3]]))
    assert [(r.name, r.params, tuple(r.output_shape)) for r in s.rows] == [("emb", 40, (1, 3, 4)),
                                                                          ("out", 40, (1, 3, 10))]
    assert s.total_params == 40


def test_summary_has_no_side_effects():
    model = Nested().train()
    model.encoder[1].eval()  # a frozen BatchNorm the user set to eval: must stay so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ln.summary(model, torch.randn(6, 3) * 10)
    assert model.training and model.head.training and not model.encoder[1].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched (eval, no_grad)
    assert not model.encoder[0]._forward_hooks  # hooks removed


def test_tuple_input_and_tuple_output():
    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, z):
            h = self.a(x) + self.b(z)
            return h, h.sum(-1)

    s = ln.summary(TwoInTwoOut(), (torch.randn(7, 3), torch.randn(7, 4)))
    assert [(r.name, r.params, tuple(r.output_shape)) for r in s.rows] == [("a", 8, (7, 2)), ("b", 10, (7, 2))]
    assert s.input_shape == ((7, 3), (7, 4)) and s.output_shape == ((7, 2), (7,))
    assert "Input: ([7, 3], [7, 4]) → output: ([7, 2], [7])" in str(s)


def test_dict_input_and_dict_output():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.num = nn.Linear(3, 4)
            self.emb = nn.Embedding(5, 4)

        def forward(self, num, cat):
            h = self.num(num) + self.emb(cat)
            return {"mu": h[:, :1], "parts": (h, h)}

    s = ln.summary(DictModel(), {"cat": torch.tensor([0, 4]), "num": torch.randn(2, 3)})
    assert [(r.name, r.params) for r in s.rows] == [("num", 16), ("emb", 20)]
    assert s.input_shape == {"cat": (2,), "num": (2, 3)}
    assert s.output_shape == {"mu": (2, 1), "parts": ((2, 4), (2, 4))}
    assert "→ output: {'mu': [2, 1], 'parts': ([2, 4], [2, 4])}" in str(s)


def test_module_without_children_and_errors():
    s = ln.summary(nn.Linear(3, 2), torch.randn(1, 3))
    assert [(r.name, r.params, tuple(r.output_shape)) for r in s.rows] == [("(model)", 8, (1, 2))]
    with pytest.raises(ln.ModelCallError, match="cannot run on example_input"):
        ln.summary(Nested(), torch.randn(5, 4))  # wrong width
    with pytest.raises(ln.ModelCallError, match="lazy parameters"):
        ln.summary(nn.Sequential(nn.LazyLinear(2)))
    s = ln.summary(nn.Sequential(nn.LazyLinear(2)), torch.randn(3, 5))  # the forward pass materializes them
    assert s.total_params == 12


def test_fitted_summary_uses_the_fits_last_batch():
    x, y = torch.randn(40, 3), torch.randn(40, 2)
    fitted = ln.setup(Nested, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False, seed=0,
                                                     dataloader_options={"batch_size": 16})
    s = fitted.summary()
    assert s.output_shape == (8, 2) and s.rows[-1].output_shape == (8, 2)  # 40 = 16 + 16 + 8
    assert s.total_params == 66 and s.input_from == "the last batch the fit saw"
    assert "Input: [8, 3] (the last batch the fit saw) → output: [8, 2]" in str(s)
    assert fitted.summary(torch.randn(3, 3)).output_shape == (3, 2)
    assert not fitted.model.training  # still in eval mode for predict
    loaded = ln.Fitted(fitted.model, None, [])  # no fit behind it: no batch to take shapes from
    assert loaded.summary().input_shape is None and "pass example_input" in str(loaded.summary())
