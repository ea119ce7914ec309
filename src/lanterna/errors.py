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


class UnexpectedArgumentError(LanternaError, TypeError):
    """A keyword ``fit`` does not take, often one of another library (``batch_size=``, ``epoch=``, ``lr=``); the
    message names the lanterna argument to use instead.

    Args:
        method: the call, e.g. ``"fit"``.
        names: the keywords it does not take (a mapping of them to their values, or their names).
        valid: the function called (its keyword parameters are listed, a near miss suggested), or their names.

    >>> from lanterna.errors import UnexpectedArgumentError
    >>> print(UnexpectedArgumentError("fit", {"batch_size": 64}, ["data", "epochs"]))  # doctest: +ELLIPSIS
    fit() got an unexpected keyword argument 'batch_size': pass dataloader_options={"batch_size": 64} ...
    """

    _HINTS: dict[str, str] = {
        "batch_size": 'pass dataloader_options={{"batch_size": {v}}} (the batch size of the loader lanterna builds; '
                      "a DataLoader you pass keeps its own)",
        "shuffle": 'pass dataloader_options={{"shuffle": {v}}}',
        "num_workers": 'pass dataloader_options={{"num_workers": {v}}}',
        "epoch": "use epochs= (an int, or (min_epochs, max_epochs))",
        "max_epochs": "use epochs= (an int, or (min_epochs, max_epochs))",
        "n_epochs": "use epochs= (an int, or (min_epochs, max_epochs))",
        "num_epochs": "use epochs= (an int, or (min_epochs, max_epochs))",
        "validation_data": "use valid_data= (data, or a fraction of data to hold out, e.g. valid_data=0.2)",
        "val_data": "use valid_data= (data, or a fraction of data to hold out, e.g. valid_data=0.2)",
        "validation_split": "use valid_data= with a fraction, e.g. valid_data=0.2",
        "lr": "set optimizer options on the setup: ln.setup(...).set_opt_hparams(lr={v})",
        "learning_rate": "set optimizer options on the setup: ln.setup(...).set_opt_hparams(lr={v})",
        "sample_weights": "use sample_weight=",
        "device": "pass accelerator=ln.Accelerator(device=...)",
        "loss": "give the loss to ln.setup(module, loss=...)",
        "optimizer": "give the optimizer to ln.setup(module, optimizer=...)",
        "metrics": "give the metrics to ln.setup(module, metrics=...)",
    }

    def __init__(self, method: str, names: Any, valid: Any = ()) -> None:
        import difflib
        import inspect

        if callable(valid):
            params = inspect.signature(valid).parameters.values()
            valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        values = dict(names) if isinstance(names, dict) else {}
        names, valid = list(names), [v for v in valid if v != "self"]
        parts = []
        for name in names:
            value = values.get(name)
            shown = repr(value) if isinstance(value, (int, float, bool)) else "..."
            hint = self._HINTS.get(name, "").format(v=shown)
            if not hint:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f"did you mean {close[0]}=" if close else ("it takes " + ", ".join(valid))
            parts.append(f"{method}() got an unexpected keyword argument {name!r}: {hint}.")
        super().__init__(" ".join(parts))
        self.names = names


__all__.append("UnexpectedArgumentError")
