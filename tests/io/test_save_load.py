"""fitted.save / ln.load: identical predictions, history and hparams; strict, explained architecture checks;
and nothing in a file is ever executed (malicious metadata, pickles)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re

import pytest
import torch
from conftest import Net, make_luz_data
from safetensors.torch import save_file
from torch import nn

import lanterna as ln


@pytest.fixture(scope="module")
def fitted():
    x, y = make_luz_data(200)
    return (ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()])
            .set_hparams(d_in=3, d_hidden=8, d_out=1).set_opt_hparams(lr=0.02)
            .fit((x, y), epochs=3, valid_data=0.25, seed=0, verbose=False))


def test_save_load_round_trip(fitted, tmp_path):
    x, y = make_luz_data(50, seed=3)
    path = fitted.save(tmp_path / "model")
    meta = json.loads((path / "lanterna.json").read_text())
    assert sorted(os.listdir(path)) == ["lanterna.json", meta["weights"]["file"]]
    assert re.fullmatch(r"model-[0-9a-f]{12}\.safetensors", meta["weights"]["file"])
    assert meta["weights"]["sha256"] == hashlib.sha256((path / meta["weights"]["file"]).read_bytes()).hexdigest()
    assert meta["module"] == "conftest:Net" and meta["hparams"] == {"d_in": 3, "d_hidden": 8, "d_out": 1}
    loaded = ln.load(path)
    assert isinstance(loaded, ln.Fitted)
    assert torch.equal(loaded.predict(x), fitted.predict(x))
    assert loaded.history == fitted.history
    assert loaded.hparams == fitted.hparams and loaded.opt_hparams == {"lr": 0.02}
    assert loaded.evaluate((x, y)).metrics == pytest.approx(fitted.evaluate((x, y)).metrics)
    assert sorted(loaded.evaluate((x, y)).metrics) == ["loss", "mae", "rmse"]
    assert loaded.plot() is not None
    assert not loaded.model.training


def test_single_safetensors_file_and_module_override(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.safetensors")
    assert path.is_file()
    x = torch.randn(7, 3)
    assert torch.equal(ln.load(path, module=Net).predict(x), fitted.predict(x))
    instance = Net(3, 8, 1)
    assert ln.load(path, module=instance).model is instance


def test_architecture_mismatch_names_keys_and_shapes(fitted, tmp_path):
    path = fitted.save(tmp_path / "model")
    with pytest.raises(ln.ModelMismatchError, match=r"net\.0\.weight: saved \(8, 3\), model \(16, 3\)"):
        ln.load(path, module=Net(3, 16, 1))

    class Wider(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
            self.extra = nn.Linear(1, 1)

    with pytest.raises(ln.ModelMismatchError, match=r"missing in the saved model.*extra\.weight"):
        ln.load(path, module=Wider)


def test_tied_weights_tuples_and_factories(tmp_path):
    class Tied(nn.Module):
        def __init__(self, sizes=(4, 4)):
            super().__init__()
            self.a = nn.Linear(*sizes, bias=False)
            self.b = nn.Linear(*sizes, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    x = torch.randn(16, 4)
    fitted = ln.setup(lambda: Tied((4, 4)), loss=nn.MSELoss()).fit((x, x), epochs=1, verbose=False)
    path = fitted.save(tmp_path / "tied")
    with pytest.raises(ln.ArtifactError, match="factory"):
        ln.load(path)  # a factory is a function: never called from metadata
    loaded = ln.load(path, module=lambda: Tied((4, 4)))
    assert loaded.model.a.weight is loaded.model.b.weight
    assert torch.equal(loaded.predict(x), fitted.predict(x))


def _crafted_artifact(folder, meta):
    """A genuine save of Net(3, 8, 1) whose lanterna.json is then edited (the JSON carries no checksum)."""
    ln.Fitted(Net(3, 8, 1), ln.setup(Net).set_hparams(d_in=3, d_hidden=8, d_out=1), []).save(folder)
    doc = json.loads((folder / "lanterna.json").read_text())
    (folder / "lanterna.json").write_text(json.dumps({**doc, **meta}))
    return folder


@pytest.mark.parametrize("target", ["os:system", "posix:system", "builtins:eval", "subprocess:Popen",
                                    "os:system.__call__", "__import__('os').system:x"])
def test_malicious_metadata_executes_nothing(tmp_path, target):
    marker = tmp_path / "marker"
    path = _crafted_artifact(tmp_path / "evil", {
        "module": target, "module_kind": "class",
        "hparams": {"command": f"touch {marker}", "args": ["touch", str(marker)], "source": f"open('{marker}','w')"},
    })
    with pytest.raises(ln.ArtifactError, match="Refused|not an import path"):
        ln.load(path)
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "marker"
    raw = tmp_path / "model.pkl"
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ln.ArtifactError, match="pickle"):
        ln.load(raw)
    zipped = tmp_path / "model.pt"
    torch.save({"model": _Evil(marker)}, zipped)
    with pytest.raises(ln.ArtifactError, match="weights-only"):
        ln.load(zipped)
    folder = _crafted_artifact(tmp_path / "disguised", {})
    weights = json.loads((folder / "lanterna.json").read_text())["weights"]["file"]
    (folder / weights).write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ln.ArtifactError, match=r"safetensors' is a pickle file"):
        ln.load(folder)
    assert not marker.exists()


def test_not_an_artifact(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ln.ArtifactError, match="not a lanterna artifact"):
        ln.load(text)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ln.ArtifactError, match="no lanterna metadata"):
        ln.load(tmp_path / "plain.safetensors")
    with pytest.raises(ln.ArtifactError, match="No model"):
        ln.load(tmp_path / "missing")


def test_newer_artifact_version_is_refused(fitted, tmp_path):
    path = _crafted_artifact(tmp_path / "future", {"module": "conftest:Net", "format_version": 99})
    with pytest.raises(ln.ArtifactError, match="newer lanterna"):
        ln.load(path)


def test_load_a_model_checkpoint_file(tmp_path):
    x, y = make_luz_data(200)
    cb = ln.callbacks.ModelCheckpoint(tmp_path / "ckpt" / "last.pt", monitor="train_loss")
    fitted = ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1).fit(
        (x, y), epochs=2, verbose=False, callbacks=[cb])
    loaded = ln.load(cb.last_path)
    assert torch.equal(loaded.predict(x), fitted.predict(x))
    assert loaded.history == fitted.history and loaded.hparams == {"d_in": 3, "d_hidden": 8, "d_out": 1}


def test_load_a_damaged_checkpoint_file_is_a_typed_error(tmp_path):
    x, y = make_luz_data(100)
    cb = ln.callbacks.ModelCheckpoint(tmp_path / "last.pt", monitor="train_loss")
    ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=8, d_out=1).fit(
        (x, y), epochs=1, verbose=False, callbacks=[cb])
    data = bytearray(cb.last_path.read_bytes())
    weight = torch.load(cb.last_path, weights_only=True)["model"]["net.0.weight"].numpy().tobytes()
    data[bytes(data).find(weight[:16]) + 2] ^= 0x08
    cb.last_path.write_bytes(bytes(data))
    with pytest.raises(ln.DamagedCheckpointError, match="checksum"):
        ln.load(cb.last_path)


@pytest.mark.parametrize("target", ["os:system", "os.system"])
def test_editing_the_saved_json_to_name_a_function_is_refused(fitted, tmp_path, target):
    marker = tmp_path / "marker"
    path = fitted.save(tmp_path / "model")
    meta = json.loads((path / "lanterna.json").read_text())
    meta.update(module=target, hparams={"command": f"touch {marker}"})
    (path / "lanterna.json").write_text(json.dumps(meta))
    with pytest.raises(ln.ArtifactError, match="Refused|not an import path"):
        ln.load(path)
    assert not marker.exists()
