"""A tuning worker started as a subprocess by test_optuna.py: it joins a shared SQLite study with ln.tune.

Usage: python optuna_worker.py DB STUDY N_TRIALS [hang MARKER]
With ``hang``, the first trial writes MARKER after its first epoch and then sleeps (to be killed).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lanterna as ln

torch.set_num_threads(1)


class Clf(nn.Module):
    def __init__(self, n_hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, n_hidden), nn.ReLU(), nn.Linear(n_hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Hang(ln.Callback):
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_epoch_end(self, ctx: ln.Context) -> None:
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(120)


def main() -> None:
    db, study_name, n_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hang = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "hang" else None
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = torch.randn(3, 4, generator=g)[y] * 3 + torch.randn(240, 4, generator=g)

    def objective(trial):
        trial.set_user_attr("pid", os.getpid())
        setup = (ln.setup(Clf, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()])
                 .set_hparams(n_hidden=trial.suggest_int("n_hidden", 4, 32))
                 .set_opt_hparams(lr=trial.suggest_float("lr", 1e-5, 1e-1, log=True)))
        callbacks = [Hang(hang)] if hang is not None and trial.number == 0 else []
        return {"setup": setup, "callbacks": callbacks}

    ln.tune(objective, (x[:180], y[:180]), valid_data=(x[180:], y[180:]), epochs=2, monitor="valid_acc",
            n_trials=n_trials, storage=db, study_name=study_name, heartbeat_interval=1, grace_period=2,
            load_if_exists=True)  # the workers join one study


if __name__ == "__main__":
    main()
