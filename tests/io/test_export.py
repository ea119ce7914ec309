"""fitted.export: ONNX (checked with onnxruntime), TorchScript and torch.export round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn

import lanterna as ln


@pytest.fixture(scope="module")
def fitted():
    x, y = make_luz_data(200)
    return ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1).fit(
        (x, y), epochs=2, verbose=False, seed=0)


def test_onnx_round_trip_with_onnxruntime(fitted, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = fitted.export(tmp_path / "model.onnx", torch.randn(4, 3), format="onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(11, 3)  # another batch size: the batch dimension is dynamic
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(out), fitted.predict(x), atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")
def test_torchscript_round_trip(fitted, tmp_path):
    path = fitted.export(tmp_path / "model.pt", torch.randn(4, 3), format="torchscript")
    loaded = torch.jit.load(str(path))
    x = torch.randn(9, 3)
    assert torch.allclose(loaded(x), fitted.predict(x), atol=1e-6)


def test_exported_program_round_trip(fitted, tmp_path):
    path = fitted.export(tmp_path / "model.pt2", torch.randn(4, 3), format="exported_program")
    loaded = torch.export.load(str(path)).module()
    x = torch.randn(13, 3)
    assert torch.allclose(loaded(x), fitted.predict(x), atol=1e-6)


def test_multi_input_multi_output_models(tmp_path):
    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, z):
            h = self.a(x) + self.b(z)
            return h, h.sum(-1)

    model = TwoInTwoOut().eval()
    fitted = ln.Fitted(model, None, [])
    example = (torch.randn(5, 3), torch.randn(5, 4))
    path = fitted.export(tmp_path / "m.pt2", example, format="exported_program")
    out = torch.export.load(str(path)).module()(*example)
    assert all(torch.allclose(a, b) for a, b in zip(out, model(*example)))
    pytest.importorskip("onnxruntime")
    fitted.export(tmp_path / "m.onnx", {"x": example[0], "z": example[1]}, format="onnx")


def test_bad_format_and_input(fitted, tmp_path):
    with pytest.raises(ln.ExportError, match="not one of"):
        fitted.export(tmp_path / "m", torch.randn(2, 3), format="tflite")
    with pytest.raises(ln.ExportError, match="no tensor"):
        fitted.export(tmp_path / "m.onnx", [1, 2], format="onnx")
    with pytest.raises(ln.ExportError, match="cannot run on example_input"):
        fitted.export(tmp_path / "m.pt2", torch.randn(2, 5), format="exported_program")  # wrong width
