"""Safe model artifacts: weights as safetensors, metadata as JSON; never a pickle (API.md §7).

An artifact is a folder ``<path>/model.safetensors`` + ``<path>/lanterna.json`` (the metadata; a copy also
sits in the safetensors header and is used when the JSON file is missing), or a single
``<path>.safetensors`` file carrying the JSON in its header. Loading never unpickles: pickle files are
refused after their first bytes, and a class named in the metadata is imported only to check that it is an
``nn.Module`` subclass; anything else (``os.system`` ...) is refused and never called.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ModelMismatchError
from .atomic import atomic_write_bytes

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "WEIGHTS_NAME",
    "META_NAME",
    "save_artifact",
    "read_artifact",
    "sniff",
    "encode_json",
    "decode_json",
    "import_path",
    "resolve_module_class",
    "load_weights_strict",
]

ARTIFACT_FORMAT = "lanterna.model"
ARTIFACT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "lanterna.json"
_HEADER_KEY = "lanterna"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


# ---------------------------------------------------------------------------- JSON with a few tagged types


class _Unencodable(ValueError):
    pass


def encode_json(value: Any, where: str = "value") -> Any:
    """A JSON-ready form of ``value``: tuples, non-finite floats, ``torch.dtype`` and small tensors are tagged
    so that :func:`decode_json` gives them back. Raises ``ValueError`` for anything else that is not plain JSON.

    >>> decode_json(encode_json({"sizes": (32, 16), "eps": float("inf")}))
    {'sizes': (32, 16), 'eps': inf}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, torch.Tensor):
        if value.numel() > 4096:
            raise _Unencodable(f"{where} is a tensor of {value.numel()} elements; metadata holds only small ones.")
        return {"__tensor__": encode_json(value.detach().cpu().tolist(), where),
                "__dtype__": str(value.dtype).replace("torch.", "")}
    if isinstance(value, (list, tuple)):
        items = [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("__"):
                raise _Unencodable(f"{where} has the key {k!r}; only string keys (not starting with '__') are stored.")
            out[k] = encode_json(v, f"{where}[{k!r}]")
        return out
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy / torch scalars
        return encode_json(value.item(), where)
    raise _Unencodable(f"{where} is a {type(value).__name__}, which JSON metadata cannot hold.")


def decode_json(value: Any) -> Any:
    """Inverse of :func:`encode_json`.

    >>> decode_json({"__dtype__": "float16"})
    torch.float16
    """
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(decode_json(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        if set(value) == {"__dtype__"}:
            return _dtype(value["__dtype__"])
        if set(value) == {"__tensor__", "__dtype__"}:
            return torch.tensor(decode_json(value["__tensor__"]), dtype=_dtype(value["__dtype__"]))
        return {k: decode_json(v) for k, v in value.items()}
    return value


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"Unknown dtype {name!r} in the metadata.")
    return dtype


# ---------------------------------------------------------------------------- file kinds


def sniff(path: str | os.PathLike[str]) -> str:
    """What a file is, from its first bytes only: ``"safetensors"``, ``"zip"`` (``torch.save``), ``"pickle"``,
    ``"empty"`` or ``"unknown"``. Nothing is parsed or executed.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.bin"; _ = p.write_bytes(b"\\x80\\x04K\\x01.")
    >>> sniff(p)
    'pickle'
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c", b"l", b"d"):
        return "pickle"
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


def save_artifact(
    path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write weights + metadata (JSON via :func:`encode_json`). ``path`` ending in ``.safetensors`` → that
    one file (metadata in its header); otherwise a folder with ``model.safetensors`` and ``lanterna.json``.
    Atomic per file.

    >>> import tempfile
    >>> p = save_artifact(Path(tempfile.mkdtemp()) / "m", {"w": torch.ones(2)}, {"history": []})
    >>> sorted(x.name for x in p.iterdir())
    ['lanterna.json', 'model.safetensors']
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    tensors, aliases = _dedupe(state_dict)
    meta = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **dict(metadata), "aliases": aliases}
    try:
        text = json.dumps(encode_json(meta, "metadata"), indent=2, allow_nan=False)
    except ValueError as e:
        raise ArtifactError(f"Cannot store the metadata: {e}") from None
    blob = st_save(tensors, metadata={"format": "pt", _HEADER_KEY: text})
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
        return path
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{str(path)!r} exists and is a file; fitted.save(path) writes a folder there "
                            "(or give a path ending in .safetensors for a single file).")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_NAME, blob)
    atomic_write_bytes(path / META_NAME, (text + "\n").encode())
    return path


def _refuse(path: Path, kind: str) -> ArtifactError:
    if kind == "pickle":
        return ArtifactError(
            f"{str(path)!r} is a pickle file. lanterna never unpickles files (unpickling can run arbitrary "
            "code); it was not opened beyond its first bytes. Save models with fitted.save(path) "
            "(safetensors + JSON), or load plain weights with torch.load(path, weights_only=True)."
        )
    if kind == "empty":
        return ArtifactError(f"{str(path)!r} is empty (0 bytes); it is not a lanterna model.")
    return ArtifactError(
        f"{str(path)!r} is not a lanterna artifact (expected a folder written by fitted.save(), a "
        ".safetensors file with lanterna metadata, or a lanterna checkpoint)."
    )


def read_artifact(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of an artifact written by :func:`save_artifact`. Tied weights come back
    as the same tensor under each name. Raises :class:`ArtifactError` for anything else (pickles refused
    unread).

    >>> import tempfile
    >>> p = save_artifact(Path(tempfile.mkdtemp()) / "m.safetensors", {"w": torch.ones(2)}, {"x": (1, 2)})
    >>> sd, meta = read_artifact(p)
    >>> sd["w"].tolist(), meta["x"]
    ([1.0, 1.0], (1, 2))
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"No model at {str(path)!r}.")
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if path.is_dir() and not weights.exists():
        raise ArtifactError(f"{str(path)!r} is a folder without {WEIGHTS_NAME}: not written by fitted.save().")
    kind = sniff(weights)
    if kind != "safetensors":
        raise _refuse(weights, kind)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:
        raise ArtifactError(f"{str(weights)!r} is not a readable safetensors file ({_short(e)}).") from None
    # In a folder, lanterna.json is the metadata (the header's copy serves when it is missing).
    meta_file = path / META_NAME if path.is_dir() else None
    if meta_file is not None and meta_file.exists():
        text = meta_file.read_text(encoding="utf-8")
    else:
        text = header.get(_HEADER_KEY)
    if text is None:
        raise ArtifactError(
            f"{str(weights)!r} holds weights but no lanterna metadata; load them into your module with "
            "safetensors.torch.load_file() and model.load_state_dict()."
        )
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"The metadata of {str(path)!r} is not valid JSON: {e}.") from None
    if not isinstance(raw, dict) or raw.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{str(path)!r} is not a lanterna model artifact (its metadata has no "
                            f"format {ARTIFACT_FORMAT!r}).")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{str(path)!r} has artifact format version {version!r}, written by a newer lanterna; this one reads "
            f"versions up to {ARTIFACT_VERSION}. Upgrade lanterna to load it."
        )
    meta = decode_json(raw)
    for name, target in (meta.get("aliases") or {}).items():
        if target not in tensors:
            raise ArtifactError(f"{str(path)!r}: tied weight {name!r} points to a missing entry {target!r}.")
        tensors[name] = tensors[target]
    return tensors, meta


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# ---------------------------------------------------------------------------- classes by import path


def import_path(obj: Any) -> str | None:
    """``"package.module:QualName"`` of a class or function, or None when it cannot be imported by name
    (defined in a function, or in ``__main__``' when that is not a file).

    >>> import_path(nn.Linear)
    'torch.nn.modules.linear:Linear'
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def resolve_module_class(path: str) -> type[nn.Module]:
    """The class named ``"package.module:QualName"``, only if it is an ``nn.Module`` subclass. The module is
    imported (as Python's ``import`` would) and the name looked up attribute by attribute; nothing named
    there is ever called. Anything else raises :class:`ArtifactError`.

    >>> resolve_module_class("torch.nn.modules.linear:Linear")
    <class 'torch.nn.modules.linear.Linear'>
    """
    if not isinstance(path, str) or not _MODULE_PATH.match(path):
        raise ArtifactError(f"The metadata names the module {path!r}, which is not an import path "
                            "'package.module:ClassName'; pass module= to ln.load.")
    mod_name, qual = path.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ArtifactError(
            f"The model class {path!r} cannot be imported ({e}). Import the code that defines it, or pass "
            "module=YourModule to ln.load."
        ) from None
    for part in qual.split("."):
        obj = inspect.getattr_static(obj, part, None) if not inspect.ismodule(obj) else getattr(obj, part, None)
        if obj is None:
            raise ArtifactError(f"{path!r}: {mod_name} has no attribute {qual!r}. Pass module=YourModule to ln.load.")
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ArtifactError(
            f"Refused: the metadata names {path!r}, which is a {type(obj).__name__}, not an nn.Module subclass. "
            "lanterna only builds nn.Module subclasses from metadata and called nothing. If you trust this "
            "file, pass module=YourModule to ln.load."
        )
    return obj


def load_weights_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str = "file") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a :class:`ModelMismatchError` that names the
    missing, unexpected and differently shaped entries (and their shapes) instead of torch's error.

    >>> m = nn.Linear(2, 1)
    >>> load_weights_strict(m, nn.Linear(2, 1).state_dict())
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: saved {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the {where}: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected (in the {where}, not in the model): {_few(unexpected)}")
        if shapes:
            parts.append(f"different shapes: {_few(shapes)}")
        raise ModelMismatchError(
            f"The saved weights do not fit {type(model).__name__}: " + "; ".join(parts) + ". Build the module with "
            "the same architecture and hparams as when it was saved (or pass the right module=)."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise ModelMismatchError(f"The saved weights do not fit {type(model).__name__}: {_short(e)}") from None


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")
