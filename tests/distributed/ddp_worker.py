"""A user script run unchanged with `python` or `torchrun` (tests/distributed/test_ddp.py starts it).

Usage: ddp_worker.py MODE OUT_DIR
(MODE: fit | parity | resume | uninterrupted | raise | metrics | accumulate | split)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import lanterna as ln

N_TRAIN, N_VALID = 800, 199  # 199: not divisible by 2 or 3


class Net(nn.Module):
    """The luz chapter's MLP; column 3 of the input carries the sample index and is ignored."""

    def __init__(self, d_in: int = 3, d_hidden: int = 32, d_out: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :3])


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = N_TRAIN + N_VALID
    x = torch.randn(n, 3, generator=g)
    y = (x @ torch.tensor([0.2, -1.3, -0.5])).unsqueeze(1) + torch.randn(n, 1, generator=g)
    idx = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return torch.cat([x, idx], dim=1), y


def metric_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(200, 1, generator=g), torch.randn(200, 1, generator=g)
    scores, labels = torch.randn(200, 3, generator=g), torch.randint(0, 3, (200,), generator=g)
    return pred, target, scores, labels


def metric_cases(pred, target, scores, labels) -> list[tuple[str, ln.metrics.LanternaMetric, Any, Any]]:
    return [("rmse", ln.metrics.RMSE(), pred, target), ("acc", ln.metrics.Accuracy(), scores, labels),
            ("auroc", ln.metrics.BinaryAUROC(from_logits=True), pred.squeeze(1), (target.squeeze(1) > 0).long()),
            ("mc_auroc", ln.metrics.MulticlassAUROC(3, average=None), scores, labels),
            ("max_error", MaxError(), pred, target)]


class MaxError(ln.metrics.LanternaMetric):
    """A custom metric with a max-reduced state."""

    name = "max_error"

    def __init__(self) -> None:
        super().__init__()
        self.add_state("worst", torch.tensor(0.0), dist_reduce_fx="max")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.worst = torch.maximum(self.worst, (pred - target).abs().max())

    def compute(self) -> torch.Tensor:
        return self.worst


class CountGradAllReduce(ln.Callback):
    """Counts DDP's gradient all-reduces (a comm hook); ``force_sync`` turns GradientAccumulation's skipping off."""

    order = 1000  # after GradientAccumulation's batch-begin decision

    def __init__(self, force_sync: bool) -> None:
        self.force_sync = force_sync
        self.per_epoch: list[int] = []

    def on_train_begin(self, ctx: ln.Context) -> None:
        if ctx.epoch == 1:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                self.per_epoch[-1] += 1
                return allreduce_hook(None, bucket)

            ctx.forward_model.register_comm_hook(None, hook)
        self.per_epoch.append(0)

    def on_train_batch_begin(self, ctx: ln.Context) -> None:
        if self.force_sync:
            ctx.dist.set_grad_sync(True)


