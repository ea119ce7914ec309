"""The checkpoint format shared by ModelCheckpoint and AutoResume (docs/saving.md, "The checkpoint format").

A checkpoint is one file written with ``torch.save`` that loads with ``torch.load(path, weights_only=True)``
into a dict::

    {"format": "lanterna.checkpoint", "format_version": 1,
     "model": <state_dict>, "optimizers": {name: state_dict}, "schedulers": [...], "scaler": ... | None,
     "epoch": int, "step": int, "history": [...], "rng": {...}, "callbacks": {name: state_dict}, ...,
     "integrity": {"algorithm": "sha256-content-v1", "sha256": "<hex>"}}

``integrity`` is a SHA-256 over the content of every other entry (keys, types, scalars, tensor dtypes,
shapes and bytes, in order), so a reader tells a whole checkpoint from a damaged one (truncated, bit-flipped,
emptied) whatever the damage hits. Files are written atomically (:mod:`lanterna.io.atomic`).

(Over 350 lines: the format's sanitizer, checksum, writer, reader and folder helpers are one unit.)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..errors import CheckpointError, CheckpointVersionError, DamagedCheckpointError
from .atomic import TEMP_MARKER, atomic_write, explain_write_error

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointInfo",
    "sanitize",
    "content_digest",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "scan_checkpoints",
    "check_writable",
    "remove_checkpoint",
]

FORMAT = "lanterna.checkpoint"
FORMAT_VERSION = 1
_ALGORITHM = "sha256-content-v1"
_FAILED = object()


# ---------------------------------------------------------------------------- content: check and digest


def sanitize(obj: Any, where: str = "checkpoint") -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` can read back: tensors detached and moved to
    the CPU, NumPy scalars and arrays turned into Python numbers and tensors. Anything else that is not a
    number, string, bytes, None, tensor, ``torch.dtype``/``torch.device``/``torch.Size``, list, tuple or dict
    raises :class:`CheckpointError` naming where it sits.

    >>> import numpy as np
    >>> from lanterna.io.checkpoint import sanitize
    >>> sanitize({"a": np.float64(1.5), "b": (1, "x")})
    {'a': 1.5, 'b': (1, 'x')}
    """
    if obj is None or isinstance(obj, (bool, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (str, bytes)):  # subclasses (torch's TorchVersion ...) would need their class to load
        return obj if type(obj) in (str, bytes) else (str(obj) if isinstance(obj, str) else bytes(obj))
    if isinstance(obj, torch.Size):
        return torch.Size(int(d) for d in obj)
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            obj = obj.to_dense()
        if obj.is_quantized:
            raise CheckpointError(f"{where} is a quantized tensor; checkpoints hold plain tensors. "
                                  "Dequantize it in state_dict().")
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (int, float)):
        return int(obj) if isinstance(obj, int) else float(obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise CheckpointError(f"{where} is a NumPy array of Python objects; store numbers or tensors.")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(f"{where} has a key of type {type(k).__name__} ({k!r}); use str or int keys.")
            out[k] = sanitize(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [sanitize(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint cannot hold "
        "(checkpoints load with torch.load(weights_only=True) and never unpickle objects). Return tensors, "
        "numbers, strings, lists and dicts from state_dict()."
    )


def _feed(h: Any, obj: Any) -> None:
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"T" if obj else b"F")
    elif isinstance(obj, int):
        s = str(obj).encode()
        h.update(b"i" + struct.pack("<I", len(s)) + s)
    elif isinstance(obj, float):
        s = obj.hex().encode() if math.isfinite(obj) else repr(obj).encode()
        h.update(b"f" + struct.pack("<I", len(s)) + s)
    elif isinstance(obj, str):
        s = obj.encode("utf-8", "surrogatepass")
        h.update(b"s" + struct.pack("<Q", len(s)) + s)
    elif isinstance(obj, bytes):
        h.update(b"b" + struct.pack("<Q", len(obj)) + obj)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        head = f"{t.dtype}|{tuple(t.shape)}".encode()
        h.update(b"t" + struct.pack("<I", len(head)) + head)
        flat = t.contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))  # type: ignore[arg-type]
    elif isinstance(obj, Mapping):
        h.update(b"d" + struct.pack("<Q", len(obj)))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"l" if isinstance(obj, list) else b"u") + struct.pack("<Q", len(obj)))
        for v in obj:
            _feed(h, v)
    else:  # torch.dtype, torch.device, torch.Size (a tuple, handled above) and the like
        s = f"{type(obj).__name__}:{obj}".encode()
        h.update(b"o" + struct.pack("<I", len(s)) + s)


