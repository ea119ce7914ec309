"""A user script run unchanged with `python` or `torchrun` (tests/distributed/test_ddp.py starts it).

Usage: ddp_worker.py MODE OUT_DIR   (MODE: fit | parity | resume | uninterrupted | raise)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

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
    elif mode == "raise":
        setup.fit(train, epochs=3, seed=1, callbacks=[RaiseOnRank1()], verbose=False)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
