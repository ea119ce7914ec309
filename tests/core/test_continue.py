"""Issue #14, item 1: ``fitted.fit(...)`` continues training (model, optimizers, schedulers, grad scaler), and
``fitted.save(path, optimizer=True)`` then ``ln.load(path).fit(...)`` does the same: 3 + 3 epochs end with the
weights of 6, bit for bit (CPU, one seed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln


class Net(nn.Module):
    def __init__(self, d_in: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    return x, x @ torch.tensor([[0.2], [-1.3], [-0.5]]) + 0.1 * torch.randn(200, 1, generator=g)


def _setup():
    return ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()]).set_opt_hparams(
        lr=0.01)


def _sched():
    return ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)


def _loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_three_plus_three_epochs_equal_six_bit_for_bit():
    x, y = _data()
    whole = _setup().fit(_loader(x, y), epochs=6, seed=0, verbose=False, callbacks=[_sched()])
    first = _setup().fit(_loader(x, y), epochs=3, seed=0, verbose=False, callbacks=[_sched()])
    second = first.fit(_loader(x, y), epochs=3, verbose=False, callbacks=[_sched()])
    assert _same(whole, second)
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4, 5, 6]
    assert [h["lr"] for h in second.history] == [h["lr"] for h in whole.history]
    assert [h["train_loss"] for h in second.history] == [h["train_loss"] for h in whole.history]
    assert len(first.history) == 3  # the first Fitted's history is not changed


def test_a_valid_fraction_holds_out_the_same_samples_when_continued():
    x, y = _data()
    whole = _setup().fit((x, y), epochs=4, valid_data=0.25, verbose=False, seed=1)
    first = _setup().fit((x, y), epochs=2, valid_data=0.25, verbose=False, seed=1)
    second = first.fit((x, y), epochs=2, valid_data=0.25, verbose=False)
    assert _same(whole, second)
    assert [h["valid_loss"] for h in second.history] == [h["valid_loss"] for h in whole.history]


def test_save_with_optimizer_state_then_load_and_fit_equals_the_uninterrupted_run(tmp_path):
    x, y = _data()
    whole = _setup().fit(_loader(x, y), epochs=6, seed=0, verbose=False, callbacks=[_sched()])
    first = _setup().fit(_loader(x, y), epochs=3, seed=0, verbose=False, callbacks=[_sched()])
    rng = torch.get_rng_state()
    path = first.save(tmp_path / "model", optimizer=True)
    loaded = ln.load(path)
    torch.set_rng_state(rng)  # the same process would go on with the same generator
    second = loaded.fit(_loader(x, y), epochs=3, verbose=False, callbacks=[_sched()])
    assert _same(whole, second)
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4, 5, 6]


def test_a_model_saved_without_optimizer_state_starts_its_optimizer_afresh(tmp_path):
    x, y = _data()
    first = _setup().fit((x, y), epochs=1, seed=0, verbose=False)
    loaded = ln.load(first.save(tmp_path / "model"))
    more = loaded.fit((x, y), epochs=1, verbose=False)
    assert [h["epoch"] for h in more.history] == [1, 2]
    assert loaded.training_state() == {}


def test_continuing_with_another_scheduler_is_a_clear_error():
    x, y = _data()
    first = _setup().fit((x, y), epochs=1, verbose=False, callbacks=[_sched()])
    other = ln.callbacks.LRScheduler(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9)
    with pytest.raises(ln.LanternaError, match="StepLR.*ExponentialLR"):
        first.fit((x, y), epochs=1, verbose=False, callbacks=[other])


def test_a_fitted_built_by_hand_cannot_be_continued():
    with pytest.raises(ln.LanternaError, match="no setup"):
        ln.Fitted(nn.Linear(3, 1), None, []).fit((torch.randn(8, 3), torch.randn(8, 1)))
