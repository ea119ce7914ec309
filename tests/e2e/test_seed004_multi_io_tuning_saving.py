"""Seed 004, "building neural networks with PyTorch" (Keras style): wide-and-deep models with several inputs and
outputs, streaming metrics, DataLoader options, bad input, NaN and Ctrl-C, save/load and export, Optuna studies,
torch.compile and mixed precision."""

from __future__ import annotations

import math
import os
import re
import signal

import numpy as np
import pytest
import torch
from conftest import (
    HISTORY_BASE,
    MLPClassifier,
    Net,
    PairDataset,
    history_keys,
    luz_net_setup,
    make_blobs,
    make_luz_data,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import lanterna as ln


class WideAndDeepV3(nn.Module):
    def __init__(self, n_wide: int = 5, n_deep: int = 6) -> None:
        super().__init__()
        self.deep_stack = nn.Sequential(nn.Linear(n_deep, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.output_layer = nn.Linear(8 + n_wide, 1)

    def forward(self, X_wide, X_deep):  # noqa: N803 - the seed's names
        return self.output_layer(torch.concat([X_wide, self.deep_stack(X_deep)], dim=1))


class WideAndDeepV4(WideAndDeepV3):
    def __init__(self, n_wide: int = 5, n_deep: int = 6) -> None:
        super().__init__(n_wide, n_deep)
        self.aux_output_layer = nn.Linear(8, 1)

    def forward(self, X_wide, X_deep):  # noqa: N803
        deep = self.deep_stack(X_deep)
        return self.output_layer(torch.concat([X_wide, deep], dim=1)), self.aux_output_layer(deep)


class WideAndDeepDataset(Dataset):
    def __init__(self, X_wide, X_deep, y):  # noqa: N803
        self.X_wide, self.X_deep, self.y = X_wide, X_deep, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return {"X_wide": self.X_wide[idx], "X_deep": self.X_deep[idx]}, self.y[idx]


def housing_like(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].sum(1, keepdim=True) + 0.5 * torch.sin(x[:, 5:6] * 2) + 0.1 * torch.randn(n, 1, generator=g))
    return x, y


def test_wide_and_deep_multiple_inputs_positional_and_named():
    x, y = housing_like()
    xv, yv = housing_like(64, seed=1)
    s = ln.setup(WideAndDeepV3, loss=nn.MSELoss(), metrics=[ln.metrics.RMSE()]).set_opt_hparams(lr=0.01)

    train_wd = DataLoader(TensorDataset(x[:, :5], x[:, 2:], y), batch_size=32, shuffle=True)
    valid_wd = DataLoader(TensorDataset(xv[:, :5], xv[:, 2:], yv), batch_size=32)
    f = s.fit(train_wd, epochs=6, valid_data=valid_wd, verbose=False, seed=0)
    assert f.history[-1]["valid_rmse"] < f.history[0]["valid_rmse"]
    assert history_keys(f.history[0]) == HISTORY_BASE | {"train_loss", "train_rmse", "valid_loss", "valid_rmse"}
    p_pos = f.predict(valid_wd)
    assert p_pos.shape == (64, 1)
    with torch.no_grad():
        torch.testing.assert_close(p_pos, f.model(xv[:, :5], xv[:, 2:]))

    named = DataLoader(WideAndDeepDataset(x[:, :5], x[:, 2:], y), batch_size=32, shuffle=True)
    valid_named = WideAndDeepDataset(xv[:, :5], xv[:, 2:], yv)
    f2 = s.fit(named, epochs=6, valid_data=valid_named, verbose=False, seed=0)
    assert f2.history[-1]["valid_loss"] < f2.history[0]["valid_loss"]
    p_named = f2.predict(valid_named)
    with torch.no_grad():
        torch.testing.assert_close(p_named, f2.model(X_wide=xv[:, :5], X_deep=xv[:, 2:]))
    ev = f2.evaluate(valid_named)
    assert ev.metrics["rmse"] == pytest.approx(float(((p_named - yv) ** 2).mean().sqrt()), rel=1e-5)


def test_auxiliary_output_weighted_losses():
    """Seed 004: loss = 0.8 * main + 0.2 * aux, one target shared by both outputs."""
    x, y = housing_like()
    data = DataLoader(TensorDataset(x[:, :5], x[:, 2:], y), batch_size=64, shuffle=True)
    s = ln.setup(WideAndDeepV4, loss=[nn.MSELoss(), nn.MSELoss()], loss_weights=[0.8, 0.2],
                 metrics=[ln.metrics.RMSE()]).set_opt_hparams(lr=0.01)
    f = s.fit(data, epochs=4, verbose=False, seed=0)
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
    test = (x[:100, :5], x[:100, 2:], y[:100])
    main, aux = f.predict(DataLoader(TensorDataset(*test), batch_size=32))
    assert main.shape == aux.shape == (100, 1)
    expected = 0.8 * nn.functional.mse_loss(main, y[:100]) + 0.2 * nn.functional.mse_loss(aux, y[:100])
    ev = f.evaluate(DataLoader(TensorDataset(*test), batch_size=32))
    assert ev.metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    # like the seed's evaluation loop (y_pred, _ = model(...)), metrics see the main output
    assert ev.metrics["rmse"] == pytest.approx(float((main - y[:100]).pow(2).mean().sqrt()), rel=1e-5)


def test_multi_output_with_dict_losses_and_dict_targets():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
            self.reg = nn.Linear(16, 1)
            self.cls = nn.Linear(16, 3)

        def forward(self, x):
            h = self.body(x)
            return {"reg": self.reg(h), "cls": self.cls(h)}

    class DS(Dataset):
        def __init__(self, x, yr, yc):
            self.x, self.yr, self.yc = x, yr, yc

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], {"reg": self.yr[i], "cls": self.yc[i]}

    x, yc = make_blobs(240)
    yr = x[:, :1] * 0.5
    s = ln.setup(TwoHeads, loss={"reg": nn.MSELoss(), "cls": nn.CrossEntropyLoss()},
                 loss_weights={"reg": 1.0, "cls": 0.5}).set_opt_hparams(lr=0.01)
    f = s.fit(DS(x, yr, yc), epochs=5, verbose=False, seed=0)
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
    pred = f.predict(DataLoader(DS(x, yr, yc), batch_size=64))
    reg, cls = (pred["reg"], pred["cls"]) if isinstance(pred, dict) else pred
    assert reg.shape == (240, 1) and cls.shape == (240, 3)
    ev = f.evaluate(DataLoader(DS(x, yr, yc), batch_size=64))
    expected = nn.functional.mse_loss(reg, yr) + 0.5 * nn.functional.cross_entropy(cls, yc)
    assert ev.metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_tuple_targets_per_output():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 1)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    x, y = make_luz_data(128)
    y2 = torch.cat([y, -y], 1)
    s = ln.setup(TwoOut, loss=[nn.MSELoss(), nn.MSELoss()], loss_weights=[1.0, 1.0])

    class PairTargets(Dataset):
        def __len__(self):
            return 128

        def __getitem__(self, i):
            return x[i], (y[i], y2[i])

    f = s.fit(PairTargets(), epochs=3, verbose=False, seed=0)
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]


