"""Built-in callbacks (API.md §6)."""

from ..core.callback import Callback
from .metrics import MetricsCallback
from .nan import TerminateOnNaN
from .progress import LiveProgress, ProgressPrinter

__all__ = ["Callback", "LiveProgress", "MetricsCallback", "ProgressPrinter", "TerminateOnNaN"]
