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
under ``__lanterna__.<n>``. Other values JSON cannot hold are tagged
(:func:`~lanterna.io.encoding.encode_json`).

Loading verifies the checksum before anything is parsed, never unpickles (a pickle is refused after its first
bytes) and never imports: a class named in the metadata is looked up only among the modules already in
``sys.modules`` and must be an ``nn.Module`` subclass; only those are ever called
(:func:`~lanterna.io.resolve.resolve_class`).

This module holds the format and :func:`save_artifact`; reading is in :mod:`lanterna.io.artifact_read`, the
metadata's JSON in :mod:`lanterna.io.encoding`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from .atomic import atomic_write_bytes, explain_write_error, fsync_dir, sweep_temp_files
from .encoding import encode_json
from .resolve import _few, _short

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "META_NAME", "save_artifact"]

ARTIFACT_FORMAT = "lanterna.model"
ARTIFACT_VERSION = 2
META_NAME = "lanterna.json"
_HEADER_KEY = "lanterna"
_HEADER_SHA = "lanterna.sha256"
_SHA_NEEDLE = b'"lanterna.sha256":"'  # how safetensors writes that header key; quotes in values are escaped
_TENSOR_PREFIX = "__lanterna__."
_WEIGHTS_FILE = re.compile(r"^model-[0-9a-f]{12}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    """Write weights + metadata (encoded once by :func:`~lanterna.io.encoding.encode_json`, its tensors stored
    with the weights). ``path`` ending in ``.safetensors`` → that one file (metadata in its header); otherwise a
    folder with ``lanterna.json`` and the weights file it names. The whole save is atomic (see the module's doc).

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