def test_streaming_metrics_exact_over_epoch_with_short_last_batch():
    """Seed 004's torchmetrics-style streaming metrics: exact over all samples, short last batch by its size."""
    x, y = make_luz_data(50)
    f = luz_net_setup().fit((x, y), epochs=1, verbose=False)
    ev = f.evaluate((x, y), metrics=[ln.metrics.RMSE(), ln.metrics.MSE(), ln.metrics.MAE()],
                    dataloader_options={"batch_size": 16})
    assert set(ev.metrics) == {"loss", "rmse", "mse", "mae"}
    p = f.predict(x)
    err = p - y
    assert ev.metrics["rmse"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-5)
    assert ev.metrics["mse"] == pytest.approx(float(err.pow(2).mean()), rel=1e-5)
    assert ev.metrics["loss"] == pytest.approx(float(err.pow(2).mean()), rel=1e-5)

    # standalone use, torchmetrics style
    m = ln.metrics.RMSE()
    m.update(p[:16], y[:16])
    m.update(p[16:], y[16:])
    assert float(m.compute()) == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-5)
    m.reset()
    m.update(p[:3], y[:3])
    assert float(m.compute()) == pytest.approx(float(err[:3].pow(2).mean().sqrt()), rel=1e-5)


def test_torchmetrics_rmse_in_fit_is_exact_over_the_epoch():
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = make_luz_data(50)
    xv, yv = make_luz_data(45, seed=1)
    f = luz_net_setup().fit((x, y), epochs=2, valid_data=(xv, yv), verbose=False,
                        dataloader_options={"batch_size": 16})
    ev = f.evaluate((xv, yv), metrics=[torchmetrics.MeanSquaredError(squared=False)],
                    dataloader_options={"batch_size": 16})
    p = f.predict(xv)
    assert set(ev.metrics) == {"loss", "meansquarederror"}
    assert ev.metrics["meansquarederror"] == pytest.approx(float((p - yv).pow(2).mean().sqrt()), rel=1e-5)


