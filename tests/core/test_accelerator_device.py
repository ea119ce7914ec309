"""Devices: auto-detection, where the model and batches live, and what predict/evaluate hand back."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn

import lanterna as ln
from lanterna.core.accelerator import default_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_detection_follows_cuda_then_mps_then_cpu():
    acc = ln.Accelerator()
    if torch.cuda.is_available():
        assert acc.device.type == "cuda" and acc.device.index is not None
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        assert acc.device.type == "mps"
    else:
        assert acc.device == torch.device("cpu")
    assert default_device() == acc.device


def test_auto_detection_picks_cpu_when_no_accelerator_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert ln.Accelerator().device == torch.device("cpu")


def test_fit_runs_on_the_detected_device_and_results_come_back_on_the_cpu():
    x, y = make_luz_data(n=64)
    seen = []

    class Where(ln.Callback):
        def on_train_batch_begin(self, ctx):
            seen.append((ctx.input.device, next(ctx.model.parameters()).device, ctx.device))

    fitted = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).fit(
        (x, y), epochs=1, verbose=False, callbacks=[Where()])
    device = default_device()
    assert all(d == (device, device, device) for d in seen)
    assert fitted.context.device == device
    pred = fitted.predict(x)
    assert pred.device.type == "cpu"
    ev = fitted.evaluate((x, y))
    assert all(type(v) is float for v in ev.metrics.values())
    assert all(type(v) in (int, float) for v in fitted.history[-1].values())


def test_an_explicit_cpu_device_and_bad_options():
    assert ln.Accelerator(device="cpu").device == torch.device("cpu")
    with pytest.raises(ln.LanternaError, match="precision='8'"):
        ln.Accelerator(precision="8")
    with pytest.raises(ln.LanternaError, match="strategy='ring'"):
        ln.Accelerator(strategy="ring")


@cuda
def test_on_cuda_predict_and_evaluate_come_back_on_the_cpu():
    x, y = make_luz_data(n=64)
    fitted = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).fit(
        (x, y), epochs=2, verbose=False, accelerator=ln.Accelerator(device="cuda"))
    assert next(fitted.model.parameters()).device.type == "cuda"
    assert fitted.predict(x).device.type == "cpu"
    ev = fitted.evaluate((x, y))
    with torch.no_grad():
        direct = (fitted.model(x.cuda()).cpu() - y).double()
    assert ev["loss"] == pytest.approx(float(direct.square().mean()), rel=1e-5)
    assert ev["mae"] == pytest.approx(float(direct.abs().mean()), rel=1e-5)


mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), 0])
def test_cuda_without_a_gpu_is_a_clear_error_naming_the_device_and_what_is_available(device):
    with pytest.raises(ln.LanternaError, match=r"Accelerator\(device=.*cuda.*\): CUDA is not available.*"
                                               r"Available: 'cpu'.*device=None"):
        ln.Accelerator(device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_last_gpu_is_a_clear_error():
    n = torch.cuda.device_count()
    with pytest.raises(ln.LanternaError, match=rf"device='cuda:{n}'.*{n} CUDA device.*'cuda:0'"):
        ln.Accelerator(device=f"cuda:{n}")


@pytest.mark.skipif(mps_available, reason="needs a machine without MPS")
def test_mps_where_unavailable_is_a_clear_error():
    with pytest.raises(ln.LanternaError, match=r"Accelerator\(device='mps'\): MPS is not available.*Available: 'cpu'"):
        ln.Accelerator(device="mps")


@pytest.mark.parametrize("device, shown", [("gpu", "'gpu'"), ("cuda:x", "'cuda:x'"), (3.5, "3.5"), ("", "''")])
def test_an_unknown_device_is_a_clear_error_listing_the_available_ones(device, shown):
    with pytest.raises(ln.LanternaError, match=rf"Accelerator\(device={re.escape(shown)}\): not a device.*"
                                               r"Available: 'cpu'"):
        ln.Accelerator(device=device)


def test_a_common_wrong_device_name_gets_a_hint():
    with pytest.raises(ln.LanternaError, match=r"device='gpu'\): not a device torch knows \(did you mean 'cuda'\?\)"):
        ln.Accelerator(device="gpu")


def test_the_device_is_checked_before_any_training():
    if torch.cuda.is_available():
        pytest.skip("needs a torch without a usable GPU")
    x, y = make_luz_data(n=16)
    steps = []

    class Count(ln.Callback):
        def on_train_batch_begin(self, ctx):
            steps.append(ctx.iter)

    with pytest.raises(ln.LanternaError, match="CUDA is not available"):
        ln.setup(Net, loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False, callbacks=[Count()],
                                              accelerator=ln.Accelerator(device="cuda"))
    assert steps == []


@pytest.mark.parametrize("precision, hint", [("8", None), ("fp16", "16-mixed"), ("bf16", "bf16-mixed"), (None, None)])
def test_a_bad_precision_names_the_value_and_the_choices(precision, hint):
    with pytest.raises(ln.LanternaError, match=rf"Accelerator\(precision={re.escape(repr(precision))}\): use one of "
                                               r"'32'.*'bf16-mixed', '16-mixed'") as err:
        ln.Accelerator(device="cpu", precision=precision)
    assert (f"did you mean precision={hint!r}?" in str(err.value)) == (hint is not None)
