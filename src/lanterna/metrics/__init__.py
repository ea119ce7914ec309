"""Metrics exact over the epoch (``update`` / ``compute`` / ``reset``), and any torchmetrics Metric.

>>> import lanterna as ln, torch
>>> mae = ln.metrics.MAE()
>>> mae.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))  # batch 1: mean 2
>>> mae.update(torch.tensor([5.0]), torch.tensor([0.0]))            # batch 2: mean 5
>>> float(mae.compute())  # over the 3 samples, not the mean of the batch means (3.5)
3.0
"""

from .base import LanternaMetric, MetricSet, metric_display, metric_key, named, on_output, unique_names
from .classification import Accuracy, BinaryAccuracy, BinaryAccuracyWithLogits, BinaryAUROC, MulticlassAUROC
from .regression import MAE, MSE, RMSE

__all__ = [
    "MAE",
    "MSE",
    "RMSE",
    "Accuracy",
    "BinaryAccuracy",
    "BinaryAccuracyWithLogits",
    "BinaryAUROC",
    "MulticlassAUROC",
    "LanternaMetric",
    "MetricSet",
    "metric_display",
    "metric_key",
    "named",
    "on_output",
    "unique_names",
]
