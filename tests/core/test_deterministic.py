"""Accelerator(deterministic=True): torch's deterministic algorithms, cuDNN benchmarking off and the CUBLAS
workspace variable during fit (and predict / evaluate), all three restored afterwards, also after an error."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lanterna as ln

VAR = "CUBLAS_WORKSPACE_CONFIG"


def flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, os.environ.get(VAR))


class ReadFlags(ln.Callback):
    """Records the global flags at fit begin, at every training and validation batch, and at fit end."""

    def __init__(self, fail_at_epoch=None):
        self.seen, self.fail_at_epoch = [], fail_at_epoch

    def on_fit_begin(self, ctx):
        self.seen.append(flags())

    def on_train_batch_end(self, ctx):
        self.seen.append(flags())
        if ctx.epoch == self.fail_at_epoch:
            raise ValueError("boom")

    def on_valid_batch_end(self, ctx):
        self.seen.append(flags())

    def on_fit_end(self, ctx):
        self.seen.append(flags())


@pytest.fixture
def user_flags(monkeypatch):
    """Settings a user had before fit, unlike the deterministic ones: each must come back."""
    monkeypatch.setenv(VAR, ":0:0")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    yield (False, False, True, ":0:0")
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark = before[2]


def setup():
    return ln.setup(Net, loss=nn.MSELoss())


def test_flags_are_on_during_fit_and_restored_after(user_flags):
    x, y = make_luz_data(n=64)
    cb = ReadFlags()
    acc = ln.Accelerator(device="cpu", deterministic=True)
    fitted = setup().fit((x, y), epochs=2, valid_data=(x, y), accelerator=acc, callbacks=[cb], verbose=False,
                         dataloader_options={"batch_size": 32})
    assert len(cb.seen) == 1 + 2 * (2 + 2) + 1
    assert set(cb.seen) == {(True, False, False, ":4096:8")}
    assert flags() == user_flags
    # predict and evaluate of the fitted model run under the same switch
    inside = []

    class Probe(ln.Callback):
        def on_predict_batch_end(self, ctx):
            inside.append(flags())

        def on_valid_batch_end(self, ctx):
            inside.append(flags())

    fitted.predict(x, callbacks=[Probe()])
    fitted.evaluate((x, y), callbacks=[Probe()])
    assert inside and set(inside) == {(True, False, False, ":4096:8")}
    assert flags() == user_flags


def test_flags_are_restored_after_a_failed_fit(user_flags):
    x, y = make_luz_data(n=64)
    cb = ReadFlags(fail_at_epoch=1)
    with pytest.raises(ln.CallbackError, match="boom"):
        setup().fit((x, y), epochs=2, accelerator=ln.Accelerator(device="cpu", deterministic=True), callbacks=[cb],
                    verbose=False)
    assert cb.seen[1] == (True, False, False, ":4096:8")
    assert cb.seen[-1] == (True, False, False, ":4096:8")  # on_fit_end still runs under the switch
    assert flags() == user_flags


def test_an_unset_variable_is_unset_again_and_a_users_deterministic_value_is_kept(monkeypatch, user_flags):
    x, y = make_luz_data(n=32)
    acc = ln.Accelerator(device="cpu", deterministic=True)
    monkeypatch.delenv(VAR)
    cb = ReadFlags()
    setup().fit((x, y), epochs=1, accelerator=acc, callbacks=[cb], verbose=False)
    assert cb.seen[0][3] == ":4096:8" and VAR not in os.environ
    monkeypatch.setenv(VAR, ":16:8")
    cb = ReadFlags()
    setup().fit((x, y), epochs=1, accelerator=acc, callbacks=[cb], verbose=False)
    assert cb.seen[0][3] == ":16:8" and os.environ[VAR] == ":16:8"


def test_the_default_changes_nothing(user_flags):
    x, y = make_luz_data(n=32)
    cb = ReadFlags()
    setup().fit((x, y), epochs=1, accelerator=ln.Accelerator(device="cpu"), callbacks=[cb], verbose=False)
    assert set(cb.seen) == {user_flags}


def test_warn_mode_warns_instead_of_failing(user_flags):
    cb = ReadFlags()
    x, y = make_luz_data(n=32)
    setup().fit((x, y), epochs=1, accelerator=ln.Accelerator(device="cpu", deterministic="warn"), callbacks=[cb],
                verbose=False)
    assert cb.seen[0] == (True, True, False, ":4096:8")
    assert flags() == user_flags


class UsesPut(nn.Module):
    """``Tensor.put_`` has no deterministic implementation (on the CPU too)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        torch.zeros(2).put_(torch.tensor([0, 0]), torch.ones(2))
        return self.lin(x)


def test_an_op_without_a_deterministic_implementation_is_a_clear_error(user_flags):
    x, y = make_luz_data(n=32)
    with pytest.raises(ln.LanternaError, match=r"the op put_ has no deterministic implementation.*'warn'"):
        ln.setup(UsesPut, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False,
                                                 accelerator=ln.Accelerator(device="cpu", deterministic=True))
    assert flags() == user_flags
    with pytest.warns(UserWarning, match="put_ does not have a deterministic implementation"):
        ln.setup(UsesPut, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False,
                                                 accelerator=ln.Accelerator(device="cpu", deterministic="warn"))
    assert flags() == user_flags


def test_two_seeded_fits_give_bit_identical_weights():
    class DropNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x)

    x, y = make_luz_data(n=96)

    def run():
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        fitted = ln.setup(DropNet, loss=nn.MSELoss(), optimizer=torch.optim.Adam).fit(
            loader, epochs=3, seed=7, verbose=False, accelerator=ln.Accelerator(device="cpu", deterministic=True))
        return fitted.model.state_dict(), [h["train_loss"] for h in fitted.history]

    (w1, l1), (w2, l2) = run(), run()
    assert l1 == l2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not torch.equal(w1["net.0.weight"], DropNet().net[0].weight)  # it did train


def test_bad_values_are_refused():
    with pytest.raises(ln.LanternaError, match=r"deterministic='yes'.*True, False or 'warn'"):
        ln.Accelerator(device="cpu", deterministic="yes")
    assert "deterministic=True" in repr(ln.Accelerator(device="cpu", deterministic=True))
