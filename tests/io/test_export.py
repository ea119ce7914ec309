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


class _DictIn(nn.Module):
    """Keys with capitals: the ONNX inputs must keep them as given."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, Xnum, Zeta):  # noqa: N803 - capitalised names are the point
        return self.a(Xnum) * self.b(Zeta)


class _TupleIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x, z):
        h = self.a(x) + self.b(z)
        return h, h.sum(-1)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return {"Mean": h[:, :1], "scale": h[:, 1:].exp()}


def _session(path):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def test_onnx_names_single_input_fed_by_name(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    session, ins, outs = _session(fitted.export(tmp_path / "m.onnx", torch.randn(4, 3)))
    assert (ins, outs) == (["x"], ["output"])  # conftest Net.forward(self, x)
    x = torch.randn(7, 3)
    (out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), fitted.predict(x), atol=1e-5, rtol=1e-5)


def test_onnx_names_dict_input_keeps_keys_and_order(tmp_path):
    pytest.importorskip("onnxruntime")
    fitted = ln.Fitted(_DictIn().eval(), None, [])
    example = {"Zeta": torch.randn(5, 4), "Xnum": torch.randn(5, 3)}  # not forward's order
    session, ins, outs = _session(fitted.export(tmp_path / "m.onnx", example))
    assert (ins, outs) == (["Zeta", "Xnum"], ["output"])
    data = {"Xnum": torch.randn(9, 3), "Zeta": torch.randn(9, 4)}  # the same dict predict takes
    (out,) = session.run(None, {k: v.numpy() for k, v in data.items()})
    torch.testing.assert_close(torch.from_numpy(out), fitted.predict(data), atol=1e-5, rtol=1e-5)


def test_onnx_names_tuple_input_and_tuple_output(tmp_path):
    pytest.importorskip("onnxruntime")
    fitted = ln.Fitted(_TupleIn().eval(), None, [])
    session, ins, outs = _session(fitted.export(tmp_path / "m.onnx", (torch.randn(5, 3), torch.randn(5, 4))))
    assert (ins, outs) == (["x", "z"], ["output_0", "output_1"])
    x, z = torch.randn(6, 3), torch.randn(6, 4)
    got = session.run(None, {"x": x.numpy(), "z": z.numpy()})
    want = fitted.predict(((x, z), torch.zeros(6)))  # (input, ignored target): a tuple input
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-5, rtol=1e-5)


def test_onnx_names_dict_output_keys_and_overrides(tmp_path):
    pytest.importorskip("onnxruntime")
    fitted = ln.Fitted(_DictOut().eval(), None, [])
    session, ins, outs = _session(fitted.export(tmp_path / "m.onnx", torch.randn(4, 3)))
    assert (ins, outs) == (["x"], ["Mean", "scale"])
    x = torch.randn(3, 3)
    got = dict(zip(outs, session.run(None, {"x": x.numpy()})))
    want = fitted.predict(x)
    for k in ("Mean", "scale"):
        torch.testing.assert_close(torch.from_numpy(got[k]), want[k], atol=1e-5, rtol=1e-5)
    _, ins, outs = _session(fitted.export(tmp_path / "o.onnx", torch.randn(4, 3), input_names=["features"],
                                          output_names=["mu", "sigma"]))
    assert (ins, outs) == (["features"], ["mu", "sigma"])
    with pytest.raises(ln.ExportError, match="unique.*'x'.*output_names="):
        fitted.export(tmp_path / "c.onnx", torch.randn(4, 3), output_names=["x", "scale"])
