"""Safe model artifacts: weights as safetensors, metadata as JSON; never a pickle (docs/saving.md).

Format version 2. An artifact is either

- a folder: ``lanterna.json`` (the metadata) and the weights file it names,
  ``model-<first 12 hex digits of its SHA-256>.safetensors``; ``lanterna.json`` records the file's name, size
  and SHA-256. A save writes the new weights file under its own name, then replaces ``lanterna.json`` (both
  atomically: temp file, fsync, rename, fsync of the folder). That rename is the commit: a kill at any moment
  leaves ``lanterna.json`` naming a complete weights file, the old one or the new one. Weights files no longer
  named are removed afterwards (and by the next save after a kill);
- or one ``<path>.safetensors`` file, the metadata in its header (``"lanterna"``) with ``"lanterna.sha256"``:
  the SHA-256 of the whole file with these 64 hex digits read as ``0``.

Tensors inside the metadata (a tensor hparam, a loss's class weights) are stored exactly in the weights file
under ``__lanterna__.<n>``. Other values JSON cannot hold are tagged (:func:`encode_json`).

Loading verifies the checksum before anything is parsed, never unpickles (a pickle is refused after its first
bytes) and never imports: a class named in the metadata is looked up only among the modules already in
``sys.modules`` and must be an ``nn.Module`` subclass; only those are ever called (:func:`resolve_class`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError, DamagedArtifactError, ModelMismatchError
from .atomic import atomic_write_bytes, explain_write_error, fsync_dir, sweep_temp_files

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "META_NAME",
    "Unrestored",
    "find_unrestored",
    "save_artifact",
    "read_artifact",
    "sniff",
    "encode_json",
    "decode_json",
    "describe_value",
    "import_path",
    "resolve_class",
    "resolve_module_class",
    "load_weights_strict",
]

ARTIFACT_FORMAT = "lanterna.model"
ARTIFACT_VERSION = 2
META_NAME = "lanterna.json"
_HEADER_KEY = "lanterna"
_HEADER_SHA = "lanterna.sha256"
_SHA_NEEDLE = b'"lanterna.sha256":"'  # how safetensors writes that header key; quotes in values are escaped
_TENSOR_PREFIX = "__lanterna__."
_WEIGHTS_FILE = re.compile(r"^model-[0-9a-f]{12}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch.save without zip
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
# constructor arguments torch keeps under other names (legacy loss flags, factory kwargs)
_UNSTORED_ARGS = frozenset({"size_average", "reduce", "device", "dtype"})
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MISSING = object()


# ---------------------------------------------------------------------------- JSON with a few tagged types


class _Unencodable(ValueError):
    pass


class Unrestored:
    """What :func:`decode_json` gives for a value it does not give back: one that could not be stored
    (a function, an arbitrary object), or a class that is refused or not imported. ``reason`` says which;
    ``ln.load`` reports it where the value is needed (:func:`find_unrestored`).

    >>> from lanterna.io.artifact import Unrestored
    >>> Unrestored("not stored")
    <not restored: not stored>
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<not restored: {self.reason}>"


