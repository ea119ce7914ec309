"""The ideal loop: what a careful engineer writes by hand for in-memory data.

Batches are index_select slices of the tensors (no per-sample work, no collation), the loss and metric sums
stay on the device and are read once per epoch, gradients are dropped with ``set_to_none=True``.
The permutation is drawn exactly as a shuffling DataLoader draws it, so its batches are those of every
DataLoader-based contender. For W4 (a Dataset doing per-sample work) it uses a tuned DataLoader.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from workloads import Workload, seeded_model


def _loader_draw() -> None:
    # Every DataLoader iteration draws its workers' base seed from the global generator.
    torch.empty((), dtype=torch.int64).random_()


def _permutation(n: int) -> Tensor:
    # DataLoader(shuffle=True): the base seed, then RandomSampler seeds a generator of its own.
    _loader_draw()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _hits(pred: Tensor, y: Tensor, metric: str) -> Tensor:
    if metric == "mae":
        return (pred.detach() - y).abs().sum()
    return (pred.detach().argmax(1) == y).sum()


def _tensor_batches(x: Tensor, y: Tensor, bs: int, shuffle: bool):
    n = len(x)
    if shuffle:
        order = _permutation(n)
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            yield x.index_select(0, idx), y.index_select(0, idx)
    else:
        _loader_draw()
        for s in range(0, n, bs):
            yield x[s : s + bs], y[s : s + bs]


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    model = seeded_model(w)
    opt = w.make_optimizer(model.parameters())
    loss_fn = w.loss_fn()
    if w.dataset:
        train_ds, valid_ds = data
        workers = min(8, len(os.sched_getaffinity(0)))  # one per CPU, as tuned on this kind of machine
        train = DataLoader(train_ds, batch_size=w.batch_size, shuffle=True, num_workers=workers)
        valid = DataLoader(valid_ds, batch_size=w.batch_size, num_workers=workers)
        n_train, n_valid = len(train_ds), len(valid_ds)
        train_batches = lambda: iter(train)  # noqa: E731
        valid_batches = lambda: iter(valid)  # noqa: E731
    else:
        xt, yt, xv, yv = data
        n_train, n_valid = len(xt), len(xv)
        train_batches = lambda: _tensor_batches(xt, yt, w.batch_size, True)  # noqa: E731
        valid_batches = lambda: _tensor_batches(xv, yv, w.batch_size, False)  # noqa: E731
    out: dict[str, float] = {}
    for _ in range(w.epochs):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        hit_sum = torch.zeros((), dtype=torch.float64)
        for xb, yb in train_batches():
            pred = model(xb)
            loss = loss_fn(pred, yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum.add_(loss.detach(), alpha=len(xb))
            if w.validate:
                hit_sum.add_(_hits(pred, yb, w.metric))
        tl, tm = torch.stack([loss_sum, hit_sum]).tolist()
        out = {"train_loss": tl / n_train}
        if w.validate:
            out["train_metric"] = tm / n_train
            model.eval()
            loss_sum = torch.zeros((), dtype=torch.float64)
            hit_sum = torch.zeros((), dtype=torch.float64)
            with torch.no_grad():
                for xb, yb in valid_batches():
                    pred = model(xb)
                    loss_sum.add_(loss_fn(pred, yb), alpha=len(xb))
                    hit_sum.add_(_hits(pred, yb, w.metric))
            vl, vm = torch.stack([loss_sum, hit_sum]).tolist()
            out.update(valid_loss=vl / n_valid, valid_metric=vm / n_valid)
    return out
