"""Multiple inputs and outputs (issue 4): seed 004's Wide & Deep with two positional inputs, named dict inputs
and an auxiliary output weighted 0.8/0.2; per-output targets, dict outputs, metrics bound to an output, the
module's own loss, and the errors for mismatched losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lanterna as ln


def housing(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """California-housing-like data: 8 standardised features, a smooth nonlinear target (n, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :5] @ torch.tensor([0.8, -0.5, 0.3, 0.2, -0.4])).unsqueeze(1) + torch.sin(2 * x[:, 2:]).sum(
        1, keepdim=True) * 0.5 + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


class WideAndDeep(nn.Module):
    """Seed 004's WideAndDeepV3: the wide input goes straight to the output layer."""

    def __init__(self, n_wide: int = 5, n_deep: int = 6) -> None:
        super().__init__()
        self.deep_stack = nn.Sequential(nn.Linear(n_deep, 50), nn.ReLU(), nn.Linear(50, 40), nn.ReLU())
        self.output_layer = nn.Linear(40 + n_wide, 1)

    def forward(self, X_wide: torch.Tensor, X_deep: torch.Tensor) -> torch.Tensor:
        deep_output = self.deep_stack(X_deep)
        return self.output_layer(torch.concat([X_wide, deep_output], dim=1))