def content_digest(obj: Any) -> str:
    """SHA-256 of the content of ``obj`` (a sanitized checkpoint dict): keys, types, scalars, tensor
    dtypes, shapes and bytes, in order. Independent of how ``torch.save`` lays the bytes out.

    >>> import torch
    >>> from lanterna.io.checkpoint import content_digest
    >>> content_digest({"a": torch.zeros(2)}) == content_digest({"a": torch.zeros(2)})
    True
    >>> content_digest({"a": torch.zeros(2)}) == content_digest({"a": torch.ones(2)})
    False
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


# ---------------------------------------------------------------------------- write and read


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a dict with at least ``"model"``) as a checkpoint file, atomically, with the format
    version and the integrity record added. Nothing is drawn from any random generator.

    Raises :class:`CheckpointError` when the state holds something a checkpoint cannot hold, or when the
    write fails: the message names the file and the cause (a full disk, a file size limit, a read-only
    folder, a permission error), the ``OSError`` is its ``__cause__``, the previous file at ``path`` is left
    as it was and no temp file remains.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lanterna.io.checkpoint import load_checkpoint, save_checkpoint
    >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "c.pt", {"model": {"w": torch.ones(2)}, "epoch": 1})
    >>> load_checkpoint(p)["epoch"]
    1
    """
    path = Path(path)
    if "model" not in state:
        raise CheckpointError("A checkpoint needs a 'model' entry (the model's state_dict).")
    body = {"format": FORMAT, "format_version": FORMAT_VERSION}
    body.update({k: v for k, v in state.items() if k not in ("format", "format_version", "integrity")})
    body = sanitize(body)
    body["integrity"] = {"algorithm": _ALGORITHM, "sha256": content_digest(body)}
    writer: _Writer | None = None

    def write(f: IO[bytes]) -> None:
        nonlocal writer
        writer = _Writer(f)
        torch.save(body, writer)  # type: ignore[arg-type]

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        # torch turns a failed write into "[enforce fail at inline_container.cc ...] unexpected pos": the
        # OSError it swallowed says why.
        os_error = e if isinstance(e, OSError) else writer.error if writer is not None else None
        if os_error is None:
            raise CheckpointError(f"Could not write the checkpoint {str(path)!r}: {_short(e)}.") from e
        raise CheckpointError(
            f"Could not write the checkpoint {str(path)!r}: {explain_write_error(os_error)}. The previous file "
            "(if any) is unchanged and no partial file was left."
        ) from os_error
    return path


class _Writer:
    """The file ``torch.save`` writes to, keeping the first ``OSError`` of a write (torch hides it)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def _torch_load(path: Path, mmap: bool) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read(path: Path, mmap: bool) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into a typed error."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"No checkpoint at {str(path)!r}.") from None
    if size == 0:
        raise DamagedCheckpointError(f"The checkpoint {str(path)!r} is empty (0 bytes): its write never completed.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is never handed to a loader
        raise DamagedCheckpointError(
            f"{str(path)!r} is not a torch.save archive (it starts with {magic!r}): not a lanterna checkpoint, or "
            "damaged. It was not loaded."
        )
    state: Any = _FAILED
    error: Any = None  # the last load's exception
    for use_mmap in ((True, False) if mmap else (False,)):
        try:
            state = _torch_load(path, use_mmap)
            break
        except Exception as e:  # truncated zip, bit flips in the pickle stream, foreign content ...
            error = e
    if state is _FAILED:
        raise DamagedCheckpointError(
            f"The checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {_short(error)}); it is truncated "
            "or corrupt (or not a checkpoint). It was not unpickled beyond torch's weights-only loader."
        ) from None
    return _check_dict(state, path)


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else ""


def _check_dict(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise DamagedCheckpointError(
            f"{str(path)!r} holds a {type(state).__name__}, not a lanterna checkpoint dict.")
    version = state.get("format_version")
    if state.get("format") == FORMAT and isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"The checkpoint {str(path)!r} has format version {version}, written by a newer lanterna; this one "
            f"reads versions up to {FORMAT_VERSION}. Upgrade lanterna (pip install -U lanterna) to load it."
        )
    if state.get("format") != FORMAT or "integrity" not in state:
        raise DamagedCheckpointError(
            f"{str(path)!r} has no lanterna integrity record (checksum), so it cannot be told from a damaged "
            "file. Checkpoints are written by ln.callbacks.ModelCheckpoint / AutoResume."
        )
    return state


def verify_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str] = "checkpoint") -> None:
    """Raise :class:`DamagedCheckpointError` unless ``state``'s content matches its integrity record."""
    record = state.get("integrity")
    if not isinstance(record, Mapping) or record.get("algorithm") != _ALGORITHM:
        raise DamagedCheckpointError(f"{str(path)!r} has no readable integrity record (checksum).")
    body = {k: v for k, v in state.items() if k != "integrity"}
    try:
        digest = content_digest(body)
    except Exception as e:  # a storage that a bit flip made unreadable, under mmap
        raise DamagedCheckpointError(f"The checkpoint {str(path)!r} cannot be read in full: {_short(e)}.") from None
    if digest != record.get("sha256"):
        raise DamagedCheckpointError(
            f"The checkpoint {str(path)!r} is damaged: its content does not match its SHA-256 checksum "
            "(bit rot, a partial copy, or a write interrupted outside lanterna's atomic writer)."
        )


