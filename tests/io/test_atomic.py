"""Atomic writes: all or nothing, no temp file left on failure, stale temp files swept."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lanterna.io import atomic
from lanterna.io.atomic import TEMP_MARKER, atomic_write, atomic_write_bytes, explain_write_error, sweep_temp_files

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"first")
    atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_a_failing_write_keeps_the_old_file_byte_identical_and_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"good content")

    def half_then_full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(p, half_then_full_disk)
    assert info.value.errno == errno.ENOSPC
    assert p.read_bytes() == b"good content"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_a_failing_fsync_raises_instead_of_falling_back(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def broken_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_sweep_removes_temp_files_of_dead_processes_only(tmp_path):
    dead = tmp_path / f".ckpt.pt{TEMP_MARKER}999999999-abcd"  # no such pid
    alive = tmp_path / f".ckpt.pt{TEMP_MARKER}{os.getpid()}-abcd"
    other = tmp_path / "ckpt.pt"
    for f in (dead, alive, other):
        f.write_bytes(b"x")
    assert sweep_temp_files(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])
    assert sweep_temp_files(tmp_path, all_processes=True) == [alive]


# ---------------------------------------------------------------------------- real full disks and size limits

_CHILD = """
import errno, json, os, resource, signal, sys
sys.path.insert(0, {src!r})
from lanterna.io.atomic import atomic_write_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing us
atomic_write_bytes({path!r}, b"previous content")
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    atomic_write_bytes({path!r}, b"y" * {size})
    print(json.dumps({{"errno": None}}))
except OSError as e:
    print(json.dumps({{"errno": e.errno}}))
"""


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="POSIX resource limits")
@pytest.mark.parametrize("size", [3000, 100_000])  # buffered (fails at flush, then at close) and direct writes
def test_a_write_past_the_file_size_limit_leaves_no_temp_file(tmp_path, size):
    target = tmp_path / "f.bin"
    code = _CHILD.format(src=SRC, path=str(target), limit=1000, size=size)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"errno": errno.EFBIG}
    assert target.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["f.bin"]  # before the fix: the temp file stayed when close() failed too


def test_cleanup_does_not_depend_on_close_succeeding(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    real_open = open

    class FailingClose:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_then_fail(f):
        f.write(b"new")
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr("builtins.open", lambda *a, **k: FailingClose(real_open(*a, **k)))
    for write in (lambda f: f.write(b"new"), write_then_fail):  # close fails after a good write, or after an error
        with pytest.raises(OSError):
            atomic_write(p, write)
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize(("err", "words"), [
    (errno.ENOSPC, "disk is full"), (errno.EFBIG, "file size limit"), (errno.EROFS, "read-only"),
    (errno.EACCES, "permission"), (errno.ENOTDIR, "not a folder"),
])
def test_write_errors_are_explained_in_plain_words(err, words):
    text = explain_write_error(OSError(err, os.strerror(err)))
    assert words in text and os.strerror(err) in text


def test_a_tiny_tmpfs_fills_up_without_a_temp_file_left(tiny_tmpfs):
    atomic_write_bytes(tiny_tmpfs / "fill", b"x" * (4096 * 15))  # 15 of its 16 pages
    atomic_write_bytes(tiny_tmpfs / "f.json", b"previous")
    with pytest.raises(OSError) as info:
        atomic_write_bytes(tiny_tmpfs / "f.json", b"y" * 3000)  # buffered: flush and close both fail
    assert info.value.errno == errno.ENOSPC
    assert (tiny_tmpfs / "f.json").read_bytes() == b"previous"
    assert sorted(os.listdir(tiny_tmpfs)) == ["f.json", "fill"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (a real full disk); skipped unless this process may mount (root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not allowed here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)
