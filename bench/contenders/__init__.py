"""One module per contender; each has ``run(workload) -> dict`` with the final epoch's numbers:
``train_loss``, ``train_metric``, ``valid_loss``, ``valid_metric`` (metric = MAE or accuracy)."""

from __future__ import annotations

import importlib
from types import ModuleType

#: contender name -> module under bench/contenders (imported only in the worker process that runs it)
CONTENDERS: dict[str, str] = {
    "ideal": "ideal_loop",
    "lanterna": "lanterna_fit",
    "seed-loop": "seed_loop",
    "lightning": "lightning_trainer",
    "lightning-defaults": "lightning_trainer",
    "keras": "keras_fit",
    "poutyne": "poutyne_model",
    "skorch": "skorch_net",
    "ignite": "ignite_engine",
    "lanterna-bf16": "lanterna_fit",
    "lanterna-compile": "lanterna_fit",
    "lanterna-sample-weight": "lanterna_fit",
    "lanterna-ema": "lanterna_fit",
}

DESCRIPTIONS: dict[str, str] = {
    "ideal": "hand-written loop: pre-sliced in-memory batches (index_select of a permutation), loss and metric "
             "sums kept on the device, one host read per epoch, zero_grad(set_to_none=True); for W4 a tuned "
             "DataLoader (workers)",
    "lanterna": "ln.setup(...).fit(train_dl, valid_data=valid_dl) with the defaults (TerminateOnNaN on, "
                "exact metrics), verbose=False",
    "seed-loop": "the loop of seeds 001/004: DataLoader, loss.item() every batch, torchmetrics update every batch",
    "lightning": "LightningModule + Trainer, lean settings (no logger, checkpointing, progress bar or summary), "
                 "torchmetrics logged on_epoch",
    "lightning-defaults": "the same with Trainer defaults (logger, checkpointing, progress bar, summary)",
    "keras": "Keras 3 on the torch backend, the same layers and initial weights, model.fit(validation_data=...)",
    "poutyne": "poutyne.Model(...).fit(x, y, validation_data=...), batch metric",
    "skorch": "skorch NeuralNetRegressor/Classifier with a predefined validation split and EpochScoring",
    "ignite": "ignite create_supervised_trainer/evaluator with metrics attached to both",
    "lanterna-bf16": "lanterna with Accelerator(precision='bf16-mixed')",
    "lanterna-compile": "lanterna with Accelerator(compile=True): one extra first epoch compiles (its time is "
                        "reported apart), the time is that of the workload's epochs after it",
    "lanterna-sample-weight": "lanterna with fit(sample_weight=w): per-sample losses and weighted metrics "
                              "(w uniform in [0, 2), in-memory data)",
    "lanterna-ema": "lanterna with callbacks=[ln.callbacks.EMA()] (validated with the averaged weights)",
}


def load(name: str) -> ModuleType:
    """The module of contender ``name``."""
    if name not in CONTENDERS:
        raise SystemExit(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")
    return importlib.import_module(f"contenders.{CONTENDERS[name]}")
