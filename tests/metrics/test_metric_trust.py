"""Metrics and monitors that can be trusted: mode="auto" follows each metric's higher_is_better, bad metric inputs
fail at the first batch, dict-valued torchmetrics are logged entry by entry, a failing metric names itself,
micro-averaged AUROC, and exact epoch losses for losses that are weighted means inside a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics
from conftest import MLPClassifier, Net, make_blobs, make_luz_data
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim import lr_scheduler as S
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score, MulticlassPrecision
from torchmetrics.functional.classification import multiclass_accuracy

import lanterna as ln
from lanterna.callbacks import metrics as metrics_module
from lanterna.callbacks.metrics import MetricsCallback
from lanterna.callbacks.monitor import resolve_mode
from lanterna.core.context import Context


def clf(metrics, lr=0.01, n_classes=3):
    return (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=metrics)
            .set_hparams(d_in=4, d_hidden=16, n_classes=n_classes).set_opt_hparams(lr=lr))


class CountBatches(ln.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_begin(self, ctx):
        self.n += 1


def noisy_blobs(n=240, seed=0):
    x, y = make_blobs(n=n, seed=seed)
    return x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)), y


# --------------------------------------------------------------------------- mode="auto"


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


# --------------------------------------------------------------------------- shapes and ignore_index


@pytest.mark.parametrize("target_shape", ["n1", "n"])
def test_accuracy_on_one_logit_per_sample_fails_at_the_first_batch_and_names_the_binary_metric(target_shape):
    x, _ = make_blobs(n=64)
    y = (x[:, 0] > 0).float()
    y = y.unsqueeze(1) if target_shape == "n1" else y
    if target_shape == "n1":
        loss = nn.BCEWithLogitsLoss()
    else:
        def loss(p, t):
            return nn.functional.binary_cross_entropy_with_logits(p.squeeze(1), t)
    setup = ln.setup(MLPClassifier, loss=loss, metrics=[ln.metrics.Accuracy()]).set_hparams(n_classes=1)
    count = CountBatches()
    with pytest.raises(ln.ShapeMismatchError, match=r"Metric 'acc' \(Accuracy\) of the train set failed in update "
                                                    r"at batch 1 of epoch 1.*BinaryAccuracyWithLogits\(\)"):
        setup.fit((x, y), epochs=1, verbose=False, callbacks=[count], dataloader_options={"batch_size": 16})
    assert count.n == 1
    # the fix named by the error gives the right value
    fitted = (ln.setup(MLPClassifier, loss=nn.BCEWithLogitsLoss(), optimizer=torch.optim.SGD,
                       metrics=[ln.metrics.BinaryAccuracyWithLogits()])
              .set_hparams(n_classes=1).set_opt_hparams(lr=0.0).fit((x, y.reshape(-1, 1)), epochs=1, verbose=False))
    with torch.no_grad():
        expected = float(((fitted.model(x) > 0).float() == y.reshape(-1, 1)).double().mean())
    assert fitted.history[0]["train_acc"] == pytest.approx(expected, abs=1e-7)


def test_accuracy_refuses_float_predictions_of_the_targets_shape_and_mismatched_scores():
    with pytest.raises(ln.ShapeMismatchError, match=r"float predictions.*BinaryAccuracy\(\)"):
        ln.metrics.Accuracy().update(torch.randn(8), torch.randint(0, 2, (8,)))
    with pytest.raises(ln.ShapeMismatchError, match=r"scores of shape \(8, 3\) do not fit targets of shape \(4,\)"):
        ln.metrics.Accuracy().update(torch.randn(8, 3), torch.randint(0, 3, (4,)))
    with pytest.raises(ln.ShapeMismatchError, match=r"targets of shape \(8, 1\) do not fit scores of shape \(8, 3\)"):
        ln.metrics.MulticlassAUROC(3).update(torch.randn(8, 3), torch.randint(0, 3, (8, 1)))
    with pytest.raises(ln.ShapeMismatchError, match=r"BinaryAUROC: predictions of shape \(8, 1\) and targets of "
                                                    r"shape \(8,\)"):
        ln.metrics.BinaryAUROC().update(torch.randn(8, 1), torch.randint(0, 2, (8,)))


def test_accuracy_ignore_index_leaves_those_samples_out_like_torchmetrics():
    g = torch.Generator().manual_seed(3)
    scores, target = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    target[torch.rand(50, generator=g) < 0.3] = -100
    m = ln.metrics.Accuracy(ignore_index=-100)
    for i in range(0, 50, 16):
        m.update(scores[i:i + 16], target[i:i + 16])
    keep = target != -100
    by_hand = float((scores.argmax(1)[keep] == target[keep]).double().mean())
    ref = multiclass_accuracy(scores, target, num_classes=4, average="micro", ignore_index=-100)
    assert float(m.compute()) == pytest.approx(by_hand, abs=1e-7) == pytest.approx(float(ref), abs=1e-7)
    # sequence outputs (N, C, L) against (N, L) with padding
    seq, labels = torch.randn(6, 4, 5, generator=g), torch.randint(0, 4, (6, 5), generator=g)
    labels[:, 3:] = -100
    m.reset()
    m.update(seq, labels)
    keep = labels != -100
    assert float(m.compute()) == pytest.approx(float((seq.argmax(1)[keep] == labels[keep]).double().mean()))


def test_micro_auroc_is_that_of_the_flattened_one_vs_rest_scores_as_in_sklearn():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(90, 4, generator=g) * 2, dim=1)
    target = torch.randint(0, 4, (90,), generator=g)
    probs[:10] = torch.round(probs[:10] * 4) / 4  # some ties
    onehot = nn.functional.one_hot(target, 4).numpy()
    expected = roc_auc_score(onehot, probs.numpy(), average="micro")
    m = ln.metrics.MulticlassAUROC(num_classes=4, average="micro")
    for i in range(0, 90, 32):
        m.update(probs[i:i + 32], target[i:i + 32])
    assert float(m.compute()) == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(roc_auc_score(onehot, probs.numpy(), average="macro"), rel=1e-4)
    logits = torch.randn(90, 4, generator=g) * 3  # logits: the AUROC of their softmax, as for macro
    m.reset()
    m.update(logits, target)
    assert float(m.compute()) == pytest.approx(
        roc_auc_score(onehot, torch.softmax(logits, dim=1).numpy(), average="micro"), rel=1e-6)


# --------------------------------------------------------------------------- dict-valued metrics


def test_classwise_wrapper_and_metric_collection_are_logged_entry_by_entry(capsys):
    x, y = noisy_blobs(n=150)
    xv, yv = noisy_blobs(n=61, seed=5)
    classwise = torchmetrics.ClasswiseWrapper(MulticlassAccuracy(num_classes=3, average=None),
                                              labels=["Cat", "dog", "sea lion"])
    coll = torchmetrics.MetricCollection([MulticlassAccuracy(num_classes=3), MulticlassPrecision(num_classes=3)])
    keep = ln.callbacks.KeepBestModel("valid_classwisewrapper_multiclassaccuracy_cat")
    fitted = clf([classwise, coll], lr=0.0).fit(
        (x, y), valid_data=(xv, yv), epochs=1, seed=0, callbacks=[keep], dataloader_options={"batch_size": 16})
    rec = fitted.history[-1]
    with torch.no_grad():
        scores = fitted.model(xv)
    per_class = MulticlassAccuracy(num_classes=3, average=None)(scores, yv).tolist()
    for label, value in zip(("cat", "dog", "sea_lion"), per_class):
        assert rec[f"valid_classwisewrapper_multiclassaccuracy_{label}"] == pytest.approx(value, abs=1e-6)
    assert rec["valid_metriccollection_multiclassaccuracy"] == pytest.approx(
        float(MulticlassAccuracy(num_classes=3)(scores, yv)), abs=1e-6)
    assert rec["valid_metriccollection_multiclassprecision"] == pytest.approx(
        float(MulticlassPrecision(num_classes=3)(scores, yv)), abs=1e-6)
    assert keep.monitor.mode == "max"
    out = capsys.readouterr().out
    assert "multiclassaccuracy_sea lion: " in out and "MulticlassPrecision: " in out
    # a MetricCollection as the whole spec, and named
    named = ln.metrics.named(torchmetrics.MetricCollection([MulticlassAccuracy(num_classes=3)]), "m")
    with torch.no_grad():
        train_acc = float(MulticlassAccuracy(num_classes=3)(fitted.model(x), y))
    for spec, key in ((coll, "train_metriccollection_multiclassaccuracy"), ([named], "train_m_multiclassaccuracy")):
        rec = clf(spec, lr=0.0).fit((x, y), epochs=1, seed=0, verbose=False).history[-1]  # the same model: lr=0
        assert rec[key] == pytest.approx(train_acc, abs=1e-6)


class _ComputeFails(torchmetrics.Metric):
    higher_is_better = True

    def __init__(self):
        super().__init__()
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, pred, target):
        self.n += 1

    def compute(self):
        return {"a": self.n, "b": "not a number"}


def test_a_metric_whose_compute_cannot_work_fails_at_the_first_batch():
    x, y = make_blobs(n=64)
    count = CountBatches()
    with pytest.raises(ln.LanternaError, match=r"Metric '_computefails' \(_ComputeFails\) of the train set returned "
                                               r"a str from compute\(\)"):
        clf([_ComputeFails()]).fit((x, y), epochs=1, verbose=False, callbacks=[count],
                                   dataloader_options={"batch_size": 16})
    assert count.n == 1
    with pytest.raises(ln.LanternaError, match=r"logs train_acc_multiclassaccuracy, which another metric"):
        clf([ln.metrics.named(torchmetrics.MetricCollection([MulticlassAccuracy(num_classes=3)]), "acc"),
             ln.metrics.named(ln.metrics.Accuracy(), "acc_multiclassaccuracy")]).fit(
            (x, y), epochs=1, verbose=False)


class _Boom(torchmetrics.Metric):
    """Raises at its third update."""

    higher_is_better = True

    def __init__(self):
        super().__init__()
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, pred, target):
        self.n += 1
        if self._update_count == 3:
            raise RuntimeError("boom inside the metric")

    def compute(self):
        return self.n


def test_a_metric_that_raises_is_named_with_its_set_epoch_and_batch():
    x, y = make_blobs(n=64)
    with pytest.raises(ln.LanternaError) as info:
        clf([ln.metrics.Accuracy(), _Boom()]).fit((x, y), epochs=1, verbose=False,
                                                  dataloader_options={"batch_size": 16})
    assert str(info.value).startswith("Metric '_boom' (_Boom) of the train set failed in update at batch 3 of "
                                      "epoch 1: RuntimeError: boom inside the metric")
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------------- exact weighted losses


class SetLossWeight(ln.Callback):
    """What the step does for CrossEntropyLoss(weight=w, ignore_index=i): the batch mean's denominator."""

    def __init__(self, weight=None, ignore_index=-100):
        self.weight, self.ignore_index = weight, ignore_index

    def _set(self, ctx):
        keep = ctx.target != self.ignore_index
        if self.weight is None:
            ctx.loss_weight = keep.sum().to(torch.float32)
        else:
            ctx.loss_weight = (self.weight[ctx.target.clamp_min(0)] * keep).sum()

    on_train_batch_after_loss = _set
    on_valid_batch_after_loss = _set


