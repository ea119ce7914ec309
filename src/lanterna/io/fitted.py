"""``fitted.save(path)`` and ``ln.load(path, module=None)`` (API.md §7).

The only module of :mod:`lanterna.io` that reaches up to the rest of the package: it builds a ``Fitted``
(imported inside the functions, so ``io`` stays importable on its own). Weights go to safetensors, the
rest (module import path, hparams, opt_hparams, loss and metric classes, history, versions) to JSON; see
:mod:`lanterna.io.artifact`. Loading never unpickles and builds only ``nn.Module`` subclasses.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ArtifactError, CheckpointError, CheckpointVersionError, LanternaError
from .artifact import (
    decode_json,
    encode_json,
    import_path,
    load_weights_strict,
    read_artifact,
    resolve_module_class,
    save_artifact,
    sniff,
)
from .checkpoint import load_checkpoint, verify_checkpoint

if TYPE_CHECKING:
    from ..results import Fitted

__all__ = ["save_fitted", "load_fitted"]


# ---------------------------------------------------------------------------- describing objects


def _describe(obj: Any) -> dict[str, Any] | None:
    """An ``nn.Module`` instance (a loss, a torchmetrics metric) as ``{"class", "kwargs"}``: its class path and
    the attributes that match its constructor's parameters. None when it cannot be described."""
    if not isinstance(obj, nn.Module):
        return None
    path = import_path(type(obj))
    if path is None:
        return None
    try:
        params = inspect.signature(type(obj).__init__).parameters
    except (TypeError, ValueError):
        return None
    kwargs: dict[str, Any] = {}
    for name in params:
        if name == "self" or not hasattr(obj, name):
            continue
        try:
            kwargs[name] = encode_json(getattr(obj, name), name)
        except ValueError:
            return None  # a constructor argument that cannot be stored: rebuilding would not be faithful
    out: dict[str, Any] = {"class": path, "kwargs": kwargs}
    label = getattr(obj, "_lanterna_name", None)
    if isinstance(label, str):
        out["name"] = label
    return out


def _rebuild(desc: Any, what: str) -> Any:
    """Build what :func:`_describe` described, only when its class is an ``nn.Module`` subclass."""
    cls = resolve_module_class(desc["class"])
    kwargs = decode_json(desc.get("kwargs") or {})
    try:
        obj = cls(**kwargs)
    except Exception as e:
        raise ArtifactError(f"the {what} {cls.__name__}(**{kwargs}) could not be built: {e}") from None
    if desc.get("name"):
        obj._lanterna_name = desc["name"]
    return obj


def _loss_meta(loss: Any, weights: Any) -> dict[str, Any] | None:
    if loss is None:
        return {"kind": "own"}
    if isinstance(loss, Mapping):
        items = {k: _describe(v) for k, v in loss.items()}
        if all(items.values()):
            return {"kind": "dict", "items": items, "weights": _json_or_none(weights)}
        return None
    if isinstance(loss, Sequence) and not isinstance(loss, str):
        described = [_describe(v) for v in loss]
        if all(described):
            return {"kind": "list", "items": described, "weights": _json_or_none(weights)}
        return None
    desc = _describe(loss)
    return {"kind": "module", **desc} if desc else None


def _json_or_none(value: Any) -> Any:
    try:
        return encode_json(value)
    except ValueError:
        return None


def _rebuild_loss(meta: Any) -> tuple[Any, Any, bool]:
    """``(loss, loss_weights, known)``."""
    if not meta:
        return None, None, False
    kind = meta.get("kind")
    if kind == "own":
        return None, None, True
    if kind == "module":
        return _rebuild(meta, "loss"), None, True
    weights = decode_json(meta.get("weights"))
    if kind == "list":
        return [_rebuild(d, "loss") for d in meta["items"]], weights, True
    if kind == "dict":
        return {k: _rebuild(d, "loss") for k, d in meta["items"].items()}, weights, True
    return None, None, False


# ---------------------------------------------------------------------------- save


def save_fitted(fitted: Fitted, path: str | os.PathLike[str]) -> Path:
    """Write ``fitted``'s weights (safetensors) and metadata (JSON); see :meth:`lanterna.Fitted.save`."""
    from .. import __version__

    setup = fitted.setup
    spec = setup.module if setup is not None else type(fitted.model)
    model_cls = type(fitted.model)
    if inspect.isclass(spec) and issubclass(spec, nn.Module):
        kind, module_path = "class", import_path(spec)
    elif isinstance(spec, nn.Module):
        kind, module_path = "instance", import_path(type(spec))
    else:
        kind, module_path = "factory", import_path(model_cls)
    hparams_raw = dict(setup.hparams) if setup is not None else {}
    try:
        hparams = encode_json(hparams_raw, "hparams")
    except ValueError as e:
        hparams = None
        warnings.warn(f"fitted.save: the hparams cannot be stored as JSON ({e}); ln.load will need module= "
                      "(a module instance, or a factory).", stacklevel=3)
    meta: dict[str, Any] = {
        "module": module_path,
        "module_kind": kind,
        "factory": import_path(spec) if kind == "factory" else None,
        "hparams": hparams,
        "opt_hparams": _json_or_none(dict(setup.opt_hparams) if setup is not None else {}),
        "optimizer": import_path(setup.optimizer) if setup is not None and setup.optimizer is not None else None,
        "loss": _loss_meta(setup.loss, setup.loss_weights) if setup is not None else None,
        "metrics": [d for d in (_describe(m) for m in fitted.metrics) if d],
        "history": _json_or_none(fitted.history) or [],
        "status": fitted.status,
        "total_time": float(fitted.total_time),
        "versions": {"lanterna": __version__, "torch": torch.__version__,
                     "python": ".".join(map(str, sys.version_info[:3]))},
    }
    return save_artifact(path, fitted.model.state_dict(), meta)


