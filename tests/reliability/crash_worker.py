"""A training process for the crash tests: ``python crash_worker.py DATA MODE WORKDIR``.

DATA: ``memory`` (tensors, valid_data=0.2 with seed=) or ``loader`` (a shuffled DataLoader with 2 workers
over a map-style dataset whose samples draw random noise). MODE: ``ref`` (no AutoResume) or ``resume``.
It appends ``START <start_epoch>`` and ``END <epoch>`` (after AutoResume saved the epoch) to
WORKDIR/progress.txt and, when fit completes, writes the weights and history to WORKDIR/result.pt.
``KILL_WINDOW=replace:N`` / ``rotate:N`` parks the N-th checkpoint save just before its rename / just
before old files are rotated away, after writing WORKDIR/in_window, so the parent can SIGKILL it there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import lanterna as ln

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import Canary, NoisyDataset  # noqa: E402

torch.set_num_threads(1)
DATA, MODE, WORK = sys.argv[1], sys.argv[2], Path(sys.argv[3])
EPOCHS = 10
DELAY = 0.015  # seconds per forward: epochs (~0.2 s) long enough to be killed inside, no CPU burnt


class SlowCanary(Canary):
    """conftest's Canary, slowed so that an epoch lasts long enough to be killed inside it."""

    def forward(self, x):
        time.sleep(DELAY)
        return super().forward(x)


class Progress(ln.Callback):
    runs_last, order = True, 5000  # after AutoResume: END e is written once epoch e's checkpoint is durable

    def _write(self, line):
        with open(WORK / "progress.txt", "a") as f:
            f.write(line + "\n")

    def on_fit_begin(self, ctx):
        self._write(f"START {ctx.start_epoch}")

    def on_epoch_end(self, ctx):
        self._write(f"END {ctx.epoch}")


def _park_in_window():
    spec = os.environ.get("KILL_WINDOW")
    if not spec:
        return
    where, n = spec.split(":")
    calls = {"n": 0}

    def park():
        calls["n"] += 1
        if calls["n"] == int(n):
            (WORK / "in_window").write_text(where)
            time.sleep(60)

    if where == "replace":
        from lanterna.io import atomic

        real_replace = atomic.os.replace

        class OsProxy:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(a, b):
                park()
                return real_replace(a, b)

        atomic.os = OsProxy()
    else:
        from lanterna.callbacks.auto_resume import AutoResume

        real_rotate = AutoResume._rotate

        def rotate(self):
            park()
            return real_rotate(self)

        AutoResume._rotate = rotate


def main():
    _park_in_window()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 3, generator=g)
    y = x @ torch.tensor([[0.2], [-1.3], [-0.5]]) + torch.randn(320, 1, generator=g)
    if DATA == "memory":
        data = {"data": (x, y), "valid_data": 0.2, "dataloader_options": {"batch_size": 32}}
    else:
        data = {"data": DataLoader(NoisyDataset(x[:256], y[:256]), batch_size=32, shuffle=True, num_workers=2),
                "valid_data": DataLoader(NoisyDataset(x[256:], y[256:]), batch_size=32)}
    callbacks = [Progress(), ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.7)]
    if MODE == "resume":
        callbacks.append(ln.callbacks.AutoResume(WORK / "state"))
    fitted = ln.setup(SlowCanary, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_opt_hparams(lr=0.01).fit(
        epochs=EPOCHS, seed=7, verbose=False, callbacks=callbacks, **data)
    history = [{k: v for k, v in r.items() if k != "epoch_time"} for r in fitted.history]
    torch.save({"state": fitted.model.state_dict(), "history": history}, WORK / "result.pt")


if __name__ == "__main__":
    main()
