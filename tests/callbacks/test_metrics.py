"""The metrics callback (callbacks/metrics.py): dict-valued torchmetrics logged entry by entry, a failing metric
named with its set, epoch and batch, exact epoch losses for weighted-mean losses, and the mid-phase state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics
from conftest import MLPClassifier, classifier_setup, make_blobs, noisy_blobs
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassPrecision

import lanterna as ln
from lanterna.callbacks import metrics as metrics_module
from lanterna.callbacks.metrics import MetricsCallback
from lanterna.core.context import Context

clf = classifier_setup


class CountBatches(ln.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_begin(self, ctx):
        self.n += 1


class _ComputeFails(torchmetrics.Metric):
    higher_is_better = True

    def __init__(self):
        super().__init__()
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, pred, target):
        self.n += 1

    def compute(self):
        return {"a": self.n, "b": "not a number"}


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


def test_a_metric_that_raises_is_named_with_its_set_epoch_and_batch():
    x, y = make_blobs(n=64)
    with pytest.raises(ln.LanternaError) as info:
        clf([ln.metrics.Accuracy(), _Boom()]).fit((x, y), epochs=1, verbose=False,
                                                  dataloader_options={"batch_size": 16})
    assert str(info.value).startswith("Metric '_boom' (_Boom) of the train set failed in update at batch 3 of "
                                      "epoch 1: RuntimeError: boom inside the metric")
    assert isinstance(info.value.__cause__, RuntimeError)


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
