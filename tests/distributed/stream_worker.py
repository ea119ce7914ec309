"""A user script for tests/distributed/test_streams.py, run with torchrun (2 ranks, gloo): streams read by 2 ranks x
2 DataLoader workers, and memory-mapped arrays sharded like tensors.

Usage: stream_worker.py OUT_DIR   (OUT_DIR holds x.npy and y.npy, written by the test)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import IterableDataset

import lanterna as ln

N_TRAIN, N_VALID = 201, 61  # shards of 4 (2 ranks x 2 workers): 51 50 50 50 and 16 15 15 15 samples
BATCH, WORKERS = 10, 2  # rank 0: 6 + 5 batches per epoch, rank 1: 5 + 5 (uneven)


def stream_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column 0 of x is the sample's index in the stream (the model ignores it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.randn(n, 2, generator=g)], dim=1)
    y = x[:, 1:2] * 0.7 - x[:, 2:3] * 0.2 + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


class Stream(IterableDataset):
    """(x_i, y_i) in order, x with the epoch the dataset was told appended; sized or not."""

    def __init__(self, n: int, seed: int, sized: bool) -> None:
        self.x, self.y = stream_data(n, seed)
        self.sized, self.epoch = sized, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for xi, yi in zip(self.x, self.y):
            yield torch.cat([xi, torch.tensor([float(self.epoch)])]), yi

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("a stream of unknown length")
        return len(self.x)


class Model(nn.Module):
    def __init__(self, d_in: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, 1:3])


class Record(ln.Callback):
    """Each epoch's stream indices per set, the epochs the dataset said it was told, and the batch counts."""

    def __init__(self) -> None:
        self.seen: dict[str, list] = {}

    def _add(self, ctx: ln.Context, name: str) -> None:
        if ctx.batch_size:  # an empty batch keeps this rank in step with the other: no sample
            self.seen.setdefault(f"{name}_{ctx.epoch}", []).extend(ctx.input[:, 0].long().tolist())
            self.seen.setdefault(f"{name}_epochs_{ctx.epoch}", []).extend(ctx.input[:, 3].long().tolist())
        self.seen.setdefault(f"{name}_batches_{ctx.epoch}", [0])[0] += 1

    def on_train_batch_begin(self, ctx: ln.Context) -> None:
        self._add(ctx, "train")

    def on_valid_batch_begin(self, ctx: ln.Context) -> None:
        self._add(ctx, "valid")


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    opts = {"batch_size": BATCH, "num_workers": WORKERS, "persistent_workers": True}  # workers started once per loader
    rec = Record()
    setup = ln.setup(Model, loss=nn.MSELoss(), optimizer=torch.optim.SGD, metrics=[ln.metrics.MAE()])
    fitted = setup.set_opt_hparams(lr=0.05).fit(
        Stream(N_TRAIN, 1, sized=True), valid_data=Stream(N_VALID, 2, sized=False), epochs=2, seed=1,
        callbacks=[rec], dataloader_options=opts, verbose=False)
    evaluation = fitted.evaluate(Stream(N_VALID, 2, sized=False), dataloader_options=opts)
    preds = fitted.predict(Stream(N_VALID, 2, sized=False), dataloader_options=opts)
    result = {"history": fitted.history, "evaluate": evaluation.metrics, "seen": rec.seen}

    # memory-mapped arrays: sharded like tensors, the same weights and predictions as the tensors under torchrun
    xm, ym = np.load(out / "x.npy", mmap_mode="r"), np.load(out / "y.npy", mmap_mode="r")
    mem = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=4, out_features=1)
    on_map = mem.fit((xm, ym), epochs=2, seed=3, valid_data=0.25, verbose=False, dataloader_options={"batch_size": 16})
    on_tensor = mem.fit((torch.from_numpy(np.array(xm)).float(), torch.from_numpy(np.array(ym)).float()), epochs=2,
                        seed=3, valid_data=0.25, verbose=False, dataloader_options={"batch_size": 16})
    result["memmap_same_weights"] = all(torch.equal(p, q) for p, q in zip(on_map.model.state_dict().values(),
                                                                          on_tensor.model.state_dict().values()))
    result["memmap_same_history"] = ([{k: v for k, v in h.items() if k != "epoch_time"} for h in on_map.history]
                                     == [{k: v for k, v in h.items() if k != "epoch_time"} for h in on_tensor.history])
    map_preds = on_map.predict(xm)
    result["memmap_same_predictions"] = torch.equal(map_preds, on_tensor.predict(np.array(xm)))

    (out / f"result_{rank}.json").write_text(json.dumps(result))
    save_file({"preds": preds.contiguous(), "map_preds": map_preds.contiguous()},
              str(out / f"preds_{rank}.safetensors"))
    if rank == 0:
        save_file(dict(fitted.model.state_dict()), str(out / "weights.safetensors"))
        save_file(dict(on_map.model.state_dict()), str(out / "map_weights.safetensors"))


if __name__ == "__main__":
    main()
