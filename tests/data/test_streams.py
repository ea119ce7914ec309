"""IterableDatasets split across DataLoader workers in one process (data/streams.py; API.md §8): every sample once
per epoch, the self-sharding protocol, predictions in stream order, exact losses and metrics over a stream."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import lanterna as ln
from lanterna.data import StreamBatches, make_source
from lanterna.data.streams import ShardedStream, shard_sizes, stream_order
from lanterna.errors import DataError

N = 23  # not a multiple of any batch size or shard count used here


def stream_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Column 0 of x is the sample's index in the stream (the model ignores it)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.randn(n, 2, generator=g)], dim=1)
    y = x[:, 1:2] * 0.7 - x[:, 2:3] * 0.2 + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


class Stream(IterableDataset):
    """A stream of (x_i, y_i), read in order; ``set_epoch`` puts the epoch it was told into column 0's twin."""

    def __init__(self, n: int = N, sized: bool = True) -> None:
        self.x, self.y = stream_data(n)
        self.sized = sized
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for xi, yi in zip(self.x, self.y):
            yield torch.cat([xi, torch.tensor([float(self.epoch)])]), yi

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("no length")
        return len(self.x)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, 1:3])


class Seen(ln.Callback):
    """The stream indices (and the epoch the dataset was told) of every training batch, per epoch."""

    def __init__(self) -> None:
        self.indices: dict[int, list[int]] = {}
        self.epochs: dict[int, set[int]] = {}

    def on_train_batch_begin(self, ctx: ln.Context) -> None:
        self.indices.setdefault(ctx.epoch, []).extend(ctx.input[:, 0].long().tolist())
        self.epochs.setdefault(ctx.epoch, set()).update(ctx.input[:, 3].long().tolist())


def fit(data, epochs: int = 2, **kw) -> tuple[ln.Fitted, Seen]:
    seen = Seen()
    fitted = (ln.setup(Model, loss=nn.MSELoss(), optimizer=torch.optim.SGD, metrics=[ln.metrics.MAE()])
              .set_opt_hparams(lr=0.05)
              .fit(data, epochs=epochs, verbose=False, seed=0, callbacks=[seen], **kw))
    return fitted, seen


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_with_workers(workers: int) -> None:
    """num_workers=2 used to give each sample twice (each worker read the whole stream)."""
    fitted, seen = fit(Stream(), dataloader_options={"batch_size": 4, "num_workers": workers})
    for epoch in (1, 2):
        assert sorted(seen.indices[epoch]) == list(range(N))
        assert seen.epochs[epoch] == {epoch}, "the dataset's set_epoch reaches the workers every epoch"
    assert len(fitted.history) == 2


def test_a_users_dataloader_is_rebuilt_with_all_its_options_and_persistent_workers_see_each_epoch() -> None:
    calls = []

    def collate(items):
        calls.append(len(items))
        x, y = zip(*items)
        return torch.stack(x), torch.stack(y)

    def init(worker_id: int) -> None:
        torch.manual_seed(worker_id)

    dl = DataLoader(Stream(), batch_size=5, num_workers=2, collate_fn=collate, worker_init_fn=init,
                    persistent_workers=True, prefetch_factor=3, timeout=30, drop_last=False)
    src = make_source(dl, train=True)
    assert isinstance(src, StreamBatches) and src.loader is not dl
    rebuilt = src.loader
    assert isinstance(rebuilt.dataset, ShardedStream) and rebuilt.dataset.dataset is dl.dataset
    assert (rebuilt.batch_size, rebuilt.num_workers, rebuilt.collate_fn, rebuilt.worker_init_fn,
            rebuilt.persistent_workers, rebuilt.prefetch_factor, rebuilt.timeout) == (5, 2, collate, init, True, 3, 30)
    # shards of 12 and 11 samples in batches of 5: 3 + 3 batches, each worker's last one short
    assert src.num_batches() == 6
    fitted, seen = fit(dl, epochs=3)
    for epoch in (1, 2, 3):
        assert sorted(seen.indices[epoch]) == list(range(N))
        assert seen.epochs[epoch] == {epoch}, "persistent workers keep their copy: the epoch still reaches them"


@pytest.mark.parametrize("drop_last", [False, True])
def test_the_number_of_batches_is_exact(drop_last: bool) -> None:
    for workers, bs in [(2, 3), (2, 4), (1, 4), (0, 5)]:
        src = make_source(Stream(), train=drop_last,
                          options={"batch_size": bs, "num_workers": workers, "drop_last": drop_last})
        got = list(src)
        assert src.num_batches() == len(got)
        sizes = shard_sizes(N, 0, 1, workers)
        assert sum(len(b[0]) for b in got) == sum(k - (k % bs if drop_last else 0) for k in sizes)
    assert make_source(Stream(sized=False), train=True, options={"num_workers": 2}).num_batches() is None


