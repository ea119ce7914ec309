"""Acceptance-style tests: each seed workflow written the way a reader of API.md would write it with lanterna.

Seeds: 000 (luz chapter), 001 (tutorial loop + TensorBoard), 002 (losses/optimizers, GAN with two optimizers),
003 (LR schedulers, weight decay), 004 (DataLoader tricks, metrics, multi-input/output, Optuna, save/load, compile).
Everything is small and synthetic; the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MLPClassifier, Net, make_blobs, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

import lanterna as ln

HISTORY_BASE = {"epoch", "lr", "epoch_time"}
N_NET_PARAMS = 3 * 32 + 32 + 32 + 1  # Net(3, 32, 1)


# ----------------------------------------------------------------------------------------------- helpers


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


def luz_setup(**opt):
    return (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
        .set_opt_hparams(**(opt or {"lr": 0.01}))
    )


def frozen_setup(**setup_kw):
    """A setup whose weights never move (SGD with lr=0): every epoch has exactly the same valid_loss."""
    return (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD, **setup_kw)
        .set_hparams(d_in=3, d_hidden=8, d_out=1)
        .set_opt_hparams(lr=0.0)
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


def keys(record: dict) -> set:
    """History keys without lanterna's documented extra throughput key (see test_history_keys_exactly_...)."""
    return set(record) - {"samples_per_s"}


def number_after(label: str, line: str) -> str:
    m = re.search(re.escape(label) + r" (-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", line)
    assert m, (label, line)
    return m.group(1)


# ----------------------------------------------------------------------------------------------- seed 000


def test_luz_chapter_train_valid_test_workflow(capsys):
    """Seed 000 §14.3.1: fit with MAE and a valid loader, console in luz's form, predict and evaluate on test."""
    train_dl, valid_dl, test_dl = luz_loaders()
    fitted = luz_setup().fit(train_dl, epochs=6, valid_data=valid_dl)
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
    assert keys(fitted.history[0]) == HISTORY_BASE | {"train_loss", "train_mae", "valid_loss", "valid_mae"}
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
    f = luz_setup().fit((x, y), epochs=1, valid_data=0.25, verbose=False)
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
        fitted = luz_setup(lr=0.05).fit(data, epochs=5, verbose=False, seed=0)
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
    f = luz_setup().fit((x, y), epochs=(2, 3), verbose=False)
    assert len(f.history) == 3


def test_early_stopping_baseline_and_min_delta():
    x, y = make_luz_data(200)
    xv, yv = make_luz_data(100, seed=1)
    # baseline is the value to beat: an unreachable baseline means epoch 1 does not improve either
    f = frozen_setup().fit((x, y), epochs=20, valid_data=(xv, yv), verbose=False,
                           callbacks=[ln.callbacks.EarlyStopping(patience=2, baseline=-1.0)])
    assert len(f.history) == 2
    # training improves, but never by more than a huge min_delta
    f = luz_setup().fit((x, y), epochs=20, valid_data=(xv, yv), verbose=False,
                        callbacks=[ln.callbacks.EarlyStopping(patience=3, min_delta=1e6)])
    assert len(f.history) == 4
    # mode="auto" maximises accuracy: with weights frozen valid_acc is constant → stops at 1 + patience
    xc, yc = make_blobs(120)
    f = (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                  metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.0)
         .fit((xc, yc), epochs=10, valid_data=0.25, verbose=False,
              callbacks=[ln.callbacks.EarlyStopping(monitor="valid_acc", patience=1)]))
    assert len(f.history) == 2


