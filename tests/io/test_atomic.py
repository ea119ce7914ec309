"""Atomic writes: all or nothing, no temp file left on failure, stale temp files swept."""

from __future__ import annotations

import errno
import os

import pytest

from lanterna.io import atomic
from lanterna.io.atomic import TEMP_MARKER, atomic_write, atomic_write_bytes, sweep_temp_files


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
