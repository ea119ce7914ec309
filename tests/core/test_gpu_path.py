"""The GPU path (issue 15, item 4): no host synchronisation inside the batches, the NaN guard decided on the device,
host-to-device copies on a side stream, compile modes for CUDA graphs.

What can be checked on the CPU is checked here on the CPU:

- every op that makes the host wait for a CUDA device (``.item()`` / ``bool()`` / ``float()`` all dispatch to
  ``aten._local_scalar_dense``; ``nonzero``, boolean-mask indexing, ``unique``, ``equal`` ...) is counted by a
  ``TorchDispatchMode`` during a whole fit with validation and a metric and the device-side NaN guard (forced on
  the CPU, with the fused optimizer lanterna builds on CUDA): none may run inside a batch, i.e. outside the
  ``allowed_sync()`` regions that mark the natural synchronisation points, and the ones at those points may not
  grow with the number of batches;
- the side-stream wrapper hands the source's batches over unchanged and in order, each fetched inside the
  side stream's context and handed over before the loop sees it (with a recording stand-in for the streams);
- ``compile="default"`` reaches torch.compile and trains like eager; a bad compile setting is a clear error;
- the optimizer policy: Adam/AdamW/SGD built fused on CUDA unless the user chose.

The tests marked ``cuda`` run the same claims on a GPU (skipped without one); on a CUDA machine run
``.venv/bin/python -m pytest -q tests/core/test_gpu_path.py``.
"""

from __future__ import annotations

import collections
import traceback
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import Net, make_luz_data
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lanterna as ln
from lanterna.core import sync
from lanterna.core.fused import fused_opt_hparams, skips_on_device
from lanterna.data.prefetch import PrefetchedBatches, copies_per_batch, device_batches
from lanterna.data.sources import LoaderBatches, TensorBatches, WrappedSource

aten = torch.ops.aten
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ops that make the host wait for a CUDA device (the value, or the size of the result, comes back to the host)
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default,
           aten.unique_dim.default, aten.repeat_interleave.Tensor}


class CountSyncs(TorchDispatchMode):
    """Counts syncing ops inside ``allowed_sync()`` regions and outside them (with where the latter ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = 0
        self.inside: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        syncing = func in SYNCING or (
            func.overloadpacket in (aten.index, aten.index_put_, aten.index_put)  # boolean-mask indexing
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None))
        if syncing:
            if sync.in_allowed_sync():
                self.allowed += 1
            else:
                frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
                at = f" at {frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else ""
                self.inside[f"{func}{at}"] += 1
        return func(*args, **(kwargs or {}))


class PlainDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _device_guard() -> ln.callbacks.TerminateOnNaN:
    guard = ln.callbacks.TerminateOnNaN()
    guard._on_device = True  # the accelerator's path, on the CPU
    return guard


class FirstFetchMarked(WrappedSource):
    """What the loop iterates on CUDA (data/prefetch.py), without the streams: the epoch's first fetch (a
    sampler's draws, its order copied to the device) is a natural synchronisation point."""

    def __iter__(self):
        return iter(PrefetchedBatches(self.source, None))


class AsOnCuda(ln.Callback):
    order = -10_000

    def on_fit_begin(self, ctx):
        ctx.train_data = FirstFetchMarked(ctx.train_data)
        if ctx.valid_data is not None:
            ctx.valid_data = FirstFetchMarked(ctx.valid_data)


def _counted_fit(batches: int, form: str) -> CountSyncs:
    x, y = make_luz_data(n=16 * 20)
    xt, yt, xv, yv = x[:256], y[:256], x[256:], y[256:]
    bs = 256 // batches
    if form == "tensors":
        train, valid = (xt, yt), (xv, yv)
    else:
        train, valid = PlainDataset(xt, yt), PlainDataset(xv, yv)
    guard = _device_guard()
    setup = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()]).set_opt_hparams(
        fused=True)  # what lanterna builds on CUDA (core/fused.py)
    counter = CountSyncs()
    with counter:
        setup.fit(train, epochs=3, valid_data=valid, verbose=False, seed=0, callbacks=[guard, AsOnCuda()],
                  dataloader_options={"batch_size": bs})
    assert guard._decided_on_device
    return counter


@pytest.mark.parametrize("form", ["tensors", "dataset"])
def test_a_fit_with_the_device_side_nan_guard_syncs_only_at_its_natural_points(form):
    few, many = _counted_fit(4, form), _counted_fit(16, form)
    assert not few.inside and not many.inside, f"syncing ops inside batches: {dict(many.inside)}"
    assert few.allowed > 0  # the epoch ends do read (metrics, the guard's flag): the counter sees them
    assert many.allowed == few.allowed, f"reads at the natural points grow with the batches: {few.allowed} → " \
                                        f"{many.allowed}"


