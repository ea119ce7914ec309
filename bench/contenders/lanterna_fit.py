"""lanterna as its users write it: the luz chapter's setup → set_opt_hparams → fit with DataLoaders
(or, for W4, the Dataset itself: lanterna chooses the loader settings)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from workloads import MODEL_SEED, Workload

import lanterna as ln


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    kwargs: dict[str, Any] = {}
    if w.dataset:
        train_ds, valid_ds = data
        train: Any = train_ds
        valid: Any = valid_ds
        kwargs["dataloader_options"] = {"batch_size": w.batch_size}
    else:
        xt, yt, xv, yv = data
        train = DataLoader(TensorDataset(xt, yt), batch_size=w.batch_size, shuffle=True)
        valid = DataLoader(TensorDataset(xv, yv), batch_size=w.batch_size)
    callbacks: list[Any] = []
    if variant == "lanterna-sample-weight":  # in-memory data: the weights travel as one more leaf
        xt, yt, xv, yv = data
        train = (xt, yt)
        kwargs["dataloader_options"] = {"batch_size": w.batch_size}
        kwargs["sample_weight"] = torch.rand(len(xt), generator=torch.Generator().manual_seed(0)) * 2
    elif variant == "lanterna-ema":
        callbacks.append(ln.callbacks.EMA())
    if variant == "lanterna-bf16":
        kwargs["accelerator"] = ln.Accelerator(precision="bf16-mixed")
    elif variant == "lanterna-compile":
        kwargs["accelerator"] = ln.Accelerator(compile=True)
    # compile=True: one extra first epoch compiles (and recompiles for the short last batches and eval
    # mode); the time reported is that of the workload's epochs after it, the first epoch's apart.
    warmup = 1 if variant == "lanterna-compile" else 0
    metric = ln.metrics.MAE() if w.metric == "mae" else ln.metrics.Accuracy()
    fitted = (
        ln.setup(w.make_model, loss=w.loss_fn(), optimizer=w.optimizer_cls,
                 metrics=[metric] if w.validate else None)
        .set_opt_hparams(**w.opt_kwargs)
        .fit(train, epochs=w.epochs + warmup, valid_data=valid if w.validate else None, verbose=False,
             seed=MODEL_SEED, callbacks=callbacks, **kwargs)
    )
    last = fitted.history[-1]
    out = {"train_loss": last["train_loss"]}
    if warmup:
        out["timed_seconds"] = sum(h["epoch_time"] for h in fitted.history[warmup:])
        out["warmup_seconds"] = sum(h["epoch_time"] for h in fitted.history[:warmup])
    if w.validate:
        out.update(train_metric=last[f"train_{w.metric}"], valid_loss=last["valid_loss"],
                   valid_metric=last[f"valid_{w.metric}"])
    return out

