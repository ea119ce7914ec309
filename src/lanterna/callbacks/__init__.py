"""Built-in callbacks (docs/callbacks.md)."""

from typing import Any

from ..core.callback import Callback
from .accumulate import GradientAccumulation
from .auto_resume import AutoResume
from .averaging import EMA, SWA
from .clip import GradientClip
from .csv_logger import CSVLogger
from .debug import FastDevRun, LimitBatches, OverfitBatches
from .early_stopping import EarlyStopping
from .keep_best import KeepBestModel
from .lr_scheduler import LRRecorder, LRScheduler
from .metrics import MetricsCallback
from .mixup import Mixup
from .model_checkpoint import ModelCheckpoint
from .nan import TerminateOnNaN
from .optuna_pruning import OptunaPruning
from .progress import LiveProgress, NotebookProgress, ProgressPrinter
from .warm_start import ResumeFromCheckpoint

__all__ = [
    "AutoResume", "Callback", "CSVLogger", "EarlyStopping", "GradientAccumulation", "GradientClip",
    "KeepBestModel", "LRRecorder", "LRScheduler", "LiveProgress", "MetricsCallback", "ModelCheckpoint",
    "NotebookProgress", "OptunaPruning", "ProgressPrinter", "TensorBoard", "TerminateOnNaN",
    "Mixup", "ResumeFromCheckpoint",
    "FastDevRun", "LimitBatches", "OverfitBatches",
    "EMA", "SWA",
    "MLflowLogger", "WandbLogger",
]


def __getattr__(name: str) -> Any:
    # TensorBoard lives with the integrations (optional dependency); resolved on first use.
    if name == "TensorBoard":
        from ..integrations.tensorboard import TensorBoard

        return TensorBoard
    if name in ("MLflowLogger", "WandbLogger"):  # optional mlflow / wandb, imported when a logger is created
        from ..integrations import trackers

        return getattr(trackers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
