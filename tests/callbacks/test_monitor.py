"""Monitors (callbacks/monitor.py): mode="auto" follows each metric's higher_is_better in every callback, is
resolved from the metric spec before any fit, and a direction that cannot be known is an error before training."""

from __future__ import annotations

import pytest
import torch
import torchmetrics
from conftest import Net, classifier_setup, make_luz_data, noisy_blobs
from torch import nn
from torch.optim import lr_scheduler as S
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

import lanterna as ln
from lanterna.callbacks.monitor import resolve_mode

clf = classifier_setup


class CountBatches(ln.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_begin(self, ctx):
        self.n += 1


class _NoDirection(ln.metrics.LanternaMetric):
    name, display_name = "me", "ME"  # higher_is_better left None

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64))

    def update(self, pred, target):
        self.total += (pred - target).sum(dtype=torch.float64)

    def compute(self):
        return self.total.float()


class _LoggingStep(nn.Module):
    """A custom step that logs the loss as "gap" (a ctx.log value: no known direction)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)

    def step(self, ctx):
        ctx.pred = self(ctx.input)
        ctx.loss = ((ctx.pred - ctx.target) ** 2).mean()
        ctx.log("gap", ctx.loss.detach())
        if ctx.training:
            ctx.backward(ctx.loss)
            ctx.step_optimizer()


def test_auto_mode_maximises_torchmetrics_and_ln_accuracy_f1_auroc_in_every_callback():
    x, y = noisy_blobs()
    metrics = ln.metrics.MetricSet(
        train=[ln.metrics.Accuracy()],
        valid=[MulticlassAccuracy(num_classes=3), ln.metrics.named(MulticlassF1Score(num_classes=3), "f1"),
               MulticlassAUROC(num_classes=3), ln.metrics.MulticlassAUROC(3)])
    keep_acc = ln.callbacks.KeepBestModel(monitor="valid_multiclassaccuracy")
    keep_train = ln.callbacks.KeepBestModel(monitor="train_acc")
    keep_auroc = ln.callbacks.KeepBestModel(monitor="valid_auroc")
    stop_f1 = ln.callbacks.EarlyStopping(monitor="valid_f1", patience=100)
    plateau = ln.callbacks.LRScheduler(S.ReduceLROnPlateau, monitor="valid_multiclassauroc", patience=100)
    fitted = clf(metrics, lr=0.003).fit((x, y), valid_data=0.3, epochs=8, seed=0, verbose=False,
                                        callbacks=[keep_acc, keep_train, keep_auroc, stop_f1, plateau])
    for cb in (keep_acc, keep_train, keep_auroc):
        values = [r[cb.monitor.name] for r in fitted.history]
        assert cb.monitor.mode == "max"
        assert cb.best == max(values) and cb.best_epoch == values.index(max(values)) + 1
    assert len(set(r["valid_multiclassaccuracy"] for r in fitted.history)) > 1  # the choice matters
    f1 = [r["valid_f1"] for r in fitted.history]
    assert stop_f1.mode == "max" and stop_f1.best == max(f1) and stop_f1.best_epoch == f1.index(max(f1)) + 1
    assert plateau.scheduler.mode == "max"


def test_auto_mode_minimises_losses_and_errors_and_maximises_r2():
    x, y = make_luz_data(n=120)
    setup = ln.setup(Net, loss=nn.MSELoss(), metrics=[torchmetrics.R2Score(), torchmetrics.MeanSquaredError(),
                                                      ln.metrics.RMSE()]).set_opt_hparams(lr=0.01)
    cbs = {name: ln.callbacks.KeepBestModel(monitor=name)
           for name in ("valid_r2score", "valid_meansquarederror", "valid_rmse", "valid_loss", "train_loss")}
    fitted = setup.fit((x, y), valid_data=0.25, epochs=4, seed=0, verbose=False, callbacks=list(cbs.values()))
    assert {n: cb.monitor.mode for n, cb in cbs.items()} == {
        "valid_r2score": "max", "valid_meansquarederror": "min", "valid_rmse": "min", "valid_loss": "min",
        "train_loss": "min"}
    for name, cb in cbs.items():
        values = [r[name] for r in fitted.history]
        assert cb.best == (max(values) if cb.monitor.mode == "max" else min(values))


def test_resolve_mode_reads_the_metric_spec_before_any_fit():
    r2 = ln.metrics.named(ln.metrics.on_output(torchmetrics.R2Score(), 1), "aux_r2")
    spec = [ln.metrics.Accuracy(), ln.metrics.MAE(), MulticlassF1Score(num_classes=3), r2, ln.metrics.MAE()]
    assert resolve_mode("valid_acc", "auto", spec) == "max"
    assert resolve_mode("train_mae", "auto", spec) == "min"
    assert resolve_mode("valid_mae_1", "auto", spec) == "min"
    assert resolve_mode("valid_multiclassf1score", "auto", spec) == "max"
    assert resolve_mode("valid_aux_r2", "auto", spec) == "max"
    assert resolve_mode("valid_loss", "auto") == resolve_mode("train_aux_loss", "auto") == "min"
    assert resolve_mode("valid_acc", "min", spec) == "min"  # an explicit mode is kept
    ms = ln.metrics.MetricSet(train=[ln.metrics.MAE()], valid=[ln.metrics.BinaryAUROC()])
    assert resolve_mode("valid_auroc", "auto", ms) == "max" and resolve_mode("train_mae", "auto", ms) == "min"
    assert resolve_mode("valid_auroc", "auto", ln.metrics.BinaryAUROC()) == "max"
    with pytest.raises(ln.MonitorError, match=r"'train_auroc'.*Pass mode='min' or mode='max'"):
        resolve_mode("train_auroc", "auto", ms)  # not a train metric of this MetricSet: direction unknown
    with pytest.raises(ln.MonitorError, match=r"'valid_acc'.*Pass mode='min' or mode='max'"):
        resolve_mode("valid_acc", "auto")  # the name alone says nothing
    with pytest.raises(ln.MonitorError, match="mode='up' is not one of"):
        resolve_mode("valid_loss", "up")
    # entries of dict-valued metrics: the wrapped metric's direction
    wrapped = torchmetrics.ClasswiseWrapper(MulticlassAccuracy(num_classes=3, average=None))
    coll = torchmetrics.MetricCollection([MulticlassAccuracy(num_classes=3), torchmetrics.MeanSquaredError()])
    assert resolve_mode("valid_classwisewrapper_multiclassaccuracy_2", "auto", [wrapped]) == "max"
    assert resolve_mode("valid_metriccollection_multiclassaccuracy", "auto", [coll]) == "max"
    assert resolve_mode("valid_metriccollection_meansquarederror", "auto", [coll]) == "min"


def test_a_direction_that_cannot_be_known_is_an_error_before_training():
    x, y = make_luz_data(n=64)
    cases = ((ln.setup(_LoggingStep), "train_gap", "ctx.log"),
             (ln.setup(Net, loss=nn.MSELoss(), metrics=[_NoDirection()]), "train_me",
              "_NoDirection declares higher_is_better=None"))
    for setup, monitor, why in cases:
        count = CountBatches()
        with pytest.raises(ln.MonitorError, match=rf"{monitor!r} should be minimised or maximised: .*{why}.*"
                                                  "Pass mode='min' or mode='max'"):
            setup.fit((x, y), epochs=2, verbose=False, callbacks=[count, ln.callbacks.EarlyStopping(monitor)])
        assert count.n == 0
    # an explicit mode works, for a ctx.log value too (its name is checked after the first epoch)
    keep = ln.callbacks.KeepBestModel("train_gap", mode="min")
    fitted = ln.setup(_LoggingStep).set_opt_hparams(lr=0.05).fit((x, y), epochs=3, verbose=False, callbacks=[keep])
    assert keep.best == min(r["train_gap"] for r in fitted.history)


def test_optuna_pruning_takes_the_study_direction_for_a_logged_value():
    optuna = pytest.importorskip("optuna")
    x, y = make_luz_data(n=64)
    study = optuna.create_study(direction="maximize")
    prune = ln.callbacks.OptunaPruning(study.ask(), monitor="train_gap")
    ln.setup(_LoggingStep).fit((x, y), epochs=1, verbose=False, callbacks=[prune])
    assert prune.monitor.mode == "max"
    with pytest.warns(UserWarning, match="the study maximizes but 'train_loss' is a quantity to minimize"):
        ln.setup(Net, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False,
                                             callbacks=[ln.callbacks.OptunaPruning(study.ask(), "train_loss")])
