"""No host read of a tensor per batch in the hot path: every ``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool()``, ``float()``, ``int()`` of a tensor is counted while fit / evaluate / predict run on
data of 4 and of 16 batches per epoch. The count must not grow with the number of batches — on an accelerator
each of those reads waits for the device.

TerminateOnNaN, on by default, reads the loss before every optimizer step (to stop before a NaN poisons the
weights). On CPU that is a plain memory read through a NumPy view, no tensor read method (asserted here, with
the defaults); on an accelerator it is the only per-batch synchronisation (docs/performance.md), and
``TerminateOnNaN(enabled=False)`` removes it.
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from conftest import MLPClassifier, Net, make_blobs, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lanterna as ln

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_reads():
    """Count host reads of tensors by method, with the file:line that made each (for failure messages)."""
    counts: collections.Counter[str] = collections.Counter()
    where: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            stack = traceback.extract_stack(limit=16)[:-1]
            # torch's optimizers read their CPU step counters (Adam's bias correction): the optimizer's
            # business, and CPU tensors on every device, so no synchronisation.
            if not any("/torch/optim/" in f.filename for f in stack):
                counts[name] += 1
                frame = stack[-1]
                where[f"{name} at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts, where
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _reads(run) -> tuple[collections.Counter[str], collections.Counter[str]]:
    with count_reads() as (counts, where):
        run()
    return counts, where


class PlainDataset(Dataset):
    """A map-style dataset (not a TensorDataset): the DataLoader path rather than the fast path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _regression(batches: int, *, nan_check: bool, form: str):
    x, y = make_luz_data(n=16 * 20)
    xt, yt, xv, yv = x[:16 * 16], y[:16 * 16], x[16 * 16:], y[16 * 16:]
    bs = len(xt) // batches
    if form == "tensors":
        train, valid, opts = (xt, yt), (xv, yv), {"batch_size": bs}
    elif form == "dataloader":
        train = DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True)
        valid, opts = DataLoader(TensorDataset(xv, yv), batch_size=bs), None
    else:
        train, valid, opts = PlainDataset(xt, yt), PlainDataset(xv, yv), {"batch_size": bs}
    callbacks = [] if nan_check else [ln.callbacks.TerminateOnNaN(enabled=False)]
    setup = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()])

    def run():
        setup.fit(train, epochs=2, valid_data=valid, verbose=False, seed=0, callbacks=callbacks,
                  dataloader_options=opts)

    return run


@pytest.mark.parametrize("form", ["tensors", "dataloader", "dataset"])
def test_fit_reads_nothing_per_batch_without_the_nan_check(form):
    few, _ = _reads(_regression(4, nan_check=False, form=form))
    many, where = _reads(_regression(16, nan_check=False, form=form))
    assert many == few, f"host reads grow with the number of batches: {few} → {many}; {where.most_common(6)}"


@pytest.mark.parametrize("form", ["tensors", "dataloader"])
def test_with_the_default_nan_check_on_cpu_fit_reads_nothing_per_batch(form):
    few, _ = _reads(_regression(4, nan_check=True, form=form))
    many, where = _reads(_regression(16, nan_check=True, form=form))
    assert many == few, f"host reads grow with the number of batches: {few} → {many}; {where.most_common(6)}"


def test_classification_with_accuracy_and_auroc_reads_nothing_per_batch():
    x, y = make_blobs(n=256, n_classes=3)
    setup = ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(),
                     metrics=[ln.metrics.Accuracy(), ln.metrics.MulticlassAUROC(num_classes=3)])

    def run(batches: int):
        return lambda: setup.fit((x, y), epochs=2, valid_data=(x[:64], y[:64]), verbose=False, seed=0,
                                 dataloader_options={"batch_size": 256 // batches},
                                 callbacks=[ln.callbacks.TerminateOnNaN(enabled=False)])

    few, _ = _reads(run(4))
    many, where = _reads(run(16))
    assert many == few, f"{few} → {many}; {where.most_common(6)}"


def test_evaluate_and_predict_read_nothing_per_batch():
    x, y = make_luz_data(n=256)
    fitted = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).fit(
        (x, y), epochs=1, verbose=False, seed=0)
    for batches_few, batches_many in [(4, 16)]:
        few, _ = _reads(lambda b=batches_few: fitted.evaluate((x, y), dataloader_options={"batch_size": 256 // b}))
        many, where = _reads(lambda b=batches_many: fitted.evaluate((x, y),
                                                                    dataloader_options={"batch_size": 256 // b}))
        assert many == few, f"evaluate: {few} → {many}; {where.most_common(6)}"
        few, _ = _reads(lambda b=batches_few: fitted.predict(x, dataloader_options={"batch_size": 256 // b}))
        many, where = _reads(lambda b=batches_many: fitted.predict(x, dataloader_options={"batch_size": 256 // b}))
        assert many == few, f"predict: {few} → {many}; {where.most_common(6)}"


def test_the_counter_sees_a_loop_that_reads_every_batch():
    """The instrument itself: the seeds' loop (``loss.item()`` every batch) is caught."""
    x, y = make_luz_data(n=64)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def seed_loop(batches: int):
        def run():
            total = 0.0
            for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64 // batches):
                loss = nn.functional.mse_loss(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                total += loss.item()

        return run

    few, _ = _reads(seed_loop(2))
    many, _ = _reads(seed_loop(8))
    assert many["item"] - few["item"] == 6


@pytest.mark.parametrize("form", ["tensors", "dataloader"])
def test_ema_with_its_defaults_reads_nothing_per_batch(form):
    """EMA (issue 14): the per-step update is a fused lerp on the device; validating with the averaged weights
    swaps them in and out once per epoch. torch's ``AveragedModel.update_parameters`` would read its counter on
    the host every step (and, being in torch/optim/, escape this counter): lanterna does not call it per step."""

    def run(batches: int):
        x, y = make_luz_data(n=16 * 20)
        bs = 256 // batches
        setup = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
        train = (x[:256], y[:256]) if form == "tensors" else DataLoader(TensorDataset(x[:256], y[:256]),
                                                                          batch_size=bs, shuffle=True)
        opts = {"batch_size": bs} if form == "tensors" else None
        return lambda: setup.fit(train, epochs=2, valid_data=(x[256:], y[256:]), verbose=False, seed=0,
                                 dataloader_options=opts, callbacks=[ln.callbacks.EMA()])

    few, _ = _reads(run(4))
    many, where = _reads(run(16))
    assert many == few, f"host reads grow with the number of batches: {few} → {many}; {where.most_common(6)}"


@pytest.mark.parametrize("feature", ["sample_weight", "mixup"])
def test_sample_weights_and_mixup_read_nothing_per_batch(feature):
    """Sample weights (a per-sample loss weighted on the device) and Mixup (λ and the permutation drawn on the
    device) add no host read per batch (issue 14)."""

    def run(batches: int):
        x, y = make_luz_data(n=16 * 20)
        bs = 256 // batches
        setup = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
        extra = ({"sample_weight": torch.rand(256, generator=torch.Generator().manual_seed(0))}
                 if feature == "sample_weight" else {"callbacks": [ln.callbacks.Mixup()]})
        return lambda: setup.fit((x[:256], y[:256]), epochs=2, valid_data=(x[256:], y[256:]), verbose=False, seed=0,
                                 dataloader_options={"batch_size": bs}, **extra)

    few, _ = _reads(run(4))
    many, where = _reads(run(16))
    assert many == few, f"host reads grow with the number of batches: {few} → {many}; {where.most_common(6)}"