def test_classification_metrics_names_and_metric_sets(capsys):
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = make_blobs(300)
    s = ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=ln.metrics.MetricSet(
        train=[ln.metrics.Accuracy()],
        valid=[ln.metrics.Accuracy(), ln.metrics.MulticlassAUROC(num_classes=3),
               torchmetrics.classification.MulticlassF1Score(num_classes=3),
               ln.metrics.named(torchmetrics.classification.MulticlassPrecision(num_classes=3), "prec")],
    )).set_opt_hparams(lr=0.02)
    f = s.fit((x, y), epochs=6, valid_data=0.2, seed=0)
    out = capsys.readouterr().out
    got = history_keys(f.history[-1])
    assert got == HISTORY_BASE | {"train_loss", "train_acc", "valid_loss", "valid_acc", "valid_auroc",
                                   "valid_multiclassf1score", "valid_prec"}, got
    assert f.history[-1]["valid_acc"] > 0.9 and f.history[-1]["valid_auroc"] > 0.95
    assert re.search(r"^Train metrics: Loss: \S+ - Acc: \S+$", out, re.M), out
    df = f.metrics_df()
    assert list(df.columns) == ["epoch", "set", "metric", "value"]
    assert len(df) == 6 * (2 + 5)
    row = df[(df.epoch == 2) & (df.set == "valid") & (df.metric == "prec")]
    assert float(row.value.iloc[0]) == pytest.approx(f.history[1]["valid_prec"])

    # repeated names get a numeric suffix, keys stay distinct
    f = ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(),
                 metrics=[ln.metrics.Accuracy(), ln.metrics.Accuracy()]).fit((x, y), epochs=1, verbose=False)
    accs = [k for k in f.history[0] if k.startswith("train_acc")]
    assert len(accs) == 2 and "train_acc" in accs


def test_binary_metrics_accept_float_and_int_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).float().unsqueeze(1)
    s = ln.setup(lambda: nn.Linear(2, 1), loss=nn.BCEWithLogitsLoss(), metrics=[
        ln.metrics.BinaryAccuracyWithLogits(), ln.metrics.BinaryAUROC(from_logits=True)]).set_opt_hparams(lr=0.1)
    f = s.fit((x, y), epochs=25, valid_data=0.25, verbose=False, seed=0)
    assert f.history[-1]["valid_acc"] > 0.9 and f.history[-1]["valid_auroc"] > 0.95
    probs = torch.sigmoid(f.predict(x))
    for target in (y, y.long()):
        m = ln.metrics.BinaryAccuracy(threshold=0.5)
        m.update(probs, target)
        assert float(m.compute()) == pytest.approx(float(((probs > 0.5).float() == y).float().mean()))
        a = ln.metrics.BinaryAUROC()
        a.update(probs, target)
        assert float(a.compute()) > 0.95


