"""ResumeFromCheckpoint (luz's warm start): the weights (and, when asked, optimizer/scheduler state and history)
are the checkpoint's before the first epoch, and training goes on as a hand loop from those weights would."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lanterna as ln


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)


def _setup():
    return ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.Adam).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.05)


OPTS = {"batch_size": 16, "shuffle": False}


def _first(tmp_path, **fit):
    ckpt = ln.callbacks.ModelCheckpoint(str(tmp_path / "ckpt" / "epoch-{epoch}.pt"), monitor="train_loss")
    fitted = _setup().fit(_data(), epochs=2, seed=0, verbose=False, dataloader_options=OPTS,
                          callbacks=[ckpt, *fit.pop("callbacks", [])], **fit)
    return fitted, ckpt, torch.load(ckpt.last_path, weights_only=True)


class Snapshot(ln.Callback):
    """The model and optimizer state at the first training batch (after every on_fit_begin)."""

    def on_train_batch_begin(self, ctx):
        if ctx.iter == 1 and not hasattr(self, "model"):
            self.model = copy.deepcopy(ctx.model.state_dict())
            self.opt = copy.deepcopy(ctx.opt.state_dict())
            self.epoch = ctx.epoch


def _hand_adam(weights, opt_state, x, y, epochs):
    model = nn.Linear(3, 1)
    model.load_state_dict(weights)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for _ in range(epochs):
        for i in range(0, len(x), 16):
            F.mse_loss(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
            opt.zero_grad()
    return model


def test_weights_only_then_training_continues_as_a_hand_loop_from_them(tmp_path):
    first, ckpt, saved = _first(tmp_path)
    snap = Snapshot()
    x, y = _data(seed=1)
    warm = _setup().fit((x, y), epochs=3, seed=5, verbose=False, dataloader_options=OPTS,
                        callbacks=[ln.callbacks.ResumeFromCheckpoint(ckpt.last_path), snap])
    for k, v in saved["model"].items():
        assert torch.equal(snap.model[k], v)
    assert snap.opt["state"] == {}  # a fresh optimizer
    assert [h["epoch"] for h in warm.history] == [1, 2, 3]
    ref = _hand_adam(saved["model"], None, x, y, epochs=3)
    torch.testing.assert_close(warm.model.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(warm.model.bias, ref.bias, rtol=0, atol=0)


def test_with_optimizer_and_history_it_equals_the_uninterrupted_run(tmp_path):
    first, ckpt, saved = _first(tmp_path)
    snap = Snapshot()
    warm = _setup().fit(_data(), epochs=3, seed=0, verbose=False, dataloader_options=OPTS,
                        callbacks=[ln.callbacks.ResumeFromCheckpoint(ckpt.last_path, restore_optimizer=True,
                                                                     restore_history=True), snap])
    opt_saved = saved["optimizers"]["opt"]
    for key, st in opt_saved["state"].items():
        for name, v in st.items():
            assert torch.equal(snap.opt["state"][key][name], v)
    assert snap.epoch == 3
    assert [h["epoch"] for h in warm.history] == [1, 2, 3, 4, 5]
    assert warm.history[:2] == first.history
    whole = _setup().fit(_data(), epochs=5, seed=0, verbose=False, dataloader_options=OPTS)
    torch.testing.assert_close(warm.model.weight, whole.model.weight, rtol=0, atol=0)
    ref = _hand_adam(saved["model"], opt_saved, *_data(), epochs=3)
    torch.testing.assert_close(warm.model.weight, ref.weight, rtol=0, atol=0)
    assert [h["train_loss"] for h in warm.history[2:]] == pytest.approx(
        [h["train_loss"] for h in whole.history[2:]], rel=1e-6)


def test_scheduler_state_is_restored(tmp_path):
    sched = lambda: ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)  # noqa: E731
    _, ckpt, _ = _first(tmp_path, callbacks=[sched()])
    warm = _setup().fit(_data(), epochs=2, seed=0, verbose=False, dataloader_options=OPTS,
                        callbacks=[sched(), ln.callbacks.ResumeFromCheckpoint(ckpt.last_path, restore_optimizer=True,
                                                                              restore_history=True)])
    whole = _setup().fit(_data(), epochs=4, seed=0, verbose=False, dataloader_options=OPTS, callbacks=[sched()])
    assert [h["lr"] for h in warm.history] == [h["lr"] for h in whole.history] == [0.05, 0.025, 0.0125, 0.00625]
    torch.testing.assert_close(warm.model.weight, whole.model.weight, rtol=0, atol=0)


def test_a_folder_uses_its_latest_checkpoint(tmp_path):
    _, ckpt, saved = _first(tmp_path)
    cb = ln.callbacks.ResumeFromCheckpoint(tmp_path / "ckpt")
    snap = Snapshot()
    _setup().fit(_data(), epochs=1, verbose=False, callbacks=[cb, snap])
    assert cb.loaded_from == ckpt.last_path
    assert all(torch.equal(snap.model[k], v) for k, v in saved["model"].items())


def test_a_mismatched_checkpoint_is_a_clear_error_that_changes_nothing(tmp_path):
    _, ckpt, _ = _first(tmp_path)
    other = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=5, out_features=1)
    with pytest.raises(ln.ModelMismatchError, match="different shapes.*Nothing was loaded"):
        other.fit((torch.randn(16, 5), torch.randn(16, 1)), epochs=1, verbose=False,
                  callbacks=[ln.callbacks.ResumeFromCheckpoint(ckpt.last_path)])
    # another optimizer class: refused before the weights are touched
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model.state_dict())
    sgd = ln.setup(model, loss=nn.MSELoss(), optimizer=torch.optim.SGD)
    with pytest.raises(ln.CheckpointError, match="optimizer 'opt'.*restore_optimizer=False"):
        sgd.fit(_data(), epochs=1, verbose=False,
                callbacks=[ln.callbacks.ResumeFromCheckpoint(ckpt.last_path, restore_optimizer=True)])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ln.CheckpointError, match="No checkpoint"):
        _setup().fit(_data(), epochs=1, verbose=False,
                     callbacks=[ln.callbacks.ResumeFromCheckpoint(tmp_path / "missing.pt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ln.CheckpointError, match="holds no checkpoint"):
        _setup().fit(_data(), epochs=1, verbose=False,
                     callbacks=[ln.callbacks.ResumeFromCheckpoint(tmp_path / "empty")])
