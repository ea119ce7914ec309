"""lanterna's benchmark suite against the ideal loop, the seeds' loop and the other training libraries.

Every (workload, contender) run is a fresh process (bench/worker.py); the repetitions are interleaved
(one run of every contender per round, the order rotated each round) so that load on the machine hits all
of them alike. The report gives medians, min–max, the ratio to the ideal loop (the median of the
per-round ratios) and the final losses/metrics, so that nobody wins by not training.

    python bench/run.py                      # everything, 5 rounds, writes BENCHMARKS.md
    python bench/run.py --quick              # W1: ideal vs seed loop vs lanterna, 3 rounds (about a minute)
    python bench/run.py -w W1,W2 -c ideal,lanterna,lightning --reps 7
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

from contenders import CONTENDERS, DESCRIPTIONS  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

MAIN = ["ideal", "lanterna", "seed-loop", "lightning", "lightning-defaults", "keras", "poutyne", "skorch", "ignite"]
EXTRA = {"W2": ["lanterna-compile"], "W3": ["lanterna-compile"]}  # + lanterna-bf16 where bf16 is native
PACKAGES = {"lanterna": "lanterna", "seed-loop": "torchmetrics", "lightning": "lightning",
            "lightning-defaults": "lightning", "keras": "keras", "poutyne": "poutyne", "skorch": "skorch",
            "ignite": "pytorch-ignite"}
TARGETS = {"W1": 1.15, "W2": 1.05, "W3": 1.05}
W0_OVERHEAD_US = 30.0
RSS_TARGET = 1.10
RESULT_TAG = "BENCH_RESULT "


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """True where bfloat16 matmuls run in hardware (CPU AMX/AVX512-BF16, or a CUDA device)."""
    if _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return True
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    except Exception:
        return False


def _mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(), "logical_cpus": cpus, "memory_gb": round(_mem_gb(), 1),
        "os": platform.platform(), "python": platform.python_version(),
        "versions": {p: _version(p) for p in ["torch", "lanterna", "torchmetrics", "lightning", "keras",
                                                "poutyne", "skorch", "pytorch-ignite"]},
        "bf16_native": native_bf16(),
    }


# --------------------------------------------------------------------------- running


def run_one(workload: str, contender: str, threads: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lanterna-bench-") as cwd:
        try:
            proc = subprocess.run(
                [sys.executable, os.path.join(BENCH, "worker.py"), workload, contender, "--threads", str(threads)],
                cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"workload": workload, "contender": contender, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["load1"] = (load0 + os.getloadavg()[0]) / 2
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    missing = any("ModuleNotFoundError" in t or "No module named" in t for t in tail)
    return {"workload": workload, "contender": contender, "missing": missing,
            "error": " | ".join(tail) or f"exit code {proc.returncode}"}


def plan(workloads: list[str], contenders: list[str] | None) -> dict[str, list[str]]:
    out = {}
    bf16 = native_bf16()
    for w in workloads:
        if contenders is not None:
            out[w] = list(contenders)
            continue
        cs = list(MAIN) + EXTRA.get(w, [])
        if bf16 and w in ("W2", "W3"):
            cs.append("lanterna-bf16")
        out[w] = cs
    return out


def run_all(jobs: dict[str, list[str]], reps: int, threads: int, timeout: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    dead: set[tuple[str, str]] = set()  # contenders that cannot run (not installed): not retried
    total = reps * sum(len(cs) for cs in jobs.values())
    n = 0
    t_start = time.time()
    for rep in range(reps):
        for w, cs in jobs.items():
            k = rep % len(cs)
            for c in cs[k:] + cs[:k]:
                n += 1
                if (w, c) in dead:
                    continue
                res = run_one(w, c, threads, timeout)
                res["rep"] = rep
                results.append(res)
                if "error" in res:
                    if res.get("missing"):
                        dead.add((w, c))
                    msg = f"FAILED: {res['error'][:200]}"
                else:
                    msg = f"{res['seconds']:8.3f} s  load {res['load1']:.2f}"
                elapsed = time.time() - t_start
                print(f"[{n:3d}/{total}] round {rep + 1}/{reps} {w} {c:<18} {msg}   ({elapsed:.0f} s)",
                      file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}"


def summarize(results: list[dict[str, Any]], jobs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Per workload and contender: times, the median per-round ratio to the ideal loop, final numbers."""
    table: dict[str, dict[str, Any]] = {}
    for w, cs in jobs.items():
        ok = [r for r in results if r["workload"] == w and "error" not in r]
        ideal = {r["rep"]: r["seconds"] for r in ok if r["contender"] == "ideal"}
        ideal_cpu = {r["rep"]: r["cpu_seconds"] for r in ok if r["contender"] == "ideal"}
        rows: dict[str, Any] = {}
        for c in cs:
            mine = [r for r in ok if r["contender"] == c]
            errors = [r for r in results if r["workload"] == w and r["contender"] == c and "error" in r]
            if not mine:
                rows[c] = {"error": errors[0]["error"] if errors else "no result"}
                continue
            secs = [r["seconds"] for r in mine]
            ratios = [r["seconds"] / ideal[r["rep"]] for r in mine if r["rep"] in ideal]
            cpu_ratios = [r["cpu_seconds"] / ideal_cpu[r["rep"]] for r in mine
                          if r["rep"] in ideal_cpu and "timed_seconds" not in r and "warmup_seconds" not in r]
            last = mine[-1]
            rows[c] = {
                "n": len(mine), "median": statistics.median(secs), "min": min(secs), "max": max(secs),
                "ratio": statistics.median(ratios) if ratios else None,
                "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios and not WORKLOADS[w].dataset else None,
                "warmup_s": statistics.median(r["warmup_seconds"] for r in mine) if "warmup_seconds" in last_of(mine)
                else None,
                "us_per_step": statistics.median(r["us_per_step"] for r in mine),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                "rss_before_mb": statistics.median(r["rss_before_mb"] for r in mine),
                "rss_growth_mb": statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in mine),
                "failures": len(errors),
                **{k: last.get(k) for k in ("train_loss", "train_metric", "valid_loss", "valid_metric")},
            }
        if "ideal" in rows and "median" in rows["ideal"]:
            base = rows["ideal"]["us_per_step"]
            for row in rows.values():
                if "us_per_step" in row:
                    row["overhead_us"] = row["us_per_step"] - base
        table[w] = rows
    return table


