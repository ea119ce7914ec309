"""Mixed precision trains the luz toy regression to its noise floor (an MSE of 1, the variance of the noise):
``bf16-mixed`` (autocast to bfloat16, no scaler) and ``16-mixed`` (float16 with a gradient scaler), on CPU here
and on CUDA where there is one. The forward really runs in the low precision, the weights stay float32."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_luz_data
from torch import nn

import lanterna as ln

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class DtypeNet(nn.Module):
    """The chapter's Net, recording the dtype its training forward passes compute in."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 1))
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.seen.add(out.dtype)
        return out


@functools.cache
def _fit(precision: str, device: str) -> ln.Fitted:
    x, y = make_luz_data(n=1000)
    return (
        ln.setup(DtypeNet, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
        .set_opt_hparams(lr=0.02)
        .fit((x[:800], y[:800]), epochs=40, valid_data=(x[800:], y[800:]), verbose=False, seed=0,
             dataloader_options={"batch_size": 100}, accelerator=ln.Accelerator(device=device, precision=precision))
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision, dtype, scaler", [
    ("bf16-mixed", torch.bfloat16, False),
    ("16-mixed", torch.float16, True),
])
def test_mixed_precision_reaches_the_noise_floor(precision, dtype, scaler, device):
    full = _fit("32", device)
    mixed = _fit(precision, device)
    last = mixed.history[-1]
    assert mixed.model.seen == {dtype}, "the forward did not run under autocast"
    assert full.model.seen == {torch.float32}
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters()), "master weights stay float32"
    assert (mixed.context.scaler is not None) == scaler
    if scaler:
        assert isinstance(mixed.context.scaler, torch.amp.GradScaler)
    # the noise has variance 1: a fitted model sits near an MSE of 1 on fresh data, as the float32 run does
    assert 0.8 < last["valid_loss"] < 1.2, last
    assert last["valid_loss"] == pytest.approx(full.history[-1]["valid_loss"], abs=0.05)
    assert mixed.history[0]["train_loss"] > 1.5 * last["train_loss"], "it trained"
    x, _ = make_luz_data(n=1000)
    pred = mixed.predict(x[:10])
    assert pred.dtype == torch.float32 and pred.device.type == "cpu"  # 16-bit autocast outputs, given as float32


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ln.errors.LanternaError, match="bf16-mixed"):
        ln.Accelerator(precision="8-mixed")
