"""The saved-model files: :func:`save_fitted` behind ``fitted.save(path)`` and :func:`read_fitted`, the reading
half of ``ln.load`` (docs/saving.md).

Weights go to safetensors, the rest (module import path, hparams, opt_hparams, optimizer, loss and metrics,
history, versions) to JSON, encoded once; the save is atomic as a whole and the weights are checksummed; see
:mod:`lanterna.io.artifact`. Reading never unpickles and never imports a module named in a file. Rebuilding a
``Fitted`` from what is read needs the rest of lanterna, so it is above, in :mod:`lanterna.loading`: this module,
like all of :mod:`lanterna.io`, imports nothing of lanterna but :mod:`lanterna.errors` (and the version string).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError, CheckpointError, CheckpointVersionError, DamagedArtifactError
from .artifact import save_artifact
from .artifact_read import read_artifact, sniff
from .checkpoint import load_checkpoint, verify_checkpoint
from .encoding import decode_json
from .model_meta import describe_module

__all__ = ["save_fitted", "read_fitted"]


# ---------------------------------------------------------------------------- save


def save_fitted(fitted: Any, path: str | os.PathLike[str], *,
                training_state: Mapping[str, Any] | None = None,
                weights: Mapping[str, Any] | None = None) -> Path:
    """Write ``fitted``'s weights (safetensors) and metadata (JSON), atomically as a whole; see
    :meth:`lanterna.Fitted.save`, its only caller. Values that cannot be stored (a function as an hparam ...)
    are recorded by their description and named in a warning; ``ln.load`` then asks for them.

    Args:
        fitted: a :class:`~lanterna.Fitted`, read only through its attributes ``model``, ``setup`` (``module``,
            ``hparams``, ``opt_hparams``, ``optimizer``, ``loss``, ``loss_weights``; or None), ``metrics``,
            ``history``, ``status`` and ``total_time`` (so that this module needs nothing above it).
        path: a folder, or a file name ending in ``.safetensors``.
        training_state: the optimizers', schedulers' and grad scaler's states to keep as well
            (``fitted.save(path, optimizer=True)``: ``Fitted.training_state()``), tensors stored exactly.
        weights: the state dict to write instead of ``fitted.model.state_dict()`` (FSDP: the full model gathered
            from the shards).

    >>> import tempfile, lanterna as ln
    >>> from torch import nn
    >>> from lanterna.io.fitted import read_fitted, save_fitted
    >>> path = save_fitted(ln.Fitted(nn.Linear(3, 1), None, []), tempfile.mkdtemp() + "/model")
    >>> sorted(read_fitted(path)[0])
    ['bias', 'weight']
    """
    from .._version import __version__

    setup = fitted.setup
    meta: dict[str, Any] = {
        **describe_module(setup, fitted.model),  # the description a checkpoint's "meta" holds too
        "loss": setup.loss if setup is not None else None,
        "loss_weights": setup.loss_weights if setup is not None else None,
        "metrics": list(fitted.metrics),
        "history": fitted.history,
        "status": fitted.status,
        "total_time": float(fitted.total_time),
        "versions": {"lanterna": __version__, "torch": torch.__version__,
                     "python": ".".join(map(str, sys.version_info[:3]))},
    }
    if training_state is not None:
        meta["training_state"] = dict(training_state)
    unsaved: list[str] = []
    state = fitted.model.state_dict() if weights is None else weights
    out = save_artifact(path, state, meta, unsaved=unsaved)
    needed = [u for u in unsaved if u.startswith(("hparams", "opt_hparams", "training_state"))]
    if needed:
        warnings.warn(
            "fitted.save: " + "; ".join(needed) + " cannot be stored (only plain values, tuples, tensors, dtypes, "
            "nn.Module classes and parameterless module instances are); they are recorded by description. "
            "ln.load(path) will ask for them: pass module= a built instance, or a factory that supplies them.",
            stacklevel=3,
        )
    return out


# ---------------------------------------------------------------------------- load


def read_fitted(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a saved model or of a lanterna checkpoint (torch's weights-only loader),
    checksums verified and the metadata's entries of their types; :func:`lanterna.load` rebuilds the model.

    Args:
        path: the folder or ``.safetensors`` file ``fitted.save`` wrote, or a lanterna checkpoint.
    """
    path = Path(path)
    state_dict, meta = _read_any(path)
    _check_meta(meta, path)
    return state_dict, meta


def _read_any(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of a saved model or of a lanterna checkpoint (weights-only loader)."""
    if path.is_file() and sniff(path) == "zip":
        try:
            state = load_checkpoint(path, verify=False)
        except CheckpointVersionError:
            raise
        except CheckpointError as e:
            raise ArtifactError(
                f"{str(path)!r} is a torch.save archive but not a readable lanterna checkpoint ({e}). It was read "
                "only by torch's weights-only loader, which runs no code. Load plain weights with "
                "torch.load(path, weights_only=True) and model.load_state_dict()."
            ) from None
        verify_checkpoint(state, path)  # a lanterna checkpoint that fails its checksum: DamagedCheckpointError
        ckpt_meta = decode_json(state.get("meta") or {})
        meta = {"module": ckpt_meta.get("module"), "module_kind": ckpt_meta.get("module_kind", "class"),
                "factory": ckpt_meta.get("factory"), "hparams": ckpt_meta.get("hparams"),
                "opt_hparams": ckpt_meta.get("opt_hparams"), "history": state.get("history") or [],
                "status": "checkpoint", "loss": None, "metrics": []}
        return dict(state["model"]), meta
    return read_artifact(path)


_META_TYPES: dict[str, Any] = {"module": str, "module_kind": str, "hparams": dict, "opt_hparams": dict,
                               "history": list, "metrics": list, "status": str, "total_time": (int, float),
                               "training_state": dict}


def _check_meta(meta: Mapping[str, Any], path: Path) -> None:
    """The metadata's entries have their types (an edited or damaged lanterna.json is a typed error)."""
    bad = [f"{key!r} is a {type(meta[key]).__name__}" for key, kind in _META_TYPES.items()
           if meta.get(key) is not None and not isinstance(meta[key], kind)]
    if isinstance(meta.get("history"), list) and not all(isinstance(r, dict) for r in meta["history"]):
        bad.append("'history' holds entries that are not per-epoch records (objects)")
    if bad:
        raise DamagedArtifactError(f"The metadata of {str(path)!r} is damaged or was badly edited: "
                                   + "; ".join(bad) + ". Save the model again.")
