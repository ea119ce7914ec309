"""Lightning: a LightningModule around the workload's model, torchmetrics logged on_epoch, a Trainer.

``lightning``: the lean settings a speed-minded user picks (no logger, no checkpointing, no progress bar,
no model summary). ``lightning-defaults``: ``Trainer(max_epochs=...)`` as the docs first show it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch.utils.data import DataLoader
from workloads import Workload, datasets, seeded_model


def _metric(w: Workload) -> torchmetrics.Metric:
    if w.metric == "mae":
        return torchmetrics.MeanAbsoluteError()
    return torchmetrics.Accuracy(task="multiclass", num_classes=10)


class Module(L.LightningModule):
    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.w = w
        self.model = seeded_model(w)
        self.loss_fn = w.loss_fn()
        self.train_metric, self.valid_metric = _metric(w), _metric(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self(x)
        loss = self.loss_fn(pred, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        if self.w.validate:
            self.train_metric(pred, y)
            self.log("train_metric", self.train_metric, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        pred = self(x)
        self.log("valid_loss", self.loss_fn(pred, y), on_epoch=True, batch_size=len(x))
        self.valid_metric(pred, y)
        self.log("valid_metric", self.valid_metric, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.w.make_optimizer(self.parameters())


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    train_ds, valid_ds = datasets(w, data)
    module = Module(w)
    train = DataLoader(train_ds, batch_size=w.batch_size, shuffle=True)
    valid = DataLoader(valid_ds, batch_size=w.batch_size) if w.validate else None
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "lightning-defaults":
            trainer = L.Trainer(max_epochs=w.epochs, default_root_dir=tmp)
        else:
            trainer = L.Trainer(max_epochs=w.epochs, accelerator="cpu", devices=1, default_root_dir=tmp,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0)
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            trainer.fit(module, train, valid)
        finally:
            os.chdir(cwd)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    out = {"train_loss": m["train_loss"]}
    if w.validate:
        out.update(train_metric=m["train_metric"], valid_loss=m["valid_loss"], valid_metric=m["valid_metric"])
    return out
