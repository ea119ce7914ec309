"""Metrics inside fit: exact over the epoch with an uneven last batch, the same on the fast path and through a
DataLoader, separate train/valid state, naming (torchmetrics, ``named``, repeats) and ``MetricSet``."""

from __future__ import annotations

import pytest
import torch
import torchmetrics
from conftest import MLPClassifier, Net, PairDataset, make_blobs, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln

TIMING = {"epoch_time"}



def regression_setup(metrics):
    return ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD, metrics=metrics).set_opt_hparams(lr=0.0)


def direct_regression(model, x, y):
    with torch.no_grad():
        err = (model(x) - y).double()
    return {"loss": float(err.square().mean()), "mae": float(err.abs().mean()),
            "rmse": float(err.square().mean().sqrt()), "mse": float(err.square().mean())}


def test_regression_metrics_are_exact_with_an_uneven_last_batch():
    x, y = make_luz_data(n=103)
    xv, yv = make_luz_data(n=57, seed=5)
    metrics = [ln.metrics.MAE(), ln.metrics.RMSE(), ln.metrics.MSE()]
    fitted = regression_setup(metrics).fit(
        (x, y), valid_data=(xv, yv), epochs=2, verbose=False, seed=0, dataloader_options={"batch_size": 10})
    train, valid = direct_regression(fitted.model, x, y), direct_regression(fitted.model, xv, yv)
    for rec in fitted.history:
        for name in ("loss", "mae", "rmse", "mse"):
            assert rec[f"train_{name}"] == pytest.approx(train[name], rel=1e-6), name
            assert rec[f"valid_{name}"] == pytest.approx(valid[name], rel=1e-6), name


def test_valid_metrics_of_the_last_epoch_equal_a_direct_computation_after_real_training():
    x, y = make_luz_data(n=300)
    xv, yv = make_luz_data(n=61, seed=3)
    fitted = (
        ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()])
        .set_opt_hparams(lr=0.01)
        .fit((x, y), valid_data=(xv, yv), epochs=3, verbose=False, seed=0)
    )
    expected = direct_regression(fitted.model, xv, yv)
    last = fitted.history[-1]
    for name in ("loss", "mae", "rmse"):
        assert last[f"valid_{name}"] == pytest.approx(expected[name], rel=1e-6)


def test_accuracy_is_exact_with_an_uneven_last_batch():
    x, y = make_blobs(n=101)
    xv, yv = make_blobs(n=47, seed=1)
    fitted = (
        ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                 metrics=[ln.metrics.Accuracy()])
        .set_opt_hparams(lr=0.0)
        .fit((x, y), valid_data=(xv, yv), epochs=1, verbose=False, seed=0, dataloader_options={"batch_size": 16})
    )
    with torch.no_grad():
        train_scores, valid_scores = fitted.model(x), fitted.model(xv)
    rec = fitted.history[-1]
    assert rec["train_acc"] == pytest.approx(float((train_scores.argmax(1) == y).double().mean()), abs=1e-7)
    assert rec["valid_acc"] == pytest.approx(float((valid_scores.argmax(1) == yv).double().mean()), abs=1e-7)
    assert rec["valid_loss"] == pytest.approx(float(nn.functional.cross_entropy(valid_scores, yv)), rel=1e-6)


def stack_collate(items):
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def _history_without_timing(fitted):
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in fitted.history]


