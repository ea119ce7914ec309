"""The scale benchmarks of issue 15 cannot rot: bench/scaling.py, bench/ddp.py and bench/gpu.py run in their
small modes and produce well-formed results whose numbers are checked against what they must be (data sizes,
parameter bytes, equal losses where both loops train on the same batches) — never against timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCH)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_scaling_quick_gives_per_step_times_and_rss_about_data_plus_a_constant(tmp_path: Path) -> None:
    import scaling

    out = tmp_path / "scaling.json"
    proc = _run("scaling.py", "--quick", "--out", str(out))
    assert proc.stdout.startswith("| N rows | data MB |")
    report = json.loads(out.read_text())
    rows = {r["n"]: r for r in report["rows"]}
    assert sorted(rows) == [10**4, 10**5]
    for n, r in rows.items():
        assert r["data_mb"] == n * (scaling.D_IN + 1) * 4 / 2**20  # x (N × 16) and y (N × 1), float32
        for c in ("ideal", "lanterna"):
            assert r[c]["us_per_step"] > 0 and r[c]["peak_rss_mb"] >= r[c]["rss_before_fit_mb"] > r["data_mb"]
        # the same permutation, the same first batches, the same model: the same training loss
        assert r["lanterna"]["train_loss"] == pytest.approx(r["ideal"]["train_loss"], rel=1e-6)
        assert r["overhead_us_per_step"] == pytest.approx(  # one round: the median of one difference
            r["lanterna"]["us_per_step"] - r["ideal"]["us_per_step"])
        assert r["x_ideal"] == pytest.approx(r["lanterna"]["us_per_step"] / r["ideal"]["us_per_step"])
    small, large = rows[10**4]["lanterna"], rows[10**5]["lanterna"]
    data_growth = rows[10**5]["data_mb"] - rows[10**4]["data_mb"]
    perm_growth = (10**5 - 10**4) * 8 / 2**20  # the epoch's int64 permutation of N rows
    # RSS grows with the data (and the permutation), not with copies of it: 40 MB of slack for allocator noise
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < data_growth + perm_growth + 40


def test_ddp_quick_one_process_and_two_ranks(tmp_path: Path) -> None:
    import ddp

    out = tmp_path / "ddp.json"
    proc = _run("ddp.py", "--quick", "--out", str(out))
    assert "| 1 process, 1 thread |" in proc.stdout and "| DDP, 2 ranks × 1 thread (gloo) |" in proc.stdout
    report = json.loads(out.read_text())
    cfg, rows = report["config"], report["rows"]
    assert set(rows) == {"1p1t", "ddp"}
    model = ddp.WideMLP(cfg["d_in"], cfg["hidden"], cfg["depth"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cfg["n_params"] * 4 == param_bytes
    one, two = rows["1p1t"], rows["ddp"]
    # the same global work: as many optimizer steps per epoch in both (the ranks split each global batch)
    assert one["steps_per_epoch"] == two["steps_per_epoch"] == cfg["n"] // cfg["batch"]
    assert len(one["ranks"]) == 1 and len(two["ranks"]) == 2
    for rank in one["ranks"] + two["ranks"]:  # DDP replicates: every rank holds all weights + momentum buffers
        assert rank["param_bytes"] == param_bytes and rank["optimizer_bytes"] == param_bytes
        assert rank["peak_rss_mb"] > 0
    assert one["seconds"] > 0 and two["seconds"] > 0 and two["allreduce_ms"] > 0
    assert two["ratio_vs_1p1t"] == pytest.approx(two["seconds"] / one["seconds"])  # one round
    for r in (one, two):
        assert 0 < r["train_loss"] < 2.5  # 10 classes: log(10) = 2.30 at chance, and it trains


def test_ddp_report_says_cleanly_when_fsdp_is_not_available() -> None:
    import ddp

    rows = ddp.summarize([{"config": "fsdp", "available": False, "reason": "no FSDP here", "rep": 0}], ["fsdp"])
    assert rows == {"fsdp": {"error": "no FSDP here", "available": False}}
    assert "| FSDP2, 2 ranks × 1 thread (gloo) | not available: no FSDP here |" in ddp.markdown(rows)


def test_gpu_script_help_and_no_cuda_exit() -> None:
    assert "--cpu-smoke" in _run("gpu.py", "--help").stdout
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the no-CUDA path does not apply")
    proc = _run("gpu.py")
    assert proc.stdout.startswith("no CUDA device")


def test_gpu_script_cpu_smoke_runs_every_variant(tmp_path: Path) -> None:
    import gpu

    out = tmp_path / "gpu.json"
    proc = _run("gpu.py", "--cpu-smoke", "--out", str(out))
    assert "| W1 | lanterna |" in proc.stdout and "| W2 | lanterna-graphs |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"] == "cpu"
    assert report["sync_debug"]["ok"], report["sync_debug"]
    assert set(report["table"]) == {"W1", "W2"}
    for name, rows in report["table"].items():
        assert set(rows) == set(gpu.VARIANTS)
        for v, r in rows.items():
            assert "seconds" in r, (name, v, r)
            assert r["steps_per_s"] > 0 and r["x_ideal"] > 0
        ideal = rows["ideal"]
        # fp32 on the same batches from the same initial weights: lanterna's numbers are the ideal loop's
        for v in ("lanterna", "lanterna-resident", "lanterna-graphs"):
            for k in ("train_loss", "valid_loss", "valid_metric"):
                assert rows[v][k] == pytest.approx(ideal[k], rel=1e-5, abs=1e-6), (name, v, k)
        assert rows["lanterna-bf16"]["train_loss"] == pytest.approx(ideal["train_loss"], rel=0.05)
