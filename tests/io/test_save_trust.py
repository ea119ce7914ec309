"""fitted.save / ln.load can be trusted (API.md §7): every setup fit accepts saves and round-trips exactly, a
save is atomic as a whole (real SIGKILLs), damaged files are typed errors naming the file, and loading never
imports a module named in a file."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn

import lanterna as ln
from lanterna.errors import DamagedArtifactError
from lanterna.io.artifact_read import sniff
from lanterna.results import Fitted


class ActNet(nn.Module):
    """A model whose hparams hold a module class, a dtype, a tensor, a tuple and a dict with int keys."""

    def __init__(self, act=nn.ReLU, dtype=torch.float32, scale=None, sizes=(8,), names=None):
        super().__init__()
        self.act = act() if isinstance(act, type) else act
        self.lin1 = nn.Linear(3, sizes[0], dtype=dtype)
        self.lin2 = nn.Linear(sizes[0], 3, dtype=dtype)
        self.register_buffer("scale", torch.ones(3, dtype=dtype) if scale is None else scale.to(dtype))
        self.names = names

    def forward(self, x):
        return (self.lin2(self.act(self.lin1(x.to(self.lin1.weight.dtype)))) * self.scale).float()


def _class_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _weights_file(folder):
    return folder / json.loads((folder / "lanterna.json").read_text())["weights"]["file"]


# ---------------------------------------------------------------------------------------------- 1. round trip


@pytest.fixture(scope="module")
def rich():
    """A fit whose setup holds everything the issue lists: betas tuple, a class-weighted loss, a module class,
    a dtype, a tensor, int dict keys; plus NaN and Inf in history."""
    x, y = _class_data()
    weight = torch.tensor([1.0, 2.5, 0.5])
    fitted = (ln.setup(ActNet, loss=nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1),
                       optimizer=torch.optim.AdamW, metrics=[ln.metrics.Accuracy()])
              .set_hparams(act=nn.Tanh, dtype=torch.float64, scale=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64),
                           sizes=(8, 4), names={0: "zero", "__dunder": (1, 2)})
              .set_opt_hparams(lr=0.01, betas=(0.9, 0.99))
              .fit((x, y), epochs=2, seed=0, verbose=False))
    fitted.history[0]["train_note"] = float("nan")
    fitted.history[1]["train_note"] = float("-inf")
    return fitted


@pytest.mark.parametrize("name", ["model", "model.safetensors"])
def test_every_setup_value_round_trips_exactly(rich, tmp_path, name):
    x, y = _class_data(40, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped: no "cannot be stored" warning
        path = rich.save(tmp_path / name)
        loaded = ln.load(path)
    hp = loaded.hparams
    assert hp["act"] is nn.Tanh and hp["dtype"] is torch.float64
    assert hp["scale"].dtype == torch.float64 and torch.equal(hp["scale"], torch.tensor([0.5, 2.0, 1.0]).double())
    assert hp["sizes"] == (8, 4) and type(hp["sizes"]) is tuple
    assert hp["names"] == {0: "zero", "__dunder": (1, 2)} and type(hp["names"]["__dunder"]) is tuple
    assert loaded.opt_hparams == {"lr": 0.01, "betas": (0.9, 0.99)} and type(loaded.opt_hparams["betas"]) is tuple
    assert loaded.setup.optimizer is torch.optim.AdamW
    assert math.isnan(loaded.history[0]["train_note"]) and loaded.history[1]["train_note"] == float("-inf")
    assert [{k: v for k, v in r.items() if k != "train_note"} for r in loaded.history] == \
        [{k: v for k, v in r.items() if k != "train_note"} for r in rich.history]
    loss = loaded.setup.loss
    assert type(loss) is nn.CrossEntropyLoss and loss.label_smoothing == 0.1
    assert torch.equal(loss.weight, torch.tensor([1.0, 2.5, 0.5])) and loss.weight.dtype == torch.float32
    assert isinstance(loaded.model.act, nn.Tanh) and loaded.model.lin1.weight.dtype == torch.float64
    assert torch.equal(loaded.predict(x), rich.predict(x))
    assert loaded.evaluate((x, y)).metrics == rich.evaluate((x, y)).metrics  # the weighted loss, exactly


def test_the_metadata_is_encoded_once_and_readable(rich, tmp_path):
    path = rich.save(tmp_path / "model")
    meta = json.loads((path / "lanterna.json").read_text())
    assert meta["format"] == "lanterna.model" and meta["format_version"] == 2
    assert meta["opt_hparams"]["betas"] == {"__tuple__": [0.9, 0.99]}
    assert meta["hparams"]["act"] == {"__class__": "torch.nn.modules.activation:Tanh"}
    assert meta["hparams"]["dtype"] == {"__dtype__": "float64"}
    assert meta["hparams"]["scale"] == {"__tensor__": "0", "dtype": "float64", "shape": [3]}
    assert meta["history"][0]["train_note"] == {"__float__": "nan"}
    assert meta["loss"]["__module__"] == "torch.nn.modules.loss:CrossEntropyLoss"
    assert meta["loss"]["kwargs"]["weight"]["dtype"] == "float32"


def test_module_instances_as_hparams_round_trip(tmp_path):
    x, y = _class_data()
    fitted = ln.setup(ActNet, loss=nn.CrossEntropyLoss()).set_hparams(act=nn.LeakyReLU(0.25)).fit(
        (x, y), epochs=1, verbose=False)
    loaded = ln.load(fitted.save(tmp_path / "m"))
    act = loaded.hparams["act"]
    assert type(act) is nn.LeakyReLU and act.negative_slope == 0.25
    assert torch.equal(loaded.predict(x), fitted.predict(x))


def test_an_unstorable_hparam_saves_and_load_asks_for_module(tmp_path):
    x, y = _class_data()
    fitted = ln.setup(ActNet, loss=nn.CrossEntropyLoss()).set_hparams(act=torch.tanh).fit(
        (x, y), epochs=1, verbose=False)
    with pytest.warns(UserWarning, match=r"hparams\['act'\].*torch\.tanh"):
        path = fitted.save(tmp_path / "m")
    with pytest.raises(ln.ArtifactError, match=r"(?s)hparams\['act'\].*module="):
        ln.load(path)
    loaded = ln.load(path, module=lambda **hp: ActNet(act=torch.tanh, **hp))
    assert torch.equal(loaded.predict(x), fitted.predict(x))
    assert torch.equal(ln.load(path, module=ActNet(act=torch.tanh)).predict(x), fitted.predict(x))


def test_a_loss_function_is_not_replaced_by_the_models_own_loss(tmp_path):
    class WithOwnLoss(Net):
        def loss(self, pred, target):
            return (pred - target).abs().mean() * 1000

    x, y = make_luz_data(64)
    fitted = Fitted(WithOwnLoss(3, 4, 1), ln.setup(WithOwnLoss, loss=nn.functional.mse_loss), [])
    path = fitted.save(tmp_path / "m")
    with pytest.warns(UserWarning, match=r"(?s)loss.*mse_loss.*loss="):
        loaded = ln.load(path, module=WithOwnLoss(3, 4, 1))
    assert loaded.loss_fn is None  # not the model's own loss in its place
    again = ln.load(path, module=WithOwnLoss(3, 4, 1), loss=nn.MSELoss())
    assert again.evaluate((x, y)).metrics["loss"] == pytest.approx(nn.functional.mse_loss(again.predict(x), y).item())


# ---------------------------------------------------------------------------------------------- 2. atomic


def _pair():
    """Two saved states that differ in weights and in metadata (lr, history)."""
    torch.manual_seed(0)
    out = []
    for lr in (0.1, 0.2):
        model = Net(3, 64, 1)
        setup = ln.setup(Net).set_hparams(d_in=3, d_hidden=64, d_out=1).set_opt_hparams(lr=lr)
        out.append(Fitted(model, setup, [{"epoch": 1, "train_loss": lr}]))
    return out


def _which(path, pair):
    """0 or 1: which of the pair ``ln.load(path)`` gives back, checking weights and metadata agree."""
    loaded = ln.load(path)
    state = loaded.model.state_dict()
    hits = [i for i, f in enumerate(pair) if all(torch.equal(state[k], v) for k, v in f.model.state_dict().items())]
    assert len(hits) == 1, "weights are neither the old nor the new model"
    i = hits[0]
    assert loaded.opt_hparams == pair[i].opt_hparams and loaded.history == pair[i].history, "a mix"
    return i


def _run_child(body):
    """Fork; the child runs ``body`` and exits; returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            body()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_kill_between_the_weights_and_the_metadata_keeps_the_previous_model(tmp_path):
    pair = _pair()
    path = pair[0].save(tmp_path / "m")

    def body():
        import lanterna.io.artifact as artifact

        real = artifact.atomic_write_bytes

        def write(target, data):
            if os.path.basename(target) == "lanterna.json":  # the new weights are on disk: die now
                os.kill(os.getpid(), signal.SIGKILL)
            return real(target, data)

        artifact.atomic_write_bytes = write
        pair[1].save(path)

    _, status = os.waitpid(_run_child(body), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert len(list(path.glob("*.safetensors"))) == 2  # the new weights sit there, unreferenced
    assert _which(path, pair) == 0
    pair[1].save(path)  # the next save cleans up
    assert _which(path, pair) == 1
    assert _files(path) == sorted(["lanterna.json", _weights_file(path).name])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_moments_leaves_the_old_or_the_new_model(tmp_path):
    pair = _pair()
    path = pair[0].save(tmp_path / "m")
    rng = random.Random(11)
    seen = set()
    for _ in range(10):
        def body():
            i = 1
            while True:
                pair[i].save(path)
                i = 1 - i

        pid = _run_child(body)
        time.sleep(rng.uniform(0.0, 0.04))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the saving child ended by itself (it raised)"
        seen.add(_which(path, pair))
    assert seen <= {0, 1}
    pair[0].save(path)
    assert _which(path, pair) == 0
    assert _files(path) == sorted(["lanterna.json", _weights_file(path).name])  # no temp file, no stale weights


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_loading_while_another_process_saves_gives_a_whole_model(tmp_path):
    pair = _pair()
    path = pair[0].save(tmp_path / "m")

    def body():
        i = 1
        while True:
            pair[i].save(path)
            i = 1 - i

    pid = _run_child(body)
    seen, end = [], time.monotonic() + 0.5
    try:
        while time.monotonic() < end or len(seen) < 10:
            seen.append(_which(path, pair))  # each load: one whole model, never a mix or an error
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert set(seen) <= {0, 1}


def test_saving_the_same_model_twice_keeps_one_weights_file(tmp_path):
    fitted = _pair()[0]
    path = fitted.save(tmp_path / "m")
    first = _files(path)
    fitted.save(path)
    assert _files(path) == first and len(first) == 2


# ---------------------------------------------------------------------------------------------- 3. checksums


@pytest.fixture()
def saved(tmp_path):
    fitted = _pair()[0]
    return fitted, fitted.save(tmp_path / "m"), fitted.save(tmp_path / "one.safetensors")


def _flip(file, offset_from_end=10, bit=0x04):
    data = bytearray(file.read_bytes())
    data[len(data) - offset_from_end] ^= bit
    file.write_bytes(bytes(data))


def test_a_flipped_weight_byte_is_a_typed_error_naming_the_file(saved):
    _, folder, single = saved
    weights = _weights_file(folder)
    _flip(weights)
    with pytest.raises(DamagedArtifactError, match=rf"(?s){weights.name}.*SHA-256"):
        ln.load(folder)
    _flip(single)
    with pytest.raises(DamagedArtifactError, match=r"(?s)one\.safetensors.*SHA-256"):
        ln.load(single)
    assert issubclass(DamagedArtifactError, ln.ArtifactError)


def test_a_damaged_header_length_is_not_called_a_pickle(saved):
    _, folder, single = saved
    for file in (single, _weights_file(folder)):
        data = bytearray(file.read_bytes())
        data[0] = 0x80
        data[1] = 0x03  # what a protocol-3 pickle starts with
        file.write_bytes(bytes(data))
        assert sniff(file) != "pickle"
    with pytest.raises(DamagedArtifactError, match=r"one\.safetensors.*damaged") as ei:
        ln.load(single)
    assert "pickle" not in str(ei.value)
    with pytest.raises(DamagedArtifactError, match="damaged") as ei:
        ln.load(folder)
    assert "pickle" not in str(ei.value)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_pickles_are_still_recognised(tmp_path, protocol):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol))
    assert sniff(p) == "pickle"
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert sniff(legacy) == "pickle"
    with pytest.raises(ln.ArtifactError, match="never unpickles"):
        ln.load(legacy)