def test_pandas_and_int32_class_targets_for_cross_entropy():
    pd = pytest.importorskip("pandas")
    x, y = make_blobs(150)
    s = ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.02)
    f = s.fit((pd.DataFrame(x.numpy()), pd.Series(y.numpy())), epochs=5, verbose=False, seed=0)
    assert f.history[-1]["train_acc"] > 0.9
    f = s.fit((x.numpy(), y.numpy().astype(np.int32)), epochs=5, verbose=False, seed=0)
    assert f.history[-1]["train_acc"] > 0.9


def test_valid_data_fraction_split_is_seeded_and_disjoint():
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    y = x.clone()
    seen = {"train": [], "valid": []}

    class Collect(ln.Callback):
        def on_train_batch_begin(self, ctx):
            if ctx.epoch == 1:
                seen["train"] += ctx.input.flatten().tolist()

        def on_valid_batch_begin(self, ctx):
            if ctx.epoch == 1:
                seen["valid"] += ctx.input.flatten().tolist()

    s = ln.setup(lambda: nn.Linear(1, 1), loss=nn.MSELoss()).set_opt_hparams(lr=1e-4)
    f = s.fit((x, y), epochs=1, valid_data=0.2, seed=0, verbose=False, callbacks=[Collect()])
    assert len(seen["train"]) == 80 and len(seen["valid"]) == 20
    assert set(seen["train"]).isdisjoint(seen["valid"]) and len(set(seen["train"]) | set(seen["valid"])) == 100
    first_valid = list(seen["valid"])
    assert seen["valid"] != list(range(80, 100))  # held out at random
    assert "valid_loss" in f.history[0]

    # same seed → same split; the validation order is the same too (never shuffled)
    seen["train"].clear()
    seen["valid"].clear()
    s.fit((x, y), epochs=1, valid_data=0.2, seed=0, verbose=False, callbacks=[Collect()])
    assert seen["valid"] == first_valid

    # a DataLoader over a map-style dataset: its dataset is split, both loaders rebuilt with its options
    seen["train"].clear()
    seen["valid"].clear()
    bs = []

    class Sizes(ln.Callback):
        def on_train_batch_begin(self, ctx):
            bs.append(len(ctx.input))

    s.fit(DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True), epochs=1, valid_data=0.2, seed=0,
          verbose=False, callbacks=[Collect(), Sizes()])
    assert len(seen["train"]) == 80 and len(seen["valid"]) == 20 and bs == [10] * 8

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    with pytest.raises(Exception, match=r"(?i)iterable"):
        s.fit(DataLoader(Stream(), batch_size=10), epochs=1, valid_data=0.2, verbose=False)


def test_dataloader_options_defaults_and_reshuffle():
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    y = x.clone()
    firsts, sizes = [], []

    class Spy(ln.Callback):
        def on_train_batch_begin(self, ctx):
            sizes.append((ctx.epoch, len(ctx.input)))
            if ctx.iter == 1:
                firsts.append(ctx.input.flatten().tolist())

    s = ln.setup(lambda: nn.Linear(1, 1), loss=nn.MSELoss()).set_opt_hparams(lr=1e-5)
    s.fit((x, y), epochs=3, verbose=False, seed=0, callbacks=[Spy()])
    assert [n for e, n in sizes if e == 1] == [32, 32, 32, 4]  # batch_size 32, drop_last False
    assert firsts[0] != firsts[1] != firsts[2]  # reshuffled every epoch
    assert firsts[0] != list(range(32))

    sizes.clear()
    s.fit((x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 30, "drop_last": True},
          callbacks=[Spy()])
    assert [n for _, n in sizes] == [30, 30, 30]

    with pytest.raises(Exception, match=r"dataloader_options"):
        s.fit(DataLoader(TensorDataset(x, y), batch_size=10), epochs=1, verbose=False,
              dataloader_options={"batch_size": 5})

    f = s.fit((x, y), epochs=1, verbose=False)
    p = f.predict(x, dataloader_options={"batch_size": 7})
    assert p.shape == (100, 1)
    with torch.no_grad():
        torch.testing.assert_close(p, f.model(x))  # prediction never shuffled
    torch.testing.assert_close(f.predict((x, y)), p)  # (x, y): the target is ignored