def test_the_counter_sees_a_read_inside_a_batch():
    """The instrument: the per-step read of the CPU guard with a non-fused optimizer is a read inside batches."""
    class ReadLoss(ln.Callback):
        def on_train_batch_end(self, ctx):
            float(ctx.loss.detach())

    x, y = make_luz_data(n=64)
    counter = CountSyncs()
    with counter:
        ln.setup(Net, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False, callbacks=[ReadLoss()],
                                             dataloader_options={"batch_size": 16})
    assert sum(counter.inside.values()) >= 4


def test_allowed_sync_nests_and_restores():
    assert not sync.in_allowed_sync()
    with sync.allowed_sync():
        with sync.allowed_sync():
            assert sync.in_allowed_sync()
        assert sync.in_allowed_sync()
    assert not sync.in_allowed_sync()
    with pytest.raises(ValueError), sync.allowed_sync():
        raise ValueError
    assert not sync.in_allowed_sync()


# ---------------------------------------------------------------------------- the side stream (data/prefetch.py)


class RecordingStreams:
    """Stands in for CudaStreams: records the order of start / fetch / hand-over."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fetching_now = False

    def start(self) -> None:
        self.log.append("start")

    def fetching(self):
        streams = self

        class Ctx:
            def __enter__(self):
                streams.fetching_now = True

            def __exit__(self, *exc):
                streams.fetching_now = False

        return Ctx()

    def hand_over(self, tensors) -> None:
        self.log.append(f"hand_over {[int(t[0]) for t in tensors]}")


class Watched:
    """A source whose generator logs each fetch, whether it ran in the side stream's context and inside
    allowed_sync, and whether it was closed."""

    def __init__(self, streams: RecordingStreams, n: int) -> None:
        self.streams, self.n, self.closed = streams, n, False

    def __iter__(self):
        try:
            for i in range(self.n):
                self.streams.log.append(f"fetch {i} side={self.streams.fetching_now} allowed={sync.in_allowed_sync()}")
                yield (torch.tensor([float(i)]), {"y": torch.tensor([10 + i])})
        finally:
            self.closed = True


def test_prefetched_batches_pass_through_in_order_each_handed_over_before_the_loop_sees_it():
    streams = RecordingStreams()
    source = Watched(streams, 3)
    seen = []
    for batch in PrefetchedBatches(source, streams):
        streams.log.append(f"loop {int(batch[0][0])}")
        seen.append(batch)
    assert [(int(b[0][0]), int(b[1]["y"][0])) for b in seen] == [(0, 10), (1, 11), (2, 12)]
    assert streams.log == [
        "start", "fetch 0 side=True allowed=True",  # the epoch's first fetch: a natural sync point
        "hand_over [0, 10]", "loop 0",
        "fetch 1 side=True allowed=False", "hand_over [1, 11]", "loop 1",  # one batch at a time: no read-ahead
        "fetch 2 side=True allowed=False", "hand_over [2, 12]", "loop 2",
    ]
    assert source.closed


def test_prefetched_batches_close_the_source_when_the_loop_leaves_early_and_pass_errors_through():
    streams = RecordingStreams()
    source = Watched(streams, 5)
    it = iter(PrefetchedBatches(source, streams))
    next(it)
    it.close()  # Ctrl-C after the first batch
    assert source.closed and streams.log.count("start") == 1

    def broken():
        yield torch.zeros(1)
        raise RuntimeError("a bad sample")

    with pytest.raises(RuntimeError, match="a bad sample"):
        list(PrefetchedBatches(broken(), RecordingStreams()))
    assert list(PrefetchedBatches([], RecordingStreams())) == []


def test_without_streams_only_the_first_fetch_is_marked():
    marks = []

    def gen():
        for i in range(3):
            marks.append(sync.in_allowed_sync())
            yield i

    assert list(PrefetchedBatches(gen(), None)) == [0, 1, 2]
    assert marks == [True, False, False]


def test_which_sources_get_the_side_stream():
    on_device = TensorBatches([torch.zeros(8), torch.zeros(8)], ("tuple", [None, None]), batch_size=4)
    assert not copies_per_batch(on_device)
    staged = TensorBatches([torch.zeros(8)], ("tuple", [None]), batch_size=4)
    staged._stage_device = torch.device("cuda", 0)  # what to_device sets for data too big for the GPU
    assert copies_per_batch(staged)
    assert copies_per_batch(LoaderBatches(DataLoader(TensorDataset(torch.zeros(8)), batch_size=4)))
    assert device_batches(on_device, torch.device("cpu")) is on_device  # CPU: the plain source, no wrapper


# ---------------------------------------------------------------------------- optimizers that skip on the device


class _FakeCudaModel(nn.Module):
    """Only what fused_opt_hparams looks at: parameters on a CUDA device (nothing touches a device)."""

    def __init__(self, dtype=torch.float32, sparse=False) -> None:
        super().__init__()
        self.emb = nn.Embedding(2, 2, sparse=sparse)
        self._dtype = dtype

    def parameters(self, recurse: bool = True):
        floating = self._dtype.is_floating_point
        yield types.SimpleNamespace(device=torch.device("cuda", 0), is_floating_point=lambda: floating)


def test_lanterna_builds_adam_adamw_sgd_fused_on_cuda_unless_the_user_chose():
    model = _FakeCudaModel()
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        assert fused_opt_hparams(cls, {"lr": 0.1}, model) == {"lr": 0.1, "fused": True}
    assert fused_opt_hparams(ln.with_param_groups(torch.optim.AdamW), {}, model) == {"fused": True}
    assert fused_opt_hparams(torch.optim.Adam, {"foreach": True}, model) == {"foreach": True}
    assert fused_opt_hparams(torch.optim.Adam, {"fused": False}, model) == {"fused": False}
    assert fused_opt_hparams(torch.optim.RMSprop, {}, model) == {}  # no fused kernel
    assert fused_opt_hparams(torch.optim.Adam, {}, _FakeCudaModel(sparse=True)) == {}
    assert fused_opt_hparams(torch.optim.Adam, {}, _FakeCudaModel(dtype=torch.int64)) == {}
    assert fused_opt_hparams(torch.optim.Adam, {}, nn.Linear(3, 1)) == {}  # the CPU: as given


def test_which_optimizers_skip_on_the_device():
    p = nn.Parameter(torch.zeros(3))
    assert skips_on_device(torch.optim.Adam([p], fused=True))
    assert skips_on_device(torch.optim.Adagrad([p], fused=True))
    assert not skips_on_device(torch.optim.Adam([p]))
    assert not skips_on_device(torch.optim.Adam([p], foreach=True))
    mixed = torch.optim.Adam([{"params": [p]}], fused=True)
    mixed.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "fused": False})
    assert not skips_on_device(mixed)


# ---------------------------------------------------------------------------- compile modes


def _tiny_fit(compile):
    x, y = make_luz_data(64)
    return ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=1, seed=0, verbose=False, accelerator=ln.Accelerator(device="cpu", compile=compile),
        dataloader_options={"batch_size": 32})


@pytest.mark.filterwarnings("ignore:.*is deprecated. Please switch to:DeprecationWarning")
def test_compile_mode_reaches_torch_compile_and_trains_like_eager():
    compiled, eager = _tiny_fit("default"), _tiny_fit(False)
    forward = compiled.forward_model
    assert isinstance(forward.compiled, torch._dynamo.eval_frame.OptimizedModule) and not forward.eager
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_compile_settings_are_checked_at_once():
    assert ln.Accelerator(device="cpu", compile="reduce-overhead").compile_options() == {"mode": "reduce-overhead"}
    assert ln.Accelerator(device="cpu", compile=True).compile_options() == {}
    assert ln.Accelerator(device="cpu").compile_options() is None
    assert not ln.Accelerator(device="cpu", compile="reduce-overhead").uses_cuda_graphs  # CUDA graphs need CUDA
    with pytest.raises(ln.LanternaError, match=r"'reduce_overhead' is not a torch.compile mode \(did you mean "
                                               r"'reduce-overhead'\?\)"):
        ln.Accelerator(device="cpu", compile="reduce_overhead")
    with pytest.raises(ln.LanternaError, match=r"'mod' is not an argument of torch.compile \(did you mean 'mode'"):
        ln.Accelerator(device="cpu", compile={"mod": "default"})
    with pytest.raises(ln.LanternaError, match="'mode' or 'options', not both"):
        ln.Accelerator(device="cpu", compile={"mode": "default", "options": {"max_autotune": True}})
    with pytest.raises(ln.LanternaError, match=r"compile='True'\) is a string; pass the bool compile=True"):
        ln.Accelerator(device="cpu", compile="True")
    with pytest.raises(ln.LanternaError, match="a value of type int is not a compile setting"):
        ln.Accelerator(device="cpu", compile=1)


# ---------------------------------------------------------------------------- on a GPU (skipped without one)


@pytest.fixture
def sync_errors():
    """``arm()`` turns torch's sync debug mode to "error"; it is always turned off again."""
    yield lambda: torch.cuda.set_sync_debug_mode("error")
    torch.cuda.set_sync_debug_mode(0)


