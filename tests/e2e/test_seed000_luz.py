"""Seed 000, the luz chapter (training with luz), written the way a reader of the docs would write it with lanterna.

setup → set_hparams → fit → predict/evaluate on the chapter's toy regression, the data forms fit accepts, the
console and history, luz's early-stopping rule, ModelCheckpoint, callback order and hooks, and the fitted's
print and plot. Small and synthetic; the shared setups are in tests/conftest.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import (
    HISTORY_BASE,
    MLPClassifier,
    Net,
    frozen_setup,
    history_keys,
    luz_net_setup,
    make_blobs,
    make_luz_data,
)
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lanterna as ln

N_NET_PARAMS = 3 * 32 + 32 + 32 + 1  # Net(3, 32, 1)


def luz_loaders(n: int = 400, batch_size: int = 100):
    """Seed 000's 60/20/20 split of tensor_dataset(x, y) into train/valid/test dataloaders."""
    x, y = make_luz_data(n)
    ds = TensorDataset(x, y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    a, b = int(0.6 * n), int(0.8 * n)
    return (
        DataLoader(Subset(ds, perm[:a]), batch_size=batch_size, shuffle=True),
        DataLoader(Subset(ds, perm[a:b]), batch_size=batch_size),
        DataLoader(Subset(ds, perm[b:]), batch_size=batch_size),
    )


HOOKS = [
    "on_fit_begin", "on_epoch_begin", "on_train_begin", "on_train_batch_begin", "on_train_batch_after_pred",
    "on_train_batch_after_loss", "on_train_batch_before_backward", "on_train_batch_before_step",
    "on_train_batch_after_step", "on_train_batch_end", "on_train_end", "on_valid_begin", "on_valid_batch_begin",
    "on_valid_batch_after_pred", "on_valid_batch_after_loss", "on_valid_batch_end", "on_valid_end", "on_epoch_end",
    "on_fit_end",
]


class Recorder(ln.Callback):
    """Records every hook call as (name, hook)."""

    def __init__(self, order: int = 0, name: str = "rec", log: list | None = None) -> None:
        self.order = order
        self.name = name
        self.calls: list = [] if log is None else log


def _make_hook(hook_name):
    def hook(self, ctx):
        self.calls.append((self.name, hook_name))

    hook.__name__ = hook_name
    return hook


for _h in HOOKS:
    setattr(Recorder, _h, _make_hook(_h))


def number_after(label: str, line: str) -> str:
    m = re.search(re.escape(label) + r" (-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", line)
    assert m, (label, line)
    return m.group(1)


def test_luz_chapter_train_valid_test_workflow(capsys):
    """Seed 000 §14.3.1: fit with MAE and a valid loader, console in luz's form, predict and evaluate on test."""
    train_dl, valid_dl, test_dl = luz_loaders()
    fitted = luz_net_setup().fit(train_dl, epochs=6, valid_data=valid_dl)
    out = capsys.readouterr().out
    lines = [ln_ for ln_ in out.splitlines() if ln_.strip()]

    assert len(lines) == 3 * 6, out  # only the plain lines when stdout is not a terminal
    epoch_lines = [i for i, line in enumerate(lines) if line.startswith("Epoch ")]
    assert [lines[i] for i in epoch_lines] == [f"Epoch {e}/6" for e in range(1, 7)]
    for k, i in enumerate(epoch_lines):
        train_line, valid_line = lines[i + 1], lines[i + 2]
        assert re.fullmatch(r"Train metrics: Loss: \S+ - MAE: \S+", train_line), train_line
        assert re.fullmatch(r"Valid metrics: Loss: \S+ - MAE: \S+", valid_line), valid_line
        h = fitted.history[k]
        for line, prefix in ((train_line, "train"), (valid_line, "valid")):
            for label, key in (("Loss:", "loss"), ("MAE:", "mae")):
                shown = number_after(label, line)
                assert float(shown) == pytest.approx(round(h[f"{prefix}_{key}"], 4), abs=1e-12)
                assert len(shown.split(".")[-1]) <= 4 if "." in shown else True
    assert "\r" not in out  # not a terminal: plain lines only

    assert [h["epoch"] for h in fitted.history] == list(range(1, 7))
    assert history_keys(fitted.history[0]) == HISTORY_BASE | {"train_loss", "train_mae", "valid_loss", "valid_mae"}
    assert fitted.history[-1]["valid_loss"] < fitted.history[0]["valid_loss"]
    assert fitted.model.training is False

    preds = fitted.predict(test_dl)
    assert isinstance(preds, torch.Tensor) and preds.device.type == "cpu" and preds.shape == (80, 1)
    assert not preds.requires_grad

    ev = fitted.evaluate(test_dl)
    assert isinstance(ev, ln.Evaluation)
    assert set(ev.metrics) == {"loss", "mae"}
    y_test = torch.cat([b[1] for b in test_dl])
    assert ev.metrics["loss"] == pytest.approx(float(nn.functional.mse_loss(preds, y_test)), rel=1e-5)
    assert ev.metrics["mae"] == pytest.approx(float((preds - y_test).abs().mean()), rel=1e-5)
    rep = [line for line in repr(ev).splitlines() if re.match(r"^\w+: ", line)]
    assert [line.split(":")[0] for line in rep] == ["loss", "mae"]
    for line in rep:
        name, value = line.split(": ")
        assert float(value) == pytest.approx(ev.metrics[name], abs=1e-4)


def test_history_keys_exactly_as_contract():
    """API.md §3: {"epoch", "train_loss", "train_mae", "valid_loss", "valid_mae", "lr", "epoch_time"}."""
    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=1, valid_data=0.25, verbose=False)
    assert set(f.history[0]) == {"epoch", "train_loss", "train_mae", "valid_loss", "valid_mae", "lr", "epoch_time"}


