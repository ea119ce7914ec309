"""Issue #14, item 2: ``fit(..., sample_weight=w)`` and ``evaluate(..., sample_weight=w)``: per-sample losses, exact
weighted epoch loss and weighted metrics, compared with hand-written weighted computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import PairDataset
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

import lanterna as ln


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[0.5], [-1.0], [2.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    w = torch.rand(n, generator=g) * 2
    return x, y, w


def _setup(**kw):
    return ln.setup(nn.Linear, loss=kw.pop("loss", nn.MSELoss()), optimizer=torch.optim.SGD, **kw).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.05)


def test_a_weighted_fit_equals_the_hand_written_weighted_loop():
    x, y, w = _data()
    fitted = _setup().fit((x, y), epochs=3, seed=0, verbose=False, sample_weight=w,
                          dataloader_options={"batch_size": 16})
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader's base seed draw
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        order = torch.randperm(96, generator=torch.Generator().manual_seed(seed))
        for i in range(0, 96, 16):
            idx = order[i:i + 16]
            wb = w[idx]
            loss_i = F.mse_loss(model(x[idx]), y[idx], reduction="none").reshape(16, -1).sum(1)
            loss = (wb * loss_i).sum() / (wb * torch.ones(16)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p, q in zip(fitted.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_the_weighted_evaluation_equals_the_whole_set_values():
    x, y, w = _data()
    fitted = _setup(metrics=[ln.metrics.MAE(), ln.metrics.RMSE()]).fit((x, y), epochs=1, verbose=False)
    ev = fitted.evaluate((x, y), sample_weight=w, dataloader_options={"batch_size": 10})
    with torch.no_grad():
        err = fitted.model(x) - y
    wmse = float((w * err[:, 0] ** 2).sum() / w.sum())
    assert ev["loss"] == pytest.approx(wmse, rel=1e-6)
    assert ev["mae"] == pytest.approx(float((w * err[:, 0].abs()).sum() / w.sum()), rel=1e-6)
    assert ev["rmse"] == pytest.approx(wmse ** 0.5, rel=1e-6)


def test_weight_zero_means_no_influence():
    x, y, w = _data()
    w[::3] = 0.0
    fitted = _setup(metrics=[ln.metrics.MAE()]).fit((x, y), epochs=1, verbose=False)
    weighted = fitted.evaluate((x, y), sample_weight=(w > 0).float())
    kept = fitted.evaluate((x[w > 0], y[w > 0]))
    assert weighted["loss"] == pytest.approx(kept["loss"], rel=1e-6)
    assert weighted["mae"] == pytest.approx(kept["mae"], rel=1e-6)


def test_class_weights_and_sample_weights_together_are_exact():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(90, 4, generator=g), torch.randint(0, 3, (90,), generator=g)
    y[::11] = -100
    w = torch.rand(90, generator=g)
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5]))
    fitted = ln.setup(nn.Linear, loss=loss, metrics=[ln.metrics.Accuracy(ignore_index=-100)]).set_hparams(
        in_features=4, out_features=3).fit((x, y), epochs=1, verbose=False)
    ev = fitted.evaluate((x, y), sample_weight=w, dataloader_options={"batch_size": 16})
    with torch.no_grad():
        scores = fitted.model(x)
    keep = y != -100
    per = F.cross_entropy(scores, y, weight=loss.weight, reduction="none")
    share = loss.weight[y.clamp(min=0)] * keep
    assert ev["loss"] == pytest.approx(float((w * per).sum() / (w * share).sum()), rel=1e-6)
    hits = (scores.argmax(1) == y) & keep
    assert ev["acc"] == pytest.approx(float((w * hits).sum() / (w * keep).sum()), rel=1e-6)


def test_a_dataset_and_tensors_give_the_same_weighted_fit():
    x, y, w = _data()
    a = _setup().fit((x, y), epochs=2, seed=3, verbose=False, sample_weight=w, dataloader_options={"batch_size": 16})
    b = _setup().fit(PairDataset(x, y), epochs=2, seed=3, verbose=False, sample_weight=w,
                     dataloader_options={"batch_size": 16})
    c = _setup().fit(DataLoader(PairDataset(x, y), batch_size=16, shuffle=True), epochs=2, seed=3, verbose=False,
                     sample_weight=w)
    for p, q, r in zip(a.model.parameters(), b.model.parameters(), c.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_a_validation_fraction_keeps_its_samples_weights():
    x, y, w = _data(100)
    fitted = _setup().fit((x, y), epochs=1, seed=0, verbose=False, valid_data=0.3, sample_weight=w)
    unweighted = _setup().fit((x, y), epochs=1, seed=0, verbose=False, valid_data=0.3)
    assert fitted.history[0]["valid_loss"] != pytest.approx(unweighted.history[0]["valid_loss"], rel=1e-4)
    ones = _setup().fit((x, y), epochs=1, seed=0, verbose=False, valid_data=0.3, sample_weight=torch.ones(100))
    assert ones.history[0]["valid_loss"] == pytest.approx(unweighted.history[0]["valid_loss"], rel=1e-6)


def test_weighted_aurocs_equal_scikit_learns():
    g = torch.Generator().manual_seed(2)
    scores, labels = torch.rand(200, generator=g), torch.randint(0, 2, (200,), generator=g)
    scores[::5] = 0.5  # ties
    w = torch.rand(200, generator=g)
    m = ln.metrics.BinaryAUROC()
    m.update(scores, labels, w)
    assert float(m.compute()) == pytest.approx(roc_auc_score(labels, scores, sample_weight=w), rel=1e-6)
    probs = torch.softmax(torch.randn(200, 3, generator=g), 1)
    classes = torch.randint(0, 3, (200,), generator=g)
    onehot = F.one_hot(classes, 3).numpy()
    for average in ("macro", "weighted", "micro"):
        mc = ln.metrics.MulticlassAUROC(num_classes=3, average=average)
        mc.update(probs, classes, w)
        assert float(mc.compute()) == pytest.approx(
            roc_auc_score(onehot, probs.numpy(), average=average, sample_weight=w.numpy()), rel=1e-6), average


def test_a_metric_that_cannot_take_weights_is_an_error_before_training():
    class Plain(ln.metrics.LanternaMetric):
        name, display_name = "plain", "Plain"

        def __init__(self):
            super().__init__()
            self.add_state("total", torch.tensor(0.0))

        def update(self, pred, target):
            self.total += pred.sum()

        def compute(self):
            return self.total

    x, y, w = _data()
    with pytest.raises(ln.LanternaError, match="'plain'.*cannot take sample weights"):
        _setup(metrics=[Plain()]).fit((x, y), epochs=1, verbose=False, sample_weight=w)


def test_a_loss_without_per_sample_values_is_a_clear_error():
    x, y, w = _data()
    with pytest.raises(ln.LanternaError, match="reduction='none'"):
        _setup(loss=lambda p, t: F.mse_loss(p, t)).fit((x, y), epochs=1, verbose=False, sample_weight=w)


@pytest.mark.parametrize("bad, match", [(torch.ones(10), "10 weights but"), (-torch.ones(96), "negative"),
                                        (torch.ones(96, 2), "1-D"), (torch.full((96,), float("nan")), "NaN"),
                                        (torch.zeros(96), "all zeros")])
def test_bad_weights_are_refused_before_training(bad, match):
    x, y, _ = _data()
    with pytest.raises(ln.DataError, match=match):
        _setup().fit((x, y), epochs=1, verbose=False, sample_weight=bad)


def test_a_wrapped_source_keeps_the_weights():
    """Sources that wrap others (FastDevRun's, a resume's batch skipper) carry the weights through."""
    x, y, w = _data()
    fitted = _setup().fit((x, y), epochs=1, verbose=False, sample_weight=w, callbacks=[ln.callbacks.FastDevRun()],
                          dataloader_options={"batch_size": 16, "shuffle": False})
    torch.manual_seed(0)
    ref = _setup().fit((x[:16], y[:16]), epochs=1, verbose=False, sample_weight=w[:16],
                       dataloader_options={"batch_size": 16, "shuffle": False}, seed=0)
    torch.manual_seed(0)
    again = _setup().fit((x, y), epochs=1, verbose=False, sample_weight=w, callbacks=[ln.callbacks.FastDevRun()],
                         dataloader_options={"batch_size": 16, "shuffle": False}, seed=0)
    for p, q in zip(again.model.parameters(), ref.model.parameters()):
        assert torch.equal(p, q)
    assert fitted.history[0]["train_loss"] > 0