class ArmAtFirstBatch(ln.Callback):
    """Sync debug "error" from the first training batch to the last validation batch of the last epoch: every
    batch of every epoch and every epoch boundary but the last is checked (set-up before the loop is not)."""

    order = -10_000

    def __init__(self, arm) -> None:
        self.arm, self.armed = arm, False

    def on_train_batch_begin(self, ctx):
        if not self.armed:
            self.arm()
            self.armed = True

    def on_valid_batch_end(self, ctx):
        if ctx.epoch == ctx.max_epochs and ctx.iter == ctx.num_batches:
            torch.cuda.set_sync_debug_mode(0)


@cuda
@pytest.mark.parametrize("form", ["tensors", "dataset"])
def test_default_fit_has_no_per_batch_sync(form, sync_errors):
    x, y = make_luz_data(n=1024)
    train = (x[:768], y[:768]) if form == "tensors" else PlainDataset(x[:768], y[:768])  # a built, pinned loader
    valid = (x[768:], y[768:]) if form == "tensors" else PlainDataset(x[768:], y[768:])
    arm = ArmAtFirstBatch(sync_errors)
    fitted = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).fit(
        train, epochs=3, valid_data=valid, seed=0, verbose=False, callbacks=[arm],
        dataloader_options={"batch_size": 32}, accelerator=ln.Accelerator(device="cuda"))
    assert arm.armed and len(fitted.history) == 3
    assert fitted.optimizers["opt"].defaults["fused"] is True  # built fused: the NaN guard decides on the device
    nan = next(cb for cb in fitted.context.hooks.callbacks if isinstance(cb, ln.callbacks.TerminateOnNaN))
    assert nan._decided_on_device