def test_luz_chapter_data_forms_all_train(capsys):
    """Seed 000 §14.2.3: fit accepts a DataLoader, a Dataset, a list of tensors and plain (NumPy/pandas) objects."""
    pd = pytest.importorskip("pandas")
    x, y = make_luz_data(300)
    ds = TensorDataset(x, y)
    forms = {
        "dataloader": DataLoader(ds, batch_size=100, shuffle=True),
        "dataset": ds,
        "tensors": [x, y],
        "numpy": (x.double().numpy(), y.double().numpy()),
        "pandas": (pd.DataFrame(x.numpy(), columns=list("abc")), pd.DataFrame(y.numpy(), columns=["y"])),
    }
    for name, data in forms.items():
        fitted = luz_net_setup(lr=0.05).fit(data, epochs=5, verbose=False, seed=0)
        h = fitted.history
        assert h[-1]["train_loss"] < h[0]["train_loss"], name
        assert "valid_loss" not in h[-1], name
        p = fitted.predict(forms["numpy"][0] if name == "numpy" else x)
        assert p.dtype == torch.float32 and p.shape == (300, 1), name
    assert capsys.readouterr().out == ""  # verbose=False prints nothing


def test_setup_is_immutable_and_reusable_and_records_hparams():
    base = ln.setup(Net, loss=nn.MSELoss())
    small = base.set_hparams(d_in=3, d_hidden=4, d_out=1)
    big = small.set_hparams(d_in=3, d_hidden=16, d_out=1)
    assert isinstance(small, ln.Setup) and small is not base and big is not small
    x, y = make_luz_data(64)
    f_small = small.set_opt_hparams(lr=0.02).fit((x, y), epochs=1, verbose=False)
    f_big = big.fit((x, y), epochs=1, verbose=False)
    f_small2 = small.fit((x, y), epochs=1, verbose=False)
    assert f_small.model.net[0].out_features == 4 and f_small2.model.net[0].out_features == 4
    assert f_big.model.net[0].out_features == 16
    assert f_small.hparams == {"d_in": 3, "d_hidden": 4, "d_out": 1}
    assert f_small.opt_hparams == {"lr": 0.02}
    assert f_small.model is not f_small2.model


def test_default_optimizer_is_adam_and_module_loss_is_used_when_loss_omitted():
    class SelfLoss(Net):
        def loss(self, pred, target):
            return nn.functional.l1_loss(pred, target)

    seen = {}

    class Spy(ln.Callback):
        def on_train_batch_after_loss(self, ctx):
            seen["opt"] = ctx.opt
            seen["opts"] = dict(ctx.optimizers)
            seen["loss"] = float(ctx.loss.detach())
            seen["l1"] = float(nn.functional.l1_loss(ctx.pred.detach(), ctx.target))

    x, y = make_luz_data(64)
    ln.setup(SelfLoss).fit((x, y), epochs=1, verbose=False, callbacks=[Spy()])
    assert isinstance(seen["opt"], torch.optim.Adam)
    assert list(seen["opts"]) == ["opt"] and seen["opts"]["opt"] is seen["opt"]
    assert seen["loss"] == pytest.approx(seen["l1"], rel=1e-6)