def test_in_memory_dataloader_semantics_batch_size_drop_last_and_order():
    x = torch.arange(95, dtype=torch.float32).unsqueeze(1)
    y = x.clone()
    batches = []

    class Spy(ln.Callback):
        def on_train_batch_begin(self, ctx):
            batches.append((ctx.epoch, ctx.input.flatten().tolist()))

    s = ln.setup(lambda: nn.Linear(1, 1), loss=nn.MSELoss()).set_opt_hparams(lr=0.0)
    s.fit(DataLoader(TensorDataset(x, y), batch_size=10, shuffle=False, drop_last=True), epochs=2, verbose=False,
          callbacks=[Spy()])
    assert [b for e, b in batches if e == 1] == [list(map(float, range(i, i + 10))) for i in range(0, 90, 10)]
    assert [b for e, b in batches if e == 2] == [b for e, b in batches if e == 1]

    batches.clear()
    s.fit(DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, drop_last=True), epochs=2, verbose=False,
          callbacks=[Spy()])
    e1, e2 = [b for e, b in batches if e == 1], [b for e, b in batches if e == 2]
    assert [len(b) for b in e1] == [10] * 9 and [len(b) for b in e2] == [10] * 9
    assert e1 != e2 and len(set(sum(e1, []))) == 90

    # a map-style dataset that is not a TensorDataset, built into a loader from dataloader_options
    batches.clear()
    f = s.fit(PairDataset(x, y), epochs=1, valid_data=0.2, verbose=False, seed=0,
              dataloader_options={"batch_size": 19}, callbacks=[Spy()])
    assert sorted(len(b) for _, b in batches) == [19] * 4  # 95 - 19 held out
    assert "valid_loss" in f.history[0]


class WorkerTagged(Dataset):
    """Each sample's input is 1 + the id of the DataLoader worker that loaded it (0 in the main process)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return torch.tensor([0.0 if info is None else 1.0 + info.id]), torch.tensor([0.0])


def test_dataloader_options_workers_are_passed_through():
    """Seed 004's DataLoader tricks (num_workers, persistent_workers, prefetch_factor) where lanterna builds it."""
    tags = set()

    class Tags(ln.Callback):
        def on_train_batch_begin(self, ctx):
            tags.update(ctx.input.flatten().tolist())

    s = ln.setup(lambda: nn.Linear(1, 1), loss=nn.MSELoss())
    s.fit(WorkerTagged(), epochs=2, verbose=False, callbacks=[Tags()],
          dataloader_options={"batch_size": 16, "num_workers": 2, "prefetch_factor": 2})
    assert tags == {1.0, 2.0}
    tags.clear()
    s.fit(WorkerTagged(), epochs=1, verbose=False, callbacks=[Tags()])
    assert tags == {0.0}


def test_integer_targets_for_mse_are_fine_and_float_inputs_become_float32():
    g = torch.Generator().manual_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 3))  # float64
    y = torch.randint(0, 3, (64, 1), generator=g)  # int64, MSE accepts it
    f = ln.setup(Net, loss=nn.MSELoss()).fit((x, y.numpy()), epochs=2, verbose=False)
    assert math.isfinite(f.history[-1]["train_loss"])
    assert f.predict(x).dtype == torch.float32


