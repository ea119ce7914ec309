"""Multi-node, simulated on one machine (issue 15): two ``torchrun --nnodes=2 --nproc_per_node=1`` launches that
meet through a c10d rendezvous on 127.0.0.1 train exactly as one ``torchrun --standalone --nproc_per_node=2``
launch of the same script and seed — same history, same weights, same evaluate / predict after fit.

Weights are compared bit for bit (``torch.equal``), not to a tolerance: both jobs have the same two ranks
holding the same shards in the same order, and gloo's all-reduce of two ranks adds two numbers per element,
an addition IEEE floats do the same whichever operand comes first. Nothing that a node boundary changes
(ports, the store, which agent hosts it) enters the arithmetic, so any difference is a bug, not rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
WORKER = HERE / "multinode_worker.py"
sys.path.insert(0, str(HERE))
from ddp_worker import N_TRAIN, N_VALID, Net, toy_data  # noqa: E402
from multinode_worker import EPOCHS  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT_S = 240  # all three launches together; one launch takes ~6 s alone on 2 cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    # A session of its own: on failure the whole group (agent and its workers) is killed, nothing hangs.
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LANTERNA_DIST_TIMEOUT": "120"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    # The whole group, also after the agent itself has exited: a failed agent may leave a worker behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# A port picked free can be taken by another process before the rendezvous binds it: such a launch is retried once
# on a fresh port; any other failure fails the test at once.
PORT_TAKEN = re.compile(r"EADDRINUSE|Address already in use|RendezvousConnectionError|DistNetworkError")


def _run_together(launches: dict[str, tuple[list[str], Path]], tmp: Path) -> dict[str, int]:
    procs = {name: _launch(args, out, tmp / f"{name}.log") for name, (args, out) in launches.items()}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            _kill(p)
    return {n: p.returncode for n, p in procs.items() if p.returncode != 0}


def _logs(bad: dict[str, int], tmp: Path) -> str:
    return "\n".join(f"--- {n} (rc {rc}) ---\n{(tmp / f'{n}.log').read_text()[-3000:]}" for n, rc in bad.items())


def _load(out: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / f"rank_{rank}.json").read_text()), load_file(str(out / f"rank_{rank}.safetensors"))


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k.startswith(("train_", "valid_"))} for rec in history]


def test_two_simulated_nodes_train_exactly_as_one_node_with_two_processes(tmp_path: Path) -> None:
    for attempt in (1, 2):
        tmp = tmp_path / f"attempt{attempt}"
        tmp.mkdir()
        port = _free_port()
        nodes, single = tmp / "nodes", tmp / "single"
        rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                f"--rdzv_id=lanterna-test-{port}", "--max_restarts=0"]
        bad = _run_together({
            # is_host says which agent serves the rendezvous store (on real machines the endpoint's host does).
            "node0": ([*rdzv, "--node_rank=0", "--rdzv_conf=is_host=1"], nodes),
            "node1": ([*rdzv, "--node_rank=1", "--rdzv_conf=is_host=0"], nodes),
            "standalone": (["--standalone", "--nproc_per_node=2"], single),
        }, tmp)
        if not bad:
            break
        logs = _logs(bad, tmp)
        if attempt == 2 or not PORT_TAKEN.search(logs):
            pytest.fail(f"launches failed or timed out after {TIMEOUT_S} s (attempt {attempt}): {bad}\n{logs}")

    n_ranks = {}
    for rank in (0, 1):
        info, _ = _load(nodes, rank)
        env = info["env"]
        # really two nodes of one process each: each agent has its own group rank and one local worker
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0", env
        assert env["GROUP_WORLD_SIZE"] == "2", env
        n_ranks[env["GROUP_RANK"]] = rank
        single_env = _load(single, rank)[0]["env"]
        assert single_env["LOCAL_WORLD_SIZE"] == "2" and single_env["GROUP_WORLD_SIZE"] == "1", single_env
    assert sorted(n_ranks) == ["0", "1"], n_ranks

    reference, ref_tensors = _load(single, 0)
    history = _metrics(reference["history"])
    assert len(history) == EPOCHS and history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"train_loss", "train_mae", "valid_loss", "valid_mae"} <= set(history[0])
    for out in (single, nodes):
        for rank in (0, 1):
            info, tensors = _load(out, rank)
            where = f"{out.name} rank {rank}"
            assert _metrics(info["history"]) == history, where  # exact, every epoch, every key
            assert info["evaluate"] == reference["evaluate"], where
            assert tensors.keys() == ref_tensors.keys(), where
            for k, v in ref_tensors.items():
                assert torch.equal(tensors[k], v), f"{where}: {k} differs by {(tensors[k] - v).abs().max()}"

    # and those numbers are right: the final weights evaluated by hand in this (plain) process
    model = Net()
    model.load_state_dict({k.removeprefix("weight."): v for k, v in ref_tensors.items() if k.startswith("weight.")})
    x, y = toy_data()
    xv, yv = x[N_TRAIN:], y[N_TRAIN:]
    with torch.no_grad():
        pred = model(xv)
    assert reference["evaluate"]["loss"] == pytest.approx(torch.nn.functional.mse_loss(pred, yv).item(), abs=1e-6)
    assert reference["evaluate"]["mae"] == pytest.approx((pred - yv).abs().mean().item(), abs=1e-6)
    assert reference["evaluate"]["loss"] == pytest.approx(history[-1]["valid_loss"], abs=1e-6)
    assert ref_tensors["preds"].shape == (N_VALID, 1)  # every validation sample once, in dataset order
    torch.testing.assert_close(ref_tensors["preds"], pred, rtol=1e-6, atol=1e-6)
