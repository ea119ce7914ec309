"""The callback contract of API.md §6: every hook fires, in order, the right number of times; ctx carries its
fields; ctx.log reaches history; built-ins run in their documented order; a raising callback is named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lanterna as ln
from lanterna.core.events import HOOKS

FIT_HOOKS = [h for h in HOOKS if not h.startswith("on_predict")]


def _recorder_class():
    """A callback class implementing every fit hook, each appending its name to ``self.calls``."""

    def make(hook):
        def method(self, ctx):
            self.calls.append(hook)
            self.snapshots.append((hook, ctx.epoch, ctx.iter, ctx.training, ctx.pred is not None,
                                   ctx.loss is not None, len(ctx.history)))

        return method

    ns = {h: make(h) for h in FIT_HOOKS}

    def __init__(self):  # noqa: N807
        self.calls, self.snapshots = [], []

    ns["__init__"] = __init__
    return type("Recorder", (ln.Callback,), ns)


def _expected(epochs: int, batches: int, valid_batches: int | None) -> list[str]:
    train_batch = ["on_train_batch_begin", "on_train_batch_after_pred", "on_train_batch_after_loss",
                   "on_train_batch_before_backward", "on_train_batch_before_step", "on_train_batch_after_step",
                   "on_train_batch_end"]
    valid_batch = ["on_valid_batch_begin", "on_valid_batch_after_pred", "on_valid_batch_after_loss",
                   "on_valid_batch_end"]
    seq = ["on_fit_begin"]
    for _ in range(epochs):
        seq += ["on_epoch_begin", "on_train_begin"] + train_batch * batches + ["on_train_end"]
        if valid_batches is not None:
            seq += ["on_valid_begin"] + valid_batch * valid_batches + ["on_valid_end"]
        seq += ["on_epoch_end"]
    return seq + ["on_fit_end"]


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1, keepdim=True)


@pytest.mark.parametrize("with_valid", [False, True])
def test_every_hook_fires_in_order(with_valid):
    rec = _recorder_class()()
    setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    fitted = setup.fit(_data(6), epochs=2, valid_data=_data(6, 1) if with_valid else None, callbacks=[rec],
                       verbose=False, dataloader_options={"batch_size": 2})
    assert rec.calls == _expected(2, 3, 3 if with_valid else None)
    assert fitted.status == "completed"
    for hook, epoch, it, training, has_pred, has_loss, n_hist in rec.snapshots:
        if hook.startswith("on_train_batch") or hook.startswith("on_valid_batch"):
            assert 1 <= it <= 3 and 1 <= epoch <= 2
            assert training is hook.startswith("on_train")
            assert has_pred == (not hook.endswith("batch_begin"))
            assert has_loss == (hook not in ("on_train_batch_begin", "on_train_batch_after_pred",
                                             "on_valid_batch_begin", "on_valid_batch_after_pred"))
        if hook == "on_epoch_end":
            assert n_hist == epoch  # the epoch's record is in history before on_epoch_end
        if hook == "on_epoch_begin":
            assert n_hist == epoch - 1


def test_ctx_fields_at_batch_begin():
    seen = {}

    class Probe(ln.Callback):
        def on_train_batch_begin(self, ctx):
            if ctx.iter == 1 and ctx.epoch == 1:
                seen.update(input=ctx.input, target=ctx.target, device=ctx.device, opt=ctx.opt,
                            opts=dict(ctx.optimizers), max_epochs=ctx.max_epochs, loss_fn=ctx.loss_fn,
                            metrics=ctx.metrics, model=ctx.model)

    x, y = _data(8)
    loss = nn.MSELoss()
    ln.setup(nn.Linear, loss=loss, metrics=[ln.metrics.MAE()]).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=3, callbacks=[Probe()], verbose=False, dataloader_options={"batch_size": 4,
                                                                                "shuffle": False})
    assert torch.equal(seen["input"], x[:4]) and torch.equal(seen["target"], y[:4])
    assert seen["device"] == torch.device("cpu") and seen["max_epochs"] == 3
    assert seen["opts"] == {"opt": seen["opt"]} and isinstance(seen["opt"], torch.optim.Adam)
    assert seen["loss_fn"] is loss and isinstance(seen["model"], nn.Linear)
    assert [type(m).__name__ for m in seen["metrics"]["train"]] == ["MAE"]


def test_ctx_log_is_averaged_and_reaches_history_printer_and_loggers(tmp_path, capsys):
    class LogIter(ln.Callback):
        def on_train_batch_end(self, ctx):
            ctx.log("it", torch.tensor(float(ctx.iter)))  # a tensor: stays on the device until epoch end

        def on_valid_batch_end(self, ctx):
            ctx.log("const", 2.5)  # a float

    x, y = _data(10)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=2, valid_data=(x, y), verbose=True, dataloader_options={"batch_size": 4},
        callbacks=[LogIter(), ln.callbacks.CSVLogger(tmp_path / "h.csv")])
    # batches of 4, 4, 2 samples: a sample-weighted mean of 1, 2, 3
    assert fitted.history[0]["train_it"] == pytest.approx((1 * 4 + 2 * 4 + 3 * 2) / 10)
    assert fitted.history[1]["valid_const"] == pytest.approx(2.5)
    out = capsys.readouterr().out
    train_lines = [line for line in out.splitlines() if line.startswith("Train metrics: Loss: ")]
    valid_lines = [line for line in out.splitlines() if line.startswith("Valid metrics: Loss: ")]
    assert len(train_lines) == 2 and train_lines[0].endswith(" - it: 1.8")
    assert len(valid_lines) == 2 and valid_lines[1].endswith(" - const: 2.5")
    header = (tmp_path / "h.csv").read_text().splitlines()[0].split(",")
    assert "train_it" in header and "valid_const" in header


def test_history_records_hold_the_contract_keys_exactly():
    """API.md §3: epoch, <set>_loss, <set>_<metric>, lr, epoch_time (plus ctx.log values), nothing else."""
    x, y = _data(40)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.03).fit((x, y), epochs=2, valid_data=0.25, verbose=False)
    for rec in fitted.history:
        assert set(rec) == {"epoch", "train_loss", "train_mae", "valid_loss", "valid_mae", "lr", "epoch_time"}
        assert rec["epoch_time"] > 0
        assert rec["lr"] == pytest.approx(0.03)


def test_builtins_run_in_documented_order(tmp_path):
    class User(ln.Callback):
        def on_epoch_end(self, ctx):
            pass

    x, y = _data(16)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=1, valid_data=(x, y), verbose=True, callbacks=[
            ln.callbacks.EarlyStopping(patience=5), ln.callbacks.KeepBestModel(), User(),
            ln.callbacks.CSVLogger(tmp_path / "h.csv"), ln.callbacks.GradientClip(1.0),
            ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=1),
        ])
    lines = dict(line.split(": ", 1) for line in fitted.context.hooks.describe().splitlines())
    assert lines["on_epoch_end"].split(", ") == ["User", "ProgressPrinter", "LRScheduler", "CSVLogger",
                                                 "KeepBestModel", "EarlyStopping"]
    assert lines["on_train_batch_before_backward"] == "TerminateOnNaN"
    assert lines["on_train_batch_before_step"] == "TerminateOnNaN, GradientClip"  # NaN gradients, then clip
    assert lines["on_train_begin"].split(", ") == ["TerminateOnNaN", "MetricsCallback", "LRRecorder"]
    # an epoch-level scheduler costs nothing per batch
    assert "on_train_batch_end" not in lines or "LRScheduler" not in lines["on_train_batch_end"]


def test_callback_error_names_callback_and_hook_and_fit_end_still_fires(tmp_path):
    ended = []

    class Boom(ln.Callback):
        order = 800

        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                raise ValueError("kaput")

    class End(ln.Callback):
        def on_fit_end(self, ctx):
            ended.append(ctx.status)

    x, y = _data(16)
    with pytest.raises(ln.CallbackError, match=r"Callback Boom raised in on_epoch_end: ValueError: kaput"):
        ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
            (x, y), epochs=4, verbose=False, callbacks=[Boom(), End(), ln.callbacks.CSVLogger(tmp_path / "h.csv")])
    assert ended == ["failed"]
    rows = (tmp_path / "h.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # both finished epochs were logged before the failure, the file is whole


def test_stop_training_flag_stops_after_the_epoch_and_fires_on_early_stopping():
    events = []

    class StopAt2(ln.Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                ctx.stop_training = True

        def on_early_stopping(self, ctx):
            events.append(ctx.epoch)

    x, y = _data(16)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=10, verbose=False, callbacks=[StopAt2()])
    assert len(fitted.history) == 2 and fitted.status == "stopped_early" and events == [2]