def test_module_factory_and_instance_forms():
    x, y = make_luz_data(64)
    f1 = ln.setup(lambda: Net(3, 5, 1), loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
    assert f1.model.net[0].out_features == 5
    inst = Net(3, 6, 1)
    f2 = ln.setup(inst, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
    assert f2.model is inst


def test_epochs_min_max_with_early_stopping_and_message(capsys):
    """Seed 000 §14.3.2: EarlyStopping(patience) luz's rules, and epochs=(min, max) never stops before min."""
    x, y = make_luz_data(200)
    xv, yv = make_luz_data(100, seed=1)
    es = ln.callbacks.EarlyStopping(patience=2)
    f = frozen_setup().fit((x, y), epochs=20, valid_data=(xv, yv), callbacks=[es])
    out = capsys.readouterr().out
    # epoch 1 is the best; 2 and 3 do not improve → last epoch = best epoch + patience = 3
    assert len(f.history) == 3
    assert out.rstrip().splitlines()[-1] == "Early stopping at epoch 3 of 20"

    f = frozen_setup().fit((x, y), epochs=(6, 20), valid_data=(xv, yv),
                           callbacks=[ln.callbacks.EarlyStopping(patience=2)])
    assert len(f.history) == 6
    assert "Early stopping at epoch 6 of 20" in capsys.readouterr().out

    # min_epochs bound holds also when training improves but early stopping is not involved
    f = luz_net_setup().fit((x, y), epochs=(2, 3), verbose=False)
    assert len(f.history) == 3


def test_early_stopping_baseline_and_min_delta():
    x, y = make_luz_data(200)
    xv, yv = make_luz_data(100, seed=1)
    # baseline is the value to beat: an unreachable baseline means epoch 1 does not improve either
    f = frozen_setup().fit((x, y), epochs=20, valid_data=(xv, yv), verbose=False,
                           callbacks=[ln.callbacks.EarlyStopping(patience=2, baseline=-1.0)])
    assert len(f.history) == 2
    # training improves, but never by more than a huge min_delta
    f = luz_net_setup().fit((x, y), epochs=20, valid_data=(xv, yv), verbose=False,
                        callbacks=[ln.callbacks.EarlyStopping(patience=3, min_delta=1e6)])
    assert len(f.history) == 4
    # mode="auto" maximises accuracy: with weights frozen valid_acc is constant → stops at 1 + patience
    xc, yc = make_blobs(120)
    f = (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                  metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.0)
         .fit((xc, yc), epochs=10, valid_data=0.25, verbose=False,
              callbacks=[ln.callbacks.EarlyStopping(monitor="valid_acc", patience=1)]))
    assert len(f.history) == 2


def _luz_stop_epoch(values, patience, min_delta, mode="min", baseline=None, min_epochs=1):
    """luz's early-stopping rule, simulated: the epoch at which training stops, or None."""
    best = baseline
    counter = 0
    for epoch, v in enumerate(values, start=1):
        better = best is None or (v < best - min_delta if mode == "min" else v > best + min_delta)
        if better:
            best, counter = v, 0
            continue
        counter += 1
        if counter >= patience and epoch >= min_epochs:
            return epoch
    return None


@pytest.mark.parametrize(("patience", "min_delta", "epochs"), [(1, 0.0, 25), (3, 0.002, 25), (2, 0.01, (8, 25))])
def test_early_stopping_matches_luz_rule_on_real_history(patience, min_delta, epochs):
    x, y = make_luz_data(200)
    xv, yv = make_luz_data(60, seed=1)
    f = luz_net_setup(lr=0.05).fit((x, y), epochs=epochs, valid_data=(xv, yv), verbose=False, seed=0,
                               dataloader_options={"batch_size": 50},
                               callbacks=[ln.callbacks.EarlyStopping(patience=patience, min_delta=min_delta)])
    values = [h["valid_loss"] for h in f.history]
    min_epochs = epochs[0] if isinstance(epochs, tuple) else 1
    max_epochs = epochs[1] if isinstance(epochs, tuple) else epochs
    stop = _luz_stop_epoch(values, patience, min_delta, min_epochs=min_epochs)
    assert len(f.history) == (stop if stop is not None else max_epochs)


def test_unknown_monitor_is_an_error_before_training_listing_names():
    steps = []

    class Count(ln.Callback):
        def on_train_batch_begin(self, ctx):
            steps.append(1)

    x, y = make_luz_data(64)
    with pytest.raises(Exception) as ei:
        luz_net_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False,
                        callbacks=[Count(), ln.callbacks.EarlyStopping(monitor="valid_mea")])
    msg = str(ei.value)
    assert "valid_mea" in msg and "valid_mae" in msg and "valid_loss" in msg and "train_mae" in msg
    assert steps == []


