"""Streams and memory-mapped arrays under torchrun (2 ranks, gloo; API.md §8): one launch, several checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lanterna as ln

HERE = Path(__file__).parent
WORKER = HERE / "stream_worker.py"
sys.path.insert(0, str(HERE))
from stream_worker import N_TRAIN, N_VALID, WORKERS, Model, stream_data  # noqa: E402

pytestmark = pytest.mark.slow

SHARDS = 2 * WORKERS


def test_streams_across_ranks_and_workers_and_memmaps_under_torchrun(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((157, 4))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", x @ rng.standard_normal((4, 1)) + 0.1 * rng.standard_normal((157, 1)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]

    # every sample once per epoch across ranks x workers; rank r reads shards 2r and 2r+1 (sample i: shard i mod 4)
    for epoch in (1, 2):
        for name, n in (("train", N_TRAIN), ("valid", N_VALID)):
            parts = [r["seen"][f"{name}_{epoch}"] for r in results]
            assert sorted(i for part in parts for i in part) == list(range(n)), (name, epoch)
            for rank, part in enumerate(parts):
                assert {i % SHARDS for i in part} == {2 * rank, 2 * rank + 1}
        train_epochs = {e for r in results for e in r["seen"][f"train_epochs_{epoch}"]}
        assert train_epochs == {epoch}, "the dataset's set_epoch reaches every worker of every rank"
        # uneven shards: 101 + 100 samples on rank 0 (6 + 5 batches of 10), 50 + 50 on rank 1 (5 + 5): rank 1 runs
        # one empty batch to keep in step
        assert [len(r["seen"][f"train_{epoch}"]) for r in results] == [101, 100]
        assert [r["seen"][f"train_batches_{epoch}"][0] for r in results] == [11, 11]
    def metrics_of(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "epoch_time"} for h in history]

    assert metrics_of(results[0]["history"]) == metrics_of(results[1]["history"])  # global values on every rank

    # the validation metrics and evaluate equal a single-process evaluation of the weights: each sample once
    model = Model()
    model.load_state_dict(load_file(str(tmp_path / "weights.safetensors")))
    xv, yv = stream_data(N_VALID, 2)
    single = ln.Fitted(model, None, [], loss_fn=torch.nn.MSELoss(), metrics=[ln.metrics.MAE()]).evaluate((xv, yv))
    with torch.no_grad():
        pred = model(xv)
    assert results[0]["history"][-1]["valid_loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert results[0]["history"][-1]["valid_mae"] == pytest.approx(single["mae"], rel=1e-6)
    assert single["loss"] == pytest.approx(torch.nn.functional.mse_loss(pred, yv).item(), rel=1e-6)
    for rank in range(2):
        assert results[rank]["evaluate"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
        # predict over the stream: every sample once, in stream order, on every rank
        torch.testing.assert_close(load_file(str(tmp_path / f"preds_{rank}.safetensors"))["preds"], pred,
                                   rtol=1e-6, atol=1e-6)

    # memory-mapped arrays sharded like tensors: bit-identical weights, history and predictions
    for r in results:
        assert r["memmap_same_weights"] and r["memmap_same_history"] and r["memmap_same_predictions"], r
    weights = load_file(str(tmp_path / "map_weights.safetensors"))
    map_pred = load_file(str(tmp_path / "preds_0.safetensors"))["map_preds"]
    expected = torch.from_numpy(x).float() @ weights["weight"].T + weights["bias"]
    torch.testing.assert_close(map_pred, expected, rtol=1e-6, atol=1e-6)  # all 157 rows, in order
