"""Console output in luz's form (API.md §4), repr(fitted) and repr(evaluation)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import Net, linear_setup, make_luz_data
from torch import nn

import lanterna as ln
from lanterna.callbacks.progress import LiveProgress, format_value

VALUE = r"-?\d+(\.\d{0,3}[1-9])?"  # rounded to 4 decimals, no trailing zeros


def luz_fit(**kw):
    x, y = make_luz_data(n=300)
    return (
        ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
        .set_hparams(d_in=3, d_hidden=32, d_out=1)
        .fit((x[:200], y[:200]), valid_data=(x[200:], y[200:]), seed=0, **kw)
    )


@pytest.mark.parametrize(
    "value, text",
    [(2.58634, "2.5863"), (2.48700001, "2.487"), (1.26, "1.26"), (0.75, "0.75"), (1.0, "1"), (0.89999, "0.9"),
     (-0.00001, "0"), (12.0, "12"), (-1.23456, "-1.2346"), (float("nan"), "nan"), (3, "3")],
)
def test_values_are_rounded_to_4_decimals_without_trailing_zeros(value, text):
    assert format_value(value) == text


def test_captured_output_has_the_exact_luz_lines_and_no_carriage_returns(capsys):
    fitted = luz_fit(epochs=3)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    expected = []
    for rec in fitted.history:
        expected += [
            f"Epoch {rec['epoch']}/3",
            f"Train metrics: Loss: {format_value(rec['train_loss'])} - MAE: {format_value(rec['train_mae'])}",
            f"Valid metrics: Loss: {format_value(rec['valid_loss'])} - MAE: {format_value(rec['valid_mae'])}",
        ]
    assert lines == expected
    pattern = re.compile(rf"(Train|Valid) metrics: Loss: {VALUE} - MAE: {VALUE}")
    assert all(pattern.fullmatch(line) for line in lines if "metrics" in line)


def test_without_validation_only_train_lines_are_printed(capsys):
    x, y = make_luz_data(n=64)
    ln.setup(Net, loss=nn.MSELoss()).fit((x, y), epochs=2, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2" and len(lines) == 4
    assert re.fullmatch(rf"Train metrics: Loss: {VALUE}", lines[1])


def test_logged_values_are_printed_like_metrics(capsys):
    class LogTwo(ln.Callback):
        def on_train_batch_end(self, ctx):
            ctx.log("two", 2.0)

    x, y = make_luz_data(n=64)
    ln.setup(Net, loss=nn.MSELoss()).fit((x, y), epochs=1, callbacks=[LogTwo()])
    assert re.fullmatch(rf"Train metrics: Loss: {VALUE} - two: 2", capsys.readouterr().out.splitlines()[1])


def test_verbose_false_prints_nothing(capsys):
    fitted = luz_fit(epochs=2, verbose=False)
    x, y = make_luz_data(n=20)
    fitted.predict(x)
    fitted.evaluate((x, y))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_on_a_terminal_a_live_bar_is_added_and_the_lines_remain(capsys, monkeypatch):
    monkeypatch.setattr("lanterna.callbacks.progress.is_interactive", lambda stream=None: True)
    luz_fit(epochs=2)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert re.search(rf"Train metrics: Loss: {VALUE} - MAE: {VALUE}", out)


def test_repr_fitted_shows_times_last_metrics_and_parameter_count():
    fitted = luz_fit(epochs=2, verbose=False)
    text = repr(fitted)
    assert "Total time:" in text
    assert re.search(r"Avg time per epoch: \d+(\.\d)?(ms|s) \(2 epochs, completed\)", text)
    last = fitted.history[-1]
    assert f"loss: {format_value(last['train_loss'])}" in text
    assert f"mae: {format_value(last['valid_mae'])}" in text
    assert "Training:" in text and "Validation:" in text
    assert "161 parameters" in text  # 3*32 + 32 + 32*1 + 1


def test_repr_fitted_counts_frozen_parameters_apart():
    x, y = make_luz_data(n=32)
    model = Net()
    model.net[0].requires_grad_(False)
    fitted = ln.setup(model, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
    assert "161 parameters (33 trainable)" in repr(fitted)


def test_repr_evaluation_prints_name_value_lines():
    assert repr(ln.Evaluation({"loss": 0.92712, "mae": 0.73480001})) == "loss: 0.9271\nmae: 0.7348"
    fitted = luz_fit(epochs=1, verbose=False)
    x, y = make_luz_data(n=50, seed=4)
    ev = fitted.evaluate((x, y))
    lines = repr(ev).splitlines()
    assert [line.split(": ")[0] for line in lines] == ["loss", "mae"]
    assert all(re.fullmatch(rf"\w+: {VALUE}", line) for line in lines)
    assert lines[0] == f"loss: {format_value(ev['loss'])}"


def test_predict_on_cpu_returns_cpu_tensors_and_evaluate_floats():
    fitted = luz_fit(epochs=1, verbose=False)
    x, y = make_luz_data(n=50, seed=4)
    assert fitted.predict(x).device == torch.device("cpu")
    assert all(type(v) is float for v in fitted.evaluate((x, y)).metrics.values())


# ---------------------------------------------------------------------------- from issue 11


def test_the_progress_bar_reads_the_loss_without_a_torch_warning(capsys):
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    bar = LiveProgress(refresh_per_second=1e9)  # refresh at every batch: the loss is read each time
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "requires_grad ... to a scalar" UserWarning fails the fit
        fitted = linear_setup().fit((x, y), epochs=1, verbose=True, callbacks=[bar],
                                    dataloader_options={"batch_size": 8})
    assert len(fitted.history) == 1


def test_a_printer_given_in_callbacks_replaces_the_default_one(capsys):
    """A LiveProgress (a ProgressPrinter subclass) given by the user is the only printer: lines print once."""
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=2, verbose=True, callbacks=[ln.callbacks.LiveProgress()])
    printers = [cb for cb in fitted.context.hooks.callbacks if isinstance(cb, ln.callbacks.ProgressPrinter)]
    assert len(printers) == 1
    assert capsys.readouterr().out.count("Epoch 2/2") == 1