def load_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (tensors on the CPU) and check it.

    Raises :class:`DamagedCheckpointError` (truncated, corrupt, empty, no checksum or a checksum mismatch),
    :class:`CheckpointVersionError` (a newer format), :class:`CheckpointError` (missing file); never a raw
    unpickling error.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lanterna.io.checkpoint import load_checkpoint, save_checkpoint
    >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "c.pt", {"model": {}, "step": 7})
    >>> load_checkpoint(p)["step"]
    7
    """
    path = Path(path)
    state = _read(path, mmap=False)
    if verify:
        verify_checkpoint(state, path)
    return state


# ---------------------------------------------------------------------------- discovery


@dataclass
class CheckpointInfo:
    """A checkpoint file found in a folder: its path, recorded epoch and step, and the (mmapped) state."""

    path: Path
    epoch: int
    step: int
    state: dict[str, Any]


def scan_checkpoints(
    folder: str | os.PathLike[str],
    *,
    on_damaged: Callable[[Path, CheckpointError], None] | None = None,
    pattern: str = "*.pt",
) -> list[CheckpointInfo]:
    """The readable checkpoints of ``folder``, latest first by their recorded ``(step, epoch)`` (never by
    file name). Files that cannot be opened are passed to ``on_damaged``; the content checksum is not
    verified here (call :func:`verify_checkpoint` on the one you use). A newer format version raises.

    >>> import tempfile
    >>> from lanterna.io.checkpoint import scan_checkpoints
    >>> scan_checkpoints(tempfile.mkdtemp())
    []
    """
    folder = Path(folder)
    found: list[CheckpointInfo] = []
    if not folder.is_dir():
        return found
    for p in sorted(folder.glob(pattern)):
        if TEMP_MARKER in p.name or not p.is_file():
            continue
        try:
            state = _read(p, mmap=True)
        except CheckpointVersionError:
            raise
        except CheckpointError as e:
            if on_damaged is not None:
                on_damaged(p, e)
            continue
        found.append(CheckpointInfo(p, int(state.get("epoch", 0) or 0), int(state.get("step", 0) or 0), state))
    found.sort(key=lambda c: (c.step, c.epoch, c.path.stat().st_mtime_ns), reverse=True)
    return found


def check_writable(folder: str | os.PathLike[str], who: str) -> None:
    """Create ``folder`` and prove a file can be written there (a probe file, removed), before training
    starts; else a :class:`CheckpointError` naming ``who``, the folder and the cause.

    Args:
        folder: the folder checkpoints will be written to.
        who: the writer, for messages (``"AutoResume"``).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lanterna.io.checkpoint import check_writable
    >>> check_writable(Path(tempfile.mkdtemp()) / "ckpt", "ModelCheckpoint")
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            f"{who}: {str(folder)!r} is an existing file, not a folder. Give a folder path, or remove or rename "
            "the file (checked before training, so no epoch is lost)."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{TEMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(
            f"{who} cannot write to {str(folder)!r}: {explain_write_error(e)} (checked before training, so no "
            "epoch is lost)."
        ) from e


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Remove a checkpoint: a file, or the folder of a sharded (FSDP) checkpoint; a missing one is no error.

    Args:
        path: the checkpoint.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from lanterna.io.checkpoint import remove_checkpoint, save_checkpoint
    >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "c.pt", {"model": {}})
    >>> remove_checkpoint(p); p.exists()
    False
    """
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
