"""The luz chapter (seed 000), snippet by snippet: every data form fits the toy regression to the noise floor,
train/valid/test with MAE, predict and evaluate; plus Setup's contract (immutable, reusable, hparams)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lanterna as ln

# y = x @ coefs + N(0, 1): the best possible MSE is the noise variance, ~1.0 (0.993 for this sample by OLS).
NOISE_FLOOR = 0.993


@pytest.fixture(scope="module")
def luz_fitted():
    """The chapter's 14.3.1 run: train 600 / valid 200 / test 200, Adam, MSE loss, MAE metric, 200 epochs."""
    x, y = make_luz_data()
    ds = TensorDataset(x, y)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    train_dl = DataLoader(Subset(ds, perm[:600]), batch_size=100, shuffle=True)
    valid_dl = DataLoader(Subset(ds, perm[600:800]), batch_size=100)
    test_dl = DataLoader(Subset(ds, perm[800:]), batch_size=100)
    fitted = (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
        .fit(train_dl, epochs=200, valid_data=valid_dl, verbose=False, seed=7)
    )
    return fitted, (x[perm[800:]], y[perm[800:]]), test_dl


def _luz_setup():
    return ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam).set_hparams(d_in=3, d_hidden=32, d_out=1)


@pytest.mark.parametrize(
    "form, epochs",
    [("dataloader", 200), ("dataset", 30), ("tensors", 30), ("numpy", 30), ("pandas", 30)],
)
def test_every_data_form_fits_the_toy_regression_to_the_noise_floor(form, epochs):
    x, y = make_luz_data()
    data = {
        "dataloader": lambda: DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True),
        "dataset": lambda: TensorDataset(x, y),
        "tensors": lambda: (x, y),
        "numpy": lambda: (x.numpy().astype(np.float64), y.numpy().astype(np.float64)),
        "pandas": lambda: (pd.DataFrame(x.numpy(), columns=["a", "b", "c"]), pd.DataFrame(y.numpy())),
    }[form]()
    fitted = _luz_setup().fit(data, epochs=epochs, verbose=False, seed=0)
    assert len(fitted.history) == epochs
    first, last = fitted.history[0]["train_loss"], fitted.history[-1]["train_loss"]
    assert first > 1.5
    assert NOISE_FLOOR - 0.1 < last < NOISE_FLOOR + 0.08
    assert fitted.model.training is False


def test_numpy_float64_inputs_become_float32_and_train_like_tensors():
    x, y = make_luz_data(n=200)
    from_np = _luz_setup().fit((x.double().numpy(), y.double().numpy()), epochs=3, verbose=False, seed=3)
    from_t = _luz_setup().fit((x, y), epochs=3, verbose=False, seed=3)
    assert next(from_np.model.parameters()).dtype == torch.float32
    for a, b in zip(from_np.model.state_dict().values(), from_t.model.state_dict().values()):
        assert torch.equal(a, b)
    assert from_np.history[-1]["train_loss"] == from_t.history[-1]["train_loss"]


def test_train_valid_test_workflow_reaches_the_noise_floor(luz_fitted):
    fitted, _, _ = luz_fitted
    last = fitted.history[-1]
    assert set(last) >= {"epoch", "train_loss", "train_mae", "valid_loss", "valid_mae", "lr", "epoch_time"}
    assert last["lr"] == 0.001  # Adam's default
    assert last["epoch"] == 200
    # E|N(0, 1)| = 0.798: the MAE of a model at the noise floor.
    assert abs(last["valid_mae"] - 0.8) < 0.1
    assert abs(last["train_mae"] - 0.8) < 0.1
    assert 0.8 < last["valid_loss"] < 1.25
    assert fitted.history[0]["valid_loss"] > last["valid_loss"] + 0.5


def test_predict_returns_a_cpu_tensor_of_shape_200_1(luz_fitted):
    fitted, (x_test, _), test_dl = luz_fitted
    pred = fitted.predict(test_dl)
    assert isinstance(pred, torch.Tensor)
    assert pred.shape == (200, 1)
    assert pred.device.type == "cpu"
    assert pred.dtype == torch.float32
    assert not pred.requires_grad
    with torch.no_grad():
        direct = fitted.model(x_test)
    torch.testing.assert_close(pred, direct)
    # the same predictions from tensors, arrays, a Dataset, and (x, y) with an ignored target
    torch.testing.assert_close(fitted.predict(x_test), direct)
    torch.testing.assert_close(fitted.predict(x_test.numpy()), direct)
    torch.testing.assert_close(fitted.predict(TensorDataset(x_test)), direct)
    torch.testing.assert_close(fitted.predict((x_test, torch.zeros(200, 1))), direct)
    torch.testing.assert_close(fitted.predict(x_test, dataloader_options={"batch_size": 7}), direct)


