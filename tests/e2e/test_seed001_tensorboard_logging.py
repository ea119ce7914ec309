"""Seed 001, the PyTorch tutorial's training loop: per-epoch train and valid losses overlaid in TensorBoard
(read back with EventAccumulator) and a CSV log of the same numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    luz_net_setup,
    make_luz_data,
)

import lanterna as ln


def test_tensorboard_keras_layout_read_back(tmp_path):
    """Seed 001: train and valid losses overlaid in TensorBoard, read back with EventAccumulator."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    x, y = make_luz_data(128)
    xv, yv = make_luz_data(64, seed=1)
    log_dir = tmp_path / "runs" / "fashion_trainer"
    f = luz_net_setup().fit((x, y), epochs=3, valid_data=(xv, yv), verbose=False,
                        callbacks=[ln.callbacks.TensorBoard(log_dir=str(log_dir))])
    for run in ("train", "valid"):
        assert (log_dir / run).is_dir()
        acc = ea_mod.EventAccumulator(str(log_dir / run))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"loss", "mae"} <= tags, tags
        if run == "train":
            assert "lr" in tags
        for key in ("loss", "mae"):
            values = [ev.value for ev in acc.Scalars(key)]
            assert values == pytest.approx([h[f"{run}_{key}"] for h in f.history], rel=1e-5)
            assert len({ev.step for ev in acc.Scalars(key)}) == 3


def test_tensorboard_cli_like_path_object(tmp_path):
    """TensorBoard accepts a pathlib.Path log_dir (what a user of seed 001's SummaryWriter would pass)."""
    pytest.importorskip("tensorboard")
    x, y = make_luz_data(64)
    luz_net_setup().fit((x, y), epochs=1, verbose=False, callbacks=[ln.callbacks.TensorBoard(log_dir=Path(tmp_path))])
    assert any((tmp_path / "train").iterdir())


def test_csv_logger_one_row_per_epoch(tmp_path):
    pd = pytest.importorskip("pandas")
    x, y = make_luz_data(64)
    path = tmp_path / "log.csv"
    f = luz_net_setup().fit((x, y), epochs=3, valid_data=0.25, verbose=False, callbacks=[ln.callbacks.CSVLogger(path)])
    df = pd.read_csv(path)
    assert len(df) == 3
    assert set(df.columns) == set(f.history[0])
    assert list(df["epoch"]) == [1, 2, 3]
    assert list(df["valid_mae"]) == pytest.approx([h["valid_mae"] for h in f.history], rel=1e-5)
