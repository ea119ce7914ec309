"""lanterna: declarative, correct and fast training for PyTorch models.

>>> import lanterna as ln
>>> from torch import nn
>>> setup = ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
"""

from . import callbacks, metrics, tuning
from ._version import __version__
from .api import Setup, seed_everything, setup
from .core.accelerator import Accelerator
from .core.callback import Callback
from .core.context import Context
from .core.events import StopTraining
from .errors import (
    ArtifactError,
    CallbackError,
    CheckpointError,
    CheckpointVersionError,
    DamagedArtifactError,
    DamagedCheckpointError,
    DataError,
    ExportError,
    LanternaError,
    MetricError,
    ModelCallError,
    ModelMismatchError,
    MonitorError,
    NonFiniteLossError,
    ShapeMismatchError,
    TargetDtypeError,
)
from .loading import load_fitted as load
from .params import param_groups, with_init, with_param_groups
from .results import Evaluation, Fitted
from .summary import summary
from .tuning import lr_finder, tune

__all__ = [
    "__version__",
    "Accelerator",
    "ArtifactError",
    "Callback",
    "CallbackError",
    "CheckpointError",
    "CheckpointVersionError",
    "Context",
    "DamagedArtifactError",
    "DamagedCheckpointError",
    "DataError",
    "Evaluation",
    "ExportError",
    "Fitted",
    "LanternaError",
    "MetricError",
    "ModelCallError",
    "ModelMismatchError",
    "MonitorError",
    "NonFiniteLossError",
    "Setup",
    "ShapeMismatchError",
    "StopTraining",
    "TargetDtypeError",
    "callbacks",
    "load",
    "lr_finder",
    "metrics",
    "param_groups",
    "seed_everything",
    "setup",
    "summary",
    "tune",
    "tuning",
    "with_init",
    "with_param_groups",
]