def test_unknown_monitor_is_an_error_before_training_listing_names():
    steps = []

    class Count(ln.Callback):
        def on_train_batch_begin(self, ctx):
            steps.append(1)

    x, y = make_luz_data(64)
    with pytest.raises(Exception) as ei:
        luz_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False,
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
    f = luz_setup(lr=0.05).fit((x, y), epochs=5, valid_data=(xv, yv), verbose=False, seed=0,
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
    luz_setup().fit((x, y), epochs=3, valid_data=(xv, yv), verbose=False,
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
    luz_setup(lr=0.01).fit((x, y), epochs=2, verbose=False,
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
    luz_setup().fit((x, y), epochs=1, verbose=False,
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
    f = luz_setup().fit((x, y), epochs=2, valid_data=(xv, yv), verbose=False,
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
    f = luz_setup().fit((x, y), epochs=10, verbose=False, callbacks=[StopAt2()])
    assert [h["epoch"] for h in f.history] == [1, 2]


# ----------------------------------------------------------------------------------------------- seed 001


def test_tensorboard_keras_layout_read_back(tmp_path):
    """Seed 001: train and valid losses overlaid in TensorBoard, read back with EventAccumulator."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    x, y = make_luz_data(128)
    xv, yv = make_luz_data(64, seed=1)
    log_dir = tmp_path / "runs" / "fashion_trainer"
    f = luz_setup().fit((x, y), epochs=3, valid_data=(xv, yv), verbose=False,
                        callbacks=[ln.callbacks.TensorBoard(log_dir=str(log_dir))])
    for run in ("train", "valid"):
        assert (log_dir / run).is_dir()
        acc = ea_mod.EventAccumulator(str(log_dir / run))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"loss", "mae"} <= tags, tags
        if run == "train":
            assert "lr" in tags
        for key in ("loss", "mae"):
            values = [ev.value for ev in acc.Scalars(key)]
            assert values == pytest.approx([h[f"{run}_{key}"] for h in f.history], rel=1e-5)
            assert len({ev.step for ev in acc.Scalars(key)}) == 3


def test_csv_logger_one_row_per_epoch(tmp_path):
    pd = pytest.importorskip("pandas")
    x, y = make_luz_data(64)
    path = tmp_path / "log.csv"
    f = luz_setup().fit((x, y), epochs=3, valid_data=0.25, verbose=False, callbacks=[ln.callbacks.CSVLogger(path)])
    df = pd.read_csv(path)
    assert len(df) == 3
    assert set(df.columns) == set(f.history[0])
    assert list(df["epoch"]) == [1, 2, 3]
    assert list(df["valid_mae"]) == pytest.approx([h["valid_mae"] for h in f.history], rel=1e-5)


# ----------------------------------------------------------------------------------------------- seed 002


class TinyGAN(nn.Module):
    """Seed 002's GAN in one dimension: a generator and a discriminator, two optimizers, a custom step."""

    def __init__(self, latent: int = 2) -> None:
        super().__init__()
        self.latent = latent
        self.gen = nn.Linear(latent, 1)
        self.disc = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
        self.objective = nn.BCELoss()

    def forward(self, z):
        return self.gen(z)

    def set_optimizers(self, lr: float = 1e-2):
        return {"gen": torch.optim.Adam(self.gen.parameters(), lr=lr),
                "disc": torch.optim.Adam(self.disc.parameters(), lr=lr)}

    def step(self, ctx):
        real = ctx.input
        assert isinstance(real, torch.Tensor) and ctx.target is None
        n = real.shape[0]
        ones, zeros = torch.ones(n, 1), torch.zeros(n, 1)
        fake = self.gen(torch.randn(n, self.latent))
        if ctx.training:
            ctx.optimizers["disc"].zero_grad()
        d_loss = self.objective(self.disc(real), ones) + self.objective(self.disc(fake.detach()), zeros)
        if ctx.training:
            d_loss.backward()
            ctx.optimizers["disc"].step()
            ctx.optimizers["gen"].zero_grad()
        g_loss = self.objective(self.disc(fake), ones)
        if ctx.training:
            g_loss.backward()
            ctx.optimizers["gen"].step()
        ctx.log("d_loss", d_loss.detach())
        ctx.log("g_loss", g_loss.detach().item())
        ctx.loss = (d_loss + g_loss).detach()
        ctx.pred = fake.detach()


def test_gan_custom_step_two_optimizers_and_scheduler_on_one(capsys):
    torch.manual_seed(0)
    real = torch.randn(256, 1) * 0.5 + 3.0
    dl = DataLoader(TensorDataset(real), batch_size=32, shuffle=True)  # batches of one item: real samples
    gen0 = None

    class Snap(ln.Callback):
        def on_fit_begin(self, ctx):
            nonlocal gen0
            gen0 = {k: v.clone() for k, v in ctx.model.state_dict().items()}
            assert set(ctx.optimizers) == {"gen", "disc"}

    sched = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, opt_name="gen", step_size=1, gamma=0.5)
    f = ln.setup(TinyGAN).set_opt_hparams(lr=0.01).fit(
        dl, epochs=3, valid_data=DataLoader(TensorDataset(real[:64]), batch_size=32), callbacks=[Snap(), sched])
    out = capsys.readouterr().out
    assert "Epoch 3/3" in out and "Train metrics: Loss: " in out
    got = keys(f.history[0])
    assert got == {"epoch", "epoch_time", "lr_gen", "lr_disc", "train_loss", "train_d_loss", "train_g_loss",
                    "valid_loss", "valid_d_loss", "valid_g_loss"}, got
    assert [h["lr_gen"] for h in f.history] == pytest.approx([0.01, 0.005, 0.0025])
    assert [h["lr_disc"] for h in f.history] == pytest.approx([0.01] * 3)
    for h in f.history:
        assert h["train_loss"] == pytest.approx(h["train_d_loss"] + h["train_g_loss"], rel=1e-4)
    sd = f.model.state_dict()
    assert not torch.equal(sd["gen.weight"], gen0["gen.weight"])
    assert not torch.equal(sd["disc.0.weight"], gen0["disc.0.weight"])


# ----------------------------------------------------------------------------------------------- seed 003


def test_lr_schedulers_epoch_plateau_and_per_batch():
    x, y = make_luz_data(128)
    sgd = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(d_in=3, d_hidden=8, d_out=1)

    f = sgd.set_opt_hparams(lr=0.1).fit(
        (x, y), epochs=3, verbose=False,
        callbacks=[ln.callbacks.LRScheduler(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9)])
    assert [h["lr"] for h in f.history] == pytest.approx([0.1, 0.09, 0.081])

    seen = []

    class SpyPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics, *args, **kwargs):
            seen.append(float(metrics))
            return super().step(metrics, *args, **kwargs)

    f = sgd.set_opt_hparams(lr=0.05).fit((x, y), epochs=3, verbose=False,
                                         callbacks=[ln.callbacks.LRScheduler(SpyPlateau, patience=0)])
    assert seen == pytest.approx([h["train_loss"] for h in f.history])  # no validation: train_loss

    seen.clear()
    f = sgd.set_opt_hparams(lr=0.05).fit((x, y), epochs=3, valid_data=0.25, verbose=False,
                                         callbacks=[ln.callbacks.LRScheduler(SpyPlateau, patience=0)])
    assert seen == pytest.approx([h["valid_loss"] for h in f.history])  # default monitor valid_loss

    seen.clear()
    f = sgd.set_opt_hparams(lr=0.05).fit(
        (x, y), epochs=2, valid_data=0.25, verbose=False,
        callbacks=[ln.callbacks.LRScheduler(SpyPlateau, monitor="train_loss", patience=0)])
    assert seen == pytest.approx([h["train_loss"] for h in f.history])

    lrs = []

    class BatchLR(ln.Callback):
        def on_train_batch_begin(self, ctx):
            lrs.append(ctx.opt.param_groups[0]["lr"])

    n_batches = math.ceil(128 / 32)
    sgd.set_opt_hparams(lr=0.1).fit(
        (x, y), epochs=2, verbose=False,
        callbacks=[BatchLR(), ln.callbacks.LRScheduler(torch.optim.lr_scheduler.OneCycleLR,
                                                       call_on="on_train_batch_end", max_lr=0.1,
                                                       total_steps=2 * n_batches)])
    assert len(lrs) == 2 * n_batches and len(set(lrs)) == len(lrs)  # changes every batch


def test_weight_decay_param_groups_via_set_optimizers():
    """Seed 003: weight decay on the weight only, bias untouched, via per-parameter groups."""

    class Linreg(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(20, 1)

        def forward(self, x):
            return self.net(x)

        def set_optimizers(self, lr=0.01, wd=0.0):
            return torch.optim.SGD([{"params": self.net.weight, "weight_decay": wd}, {"params": self.net.bias}],
                                   lr=lr)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 20, generator=g)
    y = x @ torch.full((20, 1), 0.01) + 0.05 + 0.01 * torch.randn(40, 1, generator=g)
    groups = {}

    class Spy(ln.Callback):
        def on_fit_begin(self, ctx):
            groups["wd"] = [pg["weight_decay"] for pg in ctx.opt.param_groups]

    s = ln.setup(Linreg, loss=nn.MSELoss())
    torch.manual_seed(0)
    f0 = s.set_opt_hparams(lr=0.03, wd=0.0).fit((x, y), epochs=10, verbose=False, seed=0)
    f3 = s.set_opt_hparams(lr=0.03, wd=3.0).fit((x, y), epochs=10, verbose=False, seed=0, callbacks=[Spy()])
    assert groups["wd"] == [3.0, 0]
    assert f3.model.net.weight.norm() < 0.5 * f0.model.net.weight.norm()
    assert f3.opt_hparams == {"lr": 0.03, "wd": 3.0}


# ----------------------------------------------------------------------------------------------- seed 004


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
    assert keys(f.history[0]) == HISTORY_BASE | {"train_loss", "train_rmse", "valid_loss", "valid_rmse"}
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


def test_streaming_metrics_exact_over_epoch_with_short_last_batch():
    """Seed 004's torchmetrics-style streaming metrics: exact over all samples, short last batch by its size."""
    x, y = make_luz_data(50)
    f = luz_setup().fit((x, y), epochs=1, verbose=False)
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
    got = keys(f.history[-1])
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
            luz_setup().fit((x[:0], y[:0]), epochs=1, verbose=False)
    elif case == "broadcast":
        with pytest.raises(Exception) as ei:
            luz_setup().fit((x, y.squeeze(1)), epochs=1, verbose=False)
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
            luz_setup().fit("not data", epochs=1, verbose=False)
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

    f = luz_setup().fit((x, y), epochs=5, verbose=False, callbacks=[CtrlC()])
    assert isinstance(f, ln.Fitted)
    assert batches[-1] == (2, 2) and len(batches) == 4 + 2
    assert interrupted == [2]
    assert 1 <= len(f.history) <= 2


# ----------------------------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_identical_predictions(tmp_path):
    """Seed 004 §save/load: weights + hyperparameters, safe (no pickle), identical predictions after ln.load."""
    x, y = make_luz_data(128)
    f = luz_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False)
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
    f = luz_setup().fit((x, y), epochs=1, verbose=False)
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


def test_fitted_repr_and_plot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    x, y = make_luz_data(64)
    f = luz_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False)
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


def test_checkpoint_resume_with_auto_resume(tmp_path):
    """AutoResume: a crashed fit started again continues and ends with the same weights; state removed at the end."""
    x, y = make_luz_data(96)
    state_dir = tmp_path / "resume"

    class Crash(ln.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 3:
                raise RuntimeError("simulated crash")

    def run(extra=()):
        return luz_setup().fit((x, y), epochs=4, valid_data=0.25, seed=0, verbose=False,
                               callbacks=[ln.callbacks.AutoResume(state_dir), *extra])

    with pytest.raises(Exception, match="simulated crash"):
        run([Crash()])
    assert state_dir.exists() and any(state_dir.iterdir())
    resumed = run()
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert not state_dir.exists() or not any(p for p in state_dir.rglob("*") if p.is_file())

    straight = luz_setup().fit((x, y), epochs=4, valid_data=0.25, seed=0, verbose=False)
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v)
    assert resumed.history[-1]["valid_loss"] == pytest.approx(straight.history[-1]["valid_loss"])


def test_keep_best_model_restores_best_epoch_weights():
    x, y = make_luz_data(128)
    xv, yv = make_luz_data(64, seed=1)
    # lr high enough to oscillate: the best epoch is often not the last
    f = luz_setup(lr=0.3).fit((x, y), epochs=6, valid_data=(xv, yv), verbose=False, seed=0,
                              callbacks=[ln.callbacks.KeepBestModel()])
    best = min(h["valid_loss"] for h in f.history)
    assert f.evaluate((xv, yv)).metrics["loss"] == pytest.approx(best, rel=1e-5)


def test_export_torchscript_and_exported_program(tmp_path):
    x, y = make_luz_data(64)
    f = luz_setup().fit((x, y), epochs=1, verbose=False)
    ts = tmp_path / "model_ts.pt"
    f.export(ts, x[:4], format="torchscript")
    loaded = torch.jit.load(str(ts))
    torch.testing.assert_close(loaded(x[:8]), f.predict(x[:8]))
    ep = tmp_path / "model.pt2"
    f.export(ep, x[:4], format="exported_program")
    prog = torch.export.load(str(ep))
    torch.testing.assert_close(prog.module()(x[:4]), f.predict(x[:4]))


def test_accelerator_cpu_device():
    devices = []

    class Dev(ln.Callback):
        def on_train_batch_begin(self, ctx):
            devices.append((ctx.device, ctx.input.device.type))

    x, y = make_luz_data(64)
    luz_setup().fit((x, y), epochs=1, verbose=False, accelerator=ln.Accelerator(device="cpu"), callbacks=[Dev()])
    assert devices[0] == (torch.device("cpu"), "cpu")


# ----------------------------------------------------------------------------------------------- tuning


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


def test_lr_finder_cycles_data_and_leaves_setup_untouched():
    x, y = make_luz_data(64)  # 2 batches per epoch
    s = luz_setup()
    res = ln.lr_finder(s, (x, y), start_lr=1e-5, end_lr=1.0, steps=20)
    df = res.df
    assert {"lr", "loss"} <= set(df.columns)
    assert len(df) > 2  # more steps than one epoch of batches
    assert df["lr"].is_monotonic_increasing
    assert isinstance(res.suggestion, float) and 1e-5 <= res.suggestion <= 1.0
    assert res.plot().__class__.__name__ == "Figure"
    a = s.fit((x, y), epochs=1, seed=0, verbose=False)
    b = luz_setup().fit((x, y), epochs=1, seed=0, verbose=False)
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"])
    assert a.opt_hparams == {"lr": 0.01}


def test_tensorboard_cli_like_path_object(tmp_path):
    """TensorBoard accepts a pathlib.Path log_dir (what a user of seed 001's SummaryWriter would pass)."""
    pytest.importorskip("tensorboard")
    x, y = make_luz_data(64)
    luz_setup().fit((x, y), epochs=1, verbose=False, callbacks=[ln.callbacks.TensorBoard(log_dir=Path(tmp_path))])
    assert any((tmp_path / "train").iterdir())


# ----------------------------------------------------------------------------------------------- more contract details


def test_early_stopping_defaults_and_epoch_lines_with_min_max(capsys):
    """EarlyStopping() defaults: monitor valid_loss, patience 0 → stops at the first epoch that does not improve."""
    x, y = make_luz_data(128)
    xv, yv = make_luz_data(64, seed=1)
    es = ln.callbacks.EarlyStopping()
    fired = []

    class OnES(ln.Callback):
        def on_early_stopping(self, ctx):
            fired.append(ctx.epoch)

    f = frozen_setup().fit((x, y), epochs=10, valid_data=(xv, yv), callbacks=[es, OnES()])
    out = capsys.readouterr().out
    assert len(f.history) == 2 and fired == [2]
    assert "Epoch 1/10" in out and "Early stopping at epoch 2 of 10" in out

    f = frozen_setup().fit((x, y), epochs=(3, 10), valid_data=(xv, yv), callbacks=[ln.callbacks.EarlyStopping()])
    out = capsys.readouterr().out
    assert re.findall(r"^Epoch \d+/\d+$", out, re.M) == ["Epoch 1/10", "Epoch 2/10", "Epoch 3/10"]
    assert out.rstrip().endswith("Early stopping at epoch 3 of 10")


def test_model_checkpoint_folder_names_like_luz_and_default_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = make_luz_data(64)
    f = luz_setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False, callbacks=[ln.callbacks.ModelCheckpoint()])
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".pt")
    assert len(files) == 2
    for name, h in zip(files, f.history, strict=True):
        assert f"{h['epoch']:02d}" in name and "valid_loss" in name
        assert f"{h['valid_loss']:.3f}" in name or f"{h['valid_loss']:.4f}" in name, name


