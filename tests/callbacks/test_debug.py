"""Debug runs: LimitBatches, FastDevRun and OverfitBatches, each against a hand-written loop doing the same."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler

import lanterna as ln
from lanterna.data.limit import FirstBatches


def fit(model, data, callbacks, epochs=3, **kw):
    setup = ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.05)
    return setup.fit(data, epochs=epochs, callbacks=callbacks, verbose=False, **kw)


def hand_train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x, y in batches:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def hand_loss(model, batches):
    """The sample-weighted mean MSE over ``batches``, in eval mode."""
    model.eval()
    with torch.no_grad():
        total = sum(nn.functional.mse_loss(model(x), y, reduction="sum").double() for x, y in batches)
    return float(total / sum(len(x) for x, _ in batches))


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class Seen(ln.Callback):
    """The inputs of every training and validation batch, by epoch."""

    def __init__(self):
        self.train, self.valid = [], []

    def on_train_batch_begin(self, ctx):
        self.train.append((ctx.epoch, ctx.input.clone()))

    def on_valid_batch_begin(self, ctx):
        self.valid.append((ctx.epoch, ctx.input.clone()))


class Pairs(Dataset):
    """A map-style dataset that is not a TensorDataset: its DataLoader is iterated as it is (no fast path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def loader(x, y, shuffle, seed=1, batch_size=10, dataset=TensorDataset):
    return DataLoader(dataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def test_fast_dev_run_is_one_hand_step_and_one_validation_batch():
    x, y = make_luz_data(n=100)
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    seen = Seen()
    fitted = fit(model, loader(x, y, shuffle=False), [ln.callbacks.FastDevRun(), seen], epochs=20,
                 valid_data=loader(x[50:], y[50:], shuffle=False))
    hand_train(ref, [(x[:10], y[:10])])
    assert same_weights(fitted.model, ref)
    assert len(fitted.history) == 1 and fitted.status == "completed" and fitted.context.step == 1
    assert len(seen.train) == 1 and len(seen.valid) == 1
    assert fitted.history[0]["valid_loss"] == pytest.approx(hand_loss(ref, [(x[50:60], y[50:60])]), abs=1e-6)
    assert not isinstance(fitted.context.train_data, FirstBatches)  # the sources are put back


def test_fast_dev_run_n_batches_on_in_memory_data():
    x, y = make_luz_data(n=100)
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    fitted = fit(model, (x, y), [ln.callbacks.FastDevRun(n=3)], epochs=(5, 20),
                 dataloader_options={"batch_size": 10, "shuffle": False})
    hand_train(ref, [(x[i:i + 10], y[i:i + 10]) for i in (0, 10, 20)])
    assert same_weights(fitted.model, ref) and len(fitted.history) == 1


@pytest.mark.parametrize("dataset", [TensorDataset, Pairs])  # the in-memory fast path, and a DataLoader as it is
def test_limit_batches_matches_a_hand_loop_that_breaks_early(dataset):
    x, y = make_luz_data(n=70)
    vx, vy = make_luz_data(n=50, seed=1)
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    fitted = fit(model, loader(x, y, shuffle=True, dataset=dataset), [ln.callbacks.LimitBatches(train=0.5, valid=2)],
                 valid_data=loader(vx, vy, shuffle=False, dataset=dataset))
    hand_dl = loader(x, y, shuffle=True, dataset=dataset)
    for epoch in range(3):
        batches = []
        for i, b in enumerate(hand_dl):
            if i == 3:  # 7 batches × 0.5 → 3
                break
            batches.append(b)
        hand_train(ref, batches)
        assert fitted.history[epoch]["valid_loss"] == pytest.approx(
            hand_loss(ref, [(vx[:10], vy[:10]), (vx[10:20], vy[10:20])]), abs=1e-6)
    assert same_weights(fitted.model, ref)
    assert fitted.context.step == 9


@pytest.mark.parametrize("form", ["tensors", "shuffled_loader", "shuffled_dataset_loader"])
def test_overfit_batches_trains_and_validates_on_the_first_n_batches_every_epoch(form):
    x, y = make_luz_data(n=100)
    data = {"tensors": (x, y), "shuffled_loader": loader(x, y, shuffle=True),
            "shuffled_dataset_loader": loader(x, y, shuffle=True, dataset=Pairs)}[form]
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    seen = Seen()
    options = {"batch_size": 10} if form == "tensors" else None
    fitted = fit(model, data, [ln.callbacks.OverfitBatches(n=2), seen], dataloader_options=options,
                 valid_data=(x[:5], y[:5]))  # replaced by the training batches
    first = [(x[:10], y[:10]), (x[10:20], y[10:20])]
    for epoch in (1, 2, 3):
        train_inputs = [t for e, t in seen.train if e == epoch]
        valid_inputs = [t for e, t in seen.valid if e == epoch]
        assert len(train_inputs) == 2 and len(valid_inputs) == 2
        for t, v, (bx, _) in zip(train_inputs, valid_inputs, first, strict=True):
            assert torch.equal(t, bx) and torch.equal(v, bx)
        hand_train(ref, first)
        assert fitted.history[epoch - 1]["valid_loss"] == pytest.approx(hand_loss(ref, first), abs=1e-6)
    assert same_weights(fitted.model, ref)


def test_overfit_batches_adds_validation_when_there_is_none():
    x, y = make_luz_data(n=40)
    fitted = fit(Net(), (x, y), [ln.callbacks.OverfitBatches(n=1)], epochs=2, dataloader_options={"batch_size": 8})
    assert "valid_loss" in fitted.history[-1]
    assert fitted.context.valid_data is None  # put back


def test_bad_arguments_and_combinations_are_refused():
    with pytest.raises(ln.LanternaError, match="give train= and/or valid="):
        ln.callbacks.LimitBatches()
    with pytest.raises(ln.LanternaError, match=r"LimitBatches\(train\)=0: give at least 1 batch"):
        ln.callbacks.LimitBatches(train=0)
    with pytest.raises(ln.LanternaError, match=r"valid\)=1.5: give a fraction in \(0, 1\]"):
        ln.callbacks.LimitBatches(valid=1.5)
    with pytest.raises(ln.LanternaError, match=r"FastDevRun\(n\)=0.5: give an int >= 1"):
        ln.callbacks.FastDevRun(n=0.5)
    with pytest.raises(ln.LanternaError, match=r"OverfitBatches\(n\)=True"):
        ln.callbacks.OverfitBatches(n=True)
    x, y = make_luz_data(n=40)
    with pytest.raises(ln.LanternaError, match="use only one of them"):
        fit(Net(), (x, y), [ln.callbacks.FastDevRun(), ln.callbacks.LimitBatches(train=2)])
    weighted = DataLoader(TensorDataset(x, y), batch_size=8, sampler=WeightedRandomSampler(torch.ones(40), 40))
    with pytest.raises(ln.DataError, match=r"OverfitBatches\(n=1\) needs the training batches in dataset order.*"
                                           r"WeightedRandomSampler.*shuffle=False"):
        fit(Net(), weighted, [ln.callbacks.OverfitBatches()])
