"""KeepBestModel: the fitted model is the best epoch's, not the last one's."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lanterna as ln


class Sabotage(ln.Callback):
    """Ruins the weights during the epochs from ``start`` on, so the best epoch is an earlier one."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_train_batch_end(self, ctx):
        if ctx.epoch >= self.start:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.add_(0.5)


class Snapshots(ln.Callback):
    def __init__(self) -> None:
        self.states = {}

    def on_epoch_end(self, ctx):
        self.states[ctx.epoch] = copy.deepcopy(ctx.model.state_dict())


def test_restores_the_best_epochs_weights(luz_setup, luz_split):
    train_dl, valid_dl, test_dl = luz_split
    snaps = Snapshots()
    cb = ln.callbacks.KeepBestModel()
    fitted = luz_setup.set_opt_hparams(lr=0.05).fit(train_dl, epochs=7, valid_data=valid_dl, seed=0,
                                                    callbacks=[cb, snaps, Sabotage(start=5)], verbose=False)
    valid = [r["valid_loss"] for r in fitted.history]
    best = min(range(7), key=lambda i: valid[i]) + 1
    assert best < 5 and cb.best_epoch == best and cb.best == valid[best - 1]
    state = fitted.model.state_dict()
    assert all(torch.equal(state[k], snaps.states[best][k]) for k in state)
    assert not torch.equal(state["net.0.weight"], snaps.states[7]["net.0.weight"])
    assert len(fitted.history) == 7  # history is untouched
    # the restored model really is the best one: it reproduces the best epoch's validation loss
    assert fitted.evaluate(valid_dl)["loss"] == pytest.approx(valid[best - 1], rel=1e-5)
    assert fitted.model.training is False


def test_max_mode_and_restores_after_early_stopping(clf_setup, clf_data):
    x, y = clf_data
    snaps = Snapshots()
    cb = ln.callbacks.KeepBestModel(monitor="valid_acc", min_delta=0.001)
    fitted = clf_setup.fit((x[:200], y[:200]), epochs=30, valid_data=(x[200:], y[200:]), seed=0, verbose=False,
                           callbacks=[cb, snaps, Sabotage(start=4),
                                      ln.callbacks.EarlyStopping("valid_acc", patience=3)])
    acc = [r["valid_acc"] for r in fitted.history]
    assert cb.monitor.mode == "max" and cb.best == max(acc[:cb.best_epoch])
    assert cb.best_epoch < len(acc) < 30 and acc[-1] < cb.best
    state = fitted.model.state_dict()
    assert all(torch.equal(state[k], snaps.states[cb.best_epoch][k]) for k in state)


def test_state_dict_is_weights_only_loadable(tmp_path, luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split
    cb = ln.callbacks.KeepBestModel()
    luz_setup.fit(train_dl, epochs=2, valid_data=valid_dl, callbacks=[cb], verbose=False)
    torch.save(cb.state_dict(), tmp_path / "kb.pt")
    other = ln.callbacks.KeepBestModel()
    other.load_state_dict(torch.load(tmp_path / "kb.pt", weights_only=True))
    assert other.best == cb.best and other.best_epoch == cb.best_epoch
    assert all(torch.equal(other.best_state[k], v) for k, v in cb.best_state.items())


def test_unknown_monitor_and_bad_mode(luz_setup, luz_data):
    with pytest.raises(ln.MonitorError, match="Unknown monitor 'valid_acc'"):
        luz_setup.fit(luz_data, valid_data=0.2, callbacks=[ln.callbacks.KeepBestModel("valid_acc")], verbose=False)
    with pytest.raises(ln.MonitorError, match="mode='up' is not one of 'min', 'max', 'auto'"):
        ln.callbacks.KeepBestModel(mode="up")


class StopIn(ln.Callback):
    """Ends fit inside epoch ``epoch``'s first batch: Ctrl-C, StopTraining or an error."""

    def __init__(self, epoch: int, how: str) -> None:
        self.epoch, self.how = epoch, how

    def on_train_batch_end(self, ctx):
        if ctx.epoch == self.epoch and ctx.iter == 1:
            if self.how == "interrupted":
                ctx.interrupted = True  # what the first Ctrl-C sets
            elif self.how == "stopped":
                raise ln.StopTraining
            else:
                raise RuntimeError("boom")


@pytest.mark.parametrize("how", ["interrupted", "stopped", "failed"])
def test_warns_why_nothing_was_restored_when_no_epoch_completed(how, luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split
    snaps = Snapshots()
    cb = ln.callbacks.KeepBestModel()
    with pytest.warns(UserWarning, match=rf"KeepBestModel restored nothing: no epoch completed \(fit {how} "
                                         r"during epoch 1\)"):
        try:
            fitted = luz_setup.fit(train_dl, epochs=3, valid_data=valid_dl, seed=0, verbose=False,
                                   callbacks=[cb, snaps, StopIn(1, how)])
        except ln.CallbackError:
            assert how == "failed"
        else:
            assert fitted.status == how and fitted.history == []
    assert cb.best_state is None and snaps.states == {}


def test_warns_that_a_failed_fit_keeps_its_last_weights(luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split
    cb = ln.callbacks.KeepBestModel()

    class Model(ln.Callback):
        def on_fit_begin(self, ctx):
            self.model = ctx.model

    holder = Model()
    with pytest.warns(UserWarning, match=r"fit failed, so the weights of the best epoch \(1\) were not restored"), \
            pytest.raises(ln.CallbackError, match="boom"):
        luz_setup.fit(train_dl, epochs=3, valid_data=valid_dl, seed=0, verbose=False,
                      callbacks=[cb, holder, StopIn(2, "failed")])
    assert cb.best_epoch == 1
    assert not torch.equal(holder.model.state_dict()["net.0.weight"], cb.best_state["net.0.weight"])


def test_warns_when_every_monitored_value_was_nan(luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split

    class NanLog(ln.Callback):
        def on_epoch_end(self, ctx):
            ctx.history[-1]["valid_loss"] = float("nan")

    cb = ln.callbacks.KeepBestModel()  # order 700: after NanLog (order 0)
    with pytest.warns(UserWarning, match=r"restored nothing: no epoch had a comparable valid_loss \(all 2 were NaN\)"):
        fitted = luz_setup.fit(train_dl, epochs=2, valid_data=valid_dl, seed=0, verbose=False, callbacks=[NanLog(), cb])
    assert len(fitted.history) == 2 and cb.best_state is None


def test_no_warning_when_the_best_epoch_is_restored(luz_setup, luz_split):
    train_dl, valid_dl, _ = luz_split
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        luz_setup.fit(train_dl, epochs=2, valid_data=valid_dl, seed=0, verbose=False,
                      callbacks=[ln.callbacks.KeepBestModel()])
