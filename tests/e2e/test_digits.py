"""End to end: scikit-learn's digits (8×8 images, 10 classes) from NumPy arrays to > 0.9 validation accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lanterna as ln

datasets = pytest.importorskip("sklearn.datasets")
model_selection = pytest.importorskip("sklearn.model_selection")


class DigitsNet(nn.Module):
    def __init__(self, n_hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, n_hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(n_hidden, 10))

    def forward(self, x):
        return self.net(x)


def test_digits_classifier_reaches_90_percent_validation_accuracy_in_a_few_epochs(capsys):
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float64)  # (1797, 8, 8) float64 → float32 inside lanterna
    y = digits.target  # int64 class indices
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y)

    fitted = (
        ln.setup(DigitsNet, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy(),
                                                                ln.metrics.MulticlassAUROC(num_classes=10)])
        .set_hparams(n_hidden=64)
        .set_opt_hparams(lr=3e-3)
        .fit((x_train, y_train), epochs=8, valid_data=0.2, seed=0)
    )
    out = capsys.readouterr().out
    assert "Epoch 8/8" in out and "Valid metrics: Loss: " in out and " - Acc: " in out and " - AUC: " in out

    last = fitted.history[-1]
    assert last["valid_acc"] > 0.9
    assert last["valid_auroc"] > 0.98
    assert fitted.history[0]["valid_loss"] > last["valid_loss"]

    ev = fitted.evaluate((x_test, y_test))
    scores = fitted.predict(x_test)
    assert scores.shape == (len(x_test), 10)
    accuracy = float((scores.argmax(1) == torch.from_numpy(y_test)).float().mean())
    assert ev["acc"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.9
    df = fitted.metrics_df()
    assert set(df.metric) == {"loss", "acc", "auroc"} and set(df.set) == {"train", "valid"}