@pytest.mark.parametrize("damage", ["truncated", "zeros", "empty", "missing"])
def test_truncated_zeroed_empty_or_missing_weights(saved, damage):
    _, folder, single = saved
    for file in (_weights_file(folder), single):
        data = file.read_bytes()
        if damage == "truncated":
            file.write_bytes(data[: len(data) // 2])
        elif damage == "zeros":
            file.write_bytes(bytes(len(data)))
        elif damage == "empty":
            file.write_bytes(b"")
        else:
            file.unlink()
    err = ln.ArtifactError if damage == "missing" else DamagedArtifactError
    with pytest.raises(err, match=r"model-[0-9a-f]{12}\.safetensors"):
        ln.load(folder)
    with pytest.raises(ln.ArtifactError, match=r"one\.safetensors|No model"):
        ln.load(single)


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe{\x00}", "not UTF-8"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"architectures": ["BertModel"], "model_type": "bert"}', "not lanterna"),
    (b'{"format": "lanterna.model", "format_version": 2', "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_a_bad_lanterna_json_is_a_typed_error_naming_it(saved, content, match):
    _, folder, _ = saved
    (folder / "lanterna.json").write_bytes(content)
    with pytest.raises(ln.ArtifactError, match=rf"(?s)lanterna\.json.*{match}"):
        ln.load(folder)


def test_missing_lanterna_json_and_a_bad_weights_entry(saved):
    _, folder, _ = saved
    meta = json.loads((folder / "lanterna.json").read_text())
    for bad in ({"file": "../../etc/passwd", "sha256": "0" * 64, "bytes": 1}, None, {"file": "x.safetensors"}):
        (folder / "lanterna.json").write_text(json.dumps({**meta, "weights": bad}))
        with pytest.raises(ln.ArtifactError, match=r"lanterna\.json.*weights"):
            ln.load(folder)
    (folder / "lanterna.json").unlink()
    with pytest.raises(ln.ArtifactError, match=r"lanterna\.json"):
        ln.load(folder)


def test_the_previous_format_is_refused_naming_its_version(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "old"
    folder.mkdir()
    text = json.dumps({"format": "lanterna.model", "format_version": 1, "module": "conftest:Net", "history": []})
    save_file({"net.0.weight": torch.zeros(8, 3)}, str(folder / "model.safetensors"), metadata={"lanterna": text})
    (folder / "lanterna.json").write_text(text)
    with pytest.raises(ln.ArtifactError, match=r"(?s)version 1.*older"):
        ln.load(folder)
    with pytest.raises(ln.ArtifactError, match=r"(?s)version 1.*older"):
        ln.load(folder / "model.safetensors")


# ---------------------------------------------------------------------------------------------- 4. no imports


_EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
import torch.nn as nn
class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        pathlib.Path({marker!r}).write_text("built")
"""


@pytest.fixture()
def evil(tmp_path, monkeypatch):
    name = f"lanterna_evil_{os.getpid()}"
    marker = tmp_path / "marker"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{name}.py").write_text(_EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(code))
    yield name, marker
    assert name not in sys.modules and not marker.exists(), "the module named in the file was imported"


def _edit(folder, **changes):
    meta = json.loads((folder / "lanterna.json").read_text())
    meta.update(changes)
    (folder / "lanterna.json").write_text(json.dumps(meta))


def test_load_never_imports_the_module_a_file_names(saved, evil):
    _, folder, _ = saved
    name, _ = evil
    _edit(folder, module=f"{name}:Net")
    with pytest.raises(ln.ArtifactError, match=rf"(?s){name}.*not imported.*module="):
        ln.load(folder)


@pytest.mark.parametrize("where", ["hparam_class", "hparam_module", "loss", "metric"])
def test_no_class_named_in_the_metadata_is_imported(saved, evil, where):
    _, folder, _ = saved
    name, _ = evil
    meta = json.loads((folder / "lanterna.json").read_text())
    if where == "hparam_class":
        _edit(folder, hparams={**meta["hparams"], "act": {"__class__": f"{name}:Net"}})
        with pytest.raises(ln.ArtifactError, match=rf"(?s)hparams\['act'\].*{name}.*not imported"):
            ln.load(folder)
    elif where == "hparam_module":
        _edit(folder, hparams={**meta["hparams"], "act": {"__module__": f"{name}:Net", "kwargs": {}}})
        with pytest.raises(ln.ArtifactError, match=rf"(?s)hparams\['act'\].*{name}"):
            ln.load(folder)
    else:
        tag = {"__module__": f"{name}:Net", "kwargs": {}}
        _edit(folder, **({"loss": tag} if where == "loss" else {"metrics": [tag]}))
        with pytest.warns(UserWarning, match=rf"(?s){where}.*{name}.*not imported"):
            loaded = ln.load(folder)
        assert loaded.loss_fn is None if where == "loss" else loaded.metrics == []


@pytest.mark.parametrize("target", ["os:system", "subprocess:Popen", "builtins:exec", "torch:load",
                                    "torch.nn.modules.module:Module.register_forward_hook"])
@pytest.mark.parametrize("tag", ["__class__", "__module__"])
def test_non_module_callables_in_the_metadata_are_never_called(saved, tmp_path, target, tag):
    _, folder, _ = saved
    marker = tmp_path / "called"
    meta = json.loads((folder / "lanterna.json").read_text())
    value = {"__class__": target} if tag == "__class__" else {
        "__module__": target, "kwargs": {"args": ["touch", str(marker)], "command": f"touch {marker}"}}
    _edit(folder, hparams={**meta["hparams"], "act": value}, loss=value)
    with pytest.raises(ln.ArtifactError, match=r"(?s)hparams\['act'\].*nn\.Module"):
        ln.load(folder)
    assert not marker.exists()


def test_a_tensor_reference_cannot_reach_the_weights(saved):
    fitted, folder, _ = saved
    meta = json.loads((folder / "lanterna.json").read_text())
    _edit(folder, hparams={**meta["hparams"], "d_hidden": {"__tensor__": "net.0.weight", "dtype": "float32",
                                                           "shape": [64, 3]}})
    with pytest.raises(ln.ArtifactError, match=r"hparams\['d_hidden'\]"):
        ln.load(folder)


# ---------------------------------------------------------------------------------------------- edges


def test_a_model_given_as_an_instance_needs_module_to_load(tmp_path):
    x, y = make_luz_data(64)
    fitted = ln.setup(Net(3, 4, 1), loss=nn.MSELoss()).fit((x, y), epochs=1, verbose=False)
    path = fitted.save(tmp_path / "m")
    with pytest.raises(ln.ArtifactError, match=r"(?s)instance.*module="):
        ln.load(path)  # not Net() with its defaults, which would be another model
    assert torch.equal(ln.load(path, module=Net(3, 4, 1)).predict(x), fitted.predict(x))


def test_crafted_weights_of_another_dtype_are_refused(saved):
    import hashlib
    import struct

    _, folder, _ = saved
    weights = _weights_file(folder)
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"F32"', b'"I32"')  # same size: safetensors parses it
    raw = raw[:8] + header + raw[8 + n:]
    weights.write_bytes(raw)
    _edit(folder, weights={"file": weights.name, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
    with pytest.raises(ln.ModelMismatchError, match=r"(?s)m'.*net\.0\.weight: saved torch\.int32, model torch\.float"):
        ln.load(folder)


def test_a_failed_write_is_a_typed_error_and_the_previous_model_stays(tmp_path, monkeypatch):
    import errno

    import lanterna.io.artifact as artifact

    pair = _pair()
    path = pair[0].save(tmp_path / "m")
    real = artifact.atomic_write_bytes

    def full(target, data):
        if os.path.basename(target) == "lanterna.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(target, data)

    monkeypatch.setattr(artifact, "atomic_write_bytes", full)
    with pytest.raises(ln.ArtifactError, match=r"(?s)m'.*disk is full") as ei:
        pair[1].save(path)
    assert isinstance(ei.value.__cause__, OSError)
    assert _which(path, pair) == 0
    with pytest.raises(ln.ArtifactError, match="empty path"):
        pair[0].save("")


@pytest.mark.parametrize("change, match", [
    ({"history": "abc"}, r"'history' is a str"),
    ({"history": [1, 2]}, r"'history' holds entries"),
    ({"opt_hparams": [0.1]}, r"'opt_hparams' is a list"),
    ({"total_time": "long"}, r"'total_time' is a str"),
])
def test_metadata_entries_of_the_wrong_type_are_typed_errors(saved, change, match):
    _, folder, _ = saved
    _edit(folder, **change)
    with pytest.raises(DamagedArtifactError, match=rf"(?s)m'.*{match}"):
        ln.load(folder)
