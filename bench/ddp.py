"""Data-parallel speed-up on this machine: the same global work in 1 process and in 2 torchrun ranks (gloo),
and the same fit under FSDP2 where lanterna offers it (issue 15).

    python bench/ddp.py                          # 1 process (1 and 2 threads), DDP 2 ranks, FSDP 2 ranks; 5 rounds
    python bench/ddp.py --quick                  # a small smoke run (1 process 1 thread, DDP 2 ranks)
    python bench/ddp.py --configs ddp,fsdp --reps 5 --out results.json

Workload (compute-bound, so that the gradient all-reduce is small beside the step): an MLP 512-1024-1024-1024-10
(2.6 M parameters, 10.5 MB of gradients) on 8,192 random samples of 10 classes, cross-entropy, SGD 0.01
momentum 0.9, global batch 1024 (2 ranks: 512 each, each rank 4,096 samples), 8 steps an epoch; 5 epochs,
the first a warm-up; a run's time is the fastest ``epoch_time`` of the others, as lanterna's history records it
(other work on a shared machine only ever adds time). The report gives the median over rounds and the best
round, and the ratios of both: the median of the per-round ratios, and best ÷ best.

Configurations (each a fresh process or torchrun launch, interleaved over rounds):

- ``1p1t``: 1 process, 1 thread: the same work on one core.
- ``1p2t``: 1 process, 2 threads: the one-process way to use both cores (intra-op parallelism).
- ``ddp``: ``torchrun --standalone --nproc_per_node=2``, 1 thread per rank (torchrun's default), gloo.
- ``fsdp``: the same launch with ``Accelerator(strategy="fsdp", fsdp_units=(Block,))``; reported as
  "not available" with the reason where this lanterna refuses it.

Every 2-rank run also times an all-reduce of a gradient-sized buffer (10 repetitions, median) after the fit, to
tell how much of a step is communication. Per rank: peak RSS (``ru_maxrss``) and the bytes of parameters and
optimizer state that rank holds (its local shards under FSDP).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

BENCH = os.path.dirname(os.path.abspath(__file__))
TAG = "DDP_RESULT "
CONFIGS = ("1p1t", "1p2t", "ddp", "fsdp")
FULL = {"n": 8192, "d_in": 512, "hidden": 1024, "depth": 3, "batch": 1024, "epochs": 5, "reps": 5,
        "configs": list(CONFIGS)}
QUICK = {"n": 1024, "d_in": 64, "hidden": 128, "depth": 2, "batch": 128, "epochs": 2, "reps": 1,
         "configs": ["1p1t", "ddp"]}


class Block(nn.Module):
    """Linear + ReLU: the FSDP unit (each block's parameters are sharded and gathered together)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class WideMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, depth: int, n_classes: int = 10) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * depth
        self.blocks = nn.Sequential(*(Block(a, b) for a, b in zip(dims[:-1], dims[1:])))
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def make_data(n: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the classes a fixed random linear map gives them (learnable), identical on every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    y = (x @ torch.randn(d_in, 10, generator=g)).argmax(1)
    return x, y


def _local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard
            total += local.numel() * local.element_size()
    return total


def fsdp_support() -> str | None:
    """None when ``ln.Accelerator`` takes ``fsdp_units`` (the lanterna of issue 15), else why not."""
    import lanterna as ln

    if "fsdp_units" not in inspect.signature(ln.Accelerator).parameters:
        return "ln.Accelerator has no fsdp_units parameter: this lanterna has no FSDP"
    return None


# --------------------------------------------------------------------------- the worker (one process or a rank)


def worker(cfg: dict[str, Any], strategy: str, threads: int) -> dict[str, Any] | None:
    import lanterna as ln

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out: dict[str, Any] = {"strategy": strategy, "world": world, "threads": torch.get_num_threads()}
    accelerator = None
    if strategy == "fsdp":
        try:
            accelerator = ln.Accelerator(strategy="fsdp", fsdp_units=(Block,))
        except Exception as e:  # noqa: BLE001  what this lanterna says about FSDP is the report
            return {**out, "available": False, "reason": f"{type(e).__name__}: {e}"}
    x, y = make_data(cfg["n"], cfg["d_in"])
    setup = ln.setup(lambda: WideMLP(cfg["d_in"], cfg["hidden"], cfg["depth"]), loss=nn.CrossEntropyLoss(),
                     optimizer=torch.optim.SGD).set_opt_hparams(lr=0.01, momentum=0.9)
    try:
        fitted = setup.fit((x, y), epochs=cfg["epochs"], seed=0, verbose=False, accelerator=accelerator,
                           dataloader_options={"batch_size": cfg["batch"] // world})
    except Exception as e:  # noqa: BLE001
        if strategy != "fsdp":
            raise
        return {**out, "available": True, "error": f"{type(e).__name__}: {e}"[:2000]}
    times = [h["epoch_time"] for h in fitted.history]
    mine = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_bytes": _local_bytes(fitted.model.parameters()),
        "optimizer_bytes": sum(_local_bytes(s.values()) for opt in fitted.optimizers.values()
                               for s in opt.state.values()),
    }
    out.update(available=True, epoch_seconds=times, seconds=min(times[1:]),  # load only ever adds time
               steps_per_epoch=fitted.context.step // len(times), train_loss=fitted.history[-1]["train_loss"])
    if world > 1:
        import torch.distributed as dist

        buf = torch.zeros(cfg["n_params"])  # the size of the gradients DDP all-reduces every step
        dist.barrier()
        laps = []
        for i in range(12):
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            if i >= 2:  # two warm-up rounds
                laps.append(time.perf_counter() - t0)
        out["allreduce_ms"] = statistics.median(laps) * 1e3
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine)
        out["ranks"] = ranks
    else:
        out["ranks"] = [mine]
    return out if rank == 0 else None


# --------------------------------------------------------------------------- the driver


def launch(config: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2" if config == "1p2t" else "1")
    me = [os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    if config in ("1p1t", "1p2t"):
        cmd = [sys.executable, *me, "none", "2" if config == "1p2t" else "1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *me, config, "1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=BENCH)
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return {"config": config, **json.loads(line[len(TAG):])}
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
    return {"config": config, "error": tail[-2000:] or f"exit code {proc.returncode}"}


def summarize(results: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for c in configs:
        ok = [r for r in results if r["config"] == c and r.get("available", True) and "seconds" in r]
        other = [r for r in results if r["config"] == c and r not in ok]
        if not ok:
            first = other[0] if other else {}
            rows[c] = {"error": first.get("reason") or first.get("error") or "no run",
                       "available": first.get("available", True)}
            continue
        row = {"seconds": statistics.median(r["seconds"] for r in ok), "best": min(r["seconds"] for r in ok),
               "runs": len(ok), "load1": statistics.median(r.get("load1", 0.0) for r in ok),
               "seconds_all": [r["seconds"] for r in ok], "steps_per_epoch": ok[0]["steps_per_epoch"],
               "train_loss": statistics.median(r["train_loss"] for r in ok), "ranks": ok[-1]["ranks"]}
        if "allreduce_ms" in ok[0]:
            row["allreduce_ms"] = statistics.median(r["allreduce_ms"] for r in ok)
            row["allreduce_best_ms"] = min(r["allreduce_ms"] for r in ok)
        rows[c] = row
    for base in ("1p1t", "1p2t"):
        for c in ("ddp", "fsdp"):
            if "seconds" in rows.get(base, {}) and "seconds" in rows.get(c, {}):
                # the median of the per-round ratios: a round's runs share that round's load
                per_round = [r["seconds"] / b["seconds"] for r in results if r["config"] == c and "seconds" in r
                             for b in results if b["config"] == base and "seconds" in b and b["rep"] == r["rep"]]
                rows[c][f"ratio_vs_{base}"] = statistics.median(per_round)
                rows[c][f"best_ratio_vs_{base}"] = rows[c]["best"] / rows[base]["best"]
    return rows


LABELS = {"1p1t": "1 process, 1 thread", "1p2t": "1 process, 2 threads", "ddp": "DDP, 2 ranks × 1 thread (gloo)",
          "fsdp": "FSDP2, 2 ranks × 1 thread (gloo)"}


def markdown(rows: dict[str, Any]) -> str:
    head = ("| configuration | s/epoch: median (best) | ÷ 1 process 1 thread: median (best) "
            "| ÷ 1 process 2 threads: median (best) | ms/step, best (per rank) "
            "| all-reduce of the gradients, ms, best | peak RSS MB per rank | params + optimizer MB per rank "
            "| train loss |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for c, r in rows.items():
        if "seconds" not in r:
            what = "not available" if r.get("available") is False else "failed"
            lines.append(f"| {LABELS[c]} | {what}: {r['error'][:300]} |")
            continue
        step_ms = r["best"] / r["steps_per_epoch"] * 1e3
        ar = r.get("allreduce_best_ms")
        ar_text = f"{ar:.1f} ({ar / step_ms:.0%} of a step)" if ar is not None else "–"
        rss = " / ".join(f"{k['peak_rss_mb']:.0f}" for k in r["ranks"])
        mem = " / ".join(f"{(k['param_bytes'] + k['optimizer_bytes']) / 2**20:.1f}" for k in r["ranks"])
        ratios = [f"{r[k]:.2f}× ({r['best_' + k]:.2f}×)" if k in r else "–" for k in ("ratio_vs_1p1t", "ratio_vs_1p2t")]
        lines.append(f"| {LABELS[c]} | {r['seconds']:.3f} ({r['best']:.3f}) | {ratios[0]} | {ratios[1]} "
                     f"| {step_ms:.1f} | {ar_text} | {rss} | {mem} | {r['train_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small smoke run: 1 process 1 thread and DDP, 1 round")
    p.add_argument("--configs", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--reps", type=int, help="rounds; default 5")
    p.add_argument("--out", help="write the raw results and the summary as JSON here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--worker", nargs=3, metavar=("CONFIG_JSON", "STRATEGY", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cfg_json, strategy, threads = args.worker
        res = worker(json.loads(cfg_json), strategy, int(threads))
        if res is not None:
            print(TAG + json.dumps(res), flush=True)
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    if args.configs:
        cfg["configs"] = [c for c in args.configs.split(",") if c]
        unknown = set(cfg["configs"]) - set(CONFIGS)
        if unknown:
            p.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.reps:
        cfg["reps"] = args.reps
    cfg["n_params"] = sum(p.numel() for p in WideMLP(cfg["d_in"], cfg["hidden"], cfg["depth"]).parameters())
    results: list[dict[str, Any]] = []
    configs = list(cfg["configs"])
    if "fsdp" in configs and (reason := fsdp_support()) is not None:
        results.append({"config": "fsdp", "available": False, "reason": reason, "rep": 0})
        configs.remove("fsdp")
    started = datetime.datetime.now()
    for rep in range(cfg["reps"]):
        k = rep % max(1, len(configs))
        for c in configs[k:] + configs[:k]:
            load0 = os.getloadavg()[0]
            res = launch(c, {k2: v for k2, v in cfg.items() if k2 not in ("reps", "configs")}, args.timeout)
            res.update(rep=rep, load1=(load0 + os.getloadavg()[0]) / 2)
            results.append(res)
            msg = (f"{res['seconds']:.3f} s/epoch" if "seconds" in res
                   else res.get("reason") or res.get("error", "?"))
            print(f"round {rep + 1}/{cfg['reps']} {c:<5} {msg[:300]}  (load {res['load1']:.2f})", file=sys.stderr,
                  flush=True)
            if res.get("available") is False:  # refused: no point in asking again
                configs.remove(c)
    rows = summarize(results, list(cfg["configs"]))
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"started": started.isoformat(timespec="seconds"), "config": cfg, "rows": rows,
                       "results": results}, f, indent=1)
    failed = [c for c, r in rows.items() if "seconds" not in r and r.get("available") is not False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
