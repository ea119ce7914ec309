"""Reading an artifact (the format is described in :mod:`lanterna.io.artifact`): what a file is from its first
bytes (:func:`sniff`), then :func:`read_artifact`, which verifies the checksum before anything is parsed, never
unpickles (a pickle is refused after its first bytes) and never imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError, DamagedArtifactError
from .artifact import (
    _HEADER_KEY,
    _HEADER_SHA,
    _SHA256,
    _TENSOR_PREFIX,
    _WEIGHTS_FILE,
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    META_NAME,
    _blank_sha,
)
from .encoding import decode_json
from .resolve import _short

__all__ = ["sniff", "read_artifact", "file_sha256"]

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch.save without zip


def sniff(path: str | os.PathLike[str]) -> str:
    """What a file is, from its structure (its first 16 bytes and its last one); nothing is parsed or
    executed: ``"safetensors"`` (an 8-byte little-endian header length that fits the file, then ``{``),
    ``"zip"`` (``torch.save``), ``"pickle"`` (``0x80``, a protocol byte 2..5 and a final ``.``, or
    ``torch.save``'s legacy format), ``"empty"``, ``"zeros"`` (zero-filled), ``"damaged"`` (a safetensors
    file whose header length does not fit) or ``"unknown"``.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lanterna.io.artifact_read import sniff
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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks.

    Args:
        path: the file.

    >>> import tempfile, hashlib
    >>> from pathlib import Path
    >>> from lanterna.io.artifact_read import file_sha256
    >>> p = Path(tempfile.mkdtemp()) / "f"; _ = p.write_bytes(b"abc")
    >>> file_sha256(p) == hashlib.sha256(b"abc").hexdigest()
    True
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    digest = file_sha256(weights)
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
    info: Any = header.get("__metadata__")
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
    """``(state_dict, metadata)`` of an artifact written by :func:`~lanterna.io.artifact.save_artifact`, its
    checksum verified first. Tied weights come back as the same tensor under each name; the metadata is decoded
    by :func:`~lanterna.io.encoding.decode_json` (classes only from imported modules; refused ones as
    :class:`~lanterna.io.encoding.Unrestored`). Anything
    else raises :class:`ArtifactError` naming the file (:class:`DamagedArtifactError` for damage); pickles
    are refused unread.

    Args:
        path: the folder or ``.safetensors`` file.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lanterna.io.artifact import save_artifact
    >>> from lanterna.io.artifact_read import read_artifact
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
