"""Accelerator(compile=...): torch.compile for training and inference, results within tolerance of eager,
and a backend that fails at the first compiled call is explained and run eagerly."""

from __future__ import annotations

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn

import lanterna as ln

# torch.compile's own internals still touch deprecated torch.jit entry points
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated. Please switch to:DeprecationWarning")


def _fit(accelerator=None, epochs=30):
    x, y = make_luz_data(1000)
    return (ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_hparams(d_in=3, d_hidden=32, d_out=1)
            .set_opt_hparams(lr=0.01)
            .fit((x, y), epochs=epochs, valid_data=0.2, seed=0, verbose=False, accelerator=accelerator,
                 dataloader_options={"batch_size": 100}))


@pytest.mark.slow  # inductor generates and builds C++ on the first call: tens of seconds on a cold cache
def test_compile_true_trains_to_the_noise_floor_like_eager():
    compiled = _fit(ln.Accelerator(device="cpu", compile=True))
    eager = _fit(ln.Accelerator(device="cpu"))
    assert compiled.history[-1]["valid_loss"] < 1.15  # the data's noise variance is 1
    for c, e in zip(compiled.history, eager.history):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["valid_loss"] == pytest.approx(e["valid_loss"], rel=1e-4)
    x = torch.randn(64, 3)
    assert torch.allclose(compiled.predict(x), eager.predict(x), atol=1e-4)


def test_compile_options_dict_is_used_for_training_and_inference():
    calls = []

    def counting_backend(gm, example_inputs):  # a real torch.compile backend: runs the captured graph
        calls.append(len(gm.graph.nodes))
        return gm.forward

    compiled = _fit(ln.Accelerator(device="cpu", compile={"backend": counting_backend}), epochs=3)
    assert calls  # graphs were captured and compiled
    n_train = len(calls)
    eager = _fit(ln.Accelerator(device="cpu"), epochs=3)
    assert [r["train_loss"] for r in compiled.history] == pytest.approx([r["train_loss"] for r in eager.history],
                                                                        rel=1e-6)
    x = torch.randn(10, 3)
    assert torch.allclose(compiled.predict(x), eager.predict(x), atol=1e-6)
    assert len(calls) >= n_train


def test_a_backend_failing_at_the_first_call_is_explained_and_runs_eagerly():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    with pytest.warns(UserWarning, match=r"could not compile Net.*no C\+\+ compiler found.*running it eagerly"):
        fallback = _fit(ln.Accelerator(device="cpu", compile={"backend": broken_backend}), epochs=3)
    eager = _fit(ln.Accelerator(device="cpu"), epochs=3)
    assert [r["train_loss"] for r in fallback.history] == [r["train_loss"] for r in eager.history]
    x = torch.randn(10, 3)
    assert torch.equal(fallback.predict(x), eager.predict(x))
