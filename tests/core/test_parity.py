"""Parity with the hand-written loop of seed 000's appendix: same seed, same data order → bit-identical weights.

lanterna batches in-memory data without a DataLoader (the fast path); these tests prove it draws the same random
numbers, in the same order, as the DataLoader it replaces — so nothing about training changes but the speed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Net, PairDataset, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lanterna as ln
from lanterna.data import LoaderBatches, TensorBatches, make_source

SEED = 123


def hand_loop(model, optimizer, train_dl, valid_dl=None, epochs=3):
    """The appendix's loop (train_batch / valid_batch), in PyTorch."""
    valid_losses = []
    for _ in range(epochs):
        model.train()
        for xb, yb in train_dl:
            optimizer.zero_grad()
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
        if valid_dl is not None:
            model.eval()
            with torch.no_grad():
                losses = [F.mse_loss(model(xb), yb, reduction="sum") for xb, yb in valid_dl]
            valid_losses.append(float(torch.stack(losses).sum()) / len(valid_dl.dataset))
    return valid_losses


def by_hand(optimizer_cls, opt_hparams, train_dl, valid_dl=None, epochs=3):
    torch.manual_seed(SEED)
    model = Net(3, 32, 1)
    optimizer = optimizer_cls(model.parameters(), **opt_hparams)
    valid_losses = hand_loop(model, optimizer, train_dl, valid_dl, epochs)
    return model, valid_losses, torch.get_rng_state()


def with_lanterna(optimizer_cls, opt_hparams, train_data, valid_data=None, epochs=3, **fit_kw):
    fitted = (
        ln.setup(Net, loss=nn.MSELoss(), optimizer=optimizer_cls)
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
        .set_opt_hparams(**opt_hparams)
        .fit(train_data, epochs=epochs, valid_data=valid_data, verbose=False, seed=SEED, **fit_kw)
    )
    return fitted, torch.get_rng_state()


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


OPTIMIZERS = [
    pytest.param(torch.optim.Adam, {"lr": 0.01}, id="adam"),
    pytest.param(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, id="sgd-momentum"),
]


@pytest.mark.parametrize("optimizer_cls, opt_hparams", OPTIMIZERS)
def test_shuffled_dataloader_with_validation_matches_the_hand_loop_bit_for_bit(optimizer_cls, opt_hparams):
    x, y = make_luz_data()
    ds = TensorDataset(x, y)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    train_ds, valid_ds = Subset(ds, perm[:600]), Subset(ds, perm[600:800])

    def loaders():
        return DataLoader(train_ds, batch_size=100, shuffle=True), DataLoader(valid_ds, batch_size=100)

    train_dl, valid_dl = loaders()
    assert isinstance(make_source(train_dl, train=True), TensorBatches)  # the fast path is what is compared
    model, valid_losses, rng = by_hand(optimizer_cls, opt_hparams, *loaders())
    fitted, ln_rng = with_lanterna(optimizer_cls, opt_hparams, train_dl, valid_dl)
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)  # the same number of draws from the global generator
    assert [h["valid_loss"] for h in fitted.history] == pytest.approx(valid_losses, rel=1e-6)


@pytest.mark.parametrize("optimizer_cls, opt_hparams", OPTIMIZERS)
def test_plain_tensors_match_a_shuffled_dataloader_over_a_tensor_dataset(optimizer_cls, opt_hparams):
    x, y = make_luz_data(n=500)
    hand_dl = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)  # uneven last batch: 500 = 7*64 + 52
    model, _, rng = by_hand(optimizer_cls, opt_hparams, hand_dl, epochs=4)
    fitted, ln_rng = with_lanterna(optimizer_cls, opt_hparams, (x, y), epochs=4,
                                   dataloader_options={"batch_size": 64})
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)