@pytest.mark.parametrize("case", ["empty", "broadcast", "ce_float", "bce_int", "arity", "unsupported"])
def test_bad_input_errors_name_problem_and_fix(case):
    """API.md §2: refused before or at the first batch, naming the problem and the fix."""
    x, y = make_luz_data(64)
    if case == "empty":
        with pytest.raises(Exception, match=r"(?i)empty"):
            luz_net_setup().fit((x[:0], y[:0]), epochs=1, verbose=False)
    elif case == "broadcast":
        with pytest.raises(Exception) as ei:
            luz_net_setup().fit((x, y.squeeze(1)), epochs=1, verbose=False)
        msg = str(ei.value).replace(" ", "")
        assert re.search(r"\(32,1\)|\[32,1\]|\(64,1\)|\[64,1\]", msg), msg
        assert re.search(r"\(32,?\)|\[32\]|\(64,?\)|\[64\]", msg), msg
    elif case == "ce_float":
        xc, yc = make_blobs(60)
        with pytest.raises(Exception) as ei:
            ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss()).fit((xc, yc.float()), epochs=1, verbose=False)
        msg = str(ei.value)
        assert "float32" in msg and re.search(r"long|int64", msg) and re.search(r"(?i)target", msg), msg
    elif case == "bce_int":
        xb = torch.randn(64, 2)
        yb = (xb[:, :1] > 0).long()
        with pytest.raises(Exception) as ei:
            ln.setup(lambda: nn.Linear(2, 1), loss=nn.BCEWithLogitsLoss()).fit((xb, yb), epochs=1, verbose=False)
        msg = str(ei.value)
        assert "int64" in msg and re.search(r"float", msg) and re.search(r"(?i)target", msg), msg
    elif case == "arity":
        with pytest.raises(Exception) as ei:
            ln.setup(WideAndDeepV3, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
        msg = str(ei.value)
        assert re.search(r"(?i)1 positional|one positional|arity", msg) and "X_deep" in msg, msg
    elif case == "unsupported":
        with pytest.raises(Exception) as ei:
            luz_net_setup().fit("not data", epochs=1, verbose=False)
        assert "str" in str(ei.value) and re.search(r"(?i)unsupported|expected", str(ei.value))


def test_nan_loss_stops_before_that_step_naming_epoch_and_batch():
    x, y = make_luz_data(96)
    y[70] = float("nan")  # the third batch of 32, not shuffled
    model = Net(3, 8, 1)
    snap = {}

    class Snap(ln.Callback):
        def on_train_batch_end(self, ctx):
            snap[ctx.iter] = {k: v.clone() for k, v in ctx.model.state_dict().items()}

    dl = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    with pytest.raises(Exception) as ei:
        ln.setup(model, loss=nn.MSELoss()).fit(dl, epochs=2, verbose=False, callbacks=[Snap()])
    msg = str(ei.value)
    assert re.search(r"NaN|Inf", msg) and re.search(r"(?i)epoch\D{0,3}1\b", msg) and re.search(r"(?i)batch\D{0,3}3\b",
                                                                                                 msg), msg
    assert set(snap) == {1, 2}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snap[2][k])


def test_ctrl_c_ends_after_current_batch_and_returns_fitted():
    x, y = make_luz_data(128)
    batches, interrupted = [], []

    class CtrlC(ln.Callback):
        def on_train_batch_begin(self, ctx):
            batches.append((ctx.epoch, ctx.iter))
            if ctx.epoch == 2 and ctx.iter == 2:
                os.kill(os.getpid(), signal.SIGINT)

        def on_interrupt(self, ctx):
            interrupted.append(ctx.epoch)

    f = luz_net_setup().fit((x, y), epochs=5, verbose=False, callbacks=[CtrlC()])
    assert isinstance(f, ln.Fitted)
    assert batches[-1] == (2, 2) and len(batches) == 4 + 2
    assert interrupted == [2]
    assert 1 <= len(f.history) <= 2