# ---------------------------------------------------------------------------- load


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
        meta = {"module": ckpt_meta.get("module"), "module_kind": "class", "hparams": ckpt_meta.get("hparams"),
                "opt_hparams": ckpt_meta.get("opt_hparams"), "history": state.get("history") or [],
                "status": "checkpoint", "loss": None, "metrics": []}
        return dict(state["model"]), meta
    return read_artifact(path)


def _build_module(module: Any, meta: Mapping[str, Any]) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, setup module spec, hparams)``."""
    hparams = meta.get("hparams")
    if isinstance(module, nn.Module):
        return module, module, {}
    if module is not None:
        if not callable(module):
            raise ArtifactError(f"module= must be an nn.Module subclass, a factory or an instance; got {module!r}.")
        spec = module
    else:
        recorded = meta.get("module")
        if meta.get("module_kind") == "factory":
            raise ArtifactError(
                f"The model was built by the factory {meta.get('factory') or '(unknown)'}; ln.load calls only "
                "nn.Module subclasses named in metadata. Pass module=<the factory> (or a module instance)."
            )
        if not recorded:
            raise ArtifactError("The metadata does not name an importable model class (it was defined inside a "
                                "function or in an interactive session); pass module=YourModule to ln.load.")
        spec = resolve_module_class(recorded)
    if hparams is None:
        raise ArtifactError("The hparams were not stored (not JSON); pass module= as a built instance or a "
                            "factory taking no arguments.")
    name = getattr(spec, "__name__", repr(spec))
    try:
        model = spec(**hparams)
    except TypeError as e:
        raise ArtifactError(f"Could not build {name}(**{hparams}): {e}. Pass module= (a class, factory or "
                            "instance) that builds the saved architecture.") from None
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"module={name} returned a {type(model).__name__}, not an nn.Module.")
    return model, spec, dict(hparams)


def load_fitted(
    path: str | os.PathLike[str],
    module: Any = None,
    *,
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    accelerator: Any = None,
) -> Fitted:
    """Rebuild a :class:`~lanterna.Fitted` from ``fitted.save(path)`` (or from a lanterna checkpoint file).

    The module comes from ``module`` (a class built with the saved hparams, a factory, or an instance used
    as is) or else from the recorded import path, imported only if it is an ``nn.Module`` subclass. Weights
    are loaded strictly: a different architecture raises :class:`~lanterna.errors.ModelMismatchError`
    naming the missing, unexpected and differently shaped entries. The loss and metrics are rebuilt from
    their recorded classes (``nn.Module`` subclasses only) unless given. Pickle files are refused unread.

    >>> import lanterna as ln, tempfile
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
    ...     (x, y), epochs=1, verbose=False)
    >>> path = fitted.save(tempfile.mkdtemp() + "/model")
    >>> again = ln.load(path)
    >>> torch.equal(again.predict(x), fitted.predict(x))
    True
    """
    from ..api import Setup
    from ..core.accelerator import Accelerator
    from ..core.losses import build_loss
    from ..results import Fitted

    path = Path(path)
    state_dict, meta = _read_any(path)
    model, spec, hparams = _build_module(module, meta)
    load_weights_strict(model, state_dict, where=f"saved model {str(path)!r}")
    if loss is None:
        try:
            loss, loss_weights, _ = _rebuild_loss(meta.get("loss"))
        except LanternaError as e:
            warnings.warn(f"ln.load: the recorded loss was not rebuilt ({e}); pass loss= to evaluate with it.",
                          stacklevel=2)
            loss, loss_weights = None, None
    else:
        loss_weights = None
    if metrics is None:
        metrics = []
        for desc in meta.get("metrics") or []:
            try:
                metrics.append(_rebuild(desc, "metric"))
            except LanternaError as e:
                warnings.warn(f"ln.load: a recorded metric was not rebuilt ({e}); pass metrics=.", stacklevel=2)
    has_step = callable(getattr(model, "step", None))
    try:
        loss_fn = build_loss(loss, loss_weights, model, has_step)
    except LanternaError:
        loss_fn = None  # no loss recorded or given: evaluate reports the metrics only
    acc = accelerator or Accelerator()
    forward_model = acc.prepare_model(model)
    opt_hparams = meta.get("opt_hparams")
    setup = Setup(module=spec, loss=loss, metrics=list(metrics), loss_weights=loss_weights,
                  hparams=dict(hparams), opt_hparams=dict(opt_hparams or {}))
    history = [dict(r) for r in (meta.get("history") or [])]
    return Fitted(model, setup, history, accelerator=acc, forward_model=forward_model, loss_fn=loss_fn,
                  metrics=list(metrics), total_time=float(meta.get("total_time") or 0.0),
                  status=str(meta.get("status") or "loaded"))
