"""Atomic file writes: temp file in the same folder → flush → fsync → rename → fsync of the folder.

A reader sees either the previous file or the complete new one, never a partial write, even after a power
loss. A failed write (a full disk, a permission error) raises and leaves no temp file behind; there is no
silent fallback to a non-atomic write. Temp files left by a killed process are recognised by their name
(``.<name>.lanterna-tmp-<pid>-<hex>``) and swept by :func:`sweep_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_bytes", "explain_write_error", "fsync_dir", "sweep_temp_files", "TEMP_MARKER"]

TEMP_MARKER = ".lanterna-tmp-"


def _temp_path(path: Path) -> Path:
    # os.urandom, not the random module: a save must not consume or perturb any RNG (resume parity).
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{os.urandom(4).hex()}")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename or an unlink) to disk. No-op where folders cannot be opened
    (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        if os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temp file in the same folder, which is flushed,
    fsynced and renamed over ``path``; then the folder is fsynced. Returns ``path``.

    Any error (``OSError`` such as ENOSPC included) propagates after the temp file is removed; ``path`` then
    still holds its previous content, byte for byte.

    >>> import tempfile, pathlib
    >>> from lanterna.io.atomic import atomic_write
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = atomic_write(p, lambda f: f.write(b"hello"))
    >>> p.read_bytes()
    b'hello'
    """
    path = Path(path)
    folder = path.parent
    tmp = _temp_path(path)
    f = open(tmp, "xb")  # noqa: SIM115 - closed below, before the rename
    try:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        # After a failed flush (a full disk) close() fails too: the unlink must not depend on it.
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder if str(folder) else ".")
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object.

    >>> import tempfile, pathlib
    >>> from lanterna.io.atomic import atomic_write_bytes
    >>> p = atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "b.bin", b"\\x00\\x01")
    >>> p.stat().st_size
    2
    """
    return atomic_write(path, lambda f: f.write(data))


_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free disk space or choose a folder on another disk"),
    errno.EFBIG: ("the file size limit was reached (ulimit -f / RLIMIT_FSIZE, or the file system's largest file)",
                  "raise the limit (ulimit -f unlimited) or choose a folder on another file system"),
    errno.EROFS: ("the folder is on a read-only file system", "choose a folder you can write to"),
    errno.EACCES: ("permission denied: this user cannot write to the folder",
                   "fix the folder's permissions or choose a folder you can write to"),
    errno.EPERM: ("the operation is not permitted here", "choose a folder you can write to"),
    errno.ENOTDIR: ("a part of the path is an existing file, not a folder",
                    "remove or rename that file, or choose another path"),
    errno.EEXIST: ("the path exists and is not a folder", "remove or rename it, or choose another path"),
    errno.EISDIR: ("the path is an existing folder, not a file", "choose a file name"),
}
if hasattr(errno, "EDQUOT"):
    _CAUSES[errno.EDQUOT] = ("the disk quota is exceeded", "free space in your quota or choose another folder")


def explain_write_error(e: OSError) -> str:
    """Why a write failed and what to do, in plain words, for an error message: a full disk, a file size
    limit, a read-only folder, a permission error ... (the system's own text is kept in parentheses).

    Args:
        e: the ``OSError`` the write raised.

    >>> import errno
    >>> from lanterna.io.atomic import explain_write_error
    >>> explain_write_error(OSError(errno.ENOSPC, "No space left on device"))
    'the disk is full (No space left on device); free disk space or choose a folder on another disk'
    """
    text = e.strerror or str(e)
    if e.errno in _CAUSES:
        cause, fix = _CAUSES[e.errno]
        return f"{cause} ({text}); {fix}"
    return text


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def sweep_temp_files(folder: str | os.PathLike[str], *, all_processes: bool = False) -> list[Path]:
    """Remove temp files that an interrupted :func:`atomic_write` left in ``folder``; return them.

    Files of processes still running are kept (they may be writing now) unless ``all_processes``.

    >>> import tempfile
    >>> from lanterna.io.atomic import sweep_temp_files
    >>> sweep_temp_files(tempfile.mkdtemp())
    []
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        if not (name.startswith(".") and TEMP_MARKER in name):
            continue
        if entry.is_dir():  # a sharded checkpoint (FSDP) that was never committed: its writers are gone
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            continue
        if not entry.is_file():
            continue
        pid_part = name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0]
        if not all_processes and pid_part.isdigit() and _pid_alive(int(pid_part)):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    if removed:
        fsync_dir(folder)
    return removed