def test_save_load_roundtrip_identical_predictions(tmp_path):
    """Seed 004 §save/load: weights + hyperparameters, safe (no pickle), identical predictions after ln.load."""
    x, y = make_luz_data(128)
    f = luz_net_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False)
    path = tmp_path / "model"
    f.save(path)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written), written
    assert any(p.suffix == ".json" for p in written) or any(p.suffix == ".safetensors" for p in written)

    g = ln.load(path, module=Net)
    assert isinstance(g, ln.Fitted)
    assert g.hparams == {"d_in": 3, "d_hidden": 32, "d_out": 1} and g.opt_hparams == {"lr": 0.01}
    assert len(g.history) == 2
    for a, b in zip(g.history, f.history, strict=True):
        assert set(a) == set(b)
        assert a["valid_mae"] == pytest.approx(b["valid_mae"])
    assert g.model.training is False
    torch.testing.assert_close(g.predict(x), f.predict(x), rtol=0, atol=0)
    ev = g.evaluate((x, y))
    assert set(ev.metrics) >= {"loss"}
    fig = g.plot()
    assert fig.__class__.__name__ == "Figure"

    # module from the recorded import path (conftest.Net is importable)
    h = ln.load(path)
    torch.testing.assert_close(h.predict(x), f.predict(x), rtol=0, atol=0)


@pytest.mark.parametrize("target", ["os:system", "builtins:dict"])
@pytest.mark.parametrize("field", ["module", "loss"])
def test_load_refuses_metadata_pointing_to_a_non_module(tmp_path, field, target):
    """API.md §7: ln.load never calls anything that is not an nn.Module subclass (a tampered JSON is refused)."""
    import json

    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=1, verbose=False)
    path = tmp_path / "m"
    f.save(path)
    metas = list(tmp_path.rglob("*.json"))
    assert len(metas) == 1, metas
    text = metas[0].read_text()
    needle = "conftest:Net" if field == "module" else "torch.nn.modules.loss:MSELoss"
    assert needle in text
    metas[0].write_text(text.replace(needle, target))
    json.loads(metas[0].read_text())
    if field == "module":
        with pytest.raises(Exception, match=r"(?i)nn\.Module|refused"):
            ln.load(path)
    else:  # the model still loads; the tampered loss is refused (not called) with a warning
        with pytest.warns(UserWarning, match=r"(?i)refused|nn\.Module"):
            g = ln.load(path)
        torch.testing.assert_close(g.predict(x), f.predict(x))


def test_checkpoint_resume_with_auto_resume(tmp_path):
    """AutoResume: a crashed fit started again continues and ends with the same weights; state removed at the end."""
    x, y = make_luz_data(96)
    state_dir = tmp_path / "resume"

    class Crash(ln.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 3:
                raise RuntimeError("simulated crash")

    def run(extra=()):
        return luz_net_setup().fit((x, y), epochs=4, valid_data=0.25, seed=0, verbose=False,
                               callbacks=[ln.callbacks.AutoResume(state_dir), *extra])

    with pytest.raises(Exception, match="simulated crash"):
        run([Crash()])
    assert state_dir.exists() and any(state_dir.iterdir())
    resumed = run()
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert not state_dir.exists() or not any(p for p in state_dir.rglob("*") if p.is_file())

    straight = luz_net_setup().fit((x, y), epochs=4, valid_data=0.25, seed=0, verbose=False)
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v)
    assert resumed.history[-1]["valid_loss"] == pytest.approx(straight.history[-1]["valid_loss"])


def test_keep_best_model_restores_best_epoch_weights():
    x, y = make_luz_data(128)
    xv, yv = make_luz_data(64, seed=1)
    # lr high enough to oscillate: the best epoch is often not the last
    f = luz_net_setup(lr=0.3).fit((x, y), epochs=6, valid_data=(xv, yv), verbose=False, seed=0,
                              callbacks=[ln.callbacks.KeepBestModel()])
    best = min(h["valid_loss"] for h in f.history)
    assert f.evaluate((xv, yv)).metrics["loss"] == pytest.approx(best, rel=1e-5)


def test_export_torchscript_and_exported_program(tmp_path):
    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=1, verbose=False)
    ts = tmp_path / "model_ts.pt"
    f.export(ts, x[:4], format="torchscript")
    loaded = torch.jit.load(str(ts))
    torch.testing.assert_close(loaded(x[:8]), f.predict(x[:8]))
    ep = tmp_path / "model.pt2"
    f.export(ep, x[:4], format="exported_program")
    prog = torch.export.load(str(ep))
    torch.testing.assert_close(prog.module()(x[:4]), f.predict(x[:4]))


