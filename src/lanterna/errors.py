"""Exceptions raised by lanterna. Every message names the problem and the fix."""

from __future__ import annotations

from typing import Any

__all__ = ["LanternaError", "DataError", "ShapeMismatchError", "TargetDtypeError", "ModelCallError",
           "NonFiniteLossError", "CallbackError", "MonitorError", "CheckpointError", "DamagedCheckpointError",
           "CheckpointVersionError", "ArtifactError", "ModelMismatchError", "ExportError", "MetricError",
           "DamagedArtifactError"]


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
    """The loss or a gradient became NaN or Inf; training stopped before that optimizer step.

    ``.fitted`` is the ``ln.Fitted`` at the last good step (model and history so far) when the error comes out
    of ``fit``, so the run is not lost: ``except NonFiniteLossError as e: e.fitted.save(...)``.
    """

    fitted: Any = None


class CallbackError(LanternaError, RuntimeError):
    """A callback raised; the message names the callback and the hook."""


class MonitorError(LanternaError, ValueError):
    """A monitored quantity does not exist or cannot be compared."""


class CheckpointError(LanternaError, RuntimeError):
    """A checkpoint is missing, damaged or incompatible."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file is truncated, corrupt, empty or has no integrity record (checksum)."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint was written in a format this version of lanterna cannot read."""


class ArtifactError(LanternaError, ValueError):
    """A file is not a lanterna artifact, or its metadata is unsafe (a pickle, a non-module callable)."""


class ModelMismatchError(LanternaError, ValueError):
    """Saved weights do not fit the module: missing, unexpected or differently shaped entries."""


class ExportError(LanternaError, RuntimeError):
    """A model could not be exported, or the exported model does not reproduce the original's outputs."""


class DamagedArtifactError(ArtifactError):
    """A saved model's file is damaged: truncated, zero-filled, bit-flipped (its SHA-256 checksum fails) or
    unparsable. The message names the file."""


class MetricError(LanternaError, TypeError):
    """A metric that lanterna cannot use (not a metric object, or one that failed on a batch)."""
