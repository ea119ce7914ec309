"""Keras 3 on the torch backend (KERAS_BACKEND=torch): the same layers as the workload's torch model, with its
initial weights copied in, ``compile`` + ``fit(validation_data=...)``; Keras shuffles the training data every
epoch and computes training and validation metrics."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
from keras import layers  # noqa: E402
from torch import nn  # noqa: E402
from workloads import MODEL_SEED, Workload, seeded_model  # noqa: E402


def _layers(kind: str) -> list[Any]:
    cf = "channels_first"
    if kind == "tiny":
        return [keras.Input((8,)), layers.Dense(1)]
    if kind == "net":
        return [keras.Input((3,)), layers.Dense(32, activation="relu"), layers.Dense(1)]
    if kind == "mlp":
        return [keras.Input((1, 28, 28)), layers.Flatten(), layers.Dense(300, activation="relu"),
                layers.Dense(100, activation="relu"), layers.Dense(10)]
    return [keras.Input((1, 28, 28)), layers.Conv2D(6, 5, activation="relu", data_format=cf),
            layers.MaxPooling2D(2, data_format=cf), layers.Conv2D(16, 5, activation="relu", data_format=cf),
            layers.MaxPooling2D(2, data_format=cf), layers.Flatten(data_format=cf),
            layers.Dense(120, activation="relu"), layers.Dense(84, activation="relu"), layers.Dense(10)]


def _copy_weights(torch_model: nn.Module, model: keras.Model) -> None:
    """Torch (out, in[, kh, kw]) weights → Keras (in, out) kernels / (kh, kw, in, out) filters."""
    params = [m for m in torch_model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    targets = [layer for layer in model.layers if layer.weights]
    assert len(params) == len(targets), (len(params), len(targets))
    for src, dst in zip(params, targets):
        w = src.weight.detach().numpy()
        w = w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)
        dst.set_weights([w, src.bias.detach().numpy()])


def run(w: Workload, data: Any, variant: str) -> dict[str, float]:
    if w.dataset:
        from torch.utils.data import DataLoader

        train_ds, valid_ds = data
        train: Any = DataLoader(train_ds, batch_size=w.batch_size, shuffle=True)
        valid: Any = DataLoader(valid_ds, batch_size=w.batch_size)
        fit_kw: dict[str, Any] = {}
    else:
        xt, yt, xv, yv = (t.numpy() for t in data)
        train, valid = (xt, yt), (xv, yv)
        fit_kw = {"batch_size": w.batch_size, "shuffle": True}
    keras.utils.set_random_seed(MODEL_SEED)
    model = keras.Sequential(_layers(w.model_kind))
    _copy_weights(seeded_model(w), model)
    if w.optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=w.lr, epsilon=1e-8)
    else:
        opt = keras.optimizers.SGD(learning_rate=w.lr, momentum=w.momentum)
    if w.task == "regression":
        loss, metrics = "mse", (["mae"] if w.validate else [])
    else:
        loss, metrics = keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    model.compile(optimizer=opt, loss=loss, metrics=metrics)
    x, y = train if isinstance(train, tuple) else (train, None)
    hist = model.fit(x, y, epochs=w.epochs, validation_data=valid if w.validate else None, verbose=0,
                     **fit_kw).history
    name = metrics[0] if metrics else None
    out = {"train_loss": hist["loss"][-1]}
    if w.validate and name:
        out.update(train_metric=hist[name][-1], valid_loss=hist["val_loss"][-1],
                   valid_metric=hist["val_" + name][-1])
    return out

