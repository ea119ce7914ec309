"""The loop as seeds 001 and 004 write it: DataLoader, ``loss.item()`` every batch, a torchmetrics
streaming metric updated every batch, ``optimizer.zero_grad()`` (set_to_none, torch's default)."""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch.utils.data import DataLoader
from workloads import Workload, datasets, seeded_model


def _metric(w: Workload) -> torchmetrics.Metric:
    if w.metric == "mae":
        return torchmetrics.MeanAbsoluteError()
    return torchmetrics.Accuracy(task="multiclass", num_classes=10)


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    train_ds, valid_ds = datasets(w, data)
    model = seeded_model(w)
    optimizer = w.make_optimizer(model.parameters())
    loss_fn = w.loss_fn()
    train_loader = DataLoader(train_ds, batch_size=w.batch_size, shuffle=True)
    valid_loader = DataLoader(valid_ds, batch_size=w.batch_size)
    train_metric, valid_metric = _metric(w), _metric(w)
    out: dict[str, float] = {}
    for _ in range(w.epochs):
        model.train()
        total_loss = 0.0
        train_metric.reset()
        for x_batch, y_batch in train_loader:
            y_pred = model(x_batch)
            loss = loss_fn(y_pred, y_batch)
            total_loss += loss.item() * len(x_batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if w.validate:
                train_metric.update(y_pred.detach(), y_batch)
        out = {"train_loss": total_loss / len(train_ds)}
        if not w.validate:
            continue
        out["train_metric"] = train_metric.compute().item()
        model.eval()
        valid_metric.reset()
        total_vloss = 0.0
        with torch.no_grad():
            for x_batch, y_batch in valid_loader:
                y_pred = model(x_batch)
                total_vloss += loss_fn(y_pred, y_batch).item() * len(x_batch)
                valid_metric.update(y_pred, y_batch)
        out.update(valid_loss=total_vloss / len(valid_ds), valid_metric=valid_metric.compute().item())
    return out