def test_model_checkpoint_mode_auto_maximises_accuracy(tmp_path):
    x, y = make_blobs(120)
    s = (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                  metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.0))
    # frozen weights: valid_acc constant → only the first epoch is 'best'
    s.fit((x, y), epochs=3, valid_data=0.25, verbose=False,
          callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmp_path / "a"), monitor="valid_acc", save_best_only=True)])
    assert len([p for p in (tmp_path / "a").iterdir() if p.suffix == ".pt"]) == 1
    f = s.set_opt_hparams(lr=0.05).fit(
        (x, y), epochs=4, valid_data=0.25, verbose=False, seed=0,
        callbacks=[ln.callbacks.ModelCheckpoint(path=str(tmp_path / "b"), monitor="valid_acc", save_best_only=True)])
    best, expected = -math.inf, 0
    for h in f.history:
        if h["valid_acc"] > best:
            best, expected = h["valid_acc"], expected + 1
    assert len([p for p in (tmp_path / "b").iterdir() if p.suffix == ".pt"]) == expected


def test_ctx_log_from_a_callback_and_monitor_on_custom_name():
    class GradNorm(ln.Callback):
        def on_train_batch_before_step(self, ctx):
            norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in ctx.model.parameters()))
            ctx.log("grad_norm", norm)

    x, y = make_luz_data(64)
    f = luz_setup().fit((x, y), epochs=3, verbose=False, callbacks=[GradNorm()])
    assert "train_grad_norm" in f.history[0] and f.history[0]["train_grad_norm"] > 0
    assert "grad_norm" in set(f.metrics_df().metric)

    # names that only a custom step's ctx.log creates can be monitored (checked after the first epoch)
    real = torch.randn(64, 1) + 3.0
    stops = []

    class Seen(ln.Callback):
        def on_early_stopping(self, ctx):
            stops.append(ctx.epoch)

    g = ln.setup(TinyGAN).fit(TensorDataset(real), epochs=3, verbose=False,
                              callbacks=[ln.callbacks.EarlyStopping(monitor="train_g_loss", patience=5,
                                                                    baseline=-1.0), Seen()])
    assert len(g.history) == 3 and stops == []
    calls = []

    class CountEpochs(ln.Callback):
        def on_epoch_end(self, ctx):
            calls.append(ctx.epoch)

    with pytest.raises(Exception, match=r"train_g_loss"):
        ln.setup(TinyGAN).fit(TensorDataset(real), epochs=3, verbose=False,
                              callbacks=[CountEpochs(), ln.callbacks.EarlyStopping(monitor="train_g_los", mode="min")])
    assert calls in ([], [1])