def test_export_onnx_matches_predictions(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=1, verbose=False)
    path = tmp_path / "model.onnx"
    f.export(path, x[:4], format="onnx")
    sess = ort.InferenceSession(str(path))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x[:4].numpy()})
    np.testing.assert_allclose(out, f.predict(x[:4]).numpy(), rtol=1e-5, atol=1e-6)


def test_accelerator_cpu_device():
    devices = []

    class Dev(ln.Callback):
        def on_train_batch_begin(self, ctx):
            devices.append((ctx.device, ctx.input.device.type))

    x, y = make_luz_data(64)
    luz_net_setup().fit((x, y), epochs=1, verbose=False, accelerator=ln.Accelerator(device="cpu"), callbacks=[Dev()])
    assert devices[0] == (torch.device("cpu"), "cpu")


def test_compile_and_mixed_precision_accelerators_train():
    """Seed 004's torch.compile via Accelerator(compile=True); bf16 autocast on CPU."""
    x, y = make_luz_data(128)
    f = luz_net_setup().fit((x, y), epochs=3, verbose=False, seed=0, accelerator=ln.Accelerator(compile=True))
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
    assert f.predict(x).shape == (128, 1)
    f = luz_net_setup().fit((x, y), epochs=3, verbose=False, seed=0, accelerator=ln.Accelerator(precision="bf16-mixed"))
    assert all(math.isfinite(h["train_loss"]) for h in f.history)
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]


def test_optuna_study_on_sqlite_with_median_pruner(tmp_path):
    """Seed 004: an Optuna study on SQLite, MedianPruner, OptunaPruning reporting valid_acc every epoch."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    x, y = make_blobs(240)
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def objective(trial):
        lr = trial.suggest_categorical("lr", [0.0, 0.05])
        n_hidden = trial.suggest_int("n_hidden", 8, 16)
        fitted = (
            ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam,
                     metrics=[ln.metrics.Accuracy()])
            .set_hparams(d_in=4, d_hidden=n_hidden, n_classes=3)
            .set_opt_hparams(lr=lr)
            .fit((x, y), epochs=4, valid_data=0.25, seed=0, verbose=False,
                 callbacks=[ln.callbacks.OptunaPruning(trial, monitor="valid_acc")])
        )
        return fitted.history[-1]["valid_acc"]

    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, interval_steps=1)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=42), pruner=pruner,
                                storage=storage, study_name="seed004", load_if_exists=True)
    for lr in (0.05, 0.05, 0.0):
        study.enqueue_trial({"lr": lr, "n_hidden": 12})
    study.optimize(objective, n_trials=3)

    again = optuna.load_study(study_name="seed004", storage=storage)
    trials = again.get_trials()
    states = [t.state for t in trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert states[2] == optuna.trial.TrialState.PRUNED
    assert len(trials[0].intermediate_values) == 4
    assert again.best_value > 0.9 and again.best_params["lr"] == 0.05


def test_tune_helper_defaults_to_a_local_sqlite_study(tmp_path, monkeypatch):
    """API.md §9: the helper's storage defaults to a local SQLite file (several processes can share the study)."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    monkeypatch.chdir(tmp_path)
    x, y = make_blobs(120)

    def objective(trial):
        return (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()])
                .set_opt_hparams(lr=trial.suggest_float("lr", 1e-3, 1e-1, log=True)))

    study = ln.tune(objective, (x, y), n_trials=2, valid_data=0.25, epochs=2, monitor="valid_acc")
    assert isinstance(study, optuna.Study)
    assert len(study.trials) == 2 and 0 <= study.best_value <= 1
    dbs = list(tmp_path.glob("*.db")) + list(tmp_path.glob("*.sqlite*"))
    assert dbs, list(tmp_path.iterdir())
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