class RecordShards(ln.Callback):
    """Which sample indices this rank saw, per epoch and phase."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}

    def on_train_batch_begin(self, ctx: ln.Context) -> None:
        self.seen.setdefault(f"train_{ctx.epoch}", []).extend(ctx.input[:, 3].long().tolist())

    def on_valid_batch_begin(self, ctx: ln.Context) -> None:
        self.seen.setdefault(f"valid_{ctx.epoch}", []).extend(ctx.input[:, 3].long().tolist())


class KillRank1Once(ln.Callback):
    """SIGKILL rank 1 at the start of epoch 4 of the first attempt (epoch 3's checkpoint is on disk)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_epoch_begin(self, ctx: ln.Context) -> None:
        if ctx.epoch == 4 and ctx.rank == 1 and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseOnRank1(ln.Callback):
    def on_epoch_begin(self, ctx: ln.Context) -> None:
        if ctx.epoch == 2 and ctx.rank == 1:
            raise ValueError("boom from rank 1")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    x, y = toy_data()
    train, valid = (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])
    setup = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
    if mode == "fit":
        rec = RecordShards()
        fitted = setup.set_opt_hparams(lr=0.01).fit(
            train, valid_data=valid, epochs=int(os.environ.get("EPOCHS", "15")), seed=1, callbacks=[rec],
            dataloader_options={"batch_size": 50},
        )
        preds = fitted.predict(valid[0])
        evaluation = fitted.evaluate(valid)
        (out / f"shards_{rank}.json").write_text(json.dumps(rec.seen))
        (out / f"result_{rank}.json").write_text(json.dumps(
            {"history": fitted.history, "evaluate": evaluation.metrics, "pred_shape": list(preds.shape)}))
        save_file({"preds": preds.contiguous()}, str(out / f"preds_{rank}.safetensors"))
        if rank == 0:
            save_file(dict(fitted.model.state_dict()), str(out / "weights.safetensors"))
    elif mode == "parity":  # same global batch: per-rank batch = global batch / world size, no shuffling
        world = int(os.environ.get("WORLD_SIZE", "1"))
        fitted = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.05).fit(
            train, epochs=3, seed=1, verbose=False,
            dataloader_options={"batch_size": 100 // world, "shuffle": False},
        )
        if rank == 0:
            save_file(dict(fitted.model.state_dict()), str(out / f"weights_world{world}.safetensors"))
    elif mode in ("resume", "uninterrupted"):
        callbacks: list[ln.Callback] = [ln.callbacks.AutoResume(out / "resume")] if mode == "resume" else []
        if mode == "resume":
            callbacks.append(KillRank1Once(out / "killed"))
        fitted = setup.set_opt_hparams(lr=0.01).fit(
            train, valid_data=valid, epochs=6, seed=1, callbacks=callbacks, verbose=False,
            dataloader_options={"batch_size": 50},
        )
        if rank == 0:
            save_file(dict(fitted.model.state_dict()), str(out / f"weights_{mode}.safetensors"))
            (out / f"history_{mode}.json").write_text(json.dumps(
                [{k: v for k, v in r.items() if k.startswith(("train_", "valid_"))} for r in fitted.history]))
    elif mode == "metrics":  # ln.metrics on their own: each rank updates its slice, compute() sees them all
        import torch.distributed as dist

        dist.init_process_group("gloo")
        pred, target, scores, labels = metric_data()
        world = dist.get_world_size()
        lo, hi = (0, 0) if rank == 1 else (rank * 40, rank * 40 + 40 + 7 * rank)  # rank 1 has no samples
        values = {}
        for name, metric, p, t in metric_cases(pred, target, scores, labels):
            if hi > lo:
                metric.update(p[lo:hi], t[lo:hi])
            values[name] = metric.compute().tolist()
        (out / f"metrics_{rank}.json").write_text(json.dumps({"values": values, "world": world, "n": hi - lo}))
        dist.destroy_process_group()
    elif mode == "accumulate":  # 801 samples: shards of 401 and 400, 17 and 16 batches of 25
        counter = CountGradAllReduce(force_sync=os.environ.get("FORCE_SYNC") == "1")
        fitted = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_opt_hparams(lr=0.05).fit(
            (x[:801], y[:801]), epochs=2, seed=1, verbose=False, dataloader_options={"batch_size": 25},
            callbacks=[ln.callbacks.GradientAccumulation(2), counter])
        tag = "forced" if counter.force_sync else "deferred"
        (out / f"allreduce_{tag}_{rank}.json").write_text(json.dumps(counter.per_epoch))
        if rank == 0:
            save_file(dict(fitted.model.state_dict()), str(out / f"weights_{tag}.safetensors"))
    elif mode == "split":  # valid_data=0.2 without seed=: every rank must hold out the same samples
        rec = RecordShards()
        torch.manual_seed(100 + rank)  # ranks' global RNGs differ, as in any script that draws before fit
        fitted = setup.fit((x, y), valid_data=0.2, epochs=2, callbacks=[rec], verbose=False,
                           dataloader_options={"batch_size": 50})
        parts = {name: getattr(src, "source", src).leaves[0][:, 3].long().tolist()  # the whole part as this rank
                 for name, src in (("train", fitted.context.train_data), ("valid", fitted.context.valid_data))}
        # split it (unsharded; training data is wrapped in EvenBatches)
        (out / f"split_{rank}.json").write_text(json.dumps({**parts, "seen": rec.seen}))
    elif mode == "raise":
        setup.fit(train, epochs=3, seed=1, callbacks=[RaiseOnRank1()], verbose=False)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