def test_the_sharding_rule() -> None:
    """Sample i goes to shard i mod (ranks x workers); shard = rank x workers + worker."""
    assert [list(ShardedStream(range(10), rank=r, world_size=2)) for r in (0, 1)] == [[0, 2, 4, 6, 8],
                                                                                    [1, 3, 5, 7, 9]]
    assert shard_sizes(10, rank=0, world_size=2, num_workers=2) == [3, 3]  # shards 0, 1 of 4: 0,4,8 and 1,5,9
    assert shard_sizes(10, rank=1, world_size=2, num_workers=2) == [2, 2]  # shards 2, 3: 2,6 and 3,7
    assert len(ShardedStream(range(10), rank=1, world_size=2, num_workers=2)) == 4  # 2, 6, 3, 7
    got = sorted(int(b) for b in DataLoader(ShardedStream(range(10), rank=1, world_size=2, num_workers=2),
                                              batch_size=None, num_workers=2))
    assert got == [2, 3, 6, 7]


class Seekable(IterableDataset):
    """Reads only its shard when told which (the self-sharding protocol); each sample says which shard read it."""

    def __init__(self, n: int = N) -> None:
        self.x, self.y = stream_data(n)
        self.shard = (0, 1)

    def set_shard(self, shard_index: int, num_shards: int) -> None:
        self.shard = (shard_index, num_shards)

    def __iter__(self):
        index, count = self.shard
        for i in range(index, len(self.x), count):  # a seek: the other samples are never read
            yield torch.cat([self.x[i], torch.tensor([float(index), float(count)])]), self.y[i]


def test_a_self_sharding_dataset_reads_its_shard_and_is_not_filtered() -> None:
    src = make_source(Seekable(), train=True, options={"batch_size": 4, "num_workers": 2})
    assert src.num_batches() is None  # its shards' lengths are its own business
    rows = torch.cat([b[0] for b in src])
    assert sorted(rows[:, 0].long().tolist()) == list(range(N))  # nothing dropped: lanterna did not filter
    assert torch.equal(rows[:, 3].long(), rows[:, 0].long() % 2) and set(rows[:, 4].tolist()) == {2.0}
    # one shard: set_shard(0, 1), the whole stream
    rows = torch.cat([b[0] for b in make_source(Seekable(), train=False, options={"batch_size": 4})])
    assert rows[:, 0].long().tolist() == list(range(N)) and set(rows[:, 4].tolist()) == {1.0}
    fitted = ln.Fitted(Model(), None, [])
    with torch.no_grad():
        expected = fitted.model(stream_data()[0])
    pred = fitted.predict(Seekable(), dataloader_options={"batch_size": 4, "num_workers": 2})
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)


def test_a_dataset_that_splits_itself_without_saying_so_is_warned_about() -> None:
    class SplitsByWorker(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            return iter(range(0 if info is None else info.id, 10, 1 if info is None else info.num_workers))

    with pytest.warns(UserWarning, match="set_shard"):
        make_source(SplitsByWorker(), train=True, options={"num_workers": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_source(SplitsByWorker(), train=True)  # one shard: nothing split on top


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_returns_the_stream_order(workers: int) -> None:
    fitted = ln.Fitted(Model(), None, [])
    x, _ = stream_data()
    with torch.no_grad():
        expected = fitted.model(x)
    pred = fitted.predict(Stream(), dataloader_options={"batch_size": 4, "num_workers": workers})
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)
    # a user's loader, in_order=False (batches as workers finish them), and a dataset yielding whole batches
    pred = fitted.predict(DataLoader(Stream(), batch_size=3, num_workers=workers, in_order=False))
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)

    class Batches(IterableDataset):
        def __iter__(self):
            for start in range(0, N, 5):
                yield x[start:start + 5]

    pred = fitted.predict(DataLoader(Batches(), batch_size=None, num_workers=workers))
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)


def test_evaluate_and_validation_on_a_stream_equal_the_hand_computation() -> None:
    x, y = stream_data()
    model = Model()
    fitted = ln.Fitted(model, None, [], loss_fn=nn.MSELoss(), metrics=[ln.metrics.MAE()])
    result = fitted.evaluate(Stream(), dataloader_options={"batch_size": 4, "num_workers": 2})
    with torch.no_grad():
        pred = model(x)
    assert result["loss"] == pytest.approx(((pred - y) ** 2).mean().item(), rel=1e-6)
    assert result["mae"] == pytest.approx((pred - y).abs().mean().item(), rel=1e-6)
    # as validation data during fit: the epoch's valid_loss is over every sample once
    fitted, _ = fit(Stream(), epochs=1, valid_data=Stream(), dataloader_options={"batch_size": 4, "num_workers": 2})
    with torch.no_grad():
        pred = fitted.model(x)
    assert fitted.history[0]["valid_loss"] == pytest.approx(((pred - y) ** 2).mean().item(), rel=1e-6)


def test_training_on_a_stream_with_workers_equals_the_hand_written_loop() -> None:
    """One worker per shard and batches of 4: the loader alternates worker 0's and worker 1's batches; the same
    SGD steps by hand give the same weights."""
    fitted, _ = fit(Stream(), epochs=1, dataloader_options={"batch_size": 4, "num_workers": 2})
    torch.manual_seed(0)  # what fit(seed=0) does before building the model
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = stream_data()
    shards = [torch.arange(w, N, 2) for w in (0, 1)]
    batches = [s[i:i + 4] for i in range(0, 12, 4) for s in shards if len(s[i:i + 4])]
    for idx in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    for p, q in zip(fitted.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_stream_order_refuses_outputs_without_one_row_per_sample() -> None:
    with pytest.raises(DataError, match="one prediction row per sample"):
        stream_order(torch.zeros(2, 1), torch.tensor([0, 1, 2]))
