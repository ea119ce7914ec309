"""lanterna: declarative, correct and fast training for PyTorch models.

>>> import lanterna as ln
>>> from torch import nn
>>> setup = ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
"""

from . import callbacks, metrics
from .api import Setup, seed_everything, setup
from .core.accelerator import Accelerator
from .core.callback import Callback
from .core.context import Context
from .core.events import StopTraining
from .errors import (
    CallbackError,
    CheckpointError,
    DataError,
    LanternaError,
    ModelCallError,
    MonitorError,
    NonFiniteLossError,
    ShapeMismatchError,
    TargetDtypeError,
)
from .results import Evaluation, Fitted

__version__ = "0.1.0"

__all__ = [
    "Accelerator",
    "Callback",
    "CallbackError",
    "CheckpointError",
    "Context",
    "DataError",
    "Evaluation",
    "Fitted",
    "LanternaError",
    "ModelCallError",
    "MonitorError",
    "NonFiniteLossError",
    "Setup",
    "ShapeMismatchError",
    "StopTraining",
    "TargetDtypeError",
    "callbacks",
    "metrics",
    "seed_everything",
    "setup",
]