def test_gradient_clip_limits_the_norm_the_optimizer_sees():
    norms = []

    class Late(ln.Callback):
        order = 1000  # after GradientClip's documented order

        def on_train_batch_before_step(self, ctx):
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ctx.model.parameters()])))

    x, y = make_luz_data(64)
    y = y * 100  # big gradients
    luz_setup().fit((x, y), epochs=1, verbose=False, callbacks=[ln.callbacks.GradientClip(max_norm=0.5), Late()])
    assert norms and max(norms) <= 0.5 + 1e-4


def test_custom_step_sees_training_flag_and_validation():
    flags = []

    class Model(Net):
        def step(self, ctx):
            flags.append(ctx.training)
            pred = self(ctx.input)
            loss = nn.functional.mse_loss(pred, ctx.target)
            if ctx.training:
                ctx.opt.zero_grad()
                loss.backward()
                ctx.opt.step()
            ctx.pred = pred.detach()
            ctx.loss = loss.detach()

    x, y = make_luz_data(96)
    f = ln.setup(Model, metrics=[ln.metrics.MAE()]).set_opt_hparams(lr=0.01).fit(
        (x, y), epochs=3, valid_data=(x[:32], y[:32]), verbose=False)
    assert flags == ([True] * 3 + [False]) * 3
    assert keys(f.history[0]) == HISTORY_BASE | {"train_loss", "train_mae", "valid_loss", "valid_mae"}
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
    with torch.no_grad():
        p = f.model(x[:32])
    assert f.history[-1]["valid_mae"] == pytest.approx(float((p - y[:32]).abs().mean()), rel=1e-5)


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


