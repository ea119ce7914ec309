"""The hot path's shortcuts change no result: batched metric updates (exact, errors still at the first batch),
the zero_grad shortcut (custom optimizers and the profiler still see theirs), DataLoader settings chosen for
the device and the dataset (pin_memory on CUDA, workers for costly datasets, the user's options kept)."""

from __future__ import annotations

import random
import sys
import time

import pytest
import torch
from conftest import MLPClassifier, Net, make_blobs, make_luz_data
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import lanterna as ln
from lanterna.callbacks import metrics as metrics_module
from lanterna.callbacks.metrics import MetricsCallback
from lanterna.core.context import Context
from lanterna.data import LoaderBatches, make_source
from lanterna.data.sources import auto_num_workers
from lanterna.errors import LanternaError

# --------------------------------------------------------------------------- batched metric updates


def _history(monkeypatch, batched: bool, flush_every: int = 3):
    if batched:
        monkeypatch.setattr(metrics_module, "FLUSH_BATCHES", flush_every)
    else:  # every metric updated every batch, as torchmetrics are
        monkeypatch.setattr(metrics_module, "LanternaMetric", type("NoMetric", (), {}))
    x, y = make_luz_data(n=403)  # uneven last batches: 323 = 16 * 20 + 3 and 80 = 16 * 5
    reg = (ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE(), ln.metrics.MSE()])
           .fit((x[:323], y[:323]), epochs=3, valid_data=(x[323:], y[323:]), verbose=False, seed=1,
                dataloader_options={"batch_size": 16}))
    xc, yc = make_blobs(n=203)
    clf = (ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(),
                    metrics=[ln.metrics.Accuracy(), ln.metrics.MulticlassAUROC(num_classes=3)])
           .fit((xc, yc), epochs=2, valid_data=0.25, verbose=False, seed=1, dataloader_options={"batch_size": 10}))
    monkeypatch.undo()
    return reg.history, clf.history


def test_batched_updates_give_the_per_batch_values(monkeypatch):
    per_batch = _history(monkeypatch, batched=False)
    batched = _history(monkeypatch, batched=True)
    for h_ref, h in zip(per_batch, batched):
        for rec_ref, rec in zip(h_ref, h):
            assert rec.keys() == rec_ref.keys()
            for k, v in rec_ref.items():
                if k != "epoch_time":
                    assert rec[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_the_epoch_values_are_exact_over_all_samples(monkeypatch):
    monkeypatch.setattr(metrics_module, "FLUSH_BATCHES", 4)
    x, y = make_luz_data(n=203)

    class Frozen(nn.Module):  # a model that does not change: the epoch's metrics are those of one model
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x)

    fitted = ln.setup(Frozen, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()]).set_opt_hparams(
        lr=0.0).fit((x, y), epochs=1, valid_data=(x[:37], y[:37]), verbose=False, seed=0,
                    dataloader_options={"batch_size": 8})
    with torch.no_grad():
        err = fitted.model(x) - y
        verr = fitted.model(x[:37]) - y[:37]
    rec = fitted.history[0]
    assert rec["train_loss"] == pytest.approx(float(err.square().mean()), rel=1e-6)
    assert rec["train_mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)
    assert rec["train_rmse"] == pytest.approx(float(err.square().mean().sqrt()), rel=1e-6)
    assert rec["valid_loss"] == pytest.approx(float(verr.square().mean()), rel=1e-6)
    assert rec["valid_mae"] == pytest.approx(float(verr.abs().mean()), rel=1e-6)


def test_a_metric_shape_error_still_stops_fit_at_the_first_batch():
    x, y = make_luz_data(n=200)
    steps: list[int] = []

    class CountSteps(ln.Callback):
        def on_train_batch_after_step(self, ctx):
            steps.append(ctx.iter)

    class TwoOutputs(nn.Module):  # predicts (N, 2) against targets (N, 1): the loss broadcasts, MAE refuses
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    setup = ln.setup(TwoOutputs, loss=lambda p, t: (p - t).square().mean(), metrics=[ln.metrics.MAE()])
    with pytest.raises(LanternaError, match=r"\(20, 2\).*\(20, 1\)"):
        setup.fit((x, y), epochs=2, verbose=False, dataloader_options={"batch_size": 20},
                  callbacks=[CountSteps()])
    assert steps == [1], "the error must come at the first batch, not after the epoch"


def _phase(cb: MetricsCallback, batches, training: bool = True) -> dict:
    ctx = Context(device=torch.device("cpu"), training=training, set_name="train" if training else "valid",
                  record={}, loss_fn=nn.MSELoss())
    cb.on_fit_begin(ctx)
    cb.on_train_begin(ctx)
    for pred, target in batches:
        ctx.pred, ctx.target, ctx.batch_size = pred, target, len(pred)
        ctx.loss = nn.functional.mse_loss(pred.float(), target.float()) if pred.shape == target.shape else None
        cb.on_train_batch_end(ctx)
    cb.on_train_end(ctx)
    return ctx.record


def test_batches_that_do_not_concatenate_are_updated_one_by_one(monkeypatch):
    monkeypatch.setattr(metrics_module, "FLUSH_BATCHES", 8)
    g = torch.Generator().manual_seed(0)
    # sequence outputs (N, C, L) with a different length L in every batch
    batches = [(torch.randn(4, 3, n, generator=g), torch.randint(0, 3, (4, n), generator=g)) for n in (5, 7, 2, 9)]
    record = _phase(MetricsCallback([ln.metrics.Accuracy()], []), batches)
    hits = sum(int((p.argmax(1) == t).sum()) for p, t in batches)
    assert record["train_acc"] == pytest.approx(hits / sum(t.numel() for _, t in batches))


def test_a_mid_phase_checkpoint_sees_every_batch_so_far(monkeypatch):
    monkeypatch.setattr(metrics_module, "FLUSH_BATCHES", 64)
    cb = MetricsCallback([ln.metrics.MAE()], [])
    ctx = Context(device=torch.device("cpu"), training=True, set_name="train", record={}, loss_fn=nn.MSELoss())
    cb.on_fit_begin(ctx)
    cb.on_train_begin(ctx)
    pred, target = torch.ones(5, 1), torch.zeros(5, 1)
    for _ in range(3):
        ctx.pred, ctx.target, ctx.batch_size, ctx.loss = pred, target, 5, torch.tensor(2.0)
        cb.on_train_batch_end(ctx)
    state = cb.phase_state_dict()
    assert float(state["loss_sum"]) == pytest.approx(2.0 * 15)
    assert state["count"] == 15
    assert float(state["metrics"][0]["state"]["error_sum"]) == pytest.approx(15.0)


# --------------------------------------------------------------------------- zero_grad


def test_gradients_are_dropped_after_each_step():
    x, y = make_luz_data(n=64)
    grads: list[bool] = []

    class Check(ln.Callback):
        def on_train_batch_after_step(self, ctx):
            grads.append(all(p.grad is None for p in ctx.model.parameters()))

    ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.01).fit(
        (x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16}, callbacks=[Check()])
    assert grads == [True] * 4


