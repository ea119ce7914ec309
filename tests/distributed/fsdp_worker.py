"""The script the FSDP tests launch under torchrun (gloo, CPU): ``python fsdp_worker.py MODE OUT``."""

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

N = 201  # 101 + 100 samples on two ranks: with batch 25, 5 and 4 batches (rank 1 runs one empty batch)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(torch.relu(self.inp(x))))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 51, 4, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin() + 0.1 * torch.randn(N + 51, 1, generator=g)
    return x, y


class KillRank1Once(ln.Callback):
    """SIGKILL rank 1 at the start of epoch 3 of the first attempt (epoch 2's checkpoint is on disk)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_epoch_begin(self, ctx: ln.Context) -> None:
        if ctx.epoch == 3 and ctx.rank == 1 and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonRank1Shard(ln.Callback):
    """A NaN in rank 1's shard of one gradient at epoch 1, batch 3: only that rank can see it."""

    order = -2000  # before TerminateOnNaN's check

    def on_train_batch_before_step(self, ctx: ln.Context) -> None:
        if ctx.epoch == 1 and ctx.iter == 3 and ctx.rank == 1:
            grad = next(ctx.model.parameters()).grad
            grad.to_local().view(-1)[0] = float("nan")


def run(mode: str, out: Path, strategy: str, *, accumulate: bool = False, precision: str = "32",
        extras: bool = False, ema: bool = False, poison: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    x, y = data()
    train, valid = (x[:N], y[:N]), (x[N:], y[N:])
    units = (Block,) if strategy == "fsdp" else None
    acc = ln.Accelerator(device="cpu", strategy=strategy, fsdp_units=units, precision=precision)
    setup = ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.AdamW, metrics=[ln.metrics.MAE()]).set_opt_hparams(
        lr=0.01)
    callbacks: list[ln.Callback] = [ln.callbacks.GradientClip(max_norm=0.5),
                                    ln.callbacks.LRScheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)]
    if accumulate:
        callbacks.append(ln.callbacks.GradientAccumulation(2))
    if extras:  # a callback that copies the weights and puts the best epoch's back at the end
        callbacks += [ln.callbacks.KeepBestModel()]
    if ema:
        callbacks.append(ln.callbacks.EMA(decay=0.9))
    if poison:
        callbacks.append(PoisonRank1Shard())
    if mode == "resume":  # with a ModelCheckpoint too: its files are sharded folders as well
        callbacks += [ln.callbacks.ModelCheckpoint(out / "best", save_best_only=True),
                      ln.callbacks.AutoResume(out / "resume"), KillRank1Once(out / "killed")]
    fitted = setup.fit(train, valid_data=valid, epochs=4, seed=3, accelerator=acc, callbacks=callbacks,
                       verbose=False, dataloader_options={"batch_size": 25})
    preds = fitted.predict(valid[0])
    evaluation = fitted.evaluate(valid)
    tag = (f"{mode}_{strategy}" + ("_acc" if accumulate else "") + ("_bf16" if precision != "32" else "")
           + ("_extras" if extras else ""))
    fitted.save(out / f"model_{tag}")  # every rank calls it (FSDP gathers the shards)
    steps = [int(s["step"]) for s in fitted.optimizers["opt"].state_dict()["state"].values()]
    (out / f"steps_{tag}_{rank}.json").write_text(json.dumps({"adam_steps": steps, "ctx_step": fitted.context.step}))
    if rank == 0:
        (out / f"result_{tag}.json").write_text(json.dumps(
            {"history": [{k: v for k, v in r.items() if k != "epoch_time"} for r in fitted.history],
             "evaluate": evaluation.metrics, "model_class": type(fitted.model).__name__}))
        save_file({"preds": preds.contiguous()}, str(out / f"preds_{tag}.safetensors"))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    strategy = os.environ.get("STRATEGY", "fsdp")
    run(mode, out, strategy)
    if mode == "fit" and strategy == "fsdp":  # refused clearly, on every rank
        try:
            run(mode, out, strategy, ema=True)
        except ln.LanternaError as e:
            assert "not supported" in str(e) and "strategy='ddp'" in str(e), e
            (out / f"ema_refused_{os.environ['RANK']}.txt").write_text(str(e))
    if mode == "fit" and strategy == "fsdp":  # every rank stops before the step, though one saw the NaN
        try:
            run(mode, out, strategy, poison=True)
        except ln.NonFiniteLossError as e:
            (out / f"nan_{os.environ['RANK']}.txt").write_text(str(e))
    if mode == "fit":  # more fits in the same processes: launching torchrun costs more than these
        run(mode, out, strategy, accumulate=True)
        run(mode, out, strategy, extras=True)
        if strategy == "fsdp":
            run(mode, out, strategy, precision="bf16-mixed")


if __name__ == "__main__":
    main()