@pytest.mark.parametrize("kind", ["class_weights", "ignore_index", "both"])
def test_epoch_loss_of_a_weighted_mean_loss_equals_the_whole_set_loss(kind):
    x, y = make_blobs(n=103)
    xv, yv = make_blobs(n=47, seed=2)
    w = torch.tensor([0.2, 1.0, 3.0]) if kind != "ignore_index" else None
    if kind != "class_weights":
        g = torch.Generator().manual_seed(0)
        y[torch.rand(103, generator=g) < 0.3] = -100
        yv[torch.rand(47, generator=g) < 0.3] = -100
    loss = nn.CrossEntropyLoss(weight=w, ignore_index=-100)
    fitted = (ln.setup(MLPClassifier, loss=loss, optimizer=torch.optim.SGD).set_opt_hparams(lr=0.0)
              .fit((x, y), valid_data=(xv, yv), epochs=1, verbose=False, seed=0,
                   callbacks=[SetLossWeight(w)], dataloader_options={"batch_size": 10}))
    with torch.no_grad():
        whole_train, whole_valid = loss(fitted.model(x), y), loss(fitted.model(xv), yv)
    rec = fitted.history[0]
    assert rec["train_loss"] == pytest.approx(float(whole_train), rel=1e-6)
    assert rec["valid_loss"] == pytest.approx(float(whole_valid), rel=1e-6)
    # weighting the batch means by their sample counts is not exact: the test can tell
    plain = (ln.setup(MLPClassifier, loss=loss, optimizer=torch.optim.SGD).set_opt_hparams(lr=0.0)
             .fit((x, y), epochs=1, verbose=False, seed=0, dataloader_options={"batch_size": 10}))
    if plain.history[0]["train_loss"] == rec["train_loss"]:  # the step already sets ctx.loss_weight itself
        return
    assert plain.history[0]["train_loss"] != pytest.approx(float(whole_train), rel=1e-4)


