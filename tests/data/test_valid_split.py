"""``valid_data`` as a fraction: seeded, shuffled, stratified for class targets, loaders rebuilt with their options."""

from __future__ import annotations

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

import lanterna as ln
from lanterna.data import LoaderBatches, TensorBatches, split_valid
from lanterna.errors import DataError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ids(src):
    """The first column of every sample a source yields, in order (sources over x = arange)."""
    if isinstance(src, TensorBatches):
        return src.leaves[0][:, 0].long().tolist() if src.leaves[0].dim() > 1 else src.leaves[0].long().tolist()
    return [int(v) for b in src for v in b[0].reshape(len(b[0]), -1)[:, 0]]


def test_same_seed_same_split_other_seed_other_split():
    x = torch.arange(100.0).unsqueeze(1)
    y = torch.randn(100, 1)
    a_tr, a_va = split_valid((x, y), 0.2, generator=gen(1))
    b_tr, b_va = split_valid((x, y), 0.2, generator=gen(1))
    c_tr, c_va = split_valid((x, y), 0.2, generator=gen(2))
    assert ids(a_va) == ids(b_va) and ids(a_tr) == ids(b_tr)
    assert ids(a_va) != ids(c_va)
    assert len(ids(a_va)) == 20 and len(ids(a_tr)) == 80


def test_the_split_is_shuffled_disjoint_and_complete():
    x = torch.arange(100.0).unsqueeze(1)
    tr, va = split_valid((x, torch.randn(100, 1)), 0.2, generator=gen(0))
    valid, train = set(ids(va)), set(ids(tr))
    assert valid.isdisjoint(train) and valid | train == set(range(100))
    assert valid != set(range(80, 100))  # not the tail: shuffled before splitting
    assert max(valid) - min(valid) > 40
    assert tr.shuffle is True and va.shuffle is False


def test_integer_targets_are_stratified_by_class():
    x = torch.arange(200.0).unsqueeze(1)
    y = torch.cat([torch.zeros(160), torch.ones(40)]).long()
    tr, va = split_valid((x, y), 0.25, generator=gen(0))
    assert torch.bincount(va.leaves[1]).tolist() == [40, 10]
    assert torch.bincount(tr.leaves[1]).tolist() == [120, 30]


def test_float_targets_are_not_stratified_but_still_split():
    x = torch.arange(50.0).unsqueeze(1)
    tr, va = split_valid((x, torch.randn(50)), 0.3, generator=gen(0))
    assert len(ids(va)) == 15 and len(ids(tr)) == 35


def test_a_class_on_one_side_only_warns_naming_the_side():
    x = torch.arange(41.0).unsqueeze(1)
    y = torch.cat([torch.zeros(20), torch.ones(20), torch.full((1,), 2.0)]).long()
    with pytest.warns(UserWarning, match=r"class\(es\) \[2\].*only in the training"):
        split_valid((x, y), 0.2, generator=gen(0))
    with pytest.warns(UserWarning, match=r"class\(es\) \[2\].*only in the validation"):
        split_valid((x, y), 0.6, generator=gen(0))


class Items(Dataset):
    """A map-style dataset that is not a TensorDataset, with class labels in ``targets``."""

    def __init__(self, n):
        self.x = torch.arange(float(n)).unsqueeze(1)
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def collate(items):
    return torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items])


def test_a_dataloader_over_a_map_style_dataset_is_split_and_rebuilt_with_its_options():
    dl = DataLoader(Items(40), batch_size=7, shuffle=True, collate_fn=collate, drop_last=False)
    tr, va = split_valid(dl, 0.25, generator=gen(0))
    assert isinstance(tr, LoaderBatches) and isinstance(va, LoaderBatches)
    for part in (tr, va):
        assert part.loader.batch_size == 7 and part.loader.collate_fn is collate
    assert isinstance(tr.loader.sampler, RandomSampler) and isinstance(va.loader.sampler, SequentialSampler)
    valid, train = ids(va), ids(tr)
    assert len(valid) == 10 and len(train) == 30 and set(valid).isdisjoint(train)
    assert sorted(valid) == valid  # validation keeps its order
    assert sum(v % 2 for v in valid) == 5  # stratified by the dataset's targets