def test_model_checkpoint_save_best_only_folder_and_template(tmp_path):
    """Seed 000 §14.3.2 / 001: checkpoints to a folder, only on improvement; each loads with weights_only=True."""
    x, y = make_luz_data(200)
    xv, yv = make_luz_data(100, seed=1)
    folder = tmp_path / "models"
    f = frozen_setup().fit((x, y), epochs=4, valid_data=(xv, yv), verbose=False,
                           callbacks=[ln.callbacks.ModelCheckpoint(path=str(folder) + "/", save_best_only=True)])
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    ckpts = [p for p in files if "1" in p.name]
    assert len(ckpts) >= 1
    weights = [p for p in files if p.suffix in (".pt", ".pth", ".ckpt")]
    assert len(weights) == 1, files  # only the first epoch: nothing improves afterwards
    assert re.search(r"(?<!\d)0*1(?!\d)", weights[0].name), weights[0].name
    assert f"{f.history[0]['valid_loss']:.3f}" in weights[0].name, weights[0].name  # luz's .3f
    state = torch.load(weights[0], weights_only=True)
    assert isinstance(state, dict)
    sd = f.model.state_dict()
    assert set(state["model"]) == set(sd)
    for k in sd:
        torch.testing.assert_close(state["model"][k].cpu(), sd[k].cpu())

    # improving run: files exactly for the epochs that beat the best so far
    folder2 = tmp_path / "improving"
    f = luz_net_setup(lr=0.05).fit((x, y), epochs=5, valid_data=(xv, yv), verbose=False, seed=0,
                               callbacks=[ln.callbacks.ModelCheckpoint(path=str(folder2), save_best_only=True)])
    best, expected = math.inf, []
    for h in f.history:
        if h["valid_loss"] < best:
            best = h["valid_loss"]
            expected.append(h["epoch"])
    saved = sorted(p for p in folder2.iterdir() if p.suffix in (".pt", ".pth", ".ckpt"))
    assert len(saved) == len(expected)

    # a file-name template, every epoch
    tmpl = tmp_path / "ckpt" / "epoch-{epoch:02d}.pt"
    luz_net_setup().fit((x, y), epochs=3, valid_data=(xv, yv), verbose=False,
                    callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmpl))])
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".pt")
    assert names == ["epoch-01.pt", "epoch-02.pt", "epoch-03.pt"]
    assert "model" in torch.load(tmp_path / "ckpt" / "epoch-03.pt", weights_only=True)


def _find_lrs(obj):
    """Every learning rate stored in the param_groups of an optimizer state dict, anywhere in a checkpoint."""
    if isinstance(obj, dict):
        if "param_groups" in obj:
            return [g["lr"] for g in obj["param_groups"]]
        return [lr for v in obj.values() for lr in _find_lrs(v)]
    if isinstance(obj, (list, tuple)):
        return [lr for v in obj for lr in _find_lrs(v)]
    return []


class Stamp(ln.Callback):
    """Writes the epoch number into the first bias at epoch end: a checkpoint must see it."""

    def __init__(self, order: int) -> None:
        self.order = order

    def on_epoch_end(self, ctx):
        with torch.no_grad():
            ctx.model.net[0].bias.fill_(float(ctx.epoch))


def test_callbacks_run_in_ascending_order_and_checkpoint_sees_final_epoch_state(tmp_path):
    log: list = []
    cbs = [Recorder(order=5, name="c5", log=log), Recorder(order=-5, name="cm5", log=log),
           Recorder(name="c0", log=log)]

    class DefaultOrder(ln.Callback):
        pass

    assert DefaultOrder().order == 0
    x, y = make_luz_data(64)
    tmpl = tmp_path / "ck" / "e{epoch}.pt"
    sched = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    luz_net_setup(lr=0.01).fit((x, y), epochs=2, verbose=False,
                           callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmpl), monitor="train_loss"), *cbs,
                                      Stamp(order=100), sched])
    epoch_end = [n for n, h in log if h == "on_epoch_end"]
    assert epoch_end == ["cm5", "c0", "c5"] * 2
    fit_begin = [n for n, h in log if h == "on_fit_begin"]
    assert fit_begin == ["cm5", "c0", "c5"]
    for e in (1, 2):
        ck = torch.load(tmp_path / "ck" / f"e{e}.pt", weights_only=True)
        assert torch.all(ck["model"]["net.0.bias"] == float(e))
        assert _find_lrs(ck) == pytest.approx([0.01 * 0.5**e])  # the epoch's scheduler step is included


