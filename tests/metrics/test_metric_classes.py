"""Every ``ln.metrics`` class against a reference (scikit-learn, torchmetrics functional), updated in uneven
chunks so that exactness over the epoch is what is tested."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MLPClassifier, make_blobs
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, roc_auc_score
from torch import nn
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy, multiclass_auroc

import lanterna as ln

CHUNKS = (7, 7, 7, 3, 1)  # 25 samples, uneven batches


def feed(metric, pred, target, chunks=CHUNKS):
    metric.reset()
    start = 0
    for n in chunks:
        metric.update(pred[start : start + n], target[start : start + n])
        start += n
    assert start == len(pred)
    return metric.compute()


@pytest.fixture
def regression():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(25, 1, generator=g) * 3
    target = pred + torch.randn(25, 1, generator=g)
    return pred, target


@pytest.fixture
def multiclass():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(25, 4, generator=g)
    target = torch.randint(0, 4, (25,), generator=g)
    target[:4] = torch.arange(4)  # every class present
    return scores, target


@pytest.fixture
def binary():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(25, generator=g) * 2
    target = (torch.rand(25, generator=g) < torch.sigmoid(logits)).long()
    target[:2] = torch.tensor([0, 1])
    return logits, target


def test_regression_metrics_match_sklearn(regression):
    pred, target = regression
    p, t = pred.double().numpy().ravel(), target.double().numpy().ravel()
    assert float(feed(ln.metrics.MAE(), pred, target)) == pytest.approx(mean_absolute_error(t, p), rel=1e-6)
    assert float(feed(ln.metrics.MSE(), pred, target)) == pytest.approx(mean_squared_error(t, p), rel=1e-6)
    rmse = float(feed(ln.metrics.RMSE(), pred, target))
    assert rmse == pytest.approx(np.sqrt(mean_squared_error(t, p)), rel=1e-6)


def test_rmse_is_over_all_samples_not_a_mean_of_batch_rmses(regression):
    pred, target = regression
    exact = float(((pred - target) ** 2).mean().sqrt())
    batch_mean = np.mean([float(((pred[i : i + 7] - target[i : i + 7]) ** 2).mean().sqrt()) for i in range(0, 25, 7)])
    got = float(feed(ln.metrics.RMSE(), pred, target))
    assert got == pytest.approx(exact, rel=1e-6)
    assert abs(got - batch_mean) > 1e-3


@pytest.mark.parametrize("metric", [ln.metrics.MAE(), ln.metrics.MSE(), ln.metrics.RMSE()])
def test_regression_metrics_refuse_n_1_predictions_for_n_targets(regression, metric):
    pred, target = regression  # (N, 1) against (N,) would broadcast to (N, N) in torch: refused, both shapes named
    with pytest.raises(ln.ShapeMismatchError, match=r"predictions of shape \(25, 1\) and targets of shape \(25,\)"
                                                    r".*pred\.squeeze\(1\)"):
        metric.update(pred, target.squeeze(1))
    with pytest.raises(ln.ShapeMismatchError, match=r"\(25,\) and targets of shape \(25, 1\).*y\.squeeze\(1\)"):
        metric.update(pred.squeeze(1), target)


def test_mismatched_shapes_raise_a_clear_error():
    with pytest.raises(ValueError, match=r"MAE: predictions of shape \(4, 2\) and targets of shape \(4,\)"):
        ln.metrics.MAE().update(torch.zeros(4, 2), torch.zeros(4))


def test_accuracy_matches_sklearn_and_torchmetrics(multiclass):
    scores, target = multiclass
    got = float(feed(ln.metrics.Accuracy(), scores, target))
    assert got == pytest.approx(accuracy_score(target.numpy(), scores.argmax(1).numpy()), abs=1e-7)
    ref = multiclass_accuracy(scores, target, num_classes=4, average="micro")
    assert got == pytest.approx(float(ref), abs=1e-7)
    # class predictions instead of scores
    assert float(feed(ln.metrics.Accuracy(), scores.argmax(1), target)) == pytest.approx(got, abs=1e-7)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
@pytest.mark.parametrize("float_target", [False, True])
def test_binary_accuracy_matches_sklearn(binary, threshold, float_target):
    logits, target = binary
    probs = torch.sigmoid(logits)
    t = target.float() if float_target else target
    expected = accuracy_score(target.numpy(), (probs > threshold).long().numpy())
    got = float(feed(ln.metrics.BinaryAccuracy(threshold=threshold), probs, t))
    assert got == pytest.approx(expected, abs=1e-7)
    got_logits = float(feed(ln.metrics.BinaryAccuracyWithLogits(threshold=threshold), logits, t))
    assert got_logits == pytest.approx(expected, abs=1e-7)
    # (N, 1) outputs against (N, 1) targets, as a model with one output unit gives; (N, 1) against (N,) refused
    assert float(feed(ln.metrics.BinaryAccuracy(threshold=threshold), probs.unsqueeze(1), t.unsqueeze(1))) == \
        pytest.approx(expected, abs=1e-7)
    with pytest.raises(ln.ShapeMismatchError, match=r"BinaryAccuracy: predictions of shape \(7, 1\) and targets "
                                                    r"of shape \(7,\)"):
        feed(ln.metrics.BinaryAccuracy(threshold=threshold), probs.unsqueeze(1), t)


@pytest.mark.parametrize("float_target", [False, True])
def test_binary_auroc_matches_sklearn(binary, float_target):
    logits, target = binary
    t = target.float() if float_target else target
    expected = roc_auc_score(target.numpy(), logits.numpy())
    assert float(feed(ln.metrics.BinaryAUROC(), torch.sigmoid(logits), t)) == pytest.approx(expected, rel=1e-6)
    assert float(feed(ln.metrics.BinaryAUROC(from_logits=True), logits, t)) == pytest.approx(expected, rel=1e-6)
    assert float(binary_auroc(torch.sigmoid(logits), target)) == pytest.approx(expected, rel=1e-6)


def test_multiclass_auroc_matches_sklearn_one_vs_rest(multiclass):
    scores, target = multiclass
    probs = torch.softmax(scores, dim=1)
    per_class = [roc_auc_score((target == c).numpy(), probs[:, c].numpy()) for c in range(4)]
    got = float(feed(ln.metrics.MulticlassAUROC(num_classes=4), probs, target))
    assert got == pytest.approx(np.mean(per_class), rel=1e-6)
    assert got == pytest.approx(roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr"), rel=1e-6)
    none = feed(ln.metrics.MulticlassAUROC(num_classes=4, average=None), probs, target)
    assert none.tolist() == pytest.approx(per_class, rel=1e-6)
    ref = multiclass_auroc(probs, target, num_classes=4, average="macro", thresholds=None)
    assert got == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match=r"num_classes=4\) needs scores of shape \(N, 4\)"):
        ln.metrics.MulticlassAUROC(num_classes=4).update(probs[:, :3], target)


def test_metrics_reset_and_follow_the_torchmetrics_protocol(regression):
    pred, target = regression
    m = ln.metrics.MAE()
    first = float(feed(m, pred, target))
    m.reset()
    m.update(pred[:1], target[:1])
    assert float(m.compute()) == pytest.approx(float((pred[0] - target[0]).abs()), rel=1e-6)
    assert float(feed(m, pred, target)) == first
    # metric(pred, target): the batch's own value, and the batch is accumulated (torchmetrics' forward)
    m.reset()
    assert float(m(pred[:5], target[:5])) == pytest.approx(float((pred[:5] - target[:5]).abs().mean()), rel=1e-6)
    assert float(m(pred[5:], target[5:])) == pytest.approx(float((pred[5:] - target[5:]).abs().mean()), rel=1e-6)
    assert float(m.compute()) == pytest.approx(first, rel=1e-6)


def test_state_round_trip_dtype_and_copies(binary):
    logits, target = binary
    auroc = ln.metrics.BinaryAUROC(from_logits=True)
    auroc.update(logits[:10], target[:10])
    state = auroc.metric_state
    other = ln.metrics.BinaryAUROC(from_logits=True)
    other.load_metric_state(state)
    auroc.update(logits[10:], target[10:])
    other.update(logits[10:], target[10:])
    assert float(other.compute()) == float(auroc.compute()) == pytest.approx(float(feed(
        ln.metrics.BinaryAUROC(from_logits=True), logits, target)))
    with pytest.raises(KeyError, match="has no state 'nope'"):
        other.load_metric_state({"nope": torch.zeros(())})
    mae = ln.metrics.MAE().set_dtype(torch.float32)
    assert mae.error_sum.dtype == torch.float32
    mae.reset()
    assert mae.error_sum.dtype == torch.float32  # the default was converted too
    clone = copy.deepcopy(mae)
    clone.update(torch.ones(2), torch.zeros(2))
    assert float(clone.compute()) == 1.0 and float(mae.count) == 0.0


def test_a_custom_metric_from_the_base_class_trains_and_validates_states():
    class MaxAbsError(ln.metrics.LanternaMetric):
        name, display_name, higher_is_better = "max_err", "MaxErr", False

        def __init__(self) -> None:
            super().__init__()
            self.add_state("worst", torch.tensor(0.0), dist_reduce_fx="max")

        def update(self, pred, target):
            self.worst = torch.maximum(self.worst, (pred - target).abs().max())

        def compute(self):
            return self.worst

    m = MaxAbsError()
    assert float(m(torch.tensor([1.0, -3.0]), torch.zeros(2))) == 3.0
    assert float(m(torch.tensor([2.0]), torch.zeros(1))) == 2.0 and float(m.compute()) == 3.0
    with pytest.raises(ValueError, match="dist_reduce_fx must be one of"):
        m.add_state("x", torch.zeros(()), dist_reduce_fx="mean")
    with pytest.raises(ValueError, match="a list state starts empty"):
        m.add_state("x", [torch.zeros(())])
    with pytest.raises(ValueError, match="before any update"):
        ln.metrics.BinaryAUROC().compute()


def test_ln_metrics_do_not_import_torchmetrics():
    """torchmetrics pulls scipy and matplotlib (+~100 MB): ln.metrics never import it."""
    code = (
        "import sys, torch, lanterna as ln\n"
        "x = torch.randn(64, 3); y = x.sum(1, keepdim=True)\n"
        "ln.setup(torch.nn.Linear, metrics=[ln.metrics.MAE(), ln.metrics.RMSE()], loss=torch.nn.MSELoss())"
        ".set_hparams(in_features=3, out_features=1).fit((x, y), epochs=2, valid_data=0.25, verbose=False)\n"
        "c = torch.randn(64, 4); ln.metrics.Accuracy().update(c, c.argmax(1))\n"
        "a = ln.metrics.MulticlassAUROC(4); a.update(c, c.argmax(1)); a.compute()\n"
        "b = ln.metrics.BinaryAUROC(); b.update(x[:, 0], (y[:, 0] > 0).long()); b.compute()\n"
        "print(sorted(m for m in ('torchmetrics', 'scipy', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "metric, key, display, higher",
    [
        (ln.metrics.MAE(), "mae", "MAE", False),
        (ln.metrics.MSE(), "mse", "MSE", False),
        (ln.metrics.RMSE(), "rmse", "RMSE", False),
        (ln.metrics.Accuracy(), "acc", "Acc", True),
        (ln.metrics.BinaryAccuracy(), "acc", "Acc", True),
        (ln.metrics.BinaryAccuracyWithLogits(), "acc", "Acc", True),
        (ln.metrics.BinaryAUROC(), "auroc", "AUC", True),
        (ln.metrics.MulticlassAUROC(3), "auroc", "AUC", True),
    ],
)
def test_history_keys_are_lowercase_and_display_names_follow_luz(metric, key, display, higher):
    assert ln.metrics.metric_key(metric) == key
    assert ln.metrics.metric_display(metric, key) == display
    assert metric.higher_is_better is higher


def test_auroc_is_exact_with_ties_saturated_logits_and_absent_classes():
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    target = (torch.rand(200, generator=g) < 0.3 + 0.1 * scores).long()
    got = float(feed(ln.metrics.BinaryAUROC(), scores, target, chunks=(64, 64, 72)))
    assert got == pytest.approx(roc_auc_score(target.numpy(), scores.numpy()), rel=1e-6)
    # logits far in the tails: a sigmoid would tie them all at 0.0 / 1.0; the ranking keeps them apart
    logits = torch.tensor([30.0, 40.0, 50.0, -30.0, -40.0, -50.0])
    labels = torch.tensor([0, 1, 1, 0, 0, 1])
    assert float(feed(ln.metrics.BinaryAUROC(from_logits=True), logits, labels, chunks=(6,))) == pytest.approx(
        roc_auc_score(labels.numpy(), logits.numpy()))
    assert torch.isnan(feed(ln.metrics.BinaryAUROC(), scores[:5], torch.zeros(5), chunks=(5,)))  # one class only

    probs = torch.softmax(torch.randn(120, 4, generator=g), dim=1)
    classes = torch.randint(0, 3, (120,), generator=g)  # class 3 never occurs
    per_class = feed(ln.metrics.MulticlassAUROC(4, average=None), probs, classes, chunks=(50, 70))
    assert torch.isnan(per_class[3])
    ref = [roc_auc_score((classes == c).numpy(), probs[:, c].numpy()) for c in range(3)]
    assert per_class[:3].tolist() == pytest.approx(ref, rel=1e-6)
    macro = float(feed(ln.metrics.MulticlassAUROC(4), probs, classes, chunks=(50, 70)))
    assert macro == pytest.approx(np.mean(ref), rel=1e-6)
    support = np.bincount(classes.numpy(), minlength=3)
    weighted = float(feed(ln.metrics.MulticlassAUROC(4, average="weighted"), probs, classes, chunks=(50, 70)))
    assert weighted == pytest.approx(np.average(ref, weights=support), rel=1e-6)
    with pytest.raises(ValueError, match="use 'macro', 'weighted', 'micro' or None"):
        ln.metrics.MulticlassAUROC(4, average="samples")


def test_multiclass_auroc_of_logits_is_that_of_their_softmax_as_in_torchmetrics(multiclass):
    scores, target = multiclass  # raw logits, values outside [0, 1]
    got = float(feed(ln.metrics.MulticlassAUROC(num_classes=4), scores * 3, target))
    assert got == pytest.approx(float(multiclass_auroc(scores * 3, target, num_classes=4, thresholds=None)), rel=1e-6)
    probs = torch.softmax(scores * 3, dim=1)
    assert got == pytest.approx(roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr"), rel=1e-6)


# ---------------------------------------------------------------------------- from issue 11


class CountBatches(ln.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_begin(self, ctx):
        self.n += 1


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
