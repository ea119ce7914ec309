"""skorch: ``NeuralNetRegressor`` / ``NeuralNetClassifier`` with the validation set as a predefined split,
training shuffled every epoch and the metric scored on train and valid with ``EpochScoring``."""

from __future__ import annotations

from typing import Any

import numpy as np
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import EpochScoring
from skorch.dataset import Dataset as SkDataset
from skorch.helper import predefined_split
from torch.utils.data import Dataset
from workloads import Workload, seeded_model


class _Split(Dataset):
    """skorch wants (X, y) for fit: a Dataset that yields the wrapped one's samples as is."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.ds[i]


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    if w.dataset:
        train_ds, valid_ds = data
        fit_x: Any = _Split(train_ds)
        fit_y: Any = None
        valid: Any = _Split(valid_ds)
    else:
        xt, yt, xv, yv = data
        fit_x, fit_y = xt, yt
        valid = SkDataset(xv, yv)
    regression = w.task == "regression"
    if regression:
        scoring, lower = "neg_mean_absolute_error", False
    else:
        scoring, lower = "accuracy", False
    callbacks = []
    if w.validate:
        callbacks = [EpochScoring(scoring, lower_is_better=lower, on_train=True, name="train_metric"),
                     EpochScoring(scoring, lower_is_better=lower, name="valid_metric")]
    cls = NeuralNetRegressor if regression else NeuralNetClassifier
    net = cls(
        seeded_model(w),
        criterion=type(w.loss_fn()),
        optimizer=w.optimizer_cls,
        **{f"optimizer__{k}": v for k, v in w.opt_kwargs.items() if k != "lr"},
        lr=w.lr,
        max_epochs=w.epochs,
        batch_size=w.batch_size,
        iterator_train__shuffle=True,
        train_split=predefined_split(valid) if w.validate else None,
        callbacks=callbacks,
        verbose=0,
    )
    if not regression:
        net.set_params(classes=np.arange(10))
    net.fit(fit_x, fit_y)
    last = net.history[-1]
    out = {"train_loss": float(last["train_loss"])}
    if w.validate:
        sign = -1.0 if regression else 1.0
        out.update(train_metric=sign * last["train_metric"], valid_loss=float(last["valid_loss"]),
                   valid_metric=sign * last["valid_metric"])
    return out

