"""Metrics exact over the epoch (``update`` / ``compute`` / ``reset``), and any torchmetrics Metric.

>>> import lanterna as ln
>>> metrics = [ln.metrics.MAE(), ln.metrics.RMSE()]
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