@cuda
def test_nan_gradient_on_cuda_is_skipped_on_the_device_and_raised_at_the_epoch_end(sync_errors):
    x, y = make_luz_data(n=64)

    class SqrtAt:
        calls = 0

        def __call__(self, pred, target):
            SqrtAt.calls += pred.requires_grad
            loss = F.mse_loss(pred, target)
            return loss + torch.sqrt(pred.sum() * 0.0) if SqrtAt.calls == 4 + 3 else loss

    with pytest.raises(ln.NonFiniteLossError, match=r"gradient is NaN/Inf at epoch 2, batch 3 .*cuda device") as info:
        ln.setup(nn.Linear, loss=SqrtAt()).set_hparams(in_features=3, out_features=1).fit(
            (x, y), epochs=3, seed=0, verbose=False, callbacks=[ArmAtFirstBatch(sync_errors)],
            dataloader_options={"batch_size": 16, "shuffle": False}, accelerator=ln.Accelerator(device="cuda"))
    torch.cuda.set_sync_debug_mode(0)
    torch.manual_seed(0)
    ref = nn.Linear(3, 1).cuda()
    opt = torch.optim.Adam(ref.parameters(), fused=True)
    xc, yc = x.cuda(), y.cuda()
    for lo in (0, 16, 32, 48, 0, 16):
        opt.zero_grad()
        F.mse_loss(ref(xc[lo:lo + 16]), yc[lo:lo + 16]).backward()
        opt.step()
    for p, q in zip(info.value.fitted.model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5)
    assert [r["epoch"] for r in info.value.fitted.history] == [1]


@cuda
def test_batches_copied_on_the_side_stream_arrive_equal_and_in_order():
    x = torch.randn(4096, 64)
    y = torch.arange(4096)
    source = LoaderBatches(DataLoader(TensorDataset(x, y), batch_size=256, pin_memory=True),
                           device=torch.device("cuda", 0))
    batches = device_batches(source, torch.device("cuda", 0))
    assert isinstance(batches, PrefetchedBatches) and batches.streams is not None
    seen = []
    for xb, yb in batches:
        assert xb.is_cuda and yb.is_cuda
        seen.append((xb * 2).sum(1).cpu())  # compute on the current stream, which must see the copied values
        assert torch.equal(yb.cpu(), torch.arange(len(seen) * 256 - 256, len(seen) * 256))
    assert torch.equal(torch.cat(seen), (x * 2).sum(1))


@cuda
@pytest.mark.filterwarnings("ignore:.*is deprecated. Please switch to:DeprecationWarning")
def test_compile_reduce_overhead_uses_cuda_graphs_and_trains_like_eager():
    x, y = make_luz_data(n=1024)
    acc = ln.Accelerator(device="cuda", compile="reduce-overhead")
    assert acc.uses_cuda_graphs

    def fit(accelerator):
        return ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).fit(
            (x, y), epochs=3, valid_data=0.25, seed=0, verbose=False, accelerator=accelerator,
            dataloader_options={"batch_size": 64, "drop_last": True})

    graphed, eager = fit(acc), fit(ln.Accelerator(device="cuda"))
    assert not graphed.forward_model.eager
    for a, b in zip(graphed.history, eager.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_mae"] == pytest.approx(b["valid_mae"], rel=1e-4)
    assert torch.allclose(graphed.predict(x[:10]), eager.predict(x[:10]), atol=1e-4)
