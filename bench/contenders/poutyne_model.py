"""poutyne: ``Model(network, optimizer, loss, batch_metrics=[...]).fit(x, y, validation_data=...)``; its batch
metrics ("l1" = MAE, "accuracy") are sample-weighted epoch means, like lanterna's."""

from __future__ import annotations

from typing import Any

import poutyne
from workloads import Workload, seeded_model


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    network = seeded_model(w)
    metric = "l1" if w.metric == "mae" else "accuracy"
    model = poutyne.Model(network, w.make_optimizer(network.parameters()), w.loss_fn(),
                          batch_metrics=[metric] if w.validate else [])
    if w.dataset:
        train_ds, valid_ds = data
        logs = model.fit_dataset(train_ds, valid_ds, epochs=w.epochs, batch_size=w.batch_size, verbose=False)
    else:
        xt, yt, xv, yv = data
        logs = model.fit(xt, yt, validation_data=(xv, yv) if w.validate else None, epochs=w.epochs,
                         batch_size=w.batch_size, verbose=False)
    last = logs[-1]
    key = {"l1": "l1", "accuracy": "acc"}[metric]
    out = {"train_loss": last["loss"]}
    if w.validate:
        out.update(train_metric=last[key], valid_loss=last["val_loss"], valid_metric=last["val_" + key])
    if w.metric == "acc" and w.validate:  # poutyne reports accuracy in percent
        out["train_metric"] /= 100
        out["valid_metric"] /= 100
    return out