def test_pandas_and_int32_class_targets_for_cross_entropy():
    pd = pytest.importorskip("pandas")
    x, y = make_blobs(150)
    s = ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.02)
    f = s.fit((pd.DataFrame(x.numpy()), pd.Series(y.numpy())), epochs=5, verbose=False, seed=0)
    assert f.history[-1]["train_acc"] > 0.9
    f = s.fit((x.numpy(), y.numpy().astype(np.int32)), epochs=5, verbose=False, seed=0)
    assert f.history[-1]["train_acc"] > 0.9


def test_predict_on_bare_tensor_batches_and_dataset():
    x, y = make_luz_data(70)
    f = luz_setup().fit((x, y), epochs=1, verbose=False)
    with torch.no_grad():
        ref = f.model(x)
    torch.testing.assert_close(f.predict(DataLoader(x, batch_size=16)), ref)  # bare tensor batches: inputs
    torch.testing.assert_close(f.predict(TensorDataset(x)), ref)
    torch.testing.assert_close(f.predict(TensorDataset(x, y)), ref)
    torch.testing.assert_close(f.predict(x.numpy()), ref)


def test_seeded_fits_are_reproducible():
    x, y = make_luz_data(128)
    a = luz_setup().fit((x, y), epochs=3, valid_data=0.2, seed=123, verbose=False)
    b = luz_setup().fit((x, y), epochs=3, valid_data=0.2, seed=123, verbose=False)
    assert [h["valid_loss"] for h in a.history] == [h["valid_loss"] for h in b.history]
    torch.testing.assert_close(a.predict(x), b.predict(x), rtol=0, atol=0)