def test_an_optimizer_with_its_own_zero_grad_keeps_it():
    calls: list[bool] = []

    class MySGD(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    x, y = make_luz_data(n=64)
    ln.setup(Net, loss=nn.MSELoss(), optimizer=MySGD).set_opt_hparams(lr=0.01).fit(
        (x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16})
    assert calls.count(True) >= 4


def test_the_profiler_still_records_zero_grad():
    x, y = make_luz_data(n=32)
    setup = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.01)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        setup.fit((x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16})
    names = {e.name for e in prof.events()}
    assert any("zero_grad" in n for n in names), sorted(n for n in names if "Optimizer" in n)


# --------------------------------------------------------------------------- DataLoader settings


class Costly(Dataset):
    """Samples that take time to load (like decoding files): deterministic content."""

    def __init__(self, n: int, cost_s: float = 6e-4) -> None:
        self.x, self.y = make_luz_data(n=n)
        self.cost_s = cost_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        time.sleep(self.cost_s)
        return self.x[i], self.y[i]


class Cheap(Costly):
    def __init__(self, n: int) -> None:
        super().__init__(n, cost_s=0.0)


class Stream(IterableDataset):
    def __iter__(self):
        for i in range(100):
            time.sleep(1e-3)
            yield torch.tensor([float(i)] * 3), torch.tensor([0.0])


fork_only = pytest.mark.skipif(not sys.platform.startswith("linux") or len(__import__("os").sched_getaffinity(0)) < 2,
                               reason="workers are chosen only where processes fork (Linux) and there are 2+ CPUs")


@fork_only
def test_workers_for_a_costly_dataset_none_for_a_cheap_one_or_a_stream():
    assert auto_num_workers(Costly(400), 32) >= 2
    assert auto_num_workers(Cheap(400), 32) == 0
    assert auto_num_workers(Costly(40), 32) == 0  # a whole epoch loads faster than workers start
    assert auto_num_workers(Stream(), 32) == 0
    assert auto_num_workers(TensorDataset(torch.zeros(10_000, 3)), 32) == 0


def test_the_probe_leaves_the_random_streams_alone():
    class Random(Costly):
        def __getitem__(self, i):
            torch.rand(1), random.random()
            return super().__getitem__(i)

    torch.manual_seed(0)
    random.seed(0)
    auto_num_workers(Random(400), 32)
    after = torch.rand(1).item(), random.random()
    torch.manual_seed(0)
    random.seed(0)
    assert (torch.rand(1).item(), random.random()) == after


@fork_only
def test_fit_on_a_costly_dataset_uses_workers_and_gets_the_same_result():
    setup = ln.setup(Net, loss=nn.MSELoss()).set_opt_hparams(lr=0.01)
    auto = setup.fit(Costly(400), epochs=1, verbose=False, seed=3, dataloader_options={"batch_size": 40})
    assert auto.context.train_data.loader.num_workers >= 2
    single = setup.fit(Costly(400), epochs=1, verbose=False, seed=3,
                       dataloader_options={"batch_size": 40, "num_workers": 0})
    assert single.context.train_data.loader.num_workers == 0
    for a, b in zip(auto.model.parameters(), single.model.parameters()):
        assert torch.equal(a, b)
    assert auto.history[0]["train_loss"] == single.history[0]["train_loss"]


def test_pin_memory_on_cuda_unless_the_user_said_otherwise():
    cuda = torch.device("cuda", 0)  # only the loader's settings are checked: nothing touches the device
    chosen = make_source(Cheap(64), train=True, options={"batch_size": 8}).to_device(cuda)
    assert isinstance(chosen, LoaderBatches) and chosen.loader.pin_memory
    kept = make_source(Cheap(64), train=True, options={"batch_size": 8, "pin_memory": False}).to_device(cuda)
    assert not kept.loader.pin_memory
    on_cpu = make_source(Cheap(64), train=True, options={"batch_size": 8}).to_device(torch.device("cpu"))
    assert not on_cpu.loader.pin_memory
    assert on_cpu.loader.batch_size == 8 and on_cpu.num_batches() == 8


def test_the_users_num_workers_is_kept():
    src = make_source(Costly(400), train=True, options={"batch_size": 32, "num_workers": 0})
    assert src.to_device(torch.device("cpu")).loader.num_workers == 0