def test_mid_phase_state_carries_the_loss_weights_and_wrapped_metric_states(monkeypatch):
    monkeypatch.setattr(metrics_module, "FLUSH_BATCHES", 2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (8, 8, 8, 5)]
    w = torch.tensor([0.5, 1.0, 2.0])

    def make():
        cw = torchmetrics.ClasswiseWrapper(MulticlassAccuracy(num_classes=3, average=None))
        cb = MetricsCallback([cw, ln.metrics.Accuracy()], [])
        ctx = Context(device=torch.device("cpu"), training=True, set_name="train", record={},
                      loss_fn=nn.CrossEntropyLoss(weight=w), epoch=1)
        cb.on_fit_begin(ctx)
        cb.on_train_begin(ctx)
        return cb, ctx

    def feed(cb, ctx, part):
        for i, (pred, target) in part:
            ctx.iter, ctx.pred, ctx.target, ctx.batch_size = i, pred, target, len(pred)
            ctx.loss = nn.functional.cross_entropy(pred, target, weight=w)
            ctx.loss_weight = w[target].sum()
            cb.on_train_batch_end(ctx)

    numbered = list(enumerate(batches, 1))
    one, one_ctx = make()
    feed(one, one_ctx, numbered[:1])  # the first batch is computed once, as a check: nothing of it is cached
    assert all(getattr(mod, "_computed", None) is None for mod in one.sets["train"][0][1].modules())
    cb, ctx = make()
    feed(cb, ctx, numbered[:3])
    state = cb.phase_state_dict()
    resumed, rctx = make()
    resumed._seen.add("train")  # a resumed run's phase is not its first batch
    resumed._begin(rctx)
    resumed.load_phase_state_dict(state)
    feed(resumed, rctx, numbered[3:])
    resumed.on_train_end(rctx)
    preds, targets = torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches])
    rec = rctx.record
    assert rec["train_loss"] == pytest.approx(float(nn.functional.cross_entropy(preds, targets, weight=w)), rel=1e-6)
    per_class = MulticlassAccuracy(num_classes=3, average=None)(preds, targets).tolist()
    assert [rec[f"train_classwisewrapper_multiclassaccuracy_{c}"] for c in range(3)] == pytest.approx(per_class)
    assert rec["train_acc"] == pytest.approx(float((preds.argmax(1) == targets).double().mean()))
    assert np.isfinite(rec["train_loss"])
