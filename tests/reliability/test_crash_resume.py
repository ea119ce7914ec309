"""Crash tests: a training process killed with SIGKILL at random moments (and inside the checkpoint save
window), restarted each time with the same command, ends bit-identical to an uninterrupted run; SIGTERM
saves and exits with status 143. Real subprocesses, real signals."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

WORKER = str(Path(__file__).with_name("crash_worker.py"))
SRC = str(Path(__file__).resolve().parents[2] / "src")
EPOCHS = 12


def _start(data, mode, work, **env):
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.Popen([sys.executable, WORKER, data, mode, str(work)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _progress(work):
    p = work / "progress.txt"
    return p.read_text().split() if p.exists() else []


def _ends(work):
    words = _progress(work)
    return [int(words[i + 1]) for i, w in enumerate(words) if w == "END"]


def _starts(work):
    words = _progress(work)
    return [int(words[i + 1]) for i, w in enumerate(words) if w == "START"]


def _wait(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run_to_end(data, mode, work):
    rc, out, err = _wait(_start(data, mode, work))
    assert rc == 0, err[-3000:]
    return torch.load(work / "result.pt", weights_only=True)


def _kill_when(proc, ready, delay, timeout=120):
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` turns true (or when it has ended by itself)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for data in ("memory", "loader"):
        work = tmp_path_factory.mktemp(f"ref-{data}")
        out[data] = _run_to_end(data, "ref", work)
    return out


def _assert_identical(result, ref):
    assert result["history"] == ref["history"]
    assert result["state"].keys() == ref["state"].keys()
    for k in ref["state"]:
        assert torch.equal(result["state"][k], ref["state"][k]), k
    # the canary: as many forward calls, over the same batches in the same order, as the uninterrupted run
    assert int(result["state"]["calls"]) == int(ref["state"]["calls"])


def _check_continuity(work, before_ends):
    """A restart continues from the last epoch whose END was written (its checkpoint was durable then)."""
    starts = _starts(work)
    last_end = max(before_ends, default=0)
    assert last_end <= starts[-1] <= last_end + 1, (starts, before_ends)


@pytest.mark.parametrize("data", ["memory", "loader"])
def test_sigkill_at_random_moments_then_restart_is_bit_identical(data, references, tmp_path):
    rng = random.Random(f"lanterna-{data}")
    kills = 0
    for _ in range(3):
        ends_before = _ends(tmp_path)
        target = len(ends_before) + 1
        proc = _start(data, "resume", tmp_path)
        if _kill_when(proc, lambda t=target: len(_ends(tmp_path)) >= t, delay=rng.uniform(0.0, 0.25)):
            kills += 1
        _check_continuity(tmp_path, ends_before)
    assert kills >= 2
    if data == "memory":  # inside the save window: the temp file written, not renamed; then after the rename
        for window in ("replace:3", "rotate:2"):
            ends_before = _ends(tmp_path)
            proc = _start(data, "resume", tmp_path, KILL_WINDOW=window)
            assert _kill_when(proc, lambda: (tmp_path / "in_window").exists(), delay=0.05)
            (tmp_path / "in_window").unlink()
            _check_continuity(tmp_path, ends_before)
            if window.startswith("replace"):
                assert any(".lanterna-tmp-" in p.name for p in (tmp_path / "state").iterdir())
    ends_before = _ends(tmp_path)
    result = _run_to_end(data, "resume", tmp_path)
    _check_continuity(tmp_path, ends_before)
    assert _starts(tmp_path)[-1] > 0  # the last run resumed, it did not start over
    _assert_identical(result, references[data])
    assert not (tmp_path / "state").exists()  # removed after the completed fit, temp files included


def test_sigterm_saves_exits_143_and_the_requeued_run_finishes_identically(references, tmp_path):
    proc = _start("memory", "resume", tmp_path)
    deadline = time.monotonic() + 120
    while len(_ends(tmp_path)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = _wait(proc)
    assert rc == 143, err[-3000:]
    assert "SIGTERM received: saved a checkpoint" in err
    saved = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert saved and all(n.startswith("resume-epoch-") for n in saved)
    result = _run_to_end("memory", "resume", tmp_path)
    assert _starts(tmp_path)[-1] >= 2
    _assert_identical(result, references["memory"])