class WideAndDeepAux(WideAndDeep):
    """Seed 004's WideAndDeepV4: the main output and an auxiliary output of the deep part."""

    def __init__(self, n_wide: int = 5, n_deep: int = 6) -> None:
        super().__init__(n_wide, n_deep)
        self.aux_output_layer = nn.Linear(40, 1)

    def forward(self, X_wide: torch.Tensor, X_deep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deep_output = self.deep_stack(X_deep)
        main_output = self.output_layer(torch.concat([X_wide, deep_output], dim=1))
        return main_output, self.aux_output_layer(deep_output)


class WideAndDeepDataset(Dataset):
    """Seed 004's dataset returning ``({"X_wide": ..., "X_deep": ...}, y)``."""

    def __init__(self, X_wide, X_deep, y):
        self.X_wide, self.X_deep, self.y = X_wide, X_deep, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return {"X_wide": self.X_wide[idx], "X_deep": self.X_deep[idx]}, self.y[idx]


def _split(x, y, n_train=480):
    return (x[:n_train, :5], x[:n_train, 2:], y[:n_train]), (x[n_train:, :5], x[n_train:, 2:], y[n_train:])


def _mse(pred, y):
    return float(F.mse_loss(pred, y))


def test_two_positional_inputs_from_a_three_tensor_dataloader():
    x, y = housing()
    (xw, xd, yt), (vw, vd, vy) = _split(x, y)
    train_dl = DataLoader(TensorDataset(xw, xd, yt), batch_size=32, shuffle=True)
    valid_dl = DataLoader(TensorDataset(vw, vd, vy), batch_size=64)
    fitted = (ln.setup(WideAndDeep, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_opt_hparams(lr=0.005)
              .fit(train_dl, epochs=25, valid_data=valid_dl, seed=0, verbose=False))
    assert fitted.history[-1]["valid_loss"] < 0.15 * float(vy.var())
    pred = fitted.predict(((vw, vd),))  # one-item batches: the input is the tuple (X_wide, X_deep)
    assert pred.shape == (120, 1)
    assert _mse(pred, vy) == pytest.approx(fitted.history[-1]["valid_loss"], rel=1e-5)


def test_named_dict_inputs_dataset_and_in_memory():
    x, y = housing()
    (xw, xd, yt), (vw, vd, vy) = _split(x, y)
    ds = WideAndDeepDataset(xw, xd, yt)
    fitted = ln.setup(WideAndDeep, loss=nn.MSELoss()).set_opt_hparams(lr=0.005).fit(
        ds, epochs=25, valid_data=WideAndDeepDataset(vw, vd, vy), seed=0, verbose=False)
    assert fitted.history[-1]["valid_loss"] < 0.15 * float(vy.var())
    named = {"X_wide": vw, "X_deep": vd}
    pred = fitted.predict(named)  # a dict batch: model(**inputs), no target
    assert pred.shape == (120, 1)
    with torch.no_grad():
        torch.testing.assert_close(pred, fitted.model(**named))
    # the same data in memory, as a dict of inputs and a target
    mem = ln.setup(WideAndDeep, loss=nn.MSELoss()).set_opt_hparams(lr=0.005).fit(
        ({"X_wide": xw, "X_deep": xd}, yt), epochs=25, valid_data=(named, vy), seed=0, verbose=False)
    assert mem.history[-1]["valid_loss"] < 0.15 * float(vy.var())


def test_auxiliary_output_loss_is_the_weighted_sum_computed_by_hand():
    x, y = housing()
    (xw, xd, yt), (vw, vd, vy) = _split(x, y)
    metrics = [ln.metrics.MAE(), ln.metrics.named(ln.metrics.MAE(), "aux_mae", output=1)]
    fitted = (ln.setup(WideAndDeepAux, loss=[nn.MSELoss(), nn.MSELoss()], loss_weights=[0.8, 0.2],
                       metrics=metrics)
              .set_opt_hparams(lr=0.005)
              .fit(({"X_wide": xw, "X_deep": xd}, yt), epochs=15,
                   valid_data=({"X_wide": vw, "X_deep": vd}, vy), seed=0, verbose=False))
    with torch.no_grad():
        main, aux = fitted.model(X_wide=vw, X_deep=vd)
    by_hand = 0.8 * _mse(main, vy) + 0.2 * _mse(aux, vy)
    last = fitted.history[-1]
    assert last["valid_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert last["valid_mae"] == pytest.approx(float((main - vy).abs().mean()), rel=1e-5)  # the main output
    assert last["valid_aux_mae"] == pytest.approx(float((aux - vy).abs().mean()), rel=1e-5)
    assert last["valid_mae"] < 0.5 * float((vy - vy.mean()).abs().mean())
    assert fitted.evaluate(({"X_wide": vw, "X_deep": vd}, vy))["loss"] == pytest.approx(by_hand, rel=1e-5)
    pred = fitted.predict({"X_wide": vw, "X_deep": vd})
    assert isinstance(pred, tuple) and len(pred) == 2
    torch.testing.assert_close(pred[0], main)
    torch.testing.assert_close(pred[1], aux)


def test_training_loss_is_the_weighted_sum_with_frozen_weights():
    """With lr=0 the weights never move, so the epoch's training loss is the weighted sum over all the data."""
    x, y = housing(200)
    xw, xd = x[:, :5], x[:, 2:]
    fitted = (ln.setup(WideAndDeepAux, loss=[nn.MSELoss(), nn.L1Loss()], loss_weights=[0.8, 0.2],
                       optimizer=torch.optim.SGD).set_opt_hparams(lr=0.0)
              .fit((xw, xd, y), epochs=1, seed=0, verbose=False))
    with torch.no_grad():
        main, aux = fitted.model(xw, xd)
    assert fitted.history[0]["train_loss"] == pytest.approx(
        0.8 * _mse(main, y) + 0.2 * float(F.l1_loss(aux, y)), rel=1e-5)


class TwoTasks(nn.Module):
    """A regression head and a 3-class head on shared features, returning a dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 32), nn.ReLU())
        self.reg = nn.Linear(32, 1)
        self.cls = nn.Linear(32, 3)

    def forward(self, x):
        h = self.body(x)
        return {"value": self.reg(h), "label": self.cls(h)}


def _two_task_data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    value = x[:, :1] * 2 - x[:, 1:2]
    label = (x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    return x, value, label


def test_dict_outputs_with_one_target_per_output():
    x, value, label = _two_task_data()
    acc = ln.metrics.named(ln.metrics.Accuracy(), "label_acc", output="label")
    fitted = (ln.setup(TwoTasks, loss={"value": nn.MSELoss(), "label": nn.CrossEntropyLoss()},
                       loss_weights={"value": 1.0, "label": 0.5}, metrics=[ln.metrics.MAE(), acc])
              .set_opt_hparams(lr=0.01)
              .fit((x, {"value": value, "label": label}), epochs=30, seed=0, verbose=False,
                   valid_data=(x, {"value": value, "label": label})))
    last = fitted.history[-1]
    assert last["valid_label_acc"] > 0.9 and last["valid_mae"] < 0.3
    with torch.no_grad():
        out = fitted.model(x)
    by_hand = _mse(out["value"], value) + 0.5 * float(F.cross_entropy(out["label"], label))
    assert last["valid_loss"] == pytest.approx(by_hand, rel=1e-5)
    pred = fitted.predict(x)
    assert set(pred) == {"value", "label"} and pred["label"].shape == (300, 3)


def test_tuple_outputs_with_a_tuple_target():
    x, value, label = _two_task_data()

    class TupleTasks(TwoTasks):
        def forward(self, x):
            out = super().forward(x)
            return out["value"], out["label"]

    fitted = ln.setup(TupleTasks, loss=[nn.MSELoss(), nn.CrossEntropyLoss()]).set_opt_hparams(lr=0.01).fit(
        (x, (value, label)), epochs=20, seed=0, verbose=False)
    assert fitted.history[-1]["train_loss"] < 0.5 * fitted.history[0]["train_loss"]


def test_the_modules_own_loss_method_is_used_when_no_loss_is_given():
    class OwnLoss(WideAndDeepAux):
        def loss(self, pred, target):
            main, aux = pred
            return 0.8 * F.mse_loss(main, target) + 0.2 * F.mse_loss(aux, target)

    x, y = housing(200)
    a = ln.setup(OwnLoss).fit((x[:, :5], x[:, 2:], y), epochs=3, seed=0, verbose=False)
    b = ln.setup(WideAndDeepAux, loss=[nn.MSELoss(), nn.MSELoss()], loss_weights=[0.8, 0.2]).fit(
        (x[:, :5], x[:, 2:], y), epochs=3, seed=0, verbose=False)
    assert [r["train_loss"] for r in a.history] == pytest.approx([r["train_loss"] for r in b.history], rel=1e-6)


# ---------------------------------------------------------------------------- bad input


def test_loss_list_longer_than_the_outputs_is_an_error():
    x, y = housing(64)
    setup = ln.setup(WideAndDeepAux, loss=[nn.MSELoss()] * 3)
    with pytest.raises(ln.LanternaError, match=r"list of 3 losses but the model returned a tuple of 2 outputs"):
        setup.fit((x[:, :5], x[:, 2:], y), epochs=1, verbose=False)


def test_loss_weights_of_the_wrong_length_is_an_error():
    x, y = housing(64)
    setup = ln.setup(WideAndDeepAux, loss=[nn.MSELoss(), nn.MSELoss()], loss_weights=[0.8, 0.1, 0.1])
    with pytest.raises(ln.LanternaError, match=r"loss_weights has 3 entries but loss has 2"):
        setup.fit((x[:, :5], x[:, 2:], y), epochs=1, verbose=False)


def test_a_single_builtin_loss_for_several_outputs_is_an_error():
    x, y = housing(64)
    with pytest.raises(ln.LanternaError, match=r"returned 2 outputs.*single MSELoss.*loss_weights"):
        ln.setup(WideAndDeepAux, loss=nn.MSELoss()).fit((x[:, :5], x[:, 2:], y), epochs=1, verbose=False)


def test_loss_weights_without_a_list_of_losses_is_an_error():
    x, y = housing(64)
    with pytest.raises(ln.LanternaError, match=r"loss_weights.*one loss per output"):
        ln.setup(WideAndDeep, loss=nn.MSELoss(), loss_weights=[0.8, 0.2]).fit(
            (x[:, :5], x[:, 2:], y), epochs=1, verbose=False)


def test_a_forward_that_cannot_take_the_inputs_names_the_arity():
    x, y = housing(64)
    with pytest.raises(ln.ModelCallError, match=r"3 positional inputs"):
        ln.setup(WideAndDeep, loss=nn.MSELoss()).fit((x[:, :5], x[:, 2:], x, y), epochs=1, verbose=False)