def find_unrestored(value: Any, where: str = "value") -> list[str]:
    """``"where: reason"`` for each :class:`Unrestored` inside ``value`` (dicts, lists, tuples).

    >>> from lanterna.io.artifact import Unrestored, find_unrestored
    >>> find_unrestored({"act": Unrestored("refused"), "n": 3}, "hparams")
    ["hparams['act']: refused"]
    """
    if isinstance(value, Unrestored):
        return [f"{where}: {value.reason}"]
    if isinstance(value, Mapping):
        items = [(_sub(where, k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return []
    return [found for w, v in items for found in find_unrestored(v, w)]


def describe_value(value: Any) -> str:
    """A short description of a value the metadata cannot hold, for messages.

    >>> import torch
    >>> from lanterna.io.artifact import describe_value
    >>> describe_value(torch.tanh)
    'the function torch.tanh'
    """
    if inspect.isclass(value):
        return f"the class {import_path(value) or value.__qualname__}"
    if inspect.isroutine(value):
        name = getattr(value, "__name__", None) or repr(value)
        module = getattr(value, "__module__", None)
        return f"the function {module}.{name}" if module else f"the function {name}"
    return f"a {type(value).__module__}.{type(value).__qualname__} object"


def _sub(where: str, key: Any) -> str:
    return f"{where}[{key!r}]" if where else str(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Encoder:
    def __init__(self, tensors: list[torch.Tensor] | None, unsaved: list[str] | None) -> None:
        self.tensors, self.unsaved = tensors, unsaved

    def __call__(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, torch.dtype):
            return {"__dtype__": _dtype_name(value)}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, where)
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__tuple__": [self(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self(v, _sub(where, k)) for k, v in value.items()}
            return {"__dict__": [[self(k, f"{where} key {k!r}"), self(v, _sub(where, k))] for k, v in value.items()]}
        if isinstance(value, nn.Module):
            return self._module(value, where)
        if inspect.isclass(value) and issubclass(value, nn.Module) and import_path(value):
            return {"__class__": import_path(value)}
        if isinstance(value, np.generic):
            return self(value.item(), where)
        return self.unstored(where, describe_value(value))

    def unstored(self, where: str, what: str) -> dict[str, str]:
        if self.unsaved is None:
            raise _Unencodable(f"{where} is {what}, which JSON metadata cannot hold.")
        self.unsaved.append(f"{where} ({what})")
        return {"__unsaved__": what}

    def _tensor(self, value: torch.Tensor, where: str) -> Any:
        t = value.detach()
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            return self.unstored(where, f"a {t.layout} {'quantized ' if t.is_quantized else ''}tensor on {t.device}")
        if self.tensors is None:  # inline (checkpoint metadata): small tensors only
            if t.numel() > 4096 or t.is_complex():
                return self.unstored(where, f"a tensor of {t.numel()} {_dtype_name(t.dtype)} elements")
            return {"__tensor__": self(t.cpu().tolist(), where), "__dtype__": _dtype_name(t.dtype)}
        key = str(len(self.tensors))
        self.tensors.append(t.to("cpu").clone(memory_format=torch.contiguous_format))
        return {"__tensor__": key, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

    def _ndarray(self, value: np.ndarray, where: str) -> Any:
        what = f"a NumPy array of {value.dtype}"
        if self.tensors is None or value.dtype.kind not in "biufc":
            return self.unstored(where, what)
        try:
            t = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError:
            return self.unstored(where, what)
        key = self._tensor(t, where)["__tensor__"]
        return {"__ndarray__": key, "dtype": str(value.dtype), "shape": list(value.shape)}

    def _module(self, module: nn.Module, where: str) -> Any:
        """A parameterless module (an activation, a loss, a metric) as its class and constructor arguments,
        read back from its attributes; anything else is not stored (it is rebuilt by ``module=``)."""
        cls = type(module)
        path, why, kwargs = import_path(cls), None, {}
        if path is None:
            why = "its class is defined inside a function"
        elif next(module.parameters(), None) is not None or next(module.children(), None) is not None:
            why = "it has parameters or submodules"
        else:
            try:
                params = inspect.signature(cls).parameters.values()
            except (TypeError, ValueError):
                params, why = [], "its constructor's signature is unknown"
            for p in params:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if hasattr(module, p.name):
                    kwargs[p.name] = getattr(module, p.name)
                elif p.name not in _UNSTORED_ARGS:
                    why = f"its constructor argument {p.name!r} is not one of its attributes"
                    break
        if why is not None:
            return self.unstored(where, f"a {cls.__module__}.{cls.__qualname__} instance: {why}")
        out = {"__module__": path, "kwargs": self(kwargs, f"{where}.kwargs")}
        label = getattr(module, "_lanterna_name", None)
        if isinstance(label, str):
            out["name"] = label
        return out


def encode_json(value: Any, where: str = "value", *, tensors: list[torch.Tensor] | None = None,
                unsaved: list[str] | None = None) -> Any:
    """A JSON-ready form of ``value``, in one pass: tuples, non-finite floats, dicts with non-string keys,
    ``torch.dtype``/``torch.device``, ``nn.Module`` subclasses (by import path) and parameterless module
    instances (class + constructor arguments) are tagged so that :func:`decode_json` gives them back.

    Tensors (and NumPy arrays) are appended to ``tensors`` and referenced by their index (exact, any size);
    without ``tensors`` they are written inline as lists (at most 4096 elements). A value that cannot be
    stored (a function, an arbitrary object) raises ``ValueError`` naming ``where``; with ``unsaved`` (a list)
    it becomes an ``{"__unsaved__": ...}`` placeholder instead and its description is appended there.

    Args:
        value: what to encode.
        where: its name in messages (``"hparams"``).
        tensors: where tensors go, or None for inline tensors.
        unsaved: where unstorable values are listed, or None to raise for them.

    >>> from torch import nn
    >>> from lanterna.io.artifact import decode_json, encode_json
    >>> decode_json(encode_json({"sizes": (32, 16), "eps": float("inf"), "act": nn.Tanh}))
    {'sizes': (32, 16), 'eps': inf, 'act': <class 'torch.nn.modules.activation.Tanh'>}
    """
    return _Encoder(tensors, unsaved)(value, where)


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor] | None) -> None:
        self.tensors = tensors

    def __call__(self, value: Any, where: str) -> Any:
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if not any(k.startswith("__") for k in value):
            return {k: self(v, _sub(where, k)) for k, v in value.items()}
        keys = set(value)
        if keys == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(self(v, f"{where}[{i}]") for i, v in enumerate(value["__tuple__"]))
        if keys == {"__float__"} and value["__float__"] in ("nan", "inf", "-inf"):
            return float(value["__float__"])
        if keys == {"__dtype__"}:
            return _dtype(value["__dtype__"], where)
        if keys == {"__device__"} and isinstance(value["__device__"], str):
            try:
                return torch.device(value["__device__"])
            except RuntimeError:
                pass
        if keys == {"__tensor__", "dtype", "shape"}:
            return self._tensor(value["__tensor__"], value, where)
        if keys == {"__ndarray__", "dtype", "shape"}:
            t = self._tensor(value["__ndarray__"], None, where)
            array = t.numpy()
            if str(array.dtype) != value["dtype"] or list(array.shape) != value["shape"]:
                raise ArtifactError(f"{where}: the stored array is not the {value['dtype']} {value['shape']} recorded.")
            return array
        if keys == {"__tensor__", "__dtype__"}:  # inline
            return torch.tensor(self(value["__tensor__"], where), dtype=_dtype(value["__dtype__"], where))
        if keys == {"__dict__"} and isinstance(value["__dict__"], list):
            try:
                return {self(k, f"{where} key"): self(v, _sub(where, k)) for k, v in value["__dict__"]}
            except (TypeError, ValueError):
                pass
        if keys == {"__class__"}:
            try:
                return resolve_class(value["__class__"])
            except ArtifactError as e:
                return Unrestored(str(e))
        if keys in ({"__module__", "kwargs"}, {"__module__", "kwargs", "name"}) and isinstance(value["kwargs"], dict):
            return self._module(value, where)
        if keys == {"__unsaved__"}:
            return Unrestored(f"it was not stored when saved ({value['__unsaved__']})")
        raise ArtifactError(f"{where} is a tagged value lanterna does not know ({sorted(keys)}): the metadata was "
                            "edited or written by another lanterna.")

    def _tensor(self, key: Any, record: Mapping[str, Any] | None, where: str) -> torch.Tensor:
        if self.tensors is None or not isinstance(key, str) or key not in self.tensors:
            raise ArtifactError(f"{where} refers to a stored tensor {key!r} that the weights file does not hold.")
        t = self.tensors[key]
        if record is not None and (record["dtype"] != _dtype_name(t.dtype) or record["shape"] != list(t.shape)):
            raise ArtifactError(f"{where}: the stored tensor is {_dtype_name(t.dtype)} {list(t.shape)}, not the "
                                f"{record['dtype']} {record['shape']} recorded.")
        return t

    def _module(self, value: Mapping[str, Any], where: str) -> Any:
        try:
            cls = resolve_class(value["__module__"])
        except ArtifactError as e:
            return Unrestored(str(e))
        kwargs = self(value["kwargs"], f"{where}.kwargs")
        missing = find_unrestored(kwargs, f"{cls.__qualname__} argument")
        if missing:
            return Unrestored("; ".join(missing))
        try:
            obj = cls(**kwargs)
        except Exception as e:  # a constructor that refuses its recorded arguments
            return Unrestored(f"{cls.__qualname__}(**{kwargs}) could not be built: {_short(e)}")
        if isinstance(value.get("name"), str):
            obj._lanterna_name = value["name"]
        return obj


def decode_json(value: Any, tensors: Mapping[str, torch.Tensor] | None = None, where: str = "metadata") -> Any:
    """Inverse of :func:`encode_json`. Classes are looked up only among imported modules
    (:func:`resolve_class`); a refused or missing class, or a value that was not stored, comes back as an
    :class:`Unrestored`. Malformed tags raise :class:`ArtifactError` naming ``where``.

    Args:
        value: the JSON value.
        tensors: the stored tensors, by the keys :func:`encode_json` gave them.
        where: its name in messages.

    >>> from lanterna.io.artifact import decode_json
    >>> decode_json({"__dtype__": "float16"})
    torch.float16
    """
    return _Decoder(tensors)(value, where)


def _dtype(name: Any, where: str) -> torch.dtype:
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ArtifactError(f"{where}: unknown dtype {name!r}.")
    return dtype


# ---------------------------------------------------------------------------- file kinds


def sniff(path: str | os.PathLike[str]) -> str:
    """What a file is, from its structure (its first 16 bytes and its last one); nothing is parsed or
    executed: ``"safetensors"`` (an 8-byte little-endian header length that fits the file, then ``{``),
    ``"zip"`` (``torch.save``), ``"pickle"`` (``0x80``, a protocol byte 2..5 and a final ``.``, or
    ``torch.save``'s legacy format), ``"empty"``, ``"zeros"`` (zero-filled), ``"damaged"`` (a safetensors
    file whose header length does not fit) or ``"unknown"``.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lanterna.io.artifact import sniff
    >>> p = Path(tempfile.mkdtemp()) / "x.bin"; _ = p.write_bytes(b"\\x80\\x04K\\x01.")
    >>> sniff(p)
    'pickle'
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(max(size - 1, 0))
        tail = f.read(1)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        return "safetensors" if 2 <= n <= size - 8 else "damaged"
    if head.startswith(_TORCH_LEGACY_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
                                                and tail == b"."):
        return "pickle"
    if not head.strip(b"\x00"):
        return "zeros"
    return "unknown"


# ---------------------------------------------------------------------------- save / read


def _dedupe(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors for safetensors (CPU, contiguous, no shared memory) and the aliases of tied weights."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor.")
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        shared = ptr is not None and ptr in storages
        if ptr is not None:
            storages.add(ptr)
        t = t.to("cpu")
        tensors[name] = t.clone() if shared or not t.is_contiguous() else t
    return tensors, aliases


def _blank_sha(blob: bytes | bytearray, header_len: int) -> tuple[int, str]:
    """Where the 64 hex digits of ``"lanterna.sha256"`` sit in a single-file artifact, and the SHA-256 of
    the file with them read as ``0`` (what the digits must say). ``(-1, "")`` when the key is not there once."""
    header = memoryview(blob)[8:8 + header_len]
    found = bytes(header).split(_SHA_NEEDLE)
    if len(found) != 2:
        return -1, ""
    pos = 8 + len(found[0]) + len(_SHA_NEEDLE)
    h = hashlib.sha256(memoryview(blob)[:pos])
    h.update(b"0" * 64)
    h.update(memoryview(blob)[pos + 64:])
    return pos, h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _st_save(tensors: Mapping[str, torch.Tensor], header: dict[str, str]) -> bytes:
    from safetensors.torch import save as st_save

    try:
        return st_save(dict(tensors), metadata=header)
    except Exception as e:  # a dtype safetensors cannot hold ...
        raise ArtifactError(f"The weights cannot be written as safetensors: {_short(e)}") from None


def save_artifact(
    path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
    *, unsaved: list[str] | None = None,
) -> Path:
    """Write weights + metadata (encoded once by :func:`encode_json`, its tensors stored with the weights).
    ``path`` ending in ``.safetensors`` → that one file (metadata in its header); otherwise a folder with
    ``lanterna.json`` and the weights file it names. The whole save is atomic (see the module's doc).

    Args:
        path: a folder, or a file name ending in ``.safetensors``.
        state_dict: the model's ``state_dict()`` (tied weights are stored once).
        metadata: a dict of what the metadata holds.
        unsaved: a list that collects the values that cannot be stored (as placeholders); None: they raise
            :class:`ArtifactError`.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lanterna.io.artifact import save_artifact
    >>> p = save_artifact(Path(tempfile.mkdtemp()) / "m", {"w": torch.ones(2)}, {"history": []})
    >>> sorted(x.name for x in p.iterdir())  # doctest: +ELLIPSIS
    ['lanterna.json', 'model-....safetensors']
    """
    if not os.fspath(path).strip():
        raise ArtifactError("fitted.save(path) got an empty path; give a folder (or a .safetensors file name).")
    path = Path(path)
    tensors, aliases = _dedupe(state_dict)
    reserved = [k for k in [*tensors, *aliases] if k.startswith(_TENSOR_PREFIX)]
    if reserved:
        raise ArtifactError(f"state_dict entries starting with {_TENSOR_PREFIX!r} are reserved: {_few(reserved)}.")
    stored: list[torch.Tensor] = []
    try:
        body = encode_json(dict(metadata), "", tensors=stored, unsaved=unsaved)
    except ValueError as e:
        raise ArtifactError(f"Cannot store the metadata: {e}") from None
    tensors.update({f"{_TENSOR_PREFIX}{i}": t for i, t in enumerate(stored)})
    head = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION}
    try:
        if path.suffix == ".safetensors":
            _write_file(path, tensors, {**head, **body, "aliases": aliases})
        else:
            _write_folder(path, tensors, head, {**body, "aliases": aliases})
    except OSError as e:  # a full disk, a read-only folder, a name too long ...
        raise ArtifactError(f"Could not save the model to {str(path)!r}: {explain_write_error(e)}. Nothing "
                            "half-written is left: a model saved there before still loads.") from e
    return path


def _write_file(path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    if path.is_dir():
        raise ArtifactError(f"{str(path)!r} is a folder; give another path for a single .safetensors file.")
    text = json.dumps(doc, indent=2, allow_nan=False)
    blob = bytearray(_st_save(tensors, {"format": "pt", _HEADER_KEY: text, _HEADER_SHA: "0" * 64}))
    pos, digest = _blank_sha(blob, struct.unpack("<Q", blob[:8])[0])
    blob[pos:pos + 64] = digest.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, bytes(blob))


def _write_folder(path: Path, tensors: dict[str, torch.Tensor], head: dict[str, Any], body: dict[str, Any]) -> None:
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{str(path)!r} exists and is a file; fitted.save(path) writes a folder there "
                            "(or give a path ending in .safetensors for a single file).")
    blob = _st_save(tensors, {"format": "pt"})
    digest = hashlib.sha256(blob).hexdigest()
    name = f"model-{digest[:12]}.safetensors"
    text = json.dumps({**head, "weights": {"file": name, "sha256": digest, "bytes": len(blob)}, **body},
                      indent=2, allow_nan=False)
    path.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(path)  # left by a killed save
    atomic_write_bytes(path / name, blob)  # under a new name: lanterna.json still names the previous weights
    atomic_write_bytes(path / META_NAME, (text + "\n").encode())  # the commit
    try:  # weights no longer named; one left behind (a kill, an error) goes at the next save, loads ignore it
        stale = [p for p in path.iterdir() if _WEIGHTS_FILE.match(p.name) and p.name != name]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            fsync_dir(path)
    except OSError:
        pass


def _refuse(path: Path, kind: str, *, weights: bool) -> ArtifactError:
    """The error for a file that is not a safetensors file; ``weights``: it should have been one."""
    where = str(path)
    if kind == "pickle":
        return ArtifactError(
            f"{where!r} is a pickle file. lanterna never unpickles files (unpickling can run arbitrary "
            "code); it was not opened beyond its first bytes. Save models with fitted.save(path) "
            "(safetensors + JSON), or load plain weights with torch.load(path, weights_only=True)."
        )
    if kind == "zip":
        return ArtifactError(f"{where!r} is a torch.save archive, not a safetensors file; load a lanterna "
                             "checkpoint with ln.load(path) or lanterna.io.load_checkpoint(path).")
    problem = {"empty": "is empty (0 bytes)", "zeros": "is zero-filled",
               "damaged": "has a safetensors header length that does not fit the file"}.get(kind)
    if problem is not None or weights:
        return DamagedArtifactError(
            f"{where!r} {problem or 'is not a safetensors file'}: it is damaged (an interrupted copy, a disk "
            "error?). Save the model again, or restore the file from a backup."
        )
    return ArtifactError(
        f"{where!r} is not a lanterna artifact (expected a folder written by fitted.save(), a "
        ".safetensors file with lanterna metadata, or a lanterna checkpoint)."
    )


def _parse_meta(data: bytes | str, where: Path) -> dict[str, Any]:
    """The metadata JSON object, checked to be lanterna's, of the current format version."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise DamagedArtifactError(f"{str(where)!r} is not UTF-8 text (byte {e.start}): it is damaged, or not the "
                                   "metadata fitted.save() writes.") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise DamagedArtifactError(f"{str(where)!r} is not valid JSON ({e}): it is damaged or was badly "
                                   "edited.") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{str(where)!r} is not a JSON object (it holds a {type(doc).__name__}): not the "
                            "metadata fitted.save() writes.")
    if doc.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{str(where)!r} is not lanterna model metadata (it has no \"format\": "
                            f"\"{ARTIFACT_FORMAT}\"; another tool's file?). ln.load reads what fitted.save() writes.")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise DamagedArtifactError(f"{str(where)!r} has no valid format_version ({version!r}): damaged or edited.")
    if version < ARTIFACT_VERSION:
        raise ArtifactError(
            f"{str(where)!r} is in lanterna's artifact format version {version}, written by an older lanterna; "
            f"this one reads version {ARTIFACT_VERSION}. Load it with the lanterna that wrote it and save it "
            "again, or load its weights yourself (safetensors.torch.load_file() and model.load_state_dict())."
        )
    if version > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{str(where)!r} has artifact format version {version}, written by a newer lanterna; this one reads "
            f"version {ARTIFACT_VERSION}. Upgrade lanterna to load it."
        )
    return doc