def test_tensors_with_validation_tensors_match_the_hand_loop():
    x, y = make_luz_data()
    train, valid = (x[:800], y[:800]), (x[800:], y[800:])
    model, valid_losses, rng = by_hand(
        torch.optim.Adam, {}, DataLoader(TensorDataset(*train), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(*valid), batch_size=32), epochs=2)
    fitted, ln_rng = with_lanterna(torch.optim.Adam, {}, train, valid, epochs=2)
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)
    assert [h["valid_loss"] for h in fitted.history] == pytest.approx(valid_losses, rel=1e-6)


@pytest.mark.parametrize("drop_last", [False, True])
def test_dataloader_with_its_own_generator_and_drop_last(drop_last):
    x, y = make_luz_data(n=300)

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(99))

    model, _, rng = by_hand(torch.optim.Adam, {"lr": 0.01}, loader())
    fitted, ln_rng = with_lanterna(torch.optim.Adam, {"lr": 0.01}, loader())
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)


def test_unshuffled_dataloader_matches_the_hand_loop():
    x, y = make_luz_data(n=300)
    model, _, rng = by_hand(torch.optim.SGD, {"lr": 0.05}, DataLoader(TensorDataset(x, y), batch_size=50))
    fitted, ln_rng = with_lanterna(torch.optim.SGD, {"lr": 0.05}, DataLoader(TensorDataset(x, y), batch_size=50))
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)


def test_a_dataloader_outside_the_fast_path_matches_the_hand_loop_too():
    x, y = make_luz_data(n=300)

    def loader():
        return DataLoader(PairDataset(x, y), batch_size=64, shuffle=True)

    assert isinstance(make_source(loader(), train=True), LoaderBatches)
    model, _, rng = by_hand(torch.optim.Adam, {"lr": 0.01}, loader())
    fitted, ln_rng = with_lanterna(torch.optim.Adam, {"lr": 0.01}, loader())
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)


def test_fast_path_yields_the_dataloaders_batches_in_the_same_order():
    x = torch.arange(103.0).unsqueeze(1)
    y = torch.arange(103)
    for kw in ({"shuffle": True}, {"shuffle": False}, {"shuffle": True, "drop_last": True},
               {"shuffle": True, "generator": torch.Generator().manual_seed(5)}):
        dl = DataLoader(TensorDataset(x, y), batch_size=10, **kw)
        src = make_source(dl, train=True)
        assert isinstance(src, TensorBatches)
        torch.manual_seed(0)
        if "generator" in kw:
            kw["generator"].manual_seed(5)
        expected = [[t.clone() for t in b] for epoch in range(2) for b in dl]
        torch.manual_seed(0)
        if "generator" in kw:
            kw["generator"].manual_seed(5)
        got = [list(b) for epoch in range(2) for b in src]
        assert len(got) == len(expected) == 2 * len(dl)
        for g, e in zip(got, expected):
            assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1])


def test_tensors_with_a_generator_option_match_a_dataloader_with_that_generator():
    x, y = make_luz_data(n=300)
    hand_dl = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(3))
    model, _, rng = by_hand(torch.optim.Adam, {"lr": 0.01}, hand_dl)
    fitted, ln_rng = with_lanterna(torch.optim.Adam, {"lr": 0.01}, (x, y), dataloader_options={
        "batch_size": 64, "generator": torch.Generator().manual_seed(3)})
    assert_bit_identical(fitted.model, model)
    assert torch.equal(rng, ln_rng)


def test_subset_indices_of_any_sequence_type_take_the_fast_path():
    import numpy as np

    ds = TensorDataset(torch.arange(20.0), torch.arange(20))
    for indices in (range(5, 15), np.arange(5, 15), torch.arange(5, 15), list(range(5, 15))):
        dl = DataLoader(Subset(Subset(ds, indices), [9, 0, 3]), batch_size=2)
        src = make_source(dl, train=False)
        assert isinstance(src, TensorBatches)
        assert [b[1].tolist() for b in src] == [b[1].tolist() for b in dl] == [[14, 5], [8]]
