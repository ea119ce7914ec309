"""lanterna on a CUDA device (issue 15): W1 and W2 of bench/workloads.py against an ideal hand loop on the device,
a default fit under ``torch.cuda.set_sync_debug_mode("error")``, CUDA-graph compile (``mode="reduce-overhead"``)
against eager, and bf16-mixed against fp32. A few minutes on one GPU.

    python bench/gpu.py --out bench/results/gpu.json     # on a CUDA machine: prints a markdown table
    python bench/gpu.py --cpu-smoke                      # the same code paths on the CPU, tiny sizes, seconds

Without a CUDA device (and without ``--cpu-smoke``) it measures nothing, says so and exits 0.

Variants, each run ``--reps`` times in this process, interleaved (the first round also warms the device up);
every run trains one more epoch than the workload and times the workload's epochs after that first one (which
compiles, for the compiled variant), so all variants are timed alike:

- ``ideal``: the ideal loop of bench/contenders/ideal_loop.py with the data resident on the device: batches are
  ``index_select`` of a device permutation, loss and metric sums on the device, one host read per epoch.
- ``lanterna``: a default fit (``Accelerator()``), data given as CPU tensors (lanterna copies the batches).
- ``lanterna-resident``: the same fit on the tensors already on the device (what the ideal loop is given).
- ``lanterna-bf16``: ``Accelerator(precision="bf16-mixed")``, CPU tensors.
- ``lanterna-graphs``: ``Accelerator(compile="reduce-overhead")`` (CUDA graphs), or
  ``compile={"mode": "reduce-overhead"}`` where this lanterna takes no mode strings; a compile that falls back
  to eager is reported as such.

``--cpu-smoke`` shrinks W1 to 3 epochs and W2 to 1,000 training images, runs on the CPU, skips the sync-debug
switch (a CUDA setting) and compiles with ``backend="eager"`` (dynamo's tracing without code generation, which
would take minutes on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import torch  # noqa: E402
from contenders.ideal_loop import _hits, _loader_draw, _permutation  # noqa: E402
from workloads import MODEL_SEED, WORKLOADS, Workload, image_data  # noqa: E402

VARIANTS = ("ideal", "lanterna", "lanterna-resident", "lanterna-bf16", "lanterna-graphs")
NO_CUDA = "no CUDA device: bench/gpu.py measured nothing (run it on a CUDA machine; --cpu-smoke runs its code " \
          "paths on the CPU)."


# --------------------------------------------------------------------------- workloads


def _small_images() -> tuple[torch.Tensor, ...]:
    x, y = image_data(1_200)
    return x[:1_000], y[:1_000], x[1_000:], y[1_000:]


def workloads(smoke: bool) -> list[Workload]:
    w1, w2 = WORKLOADS["W1"], WORKLOADS["W2"]
    if not smoke:
        return [w1, w2]
    return [dataclasses.replace(w1, epochs=3),
            dataclasses.replace(w2, n_train=1_000, n_valid=200, data_fn=_small_images)]


# --------------------------------------------------------------------------- the contenders


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ideal(w: Workload, data: tuple[torch.Tensor, ...], device: torch.device, epochs: int) -> dict[str, Any]:
    """bench/contenders/ideal_loop.py's loop, the data on ``device`` before the clock starts."""
    torch.manual_seed(MODEL_SEED)
    model = w.make_model().to(device)
    opt = w.make_optimizer(model.parameters())
    loss_fn = w.loss_fn()
    xt, yt, xv, yv = (t.to(device) for t in data)
    n_train, n_valid, bs = len(xt), len(xv), w.batch_size
    times, out = [], {}
    _sync(device)
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        order = _permutation(n_train).to(device, non_blocking=True)
        for s in range(0, n_train, bs):
            idx = order[s : s + bs]
            xb, yb = xt.index_select(0, idx), yt.index_select(0, idx)
            pred = model(xb)
            loss = loss_fn(pred, yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sums[0].add_(loss.detach(), alpha=len(idx))
            sums[1].add_(_hits(pred, yb, w.metric))
        model.eval()
        vsums = torch.zeros(2, dtype=torch.float64, device=device)
        _loader_draw()
        with torch.no_grad():
            for s in range(0, n_valid, bs):
                pred = model(xv[s : s + bs])
                vsums[0].add_(loss_fn(pred, yv[s : s + bs]), alpha=len(xv[s : s + bs]))
                vsums[1].add_(_hits(pred, yv[s : s + bs], w.metric))
        tl, tm, vl, vm = torch.cat([sums, vsums]).tolist()  # the epoch's one host read
        out = {"train_loss": tl / n_train, "train_metric": tm / n_train, "valid_loss": vl / n_valid,
               "valid_metric": vm / n_valid}
        times.append(time.perf_counter() - t0)
    return {**out, "epoch_seconds": times}


def graphs_compile_option(smoke: bool) -> tuple[Any, str]:
    """What to pass as ``Accelerator(compile=...)`` for CUDA graphs, and how it was spelled."""
    import lanterna as ln

    if smoke:
        return {"backend": "eager"}, "compile={'backend': 'eager'} (--cpu-smoke: tracing only)"
    if "reduce-overhead" in (ln.Accelerator.__doc__ or ""):  # this lanterna takes torch.compile mode strings
        return "reduce-overhead", "compile='reduce-overhead'"
    return {"mode": "reduce-overhead"}, "compile={'mode': 'reduce-overhead'} (no mode strings in this lanterna)"


def lanterna_fit(w: Workload, data: tuple[torch.Tensor, ...], device: torch.device, epochs: int, *,
                 precision: str = "32", compile: Any = False, resident: bool = False) -> dict[str, Any]:
    import lanterna as ln

    xt, yt, xv, yv = (t.to(device) for t in data) if resident else data
    metric = ln.metrics.MAE() if w.metric == "mae" else ln.metrics.Accuracy()
    acc = ln.Accelerator(device=device, precision=precision, compile=compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = (
            ln.setup(w.make_model, loss=w.loss_fn(), optimizer=w.optimizer_cls, metrics=[metric])
            .set_opt_hparams(**w.opt_kwargs)
            .fit((xt, yt), valid_data=(xv, yv), epochs=epochs, seed=MODEL_SEED, verbose=False, accelerator=acc,
                 dataloader_options={"batch_size": w.batch_size})
        )
    last = fitted.history[-1]
    fallbacks = sorted({str(c.message)[:300] for c in caught if "compile" in str(c.message).lower()})
    return {"train_loss": last["train_loss"], "train_metric": last[f"train_{w.metric}"],
            "valid_loss": last["valid_loss"], "valid_metric": last[f"valid_{w.metric}"],
            "epoch_seconds": [h["epoch_time"] for h in fitted.history], "compile_warnings": fallbacks}


def sync_debug_fit(w: Workload, data: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, Any]:
    """A default fit (validation, a metric, TerminateOnNaN on) with every host sync an error."""
    if device.type != "cuda":
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        note = "set_sync_debug_mode skipped: not a CUDA device"
    else:
        ctx, note = _sync_debug_error(), 'torch.cuda.set_sync_debug_mode("error")'
    short = dataclasses.replace(w, epochs=2)
    try:
        with ctx:
            res = lanterna_fit(short, data, device, short.epochs)
        return {"ok": True, "mode": note, "train_loss": res["train_loss"]}
    except Exception as e:  # noqa: BLE001  the failure text is the result
        return {"ok": False, "mode": note, "error": f"{type(e).__name__}: {e}"[:2000],
                "where": "".join(traceback.format_exception(e)[-6:])[-3000:]}


@contextlib.contextmanager
def _sync_debug_error() -> Any:
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


# --------------------------------------------------------------------------- running and reporting


def run_variant(variant: str, w: Workload, data: tuple[torch.Tensor, ...], device: torch.device,
                graphs: Any) -> dict[str, Any]:
    epochs = w.epochs + 1  # the first epoch warms up (and compiles): not timed
    try:
        if variant == "ideal":
            res = ideal(w, data, device, epochs)
        elif variant == "lanterna":
            res = lanterna_fit(w, data, device, epochs)
        elif variant == "lanterna-resident":
            res = lanterna_fit(w, data, device, epochs, resident=True)
        elif variant == "lanterna-bf16":
            res = lanterna_fit(w, data, device, epochs, precision="bf16-mixed")
        else:
            res = lanterna_fit(w, data, device, epochs, compile=graphs)
    except Exception as e:  # noqa: BLE001  one variant failing (an unsupported mode) is reported, not fatal
        return {"variant": variant, "workload": w.name, "error": f"{type(e).__name__}: {e}"[:2000]}
    timed = sum(res["epoch_seconds"][1:])
    return {"variant": variant, "workload": w.name, **res, "seconds": timed, "steps_per_s": w.steps / timed,
            "warmup_seconds": res["epoch_seconds"][0]}


def summarize(results: list[dict[str, Any]], names: list[str], variants: list[str]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for wname in names:
        rows: dict[str, Any] = {}
        ideal_by_rep = {r["rep"]: r["seconds"] for r in results
                        if r["workload"] == wname and r["variant"] == "ideal" and "seconds" in r}
        for v in variants:
            mine = [r for r in results if r["workload"] == wname and r["variant"] == v]
            ok = [r for r in mine if "seconds" in r]
            if not ok:
                rows[v] = {"error": mine[0]["error"] if mine else "not run"}
                continue
            ratios = [r["seconds"] / ideal_by_rep[r["rep"]] for r in ok if r["rep"] in ideal_by_rep]
            rows[v] = {
                "seconds": statistics.median(r["seconds"] for r in ok),
                "steps_per_s": statistics.median(r["steps_per_s"] for r in ok),
                "x_ideal": statistics.median(ratios) if ratios else None,
                "warmup_seconds": statistics.median(r["warmup_seconds"] for r in ok),
                "runs": len(ok), **{k: ok[-1][k] for k in ("train_loss", "train_metric", "valid_loss",
                                                           "valid_metric")},
                "compile_warnings": sorted({m for r in ok for m in r.get("compile_warnings", [])}),
            }
        table[wname] = rows
    return table


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Device: {report['device_name']}; torch {report['torch']}; CUDA {report['cuda_version']}; "
             f"{report['reps']} rounds, medians.", ""]
    lines += ["| workload | variant | steps/s | × ideal (time) | warm-up epoch s | train loss | valid loss "
              "| valid metric | note |", "|---|---|---|---|---|---|---|---|---|"]
    for wname, rows in report["table"].items():
        for v, r in rows.items():
            if "seconds" not in r:
                lines.append(f"| {wname} | {v} | failed: {r['error'][:300]} | | | | | | |")
                continue
            note = ""
            if v == "lanterna-graphs":
                note = report["graphs_option"] + ("; " + " / ".join(r["compile_warnings"])
                                                  if r["compile_warnings"] else "")
            x = f"{r['x_ideal']:.2f}×" if r["x_ideal"] is not None else "–"
            lines.append(f"| {wname} | {v} | {r['steps_per_s']:,.0f} | {x} | {r['warmup_seconds']:.2f} "
                         f"| {r['train_loss']:.4f} | {r['valid_loss']:.4f} | {r['valid_metric']:.4f} | {note} |")
    sd = report["sync_debug"]
    lines += ["", f"Default fit under {sd['mode']}: " + ("passed (no host sync raised)" if sd["ok"]
                                                          else f"FAILED — {sd['error'][:500]}")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--reps", type=int, help="rounds of every variant (default 3; 1 with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="run the same code paths on the CPU with tiny sizes")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"cuda": False, "message": NO_CUDA}, f)
        return 0
    smoke = args.cpu_smoke
    reps = args.reps or (1 if smoke else 3)
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    importlib.import_module("torch._dynamo")  # torch.optim imports it at its first step: an import, untimed

    graphs, graphs_text = graphs_compile_option(smoke)
    ws = workloads(smoke)
    data = {w.name: w.data() for w in ws}
    started = datetime.datetime.now()
    sync_debug = sync_debug_fit(ws[0], data[ws[0].name], device)
    print(f"sync-debug fit: {'passed' if sync_debug['ok'] else 'FAILED: ' + sync_debug['error'][:300]}",
          file=sys.stderr, flush=True)
    results = []
    for rep in range(reps):
        for w in ws:
            k = rep % len(variants)
            for v in variants[k:] + variants[:k]:
                res = run_variant(v, w, data[w.name], device, graphs)
                res["rep"] = rep
                results.append(res)
                msg = f"{res['steps_per_s']:,.0f} steps/s" if "seconds" in res else "FAILED: " + res["error"][:200]
                print(f"round {rep + 1}/{reps} {w.name} {v:<18} {msg}", file=sys.stderr, flush=True)
    report = {
        "started": started.isoformat(timespec="seconds"), "smoke": smoke, "reps": reps, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        "cpu", "torch": torch.__version__, "cuda_version": torch.version.cuda, "graphs_option": graphs_text,
        "sync_debug": sync_debug, "table": summarize(results, [w.name for w in ws], variants), "results": results,
    }
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