def _read_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    meta_file = path / META_NAME
    problem: Exception = ArtifactError("")
    for _ in range(3):  # a save in another process may replace lanterna.json and remove the file it named
        try:
            data = meta_file.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactError(f"{str(path)!r} is a folder without {META_NAME}: not a model written by "
                                "fitted.save().") from None
        doc = _parse_meta(data, meta_file)
        entry = doc.get("weights")
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and _WEIGHTS_FILE.match(entry["file"])
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
                and type(entry.get("bytes")) is int):
            raise DamagedArtifactError(
                f"{str(meta_file)!r} has no valid \"weights\" entry (file model-<12 hex digits>.safetensors, "
                "sha256, bytes): it is damaged or was edited. Save the model again."
            )
        try:
            return _read_weights(path / entry["file"], entry), doc, meta_file
        except FileNotFoundError:
            problem = ArtifactError(
                f"{str(path / entry['file'])!r}, the weights file {META_NAME} names, is missing: the folder is "
                "incomplete (copied in part?). Copy the whole folder, or save the model again.")
        except _Changed as e:
            problem = DamagedArtifactError(str(e))
    raise problem


class _Changed(Exception):
    pass


def _read_weights(weights: Path, entry: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a folder's weights file, once its size and SHA-256 match ``entry``."""
    from safetensors.torch import load_file

    kind = sniff(weights)
    if kind != "safetensors":
        raise _refuse(weights, kind, weights=True)
    size = weights.stat().st_size
    if size != entry["bytes"]:
        raise DamagedArtifactError(f"{str(weights)!r} has {size} bytes, {META_NAME} says {entry['bytes']}: it is "
                                   "damaged (truncated?). Save the model again, or restore it from a backup.")
    digest = _file_sha256(weights)
    if digest != entry["sha256"]:
        raise DamagedArtifactError(
            f"{str(weights)!r} fails its SHA-256 checksum (recorded {entry['sha256'][:16]}..., the file gives "
            f"{digest[:16]}...): it is damaged. Save the model again, or restore it from a backup."
        )
    try:
        return load_file(str(weights))  # opened by name again: the same name always holds the same bytes
    except Exception as e:  # it verified, so it changed since: removed (or written again) by another save
        raise _Changed(f"{str(weights)!r} is not a readable safetensors file ({_short(e)}).") from None


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    from safetensors.torch import load as st_load

    kind = sniff(path)
    if kind != "safetensors":
        raise _refuse(path, kind, weights=path.suffix == ".safetensors")
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise DamagedArtifactError(f"{str(path)!r} has a safetensors header that is not a JSON object: it is "
                                   "damaged. Save the model again, or restore it from a backup.")
    info = header.get("__metadata__")
    text = info.get(_HEADER_KEY) if isinstance(info, dict) else None
    if not isinstance(text, str):
        hint = " (it sits in a folder saved by fitted.save(): load the folder)" if (
            path.parent / META_NAME).is_file() else ""
        raise ArtifactError(
            f"{str(path)!r} holds weights but no lanterna metadata{hint}; load them into your module with "
            "safetensors.torch.load_file() and model.load_state_dict()."
        )
    if _HEADER_SHA not in info:  # an older format (named by the error), or no checksum at all
        _parse_meta(text, path)
    pos, digest = _blank_sha(blob, n)
    if pos < 0 or info.get(_HEADER_SHA) != digest:
        raise DamagedArtifactError(f"{str(path)!r} fails its SHA-256 checksum: it is damaged. Save the model "
                                   "again, or restore it from a backup.")
    doc = _parse_meta(text, path)
    try:
        tensors = st_load(blob)
    except Exception as e:
        raise DamagedArtifactError(f"{str(path)!r} is not a readable safetensors file ({_short(e)}).") from None
    return tensors, doc, path


def read_artifact(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of an artifact written by :func:`save_artifact`, its checksum verified
    first. Tied weights come back as the same tensor under each name; the metadata is decoded by
    :func:`decode_json` (classes only from imported modules; refused ones as :class:`Unrestored`). Anything
    else raises :class:`ArtifactError` naming the file (:class:`DamagedArtifactError` for damage); pickles
    are refused unread.

    Args:
        path: the folder or ``.safetensors`` file.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lanterna.io.artifact import read_artifact, save_artifact
    >>> p = save_artifact(Path(tempfile.mkdtemp()) / "m.safetensors", {"w": torch.ones(2)}, {"x": (1, 2)})
    >>> sd, meta = read_artifact(p)
    >>> sd["w"].tolist(), meta["x"]
    ([1.0, 1.0], (1, 2))
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"No model at {str(path)!r}.")
    tensors, doc, where = _read_folder(path) if path.is_dir() else _read_file(path)
    state = {k: t for k, t in tensors.items() if not k.startswith(_TENSOR_PREFIX)}
    stored = {k[len(_TENSOR_PREFIX):]: t for k, t in tensors.items() if k.startswith(_TENSOR_PREFIX)}
    aliases = doc.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise DamagedArtifactError(f"{str(where)!r}: \"aliases\" is not an object: damaged or edited.")
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in state:
            raise DamagedArtifactError(f"{str(where)!r}: tied weight {name!r} points to a missing entry {target!r}.")
        state[name] = state[target]
    body = {k: v for k, v in doc.items() if k not in ("format", "format_version", "weights", "aliases")}
    try:
        meta = decode_json(body, stored, where="")
    except ArtifactError as e:
        raise ArtifactError(f"{str(where)!r}: {e}") from None
    return state, meta


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# ---------------------------------------------------------------------------- classes by import path


def import_path(obj: Any) -> str | None:
    """``"package.module:QualName"`` of a class or function, or None when it cannot be imported by name
    (defined in a function, or in ``__main__``' when that is not a file).

    >>> from torch import nn
    >>> from lanterna.io.artifact import import_path
    >>> import_path(nn.Linear)
    'torch.nn.modules.linear:Linear'
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def resolve_class(path: Any, base: type = nn.Module) -> type:
    """The class named ``"package.module:QualName"``, only if it is a ``base`` subclass, looked up among the
    modules already imported (``sys.modules``), attribute by attribute without running any code: a module
    named in a file is never imported (that would run its top-level code) and nothing is called. Anything
    else raises :class:`ArtifactError`.

    Args:
        path: the recorded import path.
        base: the class it must derive from (``nn.Module``; ``torch.optim.Optimizer`` for an optimizer).

    >>> from lanterna.io.artifact import resolve_class
    >>> resolve_class("torch.nn.modules.linear:Linear")
    <class 'torch.nn.modules.linear.Linear'>
    """
    if not isinstance(path, str) or not _MODULE_PATH.match(path):
        raise ArtifactError(f"The metadata names {path!r}, which is not an import path 'package.module:ClassName'.")
    mod_name, qual = path.split(":")
    obj: Any = sys.modules.get(mod_name)
    if obj is None:
        raise ArtifactError(
            f"{path!r} is in the module {mod_name!r}, which is not imported: ln.load never imports a module named "
            f"in a file (that would run its code). If you trust it, import {mod_name} yourself first."
        )
    for part in qual.split("."):
        obj = inspect.getattr_static(obj, part, _MISSING)  # no __getattr__, no descriptor runs
        if obj is _MISSING:
            raise ArtifactError(f"{path!r}: the module {mod_name} has no attribute {qual!r}.")
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
        name = "nn.Module" if base is nn.Module else f"{base.__module__}.{base.__qualname__}"
        raise ArtifactError(
            f"Refused: the metadata names {path!r}, which is {kind}, not an {name} subclass; lanterna builds "
            f"only {name} subclasses from metadata, and called nothing."
        )
    return obj


def resolve_module_class(path: str) -> type[nn.Module]:
    """:func:`resolve_class` for an ``nn.Module`` subclass.

    >>> from lanterna.io.artifact import resolve_module_class
    >>> resolve_module_class("torch.nn.modules.activation:Tanh")
    <class 'torch.nn.modules.activation.Tanh'>
    """
    return resolve_class(path, nn.Module)


def load_weights_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str = "file") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a :class:`ModelMismatchError` that names the
    missing, unexpected and differently shaped entries (and their shapes) instead of torch's error, and the
    entries of another kind of dtype (integers into floats ...: ``load_state_dict`` would convert them
    silently; another float precision is converted as torch does).

    >>> import torch
    >>> from torch import nn
    >>> from lanterna.io.artifact import load_weights_strict
    >>> m, saved = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> load_weights_strict(m, saved.state_dict())
    >>> torch.equal(m.weight, saved.weight)
    True
    >>> load_weights_strict(m, nn.Linear(3, 1).state_dict())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lanterna.errors.ModelMismatchError: ...weight: saved (1, 3), model (1, 2)...
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: saved {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    shapes += [
        f"{k}: saved {state_dict[k].dtype}, model {expected[k].dtype}"
        for k in expected
        if k in state_dict and _dtype_kind(state_dict[k].dtype) != _dtype_kind(expected[k].dtype)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the {where}: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected (in the {where}, not in the model): {_few(unexpected)}")
        if shapes:
            parts.append(f"different shapes or dtypes: {_few(shapes)}")
        raise ModelMismatchError(
            f"The weights of the {where} do not fit {type(model).__name__}: " + "; ".join(parts) + ". Build the "
            "module with the same architecture and hparams as when it was saved (or pass the right module=)."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise ModelMismatchError(f"The weights of the {where} do not fit {type(model).__name__}: {_short(e)}") from None


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "int"


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")
