"""Scaling with the data size: per-step time and peak RSS of a lanterna fit as N grows (10⁴ … 10⁷ rows),
against the ideal hand loop of bench/contenders/ideal_loop.py on the same data (issue 15).

    python bench/scaling.py                      # 10^4 .. 10^7 rows, 5 rounds (~10 min), prints the table
    python bench/scaling.py --quick              # a smoke run of a few seconds (10^4, 10^5 rows, 1 round)
    python bench/scaling.py --sizes 1e4,1e6 --reps 5 --out results.json
    python bench/scaling.py --from-json results.json       # the table again, from saved results

Workload: x ~ N(0, 1) of N × 16 float32, y = a fixed linear map of x + noise (N × 1), MLP 16-64-64-1, MSE,
SGD 0.01, batch 256, shuffled, one thread. Every (size, contender) run is a fresh process: its peak RSS
(``ru_maxrss``) is its own.

A fixed number of steps per epoch (``LimitBatches(train=S)`` for lanterna, the first S batches of the same
permutation for the ideal loop) keeps 10⁷ rows affordable. Each epoch still draws the permutation of all N rows
(``randperm(10⁷)`` takes ~0.5 s on this machine), an O(N) cost per epoch that a fixed number of steps would
otherwise smear into the per-step figure. So each process runs S_small- and S_large-step epochs (S_large = 4,500,
or the whole epoch where it is shorter; S_small = a third of it) and reports the marginal cost of a step,
``(t(S_large) − t(S_small)) / (S_large − S_small)``, apart from the per-epoch fixed cost (the intercept: the
shuffle and the epoch's bookkeeping). Times are CPU times of the process (``time.process_time``, read at each
epoch's begin and end), which other work on a shared machine disturbs far less than wall-clock time; the
wall-clock overhead is reported beside it. Each is the fastest of the epochs after the first (at least 2, and at
least 6,000 timed steps: load on the machine only ever adds time), then the median over rounds (for the overhead,
of the per-round differences: the two loops of a round run one after the other).
The final training losses of the two loops are reported side by side: both train on the same batches.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
TAG = "SCALING_RESULT "
D_IN, BATCH, LR = 16, 256, 0.01
CONTENDERS = ("ideal", "lanterna")
FULL = {"sizes": [10**4, 10**5, 10**6, 10**7], "steps": 4500, "timed_steps": 6000, "reps": 5}
QUICK = {"sizes": [10**4, 10**5], "steps": 30, "timed_steps": 60, "reps": 1}


# --------------------------------------------------------------------------- the child process


def make_data(n: int) -> tuple[Any, Any]:
    """N × 16 inputs and N × 1 targets, made chunk by chunk in place (no N-sized temporaries)."""
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(D_IN, 1, generator=g) / D_IN**0.5
    x, y = torch.empty(n, D_IN), torch.empty(n, 1)
    for s in range(0, n, 1 << 16):
        xc, yc = x[s : s + (1 << 16)], y[s : s + (1 << 16)]
        xc.normal_(generator=g)
        torch.matmul(xc, w, out=yc)
        yc.add_(torch.randn(len(yc), 1, generator=g), alpha=0.1)
    return x, y


def make_model() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def ideal_epochs(x: Any, y: Any, steps: int, epochs: int) -> tuple[list[float], list[float], float]:
    """The ideal loop (its batching and permutation, bench/contenders/ideal_loop.py), stopped after ``steps``
    batches per epoch. Returns each epoch's wall and CPU seconds and the last epoch's training loss."""
    import torch
    from contenders.ideal_loop import _tensor_batches
    from workloads import MODEL_SEED

    torch.manual_seed(MODEL_SEED)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = torch.nn.MSELoss()
    times, cpu, loss = [], [], float("nan")
    for _ in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        n = 0
        for xb, yb in itertools.islice(_tensor_batches(x, y, BATCH, True), steps):
            out = loss_fn(model(xb), yb)
            out.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum.add_(out.detach(), alpha=len(xb))
            n += len(xb)
        loss = loss_sum.item() / n
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu, loss


def lanterna_epochs(x: Any, y: Any, steps: int, epochs: int) -> tuple[list[float], list[float], float]:
    """A default lanterna fit on the in-memory tensors, ``LimitBatches(train=steps)``; the wall time per epoch
    is the history's ``epoch_time``, the CPU time is read by a callback at each epoch's begin and end (no
    per-batch hook)."""
    import torch
    from workloads import MODEL_SEED

    import lanterna as ln

    class EpochCPUTime(ln.Callback):
        order = -10_000

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_epoch_begin(self, ctx: ln.Context) -> None:
            self.c0 = time.process_time()

        def on_epoch_end(self, ctx: ln.Context) -> None:
            self.seconds.append(time.process_time() - self.c0)

    cpu = EpochCPUTime()
    fitted = (
        ln.setup(make_model, loss=torch.nn.MSELoss(), optimizer=torch.optim.SGD)
        .set_opt_hparams(lr=LR)
        .fit((x, y), epochs=epochs, seed=MODEL_SEED, verbose=False, dataloader_options={"batch_size": BATCH},
             callbacks=[ln.callbacks.LimitBatches(train=steps), cpu])
    )
    return [h["epoch_time"] for h in fitted.history], cpu.seconds, fitted.history[-1]["train_loss"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(contender: str, n: int, steps: int, timed_steps: int) -> dict[str, Any]:
    import torch
    import torch._dynamo  # noqa: F401  torch.optim imports it at its first step: an import, not the fit's

    torch.set_num_threads(1)
    if contender == "lanterna":
        import lanterna  # noqa: F401
    x, y = make_data(n)
    rss_before = _rss_mb()
    batches = -(-n // BATCH)
    big = min(steps, batches)
    small = max(1, big // 3)
    run = ideal_epochs if contender == "ideal" else lanterna_epochs
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    losses: dict[int, float] = {}
    for s in (small, big):
        epochs = 1 + max(2, -(-timed_steps // s))  # the first epoch is a warm-up, not timed
        times, cpu_times, losses[s] = run(x, y, s, epochs)
        wall[s], cpu[s] = min(times[1:]), min(cpu_times[1:])  # load on the machine only ever adds time
    per_step = (cpu[big] - cpu[small]) / (big - small)
    wall_per_step = (wall[big] - wall[small]) / (big - small)
    return {
        "contender": contender, "n": n, "steps": [small, big], "epoch_cpu_seconds": [cpu[small], cpu[big]],
        "epoch_wall_seconds": [wall[small], wall[big]], "us_per_step": per_step * 1e6,
        "epoch_fixed_ms": (cpu[small] - small * per_step) * 1e3, "wall_us_per_step": wall_per_step * 1e6,
        "train_loss": losses[big], "data_mb": (x.nbytes + y.nbytes) / 2**20, "rss_before_fit_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --------------------------------------------------------------------------- the driver


def run_child(contender: str, n: int, steps: int, timed_steps: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, str(n), str(steps), str(timed_steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=BENCH)
    except subprocess.TimeoutExpired:
        return {"contender": contender, "n": n, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {"contender": contender, "n": n, "error": tail or f"exit code {proc.returncode}"}


def summarize(results: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        for c in CONTENDERS:
            mine = [r for r in results if r["n"] == n and r["contender"] == c and "error" not in r]
            errors = [r["error"] for r in results if r["n"] == n and r["contender"] == c and "error" in r]
            if not mine:
                row[c] = {"error": errors[0] if errors else "no run"}
                continue
            med = {k: statistics.median(r[k] for r in mine)
                   for k in ("us_per_step", "wall_us_per_step", "epoch_fixed_ms", "peak_rss_mb", "rss_before_fit_mb",
                             "train_loss")}
            row[c] = {**med, "runs": len(mine), "us_per_step_all": [r["us_per_step"] for r in mine]}
            row["data_mb"] = mine[0]["data_mb"]
            row["steps"] = mine[0]["steps"]
        if "error" not in row["ideal"] and "error" not in row["lanterna"]:
            # paired by round (the two ran one after the other, under that round's load), then the median
            pairs = [(la, i) for la in results if la["n"] == n and la["contender"] == "lanterna" and "error" not in la
                     for i in results if i["n"] == n and i["contender"] == "ideal" and "error" not in i
                     and i["rep"] == la["rep"]]
            row["overhead_us_per_step"] = statistics.median(la["us_per_step"] - i["us_per_step"] for la, i in pairs)
            row["x_ideal"] = statistics.median(la["us_per_step"] / i["us_per_step"] for la, i in pairs)
            row["wall_overhead_us_per_step"] = statistics.median(la["wall_us_per_step"] - i["wall_us_per_step"]
                                                                 for la, i in pairs)
            row["rss_minus_data_mb"] = row["lanterna"]["peak_rss_mb"] - row["data_mb"]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| N rows | data MB | steps/epoch (small, large) | ideal µs/step (CPU) | lanterna µs/step (CPU) "
            "| overhead µs/step (CPU) | × ideal (CPU) "
            "| overhead, wall clock | per-epoch fixed ms (ideal / lanterna) | peak RSS MB (ideal / lanterna) "
            "| lanterna RSS − data MB | train loss (ideal / lanterna) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        i, la = r["ideal"], r["lanterna"]
        if "error" in i or "error" in la:
            lines.append(f"| {r['n']:.0e} | error: {i.get('error') or la.get('error')} |")
            continue
        lines.append(
            f"| {r['n']:,} | {r['data_mb']:.1f} | {r['steps'][0]}, {r['steps'][1]} | {i['us_per_step']:.1f} "
            f"| {la['us_per_step']:.1f} | {r['overhead_us_per_step']:+.1f} | {r['x_ideal']:.3f}× "
            f"| {r['wall_overhead_us_per_step']:+.1f} "
            f"| {i['epoch_fixed_ms']:.1f} / {la['epoch_fixed_ms']:.1f} "
            f"| {i['peak_rss_mb']:.0f} / {la['peak_rss_mb']:.0f} | {r['rss_minus_data_mb']:.0f} "
            f"| {i['train_loss']:.5f} / {la['train_loss']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 10^4 and 10^5 rows, few steps, 1 round")
    p.add_argument("--sizes", help="comma-separated row counts (1e4,1e6 accepted)")
    p.add_argument("--reps", type=int, help="rounds (fresh processes per size and contender); default 5")
    p.add_argument("--steps", type=int, help="steps of the larger epochs (the smaller ones: a third)")
    p.add_argument("--out", help="write the raw results and the summary as JSON here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    p.add_argument("--from-json", help="re-render the table of results saved with --out, without running anything")
    p.add_argument("--child", nargs=4, metavar=("CONTENDER", "N", "STEPS", "TIMED_STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, BENCH)
    if args.child:
        c, n, s, t = args.child
        print(TAG + json.dumps(child(c, int(n), int(s), int(t))), flush=True)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(markdown(summarize(saved["results"], saved["config"]["sizes"])))
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    if args.sizes:
        cfg["sizes"] = [int(float(s)) for s in args.sizes.split(",")]
    if args.reps:
        cfg["reps"] = args.reps
    if args.steps:
        cfg["steps"] = args.steps
    started = datetime.datetime.now()
    results = []
    for rep in range(cfg["reps"]):
        for n in cfg["sizes"]:
            order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
            for c in order:
                res = run_child(c, n, cfg["steps"], cfg["timed_steps"], args.timeout)
                res["rep"] = rep
                results.append(res)
                msg = res.get("error") or f"{res['us_per_step']:.1f} µs/step, peak RSS {res['peak_rss_mb']:.0f} MB"
                print(f"round {rep + 1}/{cfg['reps']} N={n:>9,} {c:<9} {msg}", file=sys.stderr, flush=True)
    rows = summarize(results, cfg["sizes"])
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"started": started.isoformat(timespec="seconds"), "config": cfg, "load1": os.getloadavg()[0],
                       "rows": rows, "results": results}, f, indent=1)
    return 0 if all("overhead_us_per_step" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