def test_csv_logger_appends_on_resume(tmp_path):
    pd = pytest.importorskip("pandas")
    x, y = make_luz_data(64)
    csv = tmp_path / "log.csv"

    class Crash(ln.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 3:
                raise RuntimeError("simulated crash")

    def run(extra=()):
        return luz_setup().fit((x, y), epochs=4, seed=0, verbose=False,
                               callbacks=[ln.callbacks.AutoResume(tmp_path / "state"), ln.callbacks.CSVLogger(csv),
                                          *extra])

    with pytest.raises(Exception, match="simulated crash"):
        run([Crash()])
    assert len(pd.read_csv(csv)) == 2
    f = run()
    df = pd.read_csv(csv)
    assert list(df["epoch"]) == [1, 2, 3, 4]
    assert list(df["train_loss"]) == pytest.approx([h["train_loss"] for h in f.history])


def test_export_onnx_matches_predictions(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    x, y = make_luz_data(64)
    f = luz_setup().fit((x, y), epochs=1, verbose=False)
    path = tmp_path / "model.onnx"
    f.export(path, x[:4], format="onnx")
    sess = ort.InferenceSession(str(path))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x[:4].numpy()})
    np.testing.assert_allclose(out, f.predict(x[:4]).numpy(), rtol=1e-5, atol=1e-6)