def test_a_dataloader_over_a_tensor_dataset_is_split_on_the_fast_path():
    x = torch.arange(30.0).unsqueeze(1)
    dl = DataLoader(TensorDataset(x, torch.randn(30, 1)), batch_size=4, shuffle=False)
    tr, va = split_valid(dl, 0.2, generator=gen(0))
    assert isinstance(tr, TensorBatches) and isinstance(va, TensorBatches)
    assert tr.batch_size == va.batch_size == 4 and tr.shuffle is False
    assert len(ids(va)) == 6 and set(ids(va)).isdisjoint(ids(tr))


def test_a_dataset_is_split_too():
    tr, va = split_valid(Items(20), 0.5, generator=gen(0), options={"batch_size": 3, "collate_fn": collate})
    assert len(ids(va)) == 10 and len(ids(tr)) == 10
    assert va.loader.batch_size == 3 and isinstance(va.loader.sampler, SequentialSampler)


class Stream(IterableDataset):
    def __iter__(self):
        yield from ((torch.zeros(1), torch.zeros(1)) for _ in range(4))


@pytest.mark.parametrize("data", [Stream(), DataLoader(Stream())], ids=["dataset", "dataloader"])
def test_an_iterable_dataset_cannot_be_split(data):
    with pytest.raises(DataError, match="cannot split an IterableDataset.*separate validation"):
        split_valid(data, 0.2, generator=gen(0))


@pytest.mark.parametrize("fraction", [0, 1, 1.0, 1.5, -0.2, 0.0])
def test_a_fraction_outside_0_1_is_refused(fraction):
    x, y = make_luz_data(n=20)
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        ln.setup(Net, loss=nn.MSELoss()).fit((x, y), valid_data=fraction, epochs=1, verbose=False)


def test_fit_with_a_fraction_is_reproducible_with_a_seed():
    x, y = make_luz_data(n=200)
    s = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
    a = s.fit((x, y), valid_data=0.25, epochs=2, verbose=False, seed=11)
    b = s.fit((x, y), valid_data=0.25, epochs=2, verbose=False, seed=11)
    c = s.fit((x, y), valid_data=0.25, epochs=2, verbose=False, seed=12)
    assert a.history[-1]["valid_loss"] == b.history[-1]["valid_loss"]
    assert a.history[-1]["valid_loss"] != c.history[-1]["valid_loss"]
    assert a.context.valid_data.num_samples == 50 and a.context.train_data.num_samples == 150


def test_validation_never_drops_its_last_batch():
    x, y = make_luz_data(n=50)
    opts = {"batch_size": 16, "drop_last": True}
    s = ln.setup(Net, loss=nn.MSELoss())
    given = s.fit((x, y), valid_data=(x[:20], y[:20]), epochs=1, verbose=False, dataloader_options=opts)
    assert given.context.train_data.drop_last is True and given.context.valid_data.num_batches() == 2
    held_out = s.fit((x, y), valid_data=0.3, epochs=1, verbose=False, dataloader_options=opts)
    assert held_out.context.valid_data.num_samples == 15 and held_out.context.valid_data.num_batches() == 1
    tr, va = split_valid(DataLoader(Items(40), batch_size=16, drop_last=True, collate_fn=collate), 0.25,
                         generator=gen(0))
    assert tr.loader.drop_last and not va.loader.drop_last and len(list(va)) == 1
    _, va = split_valid(Items(40), 0.25, generator=gen(0), options={**opts, "collate_fn": collate})
    assert [len(b[0]) for b in va] == [10]


def test_the_one_sided_class_warning_points_at_the_users_call():
    x = torch.randn(41, 3)
    y = torch.cat([torch.zeros(20), torch.ones(20), torch.full((1,), 2.0)]).long()
    with pytest.warns(UserWarning, match="only in the training") as record:
        ln.setup(nn.Linear, loss=nn.CrossEntropyLoss()).set_hparams(in_features=3, out_features=3).fit(
            (x, y), valid_data=0.2, epochs=1, verbose=False)
    assert record[0].filename == __file__
