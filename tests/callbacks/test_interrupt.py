"""Graceful Ctrl-C: a real SIGINT sent to a child process running a fit.

First Ctrl-C: training ends after the current batch, ``on_interrupt`` fires and fit returns the Fitted with
the finished epochs. Second Ctrl-C: KeyboardInterrupt, at once.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

SRC = str(Path(__file__).resolve().parents[2] / "src")

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from torch import nn
    import lanterna as ln

    torch.set_num_threads(1)
    double = sys.argv[1] == "double"

    class Signals(ln.Callback):
        # At batch 2 of epoch `at`: says READY and waits, inside the batch, for the parent's Ctrl-C.

        def __init__(self, at):
            self.at = at
            self.interrupt_fired, self.end_status = False, None

        def on_train_batch_begin(self, ctx):
            if ctx.epoch == self.at:
                print(f"BEGIN {ctx.epoch} {ctx.iter}", flush=True)

        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) != (self.at, 2):
                return
            print("READY", flush=True)
            deadline = time.monotonic() + 60
            while not ctx.interrupted and time.monotonic() < deadline:
                time.sleep(0.01)
            if double:
                print("FIRST_SEEN", flush=True)
                time.sleep(60)  # still in the batch: the second Ctrl-C must abort right here

        def on_epoch_end(self, ctx):
            print(f"EPOCH_END {ctx.epoch}", flush=True)

        def on_interrupt(self, ctx):
            self.interrupt_fired = True

        def on_fit_end(self, ctx):
            self.end_status = ctx.status
            print(f"FIT_END {ctx.status}", flush=True)

    x = torch.randn(64, 3)
    y = x.sum(1, keepdim=True)
    cb = Signals(at=2 if double else 3)
    try:
        fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
            (x, y), epochs=10_000, callbacks=[cb], verbose=False, dataloader_options={"batch_size": 8})
    except KeyboardInterrupt:
        print("ABORTED", flush=True)
        sys.exit(3)
    print("RESULT " + json.dumps({
        "status": fitted.status, "epochs": [r["epoch"] for r in fitted.history],
        "interrupt_fired": cb.interrupt_fired, "end_status": cb.end_status,
        "pred_shape": list(fitted.predict(x).shape), "training": fitted.model.training,
    }), flush=True)
    """
)


class Child:
    """A child Python process whose stdout lines are read in a thread (so every wait is bounded)."""

    def __init__(self, script: Path, mode: str) -> None:
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r}; output so far:\n" + "\n".join(self.seen))

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def test_first_ctrl_c_returns_the_fitted_with_finished_epochs(script):
    child = Child(script, "single")
    try:
        child.wait_for("READY")  # the child is inside batch 2 of epoch 3
        child.proc.send_signal(signal.SIGINT)
        result = json.loads(child.wait_for("RESULT ")[len("RESULT "):])
        assert child.close() == 0
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
    assert result["status"] == "interrupted" and result["end_status"] == "interrupted"
    assert result["interrupt_fired"] is True
    assert result["epochs"] == [1, 2]  # the finished epochs; the interrupted one is not in history
    assert "BEGIN 3 2" in child.seen and "BEGIN 3 3" not in child.seen  # it ended after the current batch
    assert "EPOCH_END 3" not in child.seen
    assert result["pred_shape"] == [64, 1] and result["training"] is False


def test_second_ctrl_c_aborts(script):
    child = Child(script, "double")
    try:
        child.wait_for("READY")
        child.proc.send_signal(signal.SIGINT)
        child.wait_for("FIRST_SEEN")
        t0 = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        child.wait_for("ABORTED", timeout=30)
        assert child.close() == 3
        assert time.monotonic() - t0 < 30  # it did not wait for the 60 s batch to finish
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
    assert "FIT_END failed" in child.seen  # on_fit_end still fired, with the failure status