def test_checkpoint_runs_after_callbacks_with_any_order(tmp_path):
    x, y = make_luz_data(64)
    tmpl = tmp_path / "ck" / "e{epoch}.pt"
    luz_net_setup().fit((x, y), epochs=1, verbose=False,
                    callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmpl), monitor="train_loss"), Stamp(10**6)])
    ck = torch.load(tmp_path / "ck" / "e1.pt", weights_only=True)
    assert torch.all(ck["model"]["net.0.bias"] == 1.0)


def test_hook_sequence_and_ctx_attributes():
    """Seed 000 §14.3.2: the hooks fire in luz's order; ctx carries what API.md §6 lists."""
    log: list = []
    rec = Recorder(log=log)
    checks: list = []

    class Check(ln.Callback):
        def on_train_batch_begin(self, ctx):
            checks.append(("tb", ctx.input is not None and ctx.target is not None, ctx.epoch, ctx.iter,
                           ctx.training, ctx.max_epochs))
            assert isinstance(ctx.device, torch.device) and ctx.device.type == "cpu"
            assert isinstance(ctx.optimizers, dict) and ctx.opt is ctx.optimizers["opt"]
            assert isinstance(ctx.model, nn.Module) and ctx.loss_fn is not None
            assert isinstance(ctx.history, list)
            assert ctx.metrics is not None

        def on_train_batch_after_loss(self, ctx):
            assert ctx.pred.shape == ctx.target.shape
            assert ctx.loss.dim() == 0

        def on_valid_batch_begin(self, ctx):
            checks.append(("vb", ctx.training, ctx.iter))

        def on_epoch_end(self, ctx):
            checks.append(("ee", ctx.epoch, len(ctx.history)))

    x, y = make_luz_data(64)
    xv, yv = make_luz_data(32, seed=1)
    f = luz_net_setup().fit((x, y), epochs=2, valid_data=(xv, yv), verbose=False,
                        dataloader_options={"batch_size": 32}, callbacks=[rec, Check()])
    hooks = [h for _, h in log]
    first_epoch = hooks[: hooks.index("on_epoch_end") + 1]
    assert first_epoch == [
        "on_fit_begin", "on_epoch_begin", "on_train_begin",
        *["on_train_batch_begin", "on_train_batch_after_pred", "on_train_batch_after_loss",
          "on_train_batch_before_backward", "on_train_batch_before_step", "on_train_batch_after_step",
          "on_train_batch_end"] * 2,
        "on_train_end", "on_valid_begin",
        "on_valid_batch_begin", "on_valid_batch_after_pred", "on_valid_batch_after_loss", "on_valid_batch_end",
        "on_valid_end", "on_epoch_end",
    ]
    assert hooks[-1] == "on_fit_end"
    tb = [c for c in checks if c[0] == "tb"]
    assert tb == [("tb", True, 1, 1, True, 2), ("tb", True, 1, 2, True, 2),
                  ("tb", True, 2, 1, True, 2), ("tb", True, 2, 2, True, 2)]
    assert [c for c in checks if c[0] == "vb"] == [("vb", False, 1)] * 2
    # history for the epoch is in place at epoch end (or appended right after): never more than `epoch` rows
    assert [c[1] for c in checks if c[0] == "ee"] == [1, 2]
    assert len(f.history) == 2


def test_stop_training_from_a_callback():
    class StopAt2(ln.Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                ctx.stop_training = True

    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=10, verbose=False, callbacks=[StopAt2()])
    assert [h["epoch"] for h in f.history] == [1, 2]


def test_fitted_repr_and_plot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    x, y = make_luz_data(64)
    f = luz_net_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False)
    r = repr(f)
    assert str(N_NET_PARAMS) in r.replace(",", "").replace("_", ""), r
    assert re.search(r"(?i)time", r) and re.search(r"(?i)epoch", r)
    assert re.search(r"(?i)mae", r) and re.search(r"(?i)loss", r)
    fig = f.plot()
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 2  # loss and mae
    assert all(len(ax.get_lines()) == 2 for ax in panels)  # train and valid in each
