"""The callbacks of this package under a real AutoResume: a fit that crashes after the loggers wrote an epoch
that was never checkpointed, run again with the same call, ends like the uninterrupted run — schedule,
early-stopping state, best weights, CSV rows and TensorBoard points included."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import lanterna as ln

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


class CrashAt(ln.Callback):
    """Raises after the loggers (600) wrote the epoch, before AutoResume (1200) saved it."""

    order = 1150

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[0.2], [-1.3], [-0.5]]) + 0.5 * torch.randn(n, 1, generator=g)


def _fit(folder, crash_at=None):
    callbacks = [
        ln.callbacks.LRScheduler(S.ExponentialLR, gamma=0.8),
        ln.callbacks.EarlyStopping(patience=2, min_delta=0.01),
        ln.callbacks.KeepBestModel(),
        ln.callbacks.CSVLogger(folder / "history.csv"),
        ln.callbacks.TensorBoard(folder / "tb"),
        ln.callbacks.AutoResume(folder / "resume"),
    ] + ([CrashAt(crash_at)] if crash_at else [])
    return ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.05).fit(
        _data(96, 0), epochs=30, valid_data=_data(32, 1), seed=0, verbose=False, callbacks=callbacks,
        dataloader_options={"batch_size": 16})


def test_resumed_fit_matches_the_uninterrupted_one(tmp_path):
    ref = _fit(tmp_path / "ref")
    assert ref.status == "stopped_early" and len(ref.history) >= 6
    with pytest.raises(ln.CallbackError, match="simulated crash"):
        _fit(tmp_path / "run", crash_at=4)
    resumed = _fit(tmp_path / "run")
    assert resumed.status == "stopped_early"
    keys = ("epoch", "lr", "train_loss", "valid_loss")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in ref.history]
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same best epoch's weights were restored
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in ref.history]  # epoch 4 once, not twice
    assert [float(r["valid_loss"]) for r in rows] == [r["valid_loss"] for r in ref.history]
    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "valid"))
    acc.Reload()
    points = acc.Scalars("loss")  # the purge step hides the crashed run's epoch-4 point
    assert [p.step for p in points] == [r["epoch"] for r in ref.history]
    assert [p.value for p in points] == pytest.approx([r["valid_loss"] for r in ref.history], rel=1e-6)
