"""Issue 11 (data and arguments): nothing lanterna is given is dropped, coerced or ignored without a word."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import PairDataset
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import lanterna as ln
from lanterna.data import LoaderBatches, TensorBatches, make_source, split_valid, to_tensor_leaves
from lanterna.data.options import loader_options
from lanterna.errors import DataError, LanternaError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def linear():
    return ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)


def imbalanced(n=200, n_rare=20):
    """x, y, and WeightedRandomSampler weights that give the rare class (1) half of the draws."""
    x = torch.randn(n, 3, generator=gen(1))
    y = torch.zeros(n, dtype=torch.long)
    y[:n_rare] = 1
    counts = torch.bincount(y).double()
    return x, y, (1.0 / counts)[y]


class CountTargets(ln.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_begin(self, ctx):
        self.seen.append(ctx.target.clone())


# ---------------------------------------------------------------------------- 11: custom samplers and the split


def _custom_loaders():
    x, y, w = imbalanced()
    ds = TensorDataset(x, y.float().unsqueeze(1))
    return {
        "WeightedRandomSampler": DataLoader(ds, batch_size=16, sampler=WeightedRandomSampler(w, len(w))),
        "SubsetRandomSampler": DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(range(100))),
        "RandomSampler": DataLoader(ds, batch_size=16, sampler=RandomSampler(ds, replacement=True)),
        "BatchSampler": DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 16, False)),
    }


@pytest.mark.parametrize("name", list(_custom_loaders()))
def test_a_fraction_split_refuses_a_loader_with_a_custom_sampler_naming_it_and_the_fix(name):
    dl = _custom_loaders()[name]
    with pytest.raises(DataError, match=rf"{name}.*[Ss]plit the dataset yourself.*valid_data=DataLoader"):
        linear().fit(dl, valid_data=0.2, epochs=1, verbose=False)


def test_a_fraction_split_refuses_a_sampler_given_in_dataloader_options():
    x, y, w = imbalanced()
    ds = PairDataset(x, y.float().unsqueeze(1))
    with pytest.raises(DataError, match="WeightedRandomSampler.*[Ss]plit the dataset yourself"):
        linear().fit(ds, valid_data=0.2, epochs=1, verbose=False,
                     dataloader_options={"sampler": WeightedRandomSampler(w, len(w))})


def test_the_documented_fix_keeps_the_weighted_sampler_in_training():
    """Split yourself, weight the training part, pass valid_data=DataLoader: training sees the rare class
    about half of the time (it is 10% of the data), and validation sees exactly its own 40 samples."""
    x, y, _ = imbalanced()
    ds = TensorDataset(x, y.float().unsqueeze(1))
    perm = torch.randperm(len(ds), generator=gen(2))
    tr, va = perm[:160].tolist(), perm[160:].tolist()
    w = (1.0 / torch.bincount(y[tr]).double())[y[tr]]
    train_dl = DataLoader(Subset(ds, tr), batch_size=16,
                          sampler=WeightedRandomSampler(w, len(tr), generator=gen(3)))
    counter = CountTargets()
    fitted = linear().fit(train_dl, valid_data=DataLoader(Subset(ds, va), batch_size=16), epochs=5,
                          verbose=False, callbacks=[counter])
    rare = torch.cat(counter.seen).mean().item()
    assert 0.4 < rare < 0.6, rare
    assert fitted.context.valid_data.num_samples == 40


def test_the_default_samplers_still_split_and_keep_their_generator():
    x, y, _ = imbalanced()
    g = gen(7)
    dl = DataLoader(PairDataset(x, y), batch_size=16, sampler=RandomSampler(range(200), generator=g))
    tr, va = split_valid(dl, 0.25, generator=gen(0))
    assert isinstance(tr.loader.sampler, RandomSampler) and tr.loader.sampler.generator is g
    assert isinstance(va.loader.sampler, SequentialSampler)
    assert tr.num_samples == 150 and va.num_samples == 50


# ---------------------------------------------------------------------------- 11: float 0/1 targets are stratified


@pytest.mark.parametrize("shape", [(200,), (200, 1)], ids=["N", "N-1"])
def test_float_binary_targets_are_stratified_like_classes(shape):
    x = torch.arange(200.0).unsqueeze(1)
    y = torch.cat([torch.zeros(160), torch.ones(40)]).reshape(shape)
    for seed in range(5):
        tr, va = split_valid((x, y), 0.25, generator=gen(seed))
        assert va.leaves[1].sum().item() == 10 and tr.leaves[1].sum().item() == 30
        assert va.leaves[1].shape[1:] == shape[1:]


def test_float_targets_with_few_integral_values_are_stratified_and_a_dataloader_too():
    x = torch.arange(300.0).unsqueeze(1)
    y = torch.cat([torch.zeros(200), torch.ones(70), torch.full((30,), 2.0)])
    dl = DataLoader(PairDataset(x, y), batch_size=32)  # not a TensorDataset: labels come from nowhere
    dl.dataset.targets = y  # ... unless the dataset has targets
    for data in ((x, y), DataLoader(TensorDataset(x, y), batch_size=32), dl):
        _, va = split_valid(data, 0.1, generator=gen(0))
        got = torch.cat([b[1] for b in va]) if isinstance(va, LoaderBatches) else va.leaves[1]
        assert torch.bincount(got.long()).tolist() == [20, 7, 3]


def test_continuous_or_nan_float_targets_are_not_stratified_and_raise_nothing():
    x = torch.arange(100.0).unsqueeze(1)
    for y in (torch.randn(100), torch.arange(100.0), torch.where(torch.arange(100) < 50, 0.0, float("nan"))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tr, va = split_valid((x, y), 0.2, generator=gen(0))
        assert va.num_samples == 20 and tr.num_samples == 80


# ---------------------------------------------------------------------------- 18: arguments are integers


@pytest.mark.parametrize("epochs", [2.5, True, "3", (1, 2.5), (False, 3), 3.0, None])
def test_epochs_that_are_not_integers_are_refused_naming_epochs(epochs):
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    with pytest.raises(LanternaError, match=r"epochs=.*integer"):
        linear().fit((x, y), epochs=epochs, verbose=False)


def test_numpy_integer_epochs_are_fine():
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    assert len(linear().fit((x, y), epochs=np.int64(2), verbose=False).history) == 2
    assert len(linear().fit((x, y), epochs=(np.int32(1), 2), verbose=False).history) == 2


BAD_OPTIONS = [
    ({"batch_size": 2.5}, "batch_size"), ({"batch_size": True}, "batch_size"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -4}, "batch_size"), ({"batch_size": "32"}, "batch_size"),
    ({"num_workers": -1}, "num_workers"), ({"num_workers": 1.5}, "num_workers"), ({"num_workers": True}, "num_workers"),
    ({"shuffle": "False"}, "shuffle"), ({"drop_last": "yes"}, "drop_last"), ({"pin_memory": 1}, "pin_memory"),
    ({"prefetch_factor": 0}, "prefetch_factor"), ({"timeout": -1}, "timeout"), ({"generator": 3}, "generator"),
    ({"persistent_workers": "no"}, "persistent_workers"),
]


@pytest.mark.parametrize("form", ["tensors", "dataset"])
@pytest.mark.parametrize(("options", "name"), BAD_OPTIONS, ids=[f"{k}={v!r}" for (o, _) in BAD_OPTIONS
                                                                 for k, v in o.items()])
def test_bad_dataloader_options_are_refused_naming_the_option(form, options, name):
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    data = (x, y) if form == "tensors" else PairDataset(x, y)
    with pytest.raises(DataError, match=rf"dataloader_options\[{name!r}\]"):
        linear().fit(data, epochs=1, verbose=False, dataloader_options=options)


def test_numpy_integers_and_booleans_are_fine_options():
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    src = make_source((x, y), train=True, options={"batch_size": np.int64(8), "shuffle": np.bool_(False)})
    assert src.batch_size == 8 and src.shuffle is False and [len(b[0]) for b in src] == [8, 8, 4]


def test_an_unknown_option_is_refused_with_the_close_match():
    with pytest.raises(DataError, match="'batchsize'.*batch_size"):
        make_source(PairDataset(torch.randn(4, 3), torch.randn(4, 1)), train=True, options={"batchsize": 2})
    with pytest.raises(DataError, match="dataloader_options must be a dict.*list"):
        make_source((torch.randn(4, 3),), train=True, options=[("batch_size", 2)])


def test_options_the_dataloader_refuses_become_a_data_error():
    ds = PairDataset(torch.randn(8, 3), torch.randn(8, 1))
    with pytest.raises(DataError, match="dataloader_options.*could not build a DataLoader.*mutually exclusive"):
        make_source(ds, train=True, options={"sampler": SequentialSampler(ds), "shuffle": True})


def test_valid_data_may_be_a_numpy_float():
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    fitted = linear().fit((x, y), valid_data=np.float32(0.25), epochs=1, verbose=False, seed=0)
    assert fitted.context.valid_data.num_samples == 10


# ---------------------------------------------------------------------------- 19a: options that cannot apply warn


def test_options_for_the_training_data_do_not_silently_skip_a_validation_dataloader():
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    valid_dl = DataLoader(TensorDataset(x[:10], y[:10]), batch_size=3)
    with pytest.warns(UserWarning, match=r"dataloader_options \['batch_size'\].*valid_data is a DataLoader") as rec:
        fitted = linear().fit((x, y), valid_data=valid_dl, epochs=1, verbose=False,
                              dataloader_options={"batch_size": 8})
    assert rec[0].filename == __file__
    assert fitted.context.train_data.batch_size == 8 and fitted.context.valid_data.batch_size == 3


@pytest.mark.parametrize("option", ["shuffle", "drop_last"])
def test_shuffle_or_drop_last_for_prediction_data_warns_and_is_not_applied(option):
    x = torch.arange(10.0).unsqueeze(1)
    for data in (x, PairDataset(x, x)):
        with pytest.warns(UserWarning, match=rf"{option}=True.*ignored.*never"):
            src = make_source(data, train=False, options={option: True, "batch_size": 4}, what="prediction data")
        assert torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in src]).flatten().tolist() == list(
            range(10))


# ---------------------------------------------------------------------------- audit of the data forms


def test_every_floating_input_becomes_float32_and_every_integer_int64():
    leaves, _ = to_tensor_leaves((np.ones((4, 2), np.float16), torch.ones(4, dtype=torch.bfloat16),
                                  np.arange(4, dtype=np.uint16), np.arange(4, dtype=np.uint32)))
    assert [t.dtype for t in leaves] == [torch.float32, torch.float32, torch.int64, torch.int64]
    x = torch.randn(40, 3)
    fitted = linear().fit((x.half(), torch.randn(40, 1)), epochs=1, verbose=False)
    assert fitted.predict(x.half()).dtype == torch.float32


def test_a_list_of_samples_is_refused_with_the_fix_and_a_short_message():
    samples = [(torch.randn(3), torch.randn(1)) for _ in range(50)]
    with pytest.raises(DataError, match=r"different numbers of samples.*\.\.\..*list of samples.*torch.stack") as e:
        make_source(samples, train=True)
    assert len(str(e.value)) < 600


def test_a_rebuilt_loader_keeps_every_option():
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    dl = DataLoader(PairDataset(x, y), batch_size=4, num_workers=2, multiprocessing_context="spawn",
                    in_order=False, prefetch_factor=3)
    opts = loader_options(dl)
    assert opts["multiprocessing_context"] is dl.multiprocessing_context and opts["in_order"] is False
    assert opts["prefetch_factor"] == 3
    tr, _ = split_valid(dl, 0.25, generator=gen(0))
    assert tr.loader.multiprocessing_context is dl.multiprocessing_context and tr.loader.in_order is False


# ---------------------------------------------------------------------------- torchrun: a sampler is never dropped


def test_ddp_sharding_refuses_a_custom_sampler_and_keeps_a_distributed_one():
    from torch.utils.data import DistributedSampler

    from lanterna.integrations.distributed import Distributed

    ddp = Distributed(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), seed=0)
    x, y, w = imbalanced()
    ds = TensorDataset(x, y)
    weighted = make_source(DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler(w, len(w))), train=True)
    with pytest.raises(DataError, match="torchrun.*WeightedRandomSampler.*DistributedSampler"):
        ddp.shard(weighted, train=True)
    own = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    kept = ddp.shard(make_source(DataLoader(ds, batch_size=8, sampler=own), train=True), train=True)
    assert kept.loader.sampler is own
    plain = ddp.shard(make_source(DataLoader(ds, batch_size=8, shuffle=True), train=True), train=True)
    assert isinstance(plain, TensorBatches) and plain.num_samples == 100
