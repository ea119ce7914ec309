"""Fault table: malicious files (issue #11) — pickles with a payload in every place lanterna reads, crafted
safetensors headers, JSON metadata naming callables (``builtins.open``, ``subprocess.Popen``) or modules
that are not imported (a module on sys.path whose import writes a marker), and path traversal in monitor
names, templates and file-provided paths. A payload that runs writes a file into ``env.markers``: the row
is then "code executed", whatever else happened."""

from __future__ import annotations

import pickle
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import CORRECT, OK, Env, Row, Wrong, check_row, expect, params, same_state
from shared import (
    Act,
    Net,
    ar_template,
    data,
    edit_meta,
    fit,
    fitted_a,
    logger_cls,
    meta_file,
    read_header,
    retarget,
    saved_checkpoint,
    state_of,
    weights_file,
    write_raw,
)

import lanterna as ln
from lanterna.io import load_checkpoint, save_checkpoint

GROUP = "malicious"
cb = ln.callbacks


class Payload:
    """Unpickling this creates the marker file: ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def marker(env: Env, name: str = "pwned") -> Path:
    return env.markers / name


def pickle_bytes(env: Env) -> bytes:
    return pickle.dumps(Payload(marker(env)))


def torch_zip(env: Env, obj: Any = None) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj if obj is not None else {"model": Payload(marker(env)), "epoch": 1}, buf)
    return buf.getvalue()


def torch_legacy(env: Env) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"model": Payload(marker(env))}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def saved(env: Env, name: str = "model") -> Path:
    return Path(fitted_a().save(env.tmp / name))


# ---------------------------------------------------------------------------- pickles where lanterna reads


def load_file(make: Any, name: str) -> Any:
    def run(env: Env) -> None:
        p = env.tmp / name
        p.write_bytes(make(env))
        ln.load(p, module=Net)
    return run


def replace_weights(make: Any) -> Any:
    def run(env: Env) -> None:
        p = saved(env)
        weights_file(p).write_bytes(make(env))
        ln.load(p, module=Net)
    return run


def replace_json(make: Any) -> Any:
    def run(env: Env) -> None:
        p = saved(env)
        meta_file(p).write_bytes(make(env))
        ln.load(p, module=Net)
    return run


def checkpoint_file(make: Any) -> Any:
    def run(env: Env) -> None:
        p = env.tmp / "ck.pt"
        p.write_bytes(make(env))
        load_checkpoint(p)
    return run


def autoresume_with(make: Any) -> Any:
    """A payload as the newest resume checkpoint: set aside with a warning, training resumes from the whole
    one (or starts afresh) — and nothing runs."""
    def run(env: Env) -> None:
        folder = env.tmp / "state"
        shutil.copytree(ar_template(), folder)
        (folder / "resume-epoch-0009.pt").write_bytes(make(env))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = fit(epochs=3, callbacks=[cb.AutoResume(folder)])
        expect(len(f.history) == 3, f"history has {len(f.history)} epochs")
        expect(any("resume-epoch-0009" in str(w.message) for w in caught), "no warning about the bad file")
    return run


def modelcheckpoint_folder(env: Env) -> None:
    ck = env.tmp / "ck"
    ck.mkdir()
    for i in range(3):
        (ck / f"epoch-0{i}-train_loss-1.000.pt").write_bytes(torch_zip(env))
    (ck / ".last.pt.lanterna-tmp-1-abcd").write_bytes(pickle_bytes(env))
    fit(callbacks=[cb.ModelCheckpoint(ck, monitor="train_loss")])


# ---------------------------------------------------------------------------- JSON naming callables / modules


CALLABLES = {
    "builtins:open": lambda env: {"file": str(marker(env)), "mode": "w"},
    "io:open": lambda env: {"file": str(marker(env)), "mode": "w"},
    "subprocess:Popen": lambda env: {"args": ["touch", str(marker(env))]},
    "os:system": lambda env: {"command": f"touch {marker(env)}"},
    "builtins:eval": lambda env: {"source": f"open({str(marker(env))!r}, 'w')"},
    "pathlib:Path.touch": lambda env: {"self": str(marker(env))},
}


def json_module(target: str, kind: str = "class") -> Any:
    def run(env: Env) -> None:
        p = saved(env)

        def change(m: dict) -> None:
            m["module"], m["hparams"], m["module_kind"] = target, CALLABLES[target](env), kind
            if kind == "factory":
                m["factory"] = target

        edit_meta(p, change)
        ln.load(p)
    return run


def json_part(part: str, target: str) -> Any:
    """The loss or a metric recorded in the metadata names a callable: load must not call it (a warning or an
    error are both fine), and the model still loads right."""
    old = {"loss": "torch.nn.modules.loss:MSELoss", "metric": "lanterna.metrics.regression:MAE"}[part]

    def run(env: Env) -> None:
        p = saved(env)
        counts = []
        edit_meta(p, lambda m: counts.append(retarget(m, old, target, CALLABLES[target](env))))
        expect(counts[0] >= 1, f"the metadata does not name {old}: the case cannot be built")
        f = ln.load(p, module=Net)
        expect(same_state(state_of(f), state_of(fitted_a())), "the model loaded other weights")
    return run


def json_optimizer(env: Env) -> None:
    """The recorded optimizer (and its hparams) names a callable; continuing training must not call it."""
    p = saved(env)

    def change(m: dict) -> None:
        m["optimizer"] = "subprocess:Popen"
        m["opt_hparams"] = {"args": ["touch", str(marker(env))]}
        retarget(m, "torch.optim.adam:Adam", "subprocess:Popen")

    edit_meta(p, change)
    ln.load(p).fit(data(), epochs=1, verbose=False)


def header_json(target: str) -> Any:
    """The single-file form: the lanterna metadata inside the safetensors header names a callable."""
    def run(env: Env) -> None:
        import json

        p = Path(fitted_a().save(env.tmp / "m.safetensors"))
        header, blob = read_header(p)
        meta = json.loads(header["__metadata__"]["lanterna"])
        meta["module"], meta["hparams"] = target, CALLABLES[target](env)
        header["__metadata__"]["lanterna"] = json.dumps(meta)
        write_raw(p, header, blob)
        ln.load(p)
    return run


EVIL = """
open({marker!r}, "w").write("imported")
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, d_in=3, d_hidden=8, d_out=1, **kw):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))

    def forward(self, x):
        return self.net(x)