def test_evaluate_equals_a_direct_computation_over_the_whole_test_set(luz_fitted):
    fitted, (x_test, y_test), test_dl = luz_fitted
    ev = fitted.evaluate(test_dl)
    assert isinstance(ev, ln.Evaluation)
    assert set(ev.metrics) == {"loss", "mae"}
    assert all(isinstance(v, float) for v in ev.metrics.values())
    with torch.no_grad():
        err = (fitted.model(x_test) - y_test).double()
    assert ev.metrics["loss"] == pytest.approx(float(err.square().mean()), rel=1e-6)
    assert ev["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)
    # an uneven last batch (200 = 3 * 64 + 8) changes nothing
    uneven = fitted.evaluate((x_test, y_test), dataloader_options={"batch_size": 64})
    assert uneven.metrics["loss"] == pytest.approx(ev.metrics["loss"], rel=1e-6)
    assert uneven.metrics["mae"] == pytest.approx(ev.metrics["mae"], rel=1e-6)


def test_evaluate_takes_other_metrics_than_the_fit(luz_fitted):
    fitted, (x_test, y_test), _ = luz_fitted
    ev = fitted.evaluate((x_test, y_test), metrics=[ln.metrics.RMSE(), ln.metrics.MSE()])
    assert set(ev.metrics) == {"loss", "rmse", "mse"}
    assert ev["rmse"] == pytest.approx(ev["loss"] ** 0.5, rel=1e-6)
    assert ev["mse"] == pytest.approx(ev["loss"], rel=1e-6)


def test_fitted_exposes_hparams_history_and_metrics_df(luz_fitted):
    fitted, _, _ = luz_fitted
    assert fitted.hparams == {"d_in": 3, "d_hidden": 32, "d_out": 1}
    assert fitted.opt_hparams == {}
    assert isinstance(fitted.model, Net)
    df = fitted.metrics_df()
    assert list(df.columns) == ["epoch", "set", "metric", "value"]
    assert len(df) == 200 * 4  # train/valid × loss/mae
    row = df[(df.epoch == 200) & (df.set == "valid") & (df.metric == "mae")]
    assert float(row.value.iloc[0]) == fitted.history[-1]["valid_mae"]


def test_setup_is_immutable_and_reusable():
    base = ln.setup(Net, loss=nn.MSELoss())
    a = base.set_hparams(d_in=3, d_hidden=4, d_out=1)
    b = a.set_hparams(d_hidden=8).set_opt_hparams(lr=0.1)
    assert base.hparams == {}
    assert a.hparams == {"d_in": 3, "d_hidden": 4, "d_out": 1} and a.opt_hparams == {}
    assert b.hparams == {"d_in": 3, "d_hidden": 8, "d_out": 1} and b.opt_hparams == {"lr": 0.1}
    x, y = make_luz_data(n=64)
    f1 = a.fit((x, y), epochs=1, verbose=False)
    f2 = a.fit((x, y), epochs=1, verbose=False)
    assert f1.model is not f2.model
    assert f1.model.net[0].out_features == 4
    assert b.fit((x, y), epochs=1, verbose=False).model.net[0].out_features == 8
    assert f2.optimizers["opt"].param_groups[0]["lr"] == 0.001
    assert b.fit((x, y), epochs=1, verbose=False).optimizers["opt"].param_groups[0]["lr"] == 0.1


def test_module_may_be_a_factory_or_an_instance():
    x, y = make_luz_data(n=64)
    from_factory = ln.setup(lambda width: Net(3, width, 1), loss=nn.MSELoss()).set_hparams(width=5)
    assert from_factory.fit((x, y), epochs=1, verbose=False).model.net[0].out_features == 5
    instance = Net()
    fitted = ln.setup(instance, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
    assert fitted.model is instance


def test_the_loss_may_be_the_modules_own_method():
    class WithLoss(Net):
        def loss(self, pred, target):
            return nn.functional.l1_loss(pred, target)

    x, y = make_luz_data(n=128)
    fitted = ln.setup(WithLoss).fit((x, y), epochs=2, verbose=False, seed=0)
    with torch.no_grad():
        mae = float((fitted.model(x) - y).abs().mean())
    assert fitted.evaluate((x, y))["loss"] == pytest.approx(mae, rel=1e-5)


def test_default_optimizer_is_adam_and_set_opt_hparams_reaches_it():
    x, y = make_luz_data(n=64)
    f = ln.setup(Net, loss=nn.MSELoss()).set_opt_hparams(lr=0.05, weight_decay=0.01).fit(
        (x, y), epochs=1, verbose=False)
    opt = f.optimizers["opt"]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 0.01
    assert f.context.opt is opt