@pytest.mark.parametrize("slow_path", ["dataset-subclass", "custom-collate"])
def test_fast_path_and_dataloader_path_give_identical_history(slow_path):
    x, y = make_luz_data(n=250)
    xv, yv = make_luz_data(n=70, seed=9)
    s = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()]).set_opt_hparams(lr=0.01)

    def fit(train, valid):
        return s.fit(train, valid_data=valid, epochs=3, verbose=False, seed=4)

    fast = fit(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
               DataLoader(TensorDataset(xv, yv), batch_size=32))
    if slow_path == "dataset-subclass":
        slow = fit(DataLoader(PairDataset(x, y), batch_size=32, shuffle=True),
                   DataLoader(PairDataset(xv, yv), batch_size=32))
    else:
        slow = fit(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, collate_fn=stack_collate),
                   DataLoader(TensorDataset(xv, yv), batch_size=32, collate_fn=stack_collate))
    assert type(fast.context.train_data).__name__ == "TensorBatches"
    assert type(slow.context.train_data).__name__ == "LoaderBatches"
    assert _history_without_timing(fast) == _history_without_timing(slow)
    for a, b in zip(fast.model.state_dict().values(), slow.model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_and_valid_metrics_keep_separate_state():
    # Train and valid data far apart: any state shared between the sets would show in both numbers.
    x, y = make_luz_data(n=64)
    xv, yv = make_luz_data(n=32, seed=1)
    yv = yv + 100.0
    user_metric = ln.metrics.MAE()
    fitted = regression_setup([user_metric]).fit((x, y), valid_data=(xv, yv), epochs=2, verbose=False, seed=0)
    train, valid = direct_regression(fitted.model, x, y), direct_regression(fitted.model, xv, yv)
    for rec in fitted.history:
        assert rec["train_mae"] == pytest.approx(train["mae"], rel=1e-6)
        assert rec["valid_mae"] == pytest.approx(valid["mae"], rel=1e-6)
    assert float(user_metric.count) == 0  # the user's object is a template: fit works on copies


def test_a_plain_torchmetrics_metric_is_keyed_by_its_lowercased_class_name():
    x, y = make_luz_data(n=50)
    fitted = regression_setup([torchmetrics.MeanAbsoluteError(), ln.metrics.MAE()]).fit(
        (x, y), valid_data=(x, y), epochs=1, verbose=False)
    rec = fitted.history[-1]
    assert rec["train_meanabsoluteerror"] == pytest.approx(rec["train_mae"], rel=1e-6)
    assert rec["valid_meanabsoluteerror"] == pytest.approx(rec["valid_mae"], rel=1e-6)


def test_named_gives_a_metric_its_history_key():
    x, y = make_luz_data(n=50)
    f1 = ln.metrics.named(torchmetrics.MeanSquaredError(squared=False), "root_mse")
    fitted = regression_setup([f1, ln.metrics.RMSE()]).fit((x, y), epochs=1, verbose=False)
    rec = fitted.history[-1]
    assert rec["train_root_mse"] == pytest.approx(rec["train_rmse"], rel=1e-6)
    assert "train_meansquarederror" not in rec


def test_repeated_names_get_a_numeric_suffix():
    x, y = make_luz_data(n=50)
    fitted = regression_setup([ln.metrics.MAE(), ln.metrics.MAE(), ln.metrics.MAE()]).fit(
        (x, y), epochs=1, verbose=False)
    rec = fitted.history[-1]
    assert {"train_mae", "train_mae_1", "train_mae_2"} <= set(rec)
    assert rec["train_mae"] == rec["train_mae_1"] == rec["train_mae_2"]
    assert ln.metrics.unique_names([ln.metrics.Accuracy(), ln.metrics.BinaryAccuracy()]) == ["acc", "acc_1"]


def test_metric_set_gives_train_only_and_valid_only_metrics():
    x, y = make_luz_data(n=50)
    ms = ln.metrics.MetricSet(train=[ln.metrics.MAE()], valid=[ln.metrics.MAE(), ln.metrics.RMSE()])
    fitted = regression_setup(ms).fit((x, y), valid_data=(x, y), epochs=1, verbose=False)
    rec = fitted.history[-1]
    assert {"train_loss", "train_mae", "valid_loss", "valid_mae", "valid_rmse"} <= set(rec)
    assert "train_rmse" not in rec
    assert rec["train_mae"] == pytest.approx(rec["valid_mae"], rel=1e-6)
    # evaluate uses the validation metrics
    assert set(fitted.evaluate((x, y)).metrics) == {"loss", "mae", "rmse"}


def test_a_non_metric_is_refused_with_a_fix():
    x, y = make_luz_data(n=20)
    with pytest.raises(TypeError, match="torchmetrics.Metric instances; got function"):
        regression_setup([lambda p, t: (p - t).abs().mean()]).fit((x, y), epochs=1, verbose=False)


class _BatchMeanMAE(ln.metrics.LanternaMetric):
    """A mean of per-batch MAEs: not foldable over concatenated batches, so it says so."""

    name, display_name = "batch_mae", "BatchMAE"
    fold_batches = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64))
        self.add_state("batches", torch.tensor(0.0, dtype=torch.float64))

    def update(self, pred, target):
        self.total += (pred - target).abs().mean(dtype=torch.float64)
        self.batches += 1

    def compute(self):
        return (self.total / self.batches).float()


def test_custom_metrics_in_fit_folded_or_updated_every_batch():
    x, y = make_luz_data(n=100)
    fitted = regression_setup([ln.metrics.MAE(), _BatchMeanMAE()]).fit(
        (x, y), epochs=1, verbose=False, seed=0, dataloader_options={"batch_size": 30, "shuffle": False})
    with torch.no_grad():
        err = (fitted.model(x) - y).abs().double()
    per_batch = [float(err[i:i + 30].mean()) for i in range(0, 100, 30)]
    assert fitted.history[0]["train_batch_mae"] == pytest.approx(sum(per_batch) / 4, rel=1e-6)
    assert fitted.history[0]["train_mae"] == pytest.approx(float(err.mean()), rel=1e-6)
    assert fitted.history[0]["train_batch_mae"] != pytest.approx(fitted.history[0]["train_mae"], rel=1e-6)
