"""Run one contender on one workload in this process and print one JSON line (used by run.py).

    python bench/worker.py W1 lanterna --threads 1

Imports (torch._dynamo included, which torch.optim would import at its first step) and data generation are
not timed; the time covers building the model, optimizer and framework objects, training, validation and
reading the final numbers. Peak RSS is the high-water mark of the timed run (reset at its start on Linux).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import warnings

BENCH = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux), so that the peak is the timed run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if platform.system() != "Darwin" else peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("workload")
    p.add_argument("contender")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, BENCH)
    warnings.filterwarnings("ignore")
    import torch
    import torch._dynamo  # noqa: F401  torch.optim imports it at the first step (~1.4 s): an import, untimed

    torch.set_num_threads(args.threads)
    from contenders import load
    from workloads import WORKLOADS

    w = WORKLOADS[args.workload]
    mod = load(args.contender)  # the framework's import is not timed
    data = w.data()
    gc.collect()
    _reset_peak()
    rss_before = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    result = mod.run(w, data, args.contender)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    wall = seconds
    if "timed_seconds" in result:  # a contender that times a part of its run itself (compile warm-up)
        seconds = result.pop("timed_seconds")
    print("BENCH_RESULT " + json.dumps({
        "workload": w.name, "contender": args.contender, "seconds": seconds, "wall_seconds": wall,
        "cpu_seconds": cpu_seconds,
        "us_per_step": seconds / w.steps * 1e6, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before,
        "threads": torch.get_num_threads(), **{k: float(v) for k, v in result.items()},
    }), flush=True)


if __name__ == "__main__":
    main()