def test_lr_finder_stops_early_when_loss_diverges():
    x, y = make_luz_data(256)
    s = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(d_in=3, d_hidden=32, d_out=1)
    res = ln.lr_finder(s, (x, y), start_lr=1e-4, end_lr=1e4, steps=100)
    assert len(res.df) < 100


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
    from conftest import PairDataset

    batches.clear()
    f = s.fit(PairDataset(x, y), epochs=1, valid_data=0.2, verbose=False, seed=0,
              dataloader_options={"batch_size": 19}, callbacks=[Spy()])
    assert sorted(len(b) for _, b in batches) == [19] * 4  # 95 - 19 held out
    assert "valid_loss" in f.history[0]


def test_auto_resume_state_kept_after_nan_and_removed_after_early_stop(tmp_path):
    x, y = make_luz_data(64)
    state = tmp_path / "state"

    class PoisonAt2(ln.Callback):
        def on_train_batch_after_loss(self, ctx):
            if ctx.epoch == 2:
                ctx.loss = ctx.loss * float("nan")

    with pytest.raises(Exception, match=r"NaN|Inf|nan"):
        luz_setup().fit((x, y), epochs=3, verbose=False, callbacks=[ln.callbacks.AutoResume(state), PoisonAt2()])
    assert state.exists() and any(p.is_file() for p in state.rglob("*"))

    state2 = tmp_path / "state2"
    f = frozen_setup().fit((x, y), epochs=10, valid_data=0.25, verbose=False,
                           callbacks=[ln.callbacks.AutoResume(state2), ln.callbacks.EarlyStopping(patience=1)])
    assert len(f.history) == 2
    assert not state2.exists() or not any(p.is_file() for p in state2.rglob("*"))