class MSE(nn.MSELoss):
    pass


Act = nn.Tanh
"""


class EvilModule:
    """A module file on sys.path, never imported by the test, whose import writes the marker."""

    def __init__(self, env: Env, package: bool = False) -> None:
        self.name = f"lanterna_evil_{uuid.uuid4().hex[:10]}"
        self.root = env.tmp / "site"
        self.root.mkdir(exist_ok=True)
        source = EVIL.format(marker=str(marker(env, "imported")))
        if package:
            (self.root / self.name).mkdir()
            (self.root / self.name / "__init__.py").write_text(source)
            (self.root / self.name / "sub.py").write_text(source)
            self.module = f"{self.name}.sub"
        else:
            (self.root / f"{self.name}.py").write_text(source)
            self.module = self.name

    def __enter__(self) -> EvilModule:
        sys.path.insert(0, str(self.root))
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.path.remove(str(self.root))
        for name in list(sys.modules):
            if name.startswith(self.name):
                del sys.modules[name]


def unimported(where: str, package: bool = False) -> Any:
    def run(env: Env) -> None:
        with EvilModule(env, package) as evil:
            if where == "module":
                p = saved(env)
                edit_meta(p, lambda m: m.update(module=f"{evil.module}:Net"))
                ln.load(p)
            elif where in ("loss", "metric"):
                p = saved(env)
                old = {"loss": "torch.nn.modules.loss:MSELoss", "metric": "lanterna.metrics.regression:MAE"}[where]
                counts = []
                edit_meta(p, lambda m: counts.append(retarget(m, old, f"{evil.module}:MSE", {})))
                expect(counts[0] >= 1, f"the metadata does not name {old}")
                ln.load(p, module=Net)
            elif where == "hparam-class":
                f = ln.setup(Act, loss=torch.nn.MSELoss()).set_hparams(act=torch.nn.Tanh).fit(
                    data(), epochs=1, verbose=False)
                p = Path(f.save(env.tmp / "act"))
                counts = []
                edit_meta(p, lambda m: counts.append(retarget(m, "torch.nn.modules.activation:Tanh",
                                                              f"{evil.module}:Act")))
                if not counts[0]:
                    env.notes.append("not applicable: the hparam class is not recorded by path")
                    return
                ln.load(p)
            elif where == "checkpoint":
                p = saved_checkpoint(env)
                state = load_checkpoint(p)
                state["meta"] = {**(state.get("meta") or {}), "module": f"{evil.module}:Net"}
                save_checkpoint(p, state)  # a valid checksum: the content is what the attacker chose
                ln.load(p)
    return run


# ---------------------------------------------------------------------------- crafted safetensors headers


def rehash(obj: Any, digest: str, size: int) -> None:
    """Make the folder's metadata vouch for the crafted weights file (an attacker writes both files)."""
    if isinstance(obj, dict):
        for key in list(obj):
            if key in ("sha256", "checksum"):
                obj[key] = digest
            elif key in ("bytes", "size"):
                obj[key] = size
            else:
                rehash(obj[key], digest, size)
    elif isinstance(obj, list):
        for value in obj:
            rehash(value, digest, size)