def last_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return rows[-1] if rows else {}


def targets(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []

    def get(w: str, c: str, key: str) -> float | None:
        return summary.get(w, {}).get(c, {}).get(key)

    for w, limit in TARGETS.items():
        r = get(w, "lanterna", "ratio")
        if r is not None:
            verdict = "met" if r <= limit else "MISSED"
            cpu = get(w, "lanterna", "cpu_ratio")
            cpu_s = f" (CPU time: {cpu:.3f}×)" if cpu is not None else ""
            lines.append(f"| {w} lanterna time ÷ ideal | ≤ {limit:.2f}× | {r:.3f}×{cpu_s} | {verdict} |")
    ov = get("W0", "lanterna", "overhead_us")
    if ov is not None:
        lines.append(f"| W0 per-step overhead over the ideal loop | ≤ {W0_OVERHEAD_US:.0f} µs | {ov:.1f} µs | "
                     f"{'met' if ov <= W0_OVERHEAD_US else 'MISSED'} |")
    rl, ri = get("W2", "lanterna", "peak_rss_mb"), get("W2", "ideal", "peak_rss_mb")
    if rl is not None and ri is not None:
        q = rl / ri
        gl, gi = get("W2", "lanterna", "rss_growth_mb"), get("W2", "ideal", "rss_growth_mb")
        bl, bi = get("W2", "lanterna", "rss_before_mb"), get("W2", "ideal", "rss_before_mb")
        lines.append(f"| W2 peak RSS ÷ ideal | ≤ {RSS_TARGET:.2f}× | {q:.3f}× ({rl:.0f} / {ri:.0f} MB; before fit, "
                     f"imports + data: {bl:.0f} / {bi:.0f} MB; growth during fit: {gl:.0f} / {gi:.0f} MB) | "
                     f"{'met' if q <= RSS_TARGET else 'MISSED'} |")
    for w in ("W2", "W3"):
        r = get(w, "lanterna-compile", "ratio")
        if r is not None:
            lines.append(f"| stretch: {w} lanterna compile=True ÷ ideal eager | < 1.00× | {r:.3f}× | "
                         f"{'met' if r < 1 else 'not met'} |")
    return lines


def markdown(summary: dict[str, dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
             loads: list[float], wall: float) -> str:
    out = ["# Benchmarks", ""]
    took = f", {wall / 60:.0f} min" if wall else ""
    out += [f"Latest full run: {info['date']}{took}. Reproduce with `make bench` or", "",
            f"```\n{info['command']}\n```", ""]
    v = info["versions"]
    out += ["## Machine", "",
            f"- CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs available; {info['memory_gb']} GB RAM; "
            f"{info['os']}; Python {info['python']}",
            f"- torch {v['torch']} (CPU build), {args.threads} intra-op thread(s) per run "
            f"(`torch.set_num_threads({args.threads})`, OMP/MKL threads {args.threads})",
            "- " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "torch"),
            "- bf16 in hardware: " + ("yes" if info["bf16_native"]
                                      else "no (no AVX512-BF16/AMX, no GPU): bf16-mixed is not benchmarked here")]
    if loads:
        busy = statistics.median(loads) > 1.5  # the run itself keeps one CPU busy
        out.append(f"- Load during the run (1-min load average, {len(loads)} samples; the benchmark itself accounts "
                   f"for about 1): median {statistics.median(loads):.2f}, max {max(loads):.2f} on "
                   f"{info['logical_cpus']} CPUs"
                   + (" — the machine was shared, so absolute times are noisy; the ratios, taken within each "
                      "interleaved round, are the figures to read." if busy else "."))
    out += ["", "## Method", "",
            f"- {args.reps} interleaved rounds: every contender runs once per round in its own fresh process, the "
            "order rotated each round. Time = building the model/optimizer/framework objects + training + "
            "validation + reading the final numbers; imports and data generation are not timed (torch._dynamo, which "
            "torch.optim imports at its first step, ~1.4 s, is imported beforehand in every process).",
            "- Same model class, initial weights (torch.manual_seed(1) before building it), data, batch size, "
            "optimizer and hyperparameters everywhere; the DataLoader-based contenders and lanterna draw the same "
            "shuffles, so their final losses agree to float rounding.",
            "- `× ideal` is the median over rounds of (contender time ÷ ideal-loop time in the same round); "
            "`µs/step` is time ÷ optimizer steps (validation included); peak RSS is the process's high-water mark "
            "during the timed run (reset at its start, so data generation does not count; imports and data do).",
            "", "Contenders:", ""]
    for c in sorted({c for rows in summary.values() for c in rows}, key=lambda c: list(CONTENDERS).index(c)):
        out.append(f"- **{c}**: {DESCRIPTIONS[c]}")
    out += ["", "## Summary: time ÷ the ideal loop (median of the per-round ratios)", ""]
    cols = list(summary)
    names = [c for c in CONTENDERS if any(c in summary[w] for w in cols)]
    out += ["| contender | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for c in names:
        cells = []
        for w in cols:
            r = summary[w].get(c, {}).get("ratio")
            cells.append("–" if r is None else (f"**{r:.2f}×**" if c == "lanterna" else f"{r:.2f}×"))
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    w1 = summary.get("W1", {})
    if "lanterna" in w1 and w1["lanterna"].get("median"):
        peers = {c: r["median"] for c, r in w1.items() if c not in ("ideal", "lanterna") and "median" in r
                 and not c.startswith("lanterna")}
        if peers:
            best, mine = min(peers, key=peers.get), w1["lanterna"]["median"]
            slowest = f" and {max(peers.values()) / mine:.1f}× faster than the slowest" if len(peers) > 1 else ""
            out += ["", f"On W1 lanterna is {peers[best] / mine:.2f}× faster than the fastest other contender "
                    f"({best}){slowest}."]
    out += ["", "## Targets", "", "| target | limit | measured | |", "|---|---|---|---|", *targets(summary), ""]
    for w, rows in summary.items():
        wl = WORKLOADS[w]
        out += [f"## {w}: {wl.title}", ""]
        metric = {"mae": "MAE", "acc": "accuracy"}[wl.metric]
        head = ["contender", "median s", "min–max s", "× ideal", "× ideal (CPU time)", "µs/step",
                "overhead µs/step", "train loss"]
        if wl.validate:
            head += [f"train {metric}", "valid loss", f"valid {metric}"]
        head.append("peak RSS MB")
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = sorted(rows, key=lambda c: (rows[c].get("ratio") is None, rows[c].get("ratio") or 0))
        for c in order:
            r = rows[c]
            if "error" in r:
                out.append(f"| {c} | failed: {r['error'][:120].replace('|', '/')} |" + " |" * (len(head) - 2))
                continue
            name = f"**{c}**" if c == "lanterna" else c
            if r.get("warmup_s") is not None:
                name += f" (after a {r['warmup_s']:.1f} s warm-up epoch that compiles; losses after 2 epochs)"
            cells = [name, f"{r['median']:.3f}", f"{r['min']:.3f}–{r['max']:.3f}",
                     f"{r['ratio']:.2f}×" if r["ratio"] is not None else "–",
                     f"{r['cpu_ratio']:.2f}×" if r.get("cpu_ratio") is not None else "–", f"{r['us_per_step']:.0f}",
                     f"{r.get('overhead_us', 0):+.0f}", _fmt(r["train_loss"])]
            if wl.validate:
                cells += [_fmt(r["train_metric"]), _fmt(r["valid_loss"]), _fmt(r["valid_metric"])]
            cells.append(f"{r['peak_rss_mb']:.0f}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["The profile behind these numbers, and how lanterna keeps its hot path lean, is in "
            "[docs/performance.md](docs/performance.md). A full run also saves its raw results to "
            "`bench/results/latest.json` (not versioned), from which `python bench/run.py --from-json "
            "bench/results/latest.json --write` re-renders this page.", ""]
    return "\n".join(out)


def _command(argv: list[str]) -> str:
    """The command to reproduce a run: its options, less those that only say where the output goes."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json", "--out"):
            skip = True
            continue
        if a.startswith(("--json=", "--out=", "--write", "--no-write")):
            continue
        kept.append(a)
    return " ".join(["python bench/run.py", *kept])


def render_saved(args: argparse.Namespace) -> None:
    """Rebuild the markdown report from a ``--json`` file (e.g. after improving the report's layout)."""
    with open(args.from_json) as f:
        saved = json.load(f)
    info, results = saved["machine"], saved["results"]
    info.setdefault("command", "python bench/run.py")
    info["command"] = _command(info["command"].split()[2:])
    jobs: dict[str, list[str]] = {}
    for r in results:
        cs = jobs.setdefault(r["workload"], [])
        if r["contender"] not in cs:
            cs.append(r["contender"])
    for w, cs in jobs.items():  # the planned order, where it is known
        jobs[w] = [c for c in plan([w], None)[w] if c in cs] + [c for c in cs if c not in plan([w], None)[w]]
    args.threads = info.get("threads", args.threads)
    args.reps = info.get("reps", max(r["rep"] for r in results) + 1)
    summary = summarize(results, jobs)
    loads = [r["load1"] for r in results if "load1" in r]
    report = markdown(summary, info, args, loads, info.get("wall_s", 0.0))
    print(report)
    if args.write:
        write_report(args.out, report)


#: sections of the report written by other scripts (bench/scaling.py, bench/ddp.py): kept when this one rewrites it
KEPT_FROM = "## Scale (issue 15)"


def write_report(path: str, report: str) -> None:
    """Write ``report`` to ``path``, keeping the sections other scripts wrote there (from :data:`KEPT_FROM` on)."""
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if KEPT_FROM in old:
            kept = "\n" + old[old.index(KEPT_FROM):]
    with open(path, "w") as f:
        f.write(report.rstrip("\n") + "\n" + kept)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="W1: ideal, seed-loop, lanterna; 3 rounds")
    p.add_argument("-w", "--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("-c", "--contenders", help=f"comma-separated subset of {','.join(CONTENDERS)}")
    p.add_argument("--reps", type=int, default=None, help="rounds (default 5, 3 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (default 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is abandoned")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"), help="markdown report path")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                   help="write the report to --out (default: only for a full run)")
    p.add_argument("--json", help="also save the raw results here (default for a full run: bench/results/latest.json)")
    p.add_argument("--from-json", help="render the report of results saved with --json, without running anything")
    args = p.parse_args(argv)
    if args.from_json:
        render_saved(args)
        return

    if args.quick:
        args.workloads = args.workloads or "W1"
        args.contenders = args.contenders or "ideal,seed-loop,lanterna"
        args.reps = args.reps or 3
    args.reps = args.reps or 5
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    contenders = args.contenders.split(",") if args.contenders else None
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    for c in contenders or []:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r}; known: {', '.join(CONTENDERS)}")
    if contenders is not None and "ideal" not in contenders:
        contenders.insert(0, "ideal")  # the reference every ratio needs
    full = args.workloads is None and args.contenders is None and not args.quick
    write = full if args.write is None else args.write
    if write and not args.json:  # the raw results behind the report, to re-render it (--from-json)
        args.json = os.path.join(BENCH, "results", "latest.json")

    info = machine()
    info["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    info["command"] = _command(argv if argv is not None else sys.argv[1:])
    info["threads"], info["reps"] = args.threads, args.reps
    jobs = plan(workloads, contenders)
    t0 = time.time()
    results = run_all(jobs, args.reps, args.threads, args.timeout)
    wall = time.time() - t0
    info["wall_s"] = wall
    summary = summarize(results, jobs)
    loads = [r["load1"] for r in results if "load1" in r]
    report = markdown(summary, info, args, loads, wall)
    print(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, separators=(",", ":"))
    if write:
        write_report(args.out, report)


if __name__ == "__main__":
    main()
