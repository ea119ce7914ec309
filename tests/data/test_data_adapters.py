"""Data adapters (API.md §2): every accepted form → a batch source with the documented defaults."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PairDataset
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from lanterna.data import LoaderBatches, TensorBatches, make_source, to_tensor_leaves
from lanterna.errors import DataError


class Stream(IterableDataset):
    def __init__(self, n=10):
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield torch.full((2,), float(i)), torch.tensor([float(i)])


def batches(src):
    return [tuple(b) for b in src]


# ---------------------------------------------------------------------------- in-memory forms


def test_tensors_become_a_fast_path_source_with_the_documented_defaults():
    x, y = torch.randn(70, 3), torch.randn(70, 1)
    train = make_source((x, y), train=True)
    assert isinstance(train, TensorBatches)
    assert (train.batch_size, train.shuffle, train.drop_last) == (32, True, False)
    assert train.num_batches() == 3 and [len(b[0]) for b in train] == [32, 32, 6]
    valid = make_source((x, y), train=False)
    assert valid.shuffle is False
    got = batches(valid)
    assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(torch.cat([b[1] for b in got]), y)


def test_training_data_is_reshuffled_every_epoch_and_covers_every_sample_once():
    x = torch.arange(50.0)
    src = make_source((x, x), train=True, options={"batch_size": 8})
    e1 = torch.cat([b[0] for b in src])
    e2 = torch.cat([b[0] for b in src])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == x.tolist()
    assert not torch.equal(e1, e2)
    assert not torch.equal(e1, x)


def test_dataloader_options_apply_to_in_memory_data():
    x = torch.arange(10.0)
    src = make_source((x, x), train=True, options={"batch_size": 4, "shuffle": False, "drop_last": True})
    assert [b[0].tolist() for b in src] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_numpy_and_pandas_convert_floats_to_float32_and_keep_integer_targets_int64():
    x64 = np.random.default_rng(0).normal(size=(20, 3))
    y_int = np.arange(20, dtype=np.int32) % 3
    leaves, _ = to_tensor_leaves((x64, y_int))
    assert leaves[0].dtype == torch.float32 and leaves[1].dtype == torch.int64
    torch.testing.assert_close(leaves[0], torch.from_numpy(x64).float())
    df = pd.DataFrame(x64, columns=list("abc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from pandas' read-only views
        leaves, _ = to_tensor_leaves((df, pd.Series(y_int)))
    assert leaves[0].shape == (20, 3) and leaves[0].dtype == torch.float32
    assert leaves[1].dtype == torch.int64 and leaves[1].tolist() == y_int.tolist()


def test_non_numeric_pandas_columns_are_refused_with_a_fix():
    df = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]})
    with pytest.raises(DataError, match="not numeric.*get_dummies"):
        make_source((df, np.zeros(2)), train=True)


def test_nested_inputs_keep_their_structure():
    x1, x2, y = torch.randn(9, 2), torch.randn(9, 5), torch.randn(9, 1)
    (inp, tgt), = batches(make_source(((x1, x2), y), train=False, options={"batch_size": 9}))
    assert isinstance(inp, tuple) and torch.equal(inp[0], x1) and torch.equal(inp[1], x2)
    (b,) = list(make_source(({"wide": x1, "deep": x2}, y), train=False, options={"batch_size": 9}))
    assert isinstance(b[0], dict) and set(b[0]) == {"wide", "deep"} and torch.equal(b[0]["deep"], x2)


def test_a_bare_tensor_is_an_input_for_prediction():
    x = torch.randn(5, 2)
    (b,) = list(make_source(x, train=False))
    assert torch.equal(b[0] if isinstance(b, tuple) else b, x)


# ---------------------------------------------------------------------------- datasets and loaders


def test_a_tensor_dataset_or_a_subset_of_one_takes_the_fast_path():
    ds = TensorDataset(torch.randn(40, 2), torch.randn(40, 1))
    assert isinstance(make_source(ds, train=True), TensorBatches)
    sub = Subset(ds, [3, 1, 4, 15, 9])
    src = make_source(sub, train=False)
    assert isinstance(src, TensorBatches)
    (b,) = list(src)
    assert torch.equal(b[0], ds.tensors[0][[3, 1, 4, 15, 9]])


def test_a_general_dataset_is_wrapped_in_a_dataloader_with_defaults():
    ds = PairDataset(torch.randn(40, 2), torch.randn(40, 1))
    train = make_source(ds, train=True)
    assert isinstance(train, LoaderBatches)
    assert train.loader.batch_size == 32 and isinstance(train.loader.sampler, RandomSampler)
    valid = make_source(ds, train=False, options={"batch_size": 16})
    assert isinstance(valid.loader.sampler, SequentialSampler) and not valid.loader.drop_last
    assert [len(b[0]) for b in valid] == [16, 16, 8]
    unshuffled = make_source(ds, train=True, options={"batch_size": 16, "drop_last": True, "shuffle": False})
    assert isinstance(unshuffled.loader.sampler, SequentialSampler) and unshuffled.loader.drop_last
    assert [len(b[0]) for b in unshuffled] == [16, 16]


def test_a_custom_collate_or_sampler_keeps_the_dataloader():
    ds = TensorDataset(torch.randn(10, 2), torch.randn(10, 1))
    seen = []

    def collate(items):
        seen.append(len(items))
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    src = make_source(ds, train=True, options={"collate_fn": collate, "batch_size": 4})
    assert isinstance(src, LoaderBatches)
    assert len(list(src)) == 3 and seen == [4, 4, 2]
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    assert isinstance(make_source(loader, train=True), LoaderBatches)


def test_an_iterable_dataset_is_never_shuffled_by_lanterna():
    src = make_source(Stream(10), train=True, options={"batch_size": 4})
    assert isinstance(src, LoaderBatches)
    assert [b[1].flatten().tolist() for b in src] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(DataError, match="IterableDataset cannot be shuffled"):
        make_source(Stream(10), train=True, options={"shuffle": True})


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data",
    [
        pytest.param((torch.empty(0, 3), torch.empty(0, 1)), id="tensors"),
        pytest.param((np.empty((0, 3)), np.empty((0, 1))), id="arrays"),
        pytest.param(TensorDataset(torch.empty(0, 3), torch.empty(0, 1)), id="tensor-dataset"),
        pytest.param(PairDataset(torch.empty(0, 3), torch.empty(0, 1)), id="dataset"),
        pytest.param(DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0, 1))), id="dataloader"),
        pytest.param(DataLoader(PairDataset(torch.empty(0, 3), torch.empty(0, 1))), id="general-dataloader"),
    ],
)
def test_empty_data_is_refused(data):
    with pytest.raises(DataError, match="empty"):
        make_source(data, train=True)


def test_unsupported_types_are_refused_naming_what_is_accepted():
    with pytest.raises(DataError, match="Unsupported data of type str.*DataLoader"):
        make_source("data.csv", train=True)
    with pytest.raises(DataError, match="float.*Python lists.*torch.tensor"):
        make_source({"x": [1.0, 2.0]}, train=True)
    with pytest.raises(DataError, match="empty tuple"):
        make_source((), train=True)


def test_inputs_and_targets_of_different_lengths_are_refused():
    with pytest.raises(DataError, match=r"different numbers of samples.*\(4, 2\), \(5, 1\)"):
        make_source((torch.randn(4, 2), torch.randn(5, 1)), train=True)


def test_dataloader_options_with_a_dataloader_are_refused():
    dl = DataLoader(TensorDataset(torch.randn(4, 2)))
    with pytest.raises(DataError, match="dataloader_options.*DataLoader"):
        make_source(dl, train=True, options={"batch_size": 2})


def test_loader_options_that_need_a_dataloader_are_refused_for_in_memory_data():
    with pytest.raises(DataError, match="collate_fn.*Dataset and DataLoader"):
        make_source((torch.randn(4, 2),), train=True, options={"collate_fn": lambda b: b})
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        make_source((torch.randn(4, 2),), train=True, options={"batch_size": 0})


def test_a_batch_sampler_option_sets_the_batches_of_a_dataset():
    from torch.utils.data import BatchSampler

    ds = PairDataset(torch.arange(10.0), torch.arange(10.0))
    sampler = BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=False)
    src = make_source(ds, train=True, options={"batch_sampler": sampler})
    assert [b[0].tolist() for b in src] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    valid = make_source(ds, train=False, options={"batch_sampler": sampler, "shuffle": False, "drop_last": False})
    assert len(list(valid)) == 4


def test_persistent_workers_of_loaders_lanterna_builds_end_with_fit_and_predict():
    """With ``persistent_workers`` in dataloader_options, lanterna owns the loaders: their workers stop when
    fit / predict return. A user's own DataLoader keeps its workers (the user may iterate it again)."""
    import multiprocessing

    import lanterna as ln

    ds = PairDataset(torch.randn(64, 3), torch.randn(64, 1))
    before = set(multiprocessing.active_children())
    options = {"batch_size": 16, "num_workers": 2, "persistent_workers": True}
    fitted = ln.setup(torch.nn.Linear, loss=torch.nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        ds, epochs=2, valid_data=ds, verbose=False, dataloader_options=options)
    fitted.predict(ds, dataloader_options=options)
    assert set(multiprocessing.active_children()) - before == set()
    user = DataLoader(ds, batch_size=16, num_workers=1, persistent_workers=True)
    fitted.predict(user)
    assert len(set(multiprocessing.active_children()) - before) == 1
    del user