def crafted(change: Any, form: str = "folder") -> Any:
    """Load a saved model whose safetensors header was rewritten by ``change(header, data) -> (header, data,
    length)``: refused with a clear error, or loaded with the very weights that were saved. In the folder form
    the metadata's checksum is recomputed for the crafted file, so the header itself is what gets parsed."""
    def run(env: Env) -> None:
        import hashlib

        p = saved(env, "m.safetensors" if form == "file" else "model")
        header, blob = read_header(p)
        new_header, new_blob, length = change(header, blob)
        write_raw(p, new_header, new_blob, length)
        if form == "folder":
            raw = weights_file(p).read_bytes()
            edit_meta(p, lambda m: rehash(m, hashlib.sha256(raw).hexdigest(), len(raw)))
        f = ln.load(p, module=Net)
        expect(same_state(state_of(f), state_of(fitted_a())), "a crafted header loaded other weights silently")
    return run


def _tensors(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def huge_length(h: dict, b: bytes) -> Any:
    return h, b, 2**63 - 1


def length_past_end(h: dict, b: bytes) -> Any:
    import json

    return h, b, len(json.dumps(h)) + len(b) + 100


def zero_length(h: dict, b: bytes) -> Any:
    return h, b, 0


def offsets_out_of_range(h: dict, b: bytes) -> Any:
    k = _tensors(h)[-1]
    h[k]["data_offsets"] = [h[k]["data_offsets"][0], 10**12]
    return h, b, None


def overlapping(h: dict, b: bytes) -> Any:
    ks = sorted(_tensors(h), key=lambda k: h[k]["data_offsets"][0])
    a, c = ks[0], ks[1]
    size = h[a]["data_offsets"][1] - h[a]["data_offsets"][0]
    h[c]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
    h[c]["shape"] = h[a]["shape"]
    return h, b, None


def wrong_dtype_same_size(h: dict, b: bytes) -> Any:
    for k in _tensors(h):
        h[k]["dtype"] = "I32"
    return h, b, None


def wrong_dtype_half(h: dict, b: bytes) -> Any:
    k = "net.0.weight"
    s, e = h[k]["data_offsets"]
    h[k]["dtype"] = "F16"
    h[k]["data_offsets"] = [s, s + (e - s) // 2]
    # the rest of the tensors keep their ranges: the gap left is refused or the dtype caught
    return h, b, None


def unknown_dtype(h: dict, b: bytes) -> Any:
    h[_tensors(h)[0]]["dtype"] = "X99"
    return h, b, None


def shape_mismatch(h: dict, b: bytes) -> Any:
    h[_tensors(h)[0]]["shape"] = [1000]
    return h, b, None


def not_json(h: dict, b: bytes) -> Any:
    return b'{"net.0.weight": {"dtype": "F32", garbage', b, None


def deep_json(h: dict, b: bytes) -> Any:
    return b"[" * 100000 + b"]" * 100000, b, None


def metadata_not_strings(h: dict, b: bytes) -> Any:
    h["__metadata__"] = {"lanterna": {"format": "lanterna.model"}, "format": 3}
    return h, b, None


def negative_offsets(h: dict, b: bytes) -> Any:
    k = _tensors(h)[0]
    h[k]["data_offsets"] = [-4, h[k]["data_offsets"][1]]
    return h, b, None


# ---------------------------------------------------------------------------- path traversal


def outside(env: Env, allowed: tuple[str, ...]) -> list[str]:
    """Files written outside the allowed folders: anywhere in the row's folder (one level above env.tmp)."""
    row_dir = env.tmp.parent
    found = []
    for p in row_dir.rglob("*"):
        if not p.is_file() or p.is_relative_to(env.markers):
            continue
        rel = p.relative_to(env.tmp) if p.is_relative_to(env.tmp) else None
        if rel is None or not any(str(rel).startswith(a) for a in allowed):
            found.append(str(p.relative_to(row_dir)))
    return sorted(found)


def no_escape(*allowed: str) -> Any:
    def post(env: Env) -> None:
        escaped = outside(env, allowed)
        if escaped:
            raise Wrong(f"files written outside {', '.join(allowed)}: {escaped}")
    return post


def monitor_traversal(name: str) -> Any:
    def run(env: Env) -> None:
        setup = ln.setup(logger_cls(name)).set_opt_hparams(lr=0.01)
        setup.fit(data(), epochs=1, verbose=False, callbacks=[
            cb.ModelCheckpoint(env.tmp / "ck", monitor=f"train_{name}", mode="min")])
    return run


def template_traversal(env: Env) -> None:
    fit(callbacks=[cb.ModelCheckpoint(str(env.tmp / "ck") + "/{epoch:02d}/../../../escaped-{epoch}.pt",
                                      monitor="train_loss")])


class Tag(ln.Callback):
    order = 100

    def on_epoch_end(self, ctx: Any) -> None:
        ctx.history[-1]["train_tag"] = "../../../escaped"


def template_string_field(env: Env) -> None:
    fit(callbacks=[Tag(), cb.ModelCheckpoint(str(env.tmp / "ck") + "/run-{train_tag}.pt", monitor="train_loss")])


def crafted_callback_paths(env: Env) -> None:
    """A resume checkpoint (valid checksum) whose ModelCheckpoint state names files outside the folder: the
    resumed fit must neither write nor delete them."""
    victim = env.tmp / "victim.txt"
    victim.write_text("precious")
    folder = env.tmp / "state"
    shutil.copytree(ar_template(), folder)
    newest = sorted(folder.glob("resume-*.pt"))[-1]
    state = load_checkpoint(newest)
    state.setdefault("callbacks", {})["ModelCheckpoint"] = {
        "best": -1e9, "best_path": str(victim), "last_path": str(victim), "saved": [str(victim)],
        "best_k": [[0.0, str(victim)]]}
    save_checkpoint(newest, state)
    fit(epochs=3, callbacks=[cb.AutoResume(folder), cb.ModelCheckpoint(env.tmp / "ck", monitor="train_loss",
                                                                       save_best_only=True)])
    expect(victim.exists() and victim.read_text() == "precious", "the file named in the checkpoint was changed")


def rows() -> list[Row]:
    R: list[Row] = []

    def row(id: str, run: Any, names: tuple[str, ...] = (), area: str = "pickle", **kw: Any) -> None:
        R.append(Row(id, run, tuple(names), area=area, **kw))

    # -------------------------------------------------------------- pickles with a payload
    row("pickle-file-ln-load", load_file(pickle_bytes, "model.pkl"), ("pickle",))
    row("pickle-named-safetensors-ln-load", load_file(pickle_bytes, "model.safetensors"), ("{tmp}",))
    row("torch-zip-payload-ln-load", load_file(torch_zip, "model.pt"), ("{tmp}",))
    row("torch-legacy-payload-ln-load", load_file(torch_legacy, "model.pt"), ("{tmp}",))
    row("pickle-as-weights-in-folder", replace_weights(pickle_bytes), ("{tmp}",))
    row("torch-zip-as-weights-in-folder", replace_weights(torch_zip), ("{tmp}",))
    row("pickle-as-lanterna-json", replace_json(pickle_bytes), ("{tmp}",))
    row("checkpoint-torch-zip-payload", checkpoint_file(torch_zip), ("ck.pt",))
    row("checkpoint-torch-legacy-payload", checkpoint_file(torch_legacy), ("ck.pt",))
    row("checkpoint-plain-pickle", checkpoint_file(pickle_bytes), ("ck.pt",))
    row("autoresume-torch-zip-payload", autoresume_with(torch_zip), expect=OK)
    row("autoresume-legacy-payload", autoresume_with(torch_legacy), expect=OK)
    row("autoresume-plain-pickle", autoresume_with(pickle_bytes), expect=OK)
    row("modelcheckpoint-folder-with-payloads", modelcheckpoint_folder, expect=CORRECT)
    # -------------------------------------------------------------- JSON naming callables
    for target in CALLABLES:
        row(f"json-module-{target}", json_module(target), ("refused",), area="json callables")
    row("json-factory-builtins:open", json_module("builtins:open", "factory"), ("module=",), area="json callables")
    row("json-loss-builtins:open", json_part("loss", "builtins:open"), expect=OK, area="json callables")
    row("json-loss-subprocess:Popen", json_part("loss", "subprocess:Popen"), expect=OK, area="json callables")
    row("json-metric-subprocess:Popen", json_part("metric", "subprocess:Popen"), expect=OK, area="json callables")
    row("json-metric-os:system", json_part("metric", "os:system"), expect=OK, area="json callables")
    row("json-optimizer-subprocess:Popen", json_optimizer, expect=OK, area="json callables")
    row("header-json-module-builtins:open", header_json("builtins:open"), ("{tmp}",), area="json callables")
    row("header-json-module-subprocess:Popen", header_json("subprocess:Popen"), ("{tmp}",),
        area="json callables")
    # -------------------------------------------------------------- modules never imported
    row("unimported-module-class", unimported("module"), ("module=",), area="unimported module")
    row("unimported-package-class", unimported("module", package=True), ("module=",), area="unimported module")
    row("unimported-loss-class", unimported("loss"), expect=OK, area="unimported module")
    row("unimported-metric-class", unimported("metric"), expect=OK, area="unimported module")
    row("unimported-hparam-class", unimported("hparam-class"), ("module=",), expect=OK, area="unimported module")
    row("unimported-checkpoint-module", unimported("checkpoint"), ("module=",), area="unimported module")
    # -------------------------------------------------------------- crafted safetensors headers
    for form in ("folder", "file"):
        for name, change in (("huge-header-length", huge_length), ("header-length-past-end", length_past_end),
                             ("zero-header-length", zero_length), ("offsets-out-of-range", offsets_out_of_range),
                             ("negative-offsets", negative_offsets), ("overlapping-offsets", overlapping),
                             ("dtype-I32-same-size", wrong_dtype_same_size), ("dtype-F16-half", wrong_dtype_half),
                             ("unknown-dtype", unknown_dtype), ("shape-mismatch", shape_mismatch),
                             ("header-not-json", not_json), ("header-deep-json", deep_json),
                             ("metadata-not-strings", metadata_not_strings)):
            row(f"header-{form}-{name}", crafted(change, form), ("{tmp}",), area="crafted safetensors")
    # -------------------------------------------------------------- path traversal
    row("traversal-monitor-dotdot", monitor_traversal("x/../../../escaped"), expect=OK, area="path traversal",
        post=no_escape("ck"))
    row("traversal-template-dotdot", template_traversal, expect=OK, area="path traversal", post=no_escape("ck"))
    row("traversal-template-string-field", template_string_field, expect=OK, area="path traversal",
        post=no_escape("ck"))
    row("traversal-checkpoint-state-paths", crafted_callback_paths, expect=CORRECT, area="path traversal",
        post=no_escape("ck", "state", "victim.txt"))
    return R


ROWS = rows()


@pytest.mark.parametrize("row", params(ROWS))
def test_malicious(row: Row) -> None:
    check_row(GROUP, row)

