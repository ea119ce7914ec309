"""Exceptions raised by lanterna. Every message names the problem and the fix."""

from __future__ import annotations

__all__ = ["LanternaError", "DataError", "ShapeMismatchError", "TargetDtypeError", "ModelCallError",
           "NonFiniteLossError", "CallbackError", "MonitorError", "CheckpointError"]


class LanternaError(Exception):
    """Base class of lanterna's errors."""


class DataError(LanternaError, ValueError):
    """The data cannot be used as given (empty, unsupported type, bad split ...)."""


class ShapeMismatchError(LanternaError, ValueError):
    """Model output and target shapes differ in a way the loss would silently broadcast."""


class TargetDtypeError(LanternaError, TypeError):
    """The target's dtype cannot be taken by the loss."""


class ModelCallError(LanternaError, TypeError):
    """The model's forward cannot take the batch structure it was given."""


class NonFiniteLossError(LanternaError, FloatingPointError):
    """The loss became NaN or Inf; training stopped before the optimizer step."""


class CallbackError(LanternaError, RuntimeError):
    """A callback raised; the message names the callback and the hook."""


class MonitorError(LanternaError, ValueError):
    """A monitored quantity does not exist or cannot be compared."""


class CheckpointError(LanternaError, RuntimeError):
    """A checkpoint is missing, damaged or incompatible."""
