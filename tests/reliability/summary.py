"""Print the fault tables of issue #11: per group, how many rows fell in each class, and the rows whose class
is not the expected one.

    python tests/reliability/summary.py            # run every table now (about a minute)
    python tests/reliability/summary.py --last     # the figures of the last pytest run of tests/reliability
    python tests/reliability/summary.py -k save    # only rows whose id contains "save"
    python tests/reliability/summary.py --all      # list every row, not only the failing ones
    python tests/reliability/summary.py -t test_malicious   # one table
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

TABLES = ("test_bad_input", "test_persistence", "test_malicious", "test_signals_numerics")


def run_tables(pattern: str | None, tables: list[str] | None = None) -> list[dict]:
    out = []
    for name in tables or TABLES:
        mod = importlib.import_module(name)
        for row in mod.ROWS:
            if pattern and pattern not in row.id:
                continue
            group_of = getattr(mod, "group_of", None)
            group = group_of(row) if group_of else mod.GROUP
            o = harness.classify(row)
            out.append({"group": group, "id": row.id, "area": row.area, "cls": o.cls,
                        "expected": sorted(row.expected), "message": o.message, "seconds": o.seconds})
            print("." if o.cls in row.expected else "F", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return out


def last_results() -> list[dict]:
    files = sorted(harness.RESULTS_DIR.glob("results-*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit(f"no results in {harness.RESULTS_DIR}: run pytest tests/reliability first")
    latest: dict[tuple[str, str], dict] = {}
    for line in files[-1].read_text().splitlines():
        r = json.loads(line)
        latest[(r["group"], r["id"])] = r
    return list(latest.values())


def report(results: list[dict], show_all: bool) -> None:
    classes = harness.CLASSES
    by_group: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_group[r["group"]][r["cls"]] += 1
    width = max([len(g) for g in by_group] + [5])
    print(f"{'group':<{width}}  {'rows':>4}  " + "  ".join(f"{c:>13}" for c in classes))
    total: Counter = Counter()
    for group, counts in by_group.items():
        total.update(counts)
        print(f"{group:<{width}}  {sum(counts.values()):>4}  " + "  ".join(f"{counts[c]:>13}" for c in classes))
    print(f"{'all':<{width}}  {sum(total.values()):>4}  " + "  ".join(f"{total[c]:>13}" for c in classes))
    failing = [r for r in results if r["cls"] not in r["expected"]]
    print(f"\n{len(failing)} of {len(results)} rows are not in their expected class"
          + (":" if failing else "."))
    shown = results if show_all else failing
    by_area: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in shown:
        by_area[(r["group"], r["area"])].append(r)
    for (group, area), rows in sorted(by_area.items()):
        print(f"\n[{group} / {area}]")
        for r in rows:
            mark = " " if r["cls"] in r["expected"] else "✗"
            print(f" {mark} {r['id']}: {r['cls']} (expected {' or '.join(r['expected'])}) — {r['message']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--last", action="store_true", help="read the last pytest run's results instead of running")
    ap.add_argument("--all", action="store_true", help="list every row")
    ap.add_argument("--slow", type=int, default=0, help="also list the N slowest rows")
    ap.add_argument("-k", help="only rows whose id contains this")
    ap.add_argument("-t", "--table", action="append", choices=TABLES, help="only this table (repeatable)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = last_results() if args.last else run_tables(args.k, args.table)
    report(results, args.all)
    for r in sorted(results, key=lambda r: -r["seconds"])[: args.slow]:
        print(f"  {r['seconds']:6.2f} s  {r['group']}/{r['id']}")
    if not args.last:
        print(f"\n{len(results)} rows in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
