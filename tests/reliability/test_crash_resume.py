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


def _kill_when(proc, ready, delay, timeout=120, sig=signal.SIGKILL):
    """Send ``sig`` to ``proc`` ``delay`` seconds after ``ready()`` turns true; False if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return True


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    works = {data: tmp_path_factory.mktemp(f"ref-{data}") for data in ("memory", "loader")}
    procs = {data: _start(data, "ref", work) for data, work in works.items()}  # both at once: mostly asleep
    out = {}
    for data, proc in procs.items():
        rc, _, err = _wait(proc)
        assert rc == 0, err[-3000:]
        out[data] = torch.load(works[data] / "result.pt", weights_only=True)
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


def _random_kills(data, work, rng, n):
    kills = 0
    for _ in range(n):
        ends_before = _ends(work)
        target = len(ends_before) + 1  # an epoch into this run, then a random moment within about an epoch
        proc = _start(data, "resume", work)
        if _kill_when(proc, lambda t=target: len(_ends(work)) >= t, delay=rng.uniform(0.0, 0.15)):
            kills += 1
        _check_continuity(work, ends_before)
    assert kills >= n - 1


def _finish(data, work, reference):
    ends_before = _ends(work)
    result = _run_to_end(data, "resume", work)
    _check_continuity(work, ends_before)
    assert _starts(work)[-1] > 0  # the last run resumed, it did not start over
    _assert_identical(result, reference)
    assert not (work / "state").exists()  # removed after the completed fit, temp files included


def test_in_memory_data_killed_in_and_out_of_the_save_window_and_preempted(references, tmp_path):
    _random_kills("memory", tmp_path, random.Random("lanterna-memory"), 2)
    # SIGTERM: the current step is finished, a checkpoint written, exit status 143
    ends_before = _ends(tmp_path)
    proc = _start("memory", "resume", tmp_path)
    assert _kill_when(proc, lambda: len(_ends(tmp_path)) > len(ends_before), delay=0.05, sig=signal.SIGTERM)
    assert proc.returncode == 143
    assert "SIGTERM received: saved a checkpoint" in proc.stderr.read()
    _check_continuity(tmp_path, ends_before)
    # inside the save window: the temp file written but not renamed; then renamed, old ones not yet rotated
    for window in ("replace:2", "rotate:2"):
        ends_before = _ends(tmp_path)
        proc = _start("memory", "resume", tmp_path, KILL_WINDOW=window)
        assert _kill_when(proc, lambda: (tmp_path / "in_window").exists(), delay=0.05)
        (tmp_path / "in_window").unlink()
        _check_continuity(tmp_path, ends_before)
        if window.startswith("replace"):
            assert any(".lanterna-tmp-" in p.name for p in (tmp_path / "state").iterdir())
    _finish("memory", tmp_path, references["memory"])


def test_shuffled_dataloader_with_workers_killed_at_random_moments(references, tmp_path):
    _random_kills("loader", tmp_path, random.Random("lanterna-loader"), 2)
    _finish("loader", tmp_path, references["loader"])
