"""The in-memory fast path gives exactly the DataLoader's batches: same permutation for the same random
state, the same random numbers drawn (so everything after is unchanged), drop_last, last-batch sizes — and
fit, evaluate and predict take it for tensors, a TensorDataset and a plain DataLoader over one."""

from __future__ import annotations

import pytest
import torch
from conftest import Net
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lanterna as ln
from lanterna.data import LoaderBatches, TensorBatches, make_source


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Row i holds the value i, so a batch's content tells which samples it took, in which order.
    return torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3), torch.arange(n)


def _batches(iterable) -> list[list[int]]:
    return [b[1].tolist() for b in iterable]


CASES = [
    pytest.param(10, 3, True, False, id="shuffled-uneven"),
    pytest.param(10, 3, True, True, id="shuffled-drop_last"),
    pytest.param(12, 4, True, False, id="shuffled-even"),
    pytest.param(10, 3, False, False, id="sequential-uneven"),
    pytest.param(10, 3, False, True, id="sequential-drop_last"),
    pytest.param(5, 8, True, False, id="batch-larger-than-data"),
]


@pytest.mark.parametrize("n, batch_size, shuffle, drop_last", CASES)
@pytest.mark.parametrize("with_generator", [False, True], ids=["global-rng", "generator"])
def test_same_batches_and_random_stream_as_the_dataloader(n, batch_size, shuffle, drop_last, with_generator):
    x, y = _data(n)

    def loader() -> DataLoader:
        gen = torch.Generator().manual_seed(7) if with_generator else None
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          generator=gen)

    source = make_source(loader(), train=True)
    assert isinstance(source, TensorBatches)
    reference = loader()
    torch.manual_seed(3)
    expected = [_batches(reference) for _ in range(3)]  # three epochs: reshuffled every epoch
    after_loader = torch.get_rng_state()
    torch.manual_seed(3)
    got = [_batches(source) for _ in range(3)]
    assert got == expected
    assert torch.equal(torch.get_rng_state(), after_loader), "the fast path drew other random numbers"
    sizes = [len(b) for b in got[0]]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    assert source.num_batches() == len(reference) == len(sizes)
    if shuffle:
        assert got[0] != got[1], "a new permutation every epoch"


def test_options_on_in_memory_data_match_a_dataloader_with_the_same_options():
    x, y = _data(23)
    opts = {"batch_size": 5, "shuffle": True, "drop_last": True}
    source = make_source((x, y), train=True, options=opts)
    assert isinstance(source, TensorBatches)
    torch.manual_seed(11)
    expected = _batches(DataLoader(TensorDataset(x, y), **opts))
    torch.manual_seed(11)
    assert _batches(source) == expected
    assert [len(b) for b in expected] == [5, 5, 5, 5]


def test_subset_of_a_tensor_dataset_keeps_the_fast_path_and_its_order():
    x, y = _data(30)
    sub = Subset(TensorDataset(x, y), [29, 3, 17, 8, 0, 11, 25])
    source = make_source(DataLoader(sub, batch_size=3), train=False)
    assert isinstance(source, TensorBatches)
    assert _batches(source) == [[29, 3, 17], [8, 0, 11], [25]]


def test_custom_sampler_or_collate_is_left_to_the_dataloader():
    x, y = _data(10)
    ds = TensorDataset(x, y)
    custom_collate = DataLoader(ds, batch_size=4, collate_fn=lambda items: items)
    custom_sampler = DataLoader(ds, batch_size=4, sampler=[9, 8, 7, 6, 5])
    assert isinstance(make_source(custom_collate, train=True), LoaderBatches)
    src = make_source(custom_sampler, train=True)
    assert isinstance(src, LoaderBatches)
    assert _batches(src) == [[9, 8, 7, 6], [5]]


class _Recorder(ln.Callback):
    def __init__(self) -> None:
        self.train: list[list[int]] = []
        self.valid: list[list[int]] = []

    def on_train_batch_begin(self, ctx) -> None:
        self.train.append(ctx.input[:, 0].long().tolist())

    def on_valid_batch_begin(self, ctx) -> None:
        self.valid.append(ctx.input[:, 0].long().tolist())


def test_fit_on_a_dataloader_trains_on_the_dataloaders_batches_in_its_order():
    x, y = _data(50)
    y = y.float().unsqueeze(1)
    train_dl = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=6, shuffle=True)
    valid_dl = DataLoader(TensorDataset(x[40:], y[40:]), batch_size=4)
    rec = _Recorder()
    fitted = (ln.setup(Net, loss=nn.MSELoss()).set_opt_hparams(lr=1e-3)
              .fit(train_dl, epochs=2, valid_data=valid_dl, verbose=False, seed=5, callbacks=[rec]))
    assert isinstance(fitted.context.train_data, TensorBatches)
    # The same draws by hand: seed, build the model (its initialisation draws first), iterate the loaders.
    torch.manual_seed(5)
    Net()
    expected_train, expected_valid = [], []
    for _ in range(2):
        expected_train += [xb[:, 0].long().tolist() for xb, _ in train_dl]
        expected_valid += [xb[:, 0].long().tolist() for xb, _ in valid_dl]
    assert rec.train == expected_train
    assert rec.valid == expected_valid
    assert [len(b) for b in rec.train[:7]] == [6, 6, 6, 6, 6, 6, 4]


def test_evaluate_and_predict_use_the_fast_path_and_keep_the_order():
    x, y = _data(37)
    y = y.float().unsqueeze(1)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=1, verbose=False, seed=0)
    assert isinstance(make_source(x, train=False), TensorBatches)
    pred = fitted.predict(x, dataloader_options={"batch_size": 5})
    with torch.no_grad():
        assert torch.allclose(pred, fitted.model(x))
    ev = fitted.evaluate((x, y), dataloader_options={"batch_size": 5})
    with torch.no_grad():
        assert ev.metrics["loss"] == pytest.approx(float(nn.functional.mse_loss(fitted.model(x), y)), rel=1e-6)