def test_load_with_a_different_architecture_names_the_mismatch(tmp_path):
    x, y = make_luz_data(64)
    f = luz_setup().fit((x, y), epochs=1, verbose=False)
    f.save(tmp_path / "m")
    with pytest.raises(Exception) as ei:
        ln.load(tmp_path / "m", module=Net(3, 8, 1))
    assert "net.0.weight" in str(ei.value)


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


def test_predict_is_in_eval_mode_and_deterministic_with_dropout():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 1))

        def forward(self, x):
            return self.net(x)

    modes = []

    class Mode(ln.Callback):
        def on_train_batch_begin(self, ctx):
            modes.append(("train", ctx.model.training))

        def on_valid_batch_begin(self, ctx):
            modes.append(("valid", ctx.model.training))

    x, y = make_luz_data(64)
    f = ln.setup(Drop, loss=nn.MSELoss()).fit((x, y), epochs=1, valid_data=0.25, verbose=False, callbacks=[Mode()])
    assert ("train", True) in modes and ("valid", False) in modes and ("valid", True) not in modes
    torch.testing.assert_close(f.predict(x), f.predict(x), rtol=0, atol=0)
    assert f.evaluate((x, y)).metrics["loss"] == pytest.approx(f.evaluate((x, y)).metrics["loss"], rel=0)


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
    f = luz_setup(lr=0.05).fit((x, y), epochs=epochs, valid_data=(xv, yv), verbose=False, seed=0,
                               dataloader_options={"batch_size": 50},
                               callbacks=[ln.callbacks.EarlyStopping(patience=patience, min_delta=min_delta)])
    values = [h["valid_loss"] for h in f.history]
    min_epochs = epochs[0] if isinstance(epochs, tuple) else 1
    max_epochs = epochs[1] if isinstance(epochs, tuple) else epochs
    stop = _luz_stop_epoch(values, patience, min_delta, min_epochs=min_epochs)
    assert len(f.history) == (stop if stop is not None else max_epochs)


def test_torchmetrics_rmse_in_fit_is_exact_over_the_epoch():
    torchmetrics = pytest.importorskip("torchmetrics")
    x, y = make_luz_data(50)
    xv, yv = make_luz_data(45, seed=1)
    f = luz_setup().fit((x, y), epochs=2, valid_data=(xv, yv), verbose=False,
                        dataloader_options={"batch_size": 16})
    ev = f.evaluate((xv, yv), metrics=[torchmetrics.MeanSquaredError(squared=False)],
                    dataloader_options={"batch_size": 16})
    p = f.predict(xv)
    assert set(ev.metrics) == {"loss", "meansquarederror"}
    assert ev.metrics["meansquarederror"] == pytest.approx(float((p - yv).pow(2).mean().sqrt()), rel=1e-5)


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


def test_compile_and_mixed_precision_accelerators_train():
    """Seed 004's torch.compile via Accelerator(compile=True); bf16 autocast on CPU."""
    x, y = make_luz_data(128)
    f = luz_setup().fit((x, y), epochs=3, verbose=False, seed=0, accelerator=ln.Accelerator(compile=True))
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
    assert f.predict(x).shape == (128, 1)
    f = luz_setup().fit((x, y), epochs=3, verbose=False, seed=0, accelerator=ln.Accelerator(precision="bf16-mixed"))
    assert all(math.isfinite(h["train_loss"]) for h in f.history)
    assert f.history[-1]["train_loss"] < f.history[0]["train_loss"]
