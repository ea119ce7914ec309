"""DDP on CPU (gloo) with real torchrun processes (issue 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lanterna as ln

HERE = Path(__file__).parent
WORKER = HERE / "ddp_worker.py"
sys.path.insert(0, str(HERE))
from ddp_worker import N_TRAIN, N_VALID, Net, metric_cases, metric_data, toy_data  # noqa: E402

pytestmark = pytest.mark.slow


def torchrun(nproc: int, *args: str, timeout: float = 240, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "EPOCHS": "12"})


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_fit_exact_metrics_shards_and_single_output(world: int, tmp_path: Path) -> None:
    proc = torchrun(world, "fit", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # only rank 0 prints: one set of console lines
    assert proc.stdout.count("Epoch 1/12") == 1
    assert proc.stdout.count("Valid metrics:") == 12

    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(world)]
    history = results[0]["history"]
    def metrics_of(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in rec.items() if k.startswith(("train_", "valid_"))} for rec in h]

    assert all(metrics_of(r["history"]) == metrics_of(history) for r in results)  # global values on every rank
    assert history[-1]["train_loss"] < 1.15  # the noise floor (noise variance 1)

    # validation equals a single-process evaluation of the same weights: every sample counted once
    model = Net()
    model.load_state_dict(load_file(str(tmp_path / "weights.safetensors")))
    x, y = toy_data()
    xv, yv = x[N_TRAIN:], y[N_TRAIN:]
    single = ln.Fitted(model, None, [], loss_fn=torch.nn.MSELoss(), metrics=[ln.metrics.MAE()]).evaluate((xv, yv))
    with torch.no_grad():
        pred = model(xv)
    assert abs(history[-1]["valid_loss"] - single.metrics["loss"]) < 1e-6
    assert abs(history[-1]["valid_mae"] - single.metrics["mae"]) < 1e-6
    assert abs(history[-1]["valid_loss"] - torch.nn.functional.mse_loss(pred, yv).item()) < 1e-6
    for r in results:  # evaluate and predict after fit: sharded, gathered in dataset order
        assert abs(r["evaluate"]["loss"] - single.metrics["loss"]) < 1e-6
        assert r["pred_shape"] == [N_VALID, 1]
    preds = load_file(str(tmp_path / "preds_0.safetensors"))["preds"]
    torch.testing.assert_close(preds, pred, rtol=1e-6, atol=1e-6)

    shards = [json.loads((tmp_path / f"shards_{r}.json").read_text()) for r in range(world)]
    previous = None
    for epoch in range(1, 13):
        train_parts = [s[f"train_{epoch}"] for s in shards]
        seen = sorted(i for part in train_parts for i in part)
        assert seen == list(range(N_TRAIN)), "each training sample exactly once per epoch"
        assert previous is None or train_parts[0] != previous, "shards are reshuffled every epoch"
        previous = train_parts[0]
        valid_seen = sorted(i for s in shards for i in s[f"valid_{epoch}"])
        assert valid_seen == list(range(N_TRAIN, N_TRAIN + N_VALID)), "no padding duplicates in validation"


def test_ddp_matches_single_process_with_same_global_batch(tmp_path: Path) -> None:
    proc = torchrun(2, "parity", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = subprocess.run([sys.executable, str(WORKER), "parity", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_w = load_file(str(tmp_path / "weights_world2.safetensors"))
    one_w = load_file(str(tmp_path / "weights_world1.safetensors"))
    for k in one_w:
        torch.testing.assert_close(ddp_w[k], one_w[k], rtol=1e-5, atol=1e-6)


def test_killed_worker_restarted_by_torchrun_resumes_to_the_same_weights(tmp_path: Path) -> None:
    killed = torchrun(2, "resume", str(tmp_path), extra=("--max-restarts=1",))
    assert killed.returncode == 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert (tmp_path / "killed").exists(), "the worker was not killed: the test proves nothing"
    plain = torchrun(2, "uninterrupted", str(tmp_path))
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    resumed_w = load_file(str(tmp_path / "weights_resume.safetensors"))
    plain_w = load_file(str(tmp_path / "weights_uninterrupted.safetensors"))
    for k in plain_w:
        assert torch.equal(resumed_w[k], plain_w[k]), k
    assert json.loads((tmp_path / "history_resume.json").read_text()) == json.loads(
        (tmp_path / "history_uninterrupted.json").read_text())


def test_a_rank_that_raises_fails_the_job_without_hanging(tmp_path: Path) -> None:
    proc = torchrun(2, "raise", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert "boom from rank 1" in proc.stdout + proc.stderr


def test_standalone_metrics_compute_over_all_ranks_even_a_rank_without_samples(tmp_path: Path) -> None:
    """Sum, max and concatenated (AUROC) states reduced in compute(); rank 1 updated nothing."""
    proc = torchrun(3, "metrics", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"metrics_{r}.json").read_text()) for r in range(3)]
    assert [r["n"] for r in results] == [40, 0, 54]
    data = metric_data()
    rows = torch.cat([torch.arange(0, 40), torch.arange(80, 134)])  # what ranks 0 and 2 hold, in rank order
    for name, metric, p, t in metric_cases(*data):
        metric.update(p[rows], t[rows])
        expected = metric.compute().tolist()
        for r in results:
            assert r["values"][name] == pytest.approx(expected, rel=1e-6), (name, r)


def test_gradient_accumulation_skips_the_all_reduce_of_deferred_batches(tmp_path: Path) -> None:
    """One gradient all-reduce per optimizer step (DDP no_sync on the deferred batches); the uneven last group
    (rank 0 has a 17th batch) syncs; the weights are those of syncing every batch, to float rounding."""
    for force in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
             "accumulate", str(tmp_path)],
            capture_output=True, text=True, timeout=240,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "FORCE_SYNC": force})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deferred = json.loads((tmp_path / "allreduce_deferred_0.json").read_text())
    forced = json.loads((tmp_path / "allreduce_forced_0.json").read_text())
    assert forced == [17, 17]  # one bucket: an all-reduce per batch
    assert deferred == [9, 9]  # 8 steps on whole groups of 2, then the 17th batch's own step
    a = load_file(str(tmp_path / "weights_deferred.safetensors"))
    b = load_file(str(tmp_path / "weights_forced.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_valid_fraction_without_a_seed_holds_out_the_same_samples_on_every_rank(tmp_path: Path) -> None:
    """Issue 11: the split's seed comes from rank 0, so no rank trains on what another rank validates on."""
    proc = torchrun(2, "split", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"split_{r}.json").read_text()) for r in range(2)]
    n = N_TRAIN + N_VALID
    assert ranks[0]["valid"] == ranks[1]["valid"] and ranks[0]["train"] == ranks[1]["train"]
    valid = set(ranks[0]["valid"])
    assert len(valid) == round(0.2 * n) and valid.isdisjoint(ranks[0]["train"])
    assert valid | set(ranks[0]["train"]) == set(range(n))
    for epoch in (1, 2):
        trained = [i for r in ranks for i in r["seen"][f"train_{epoch}"]]
        validated = [i for r in ranks for i in r["seen"][f"valid_{epoch}"]]
        assert sorted(trained) == sorted(ranks[0]["train"]) and sorted(validated) == sorted(valid)
