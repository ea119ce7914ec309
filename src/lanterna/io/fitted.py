"""``fitted.save(path)`` and ``ln.load(path, module=None)`` (API.md §7).

The only module of :mod:`lanterna.io` that reaches up to the rest of the package: it builds a ``Fitted``
(imported inside the functions, so ``io`` stays importable on its own). Weights go to safetensors, the
rest (module import path, hparams, opt_hparams, optimizer, loss and metrics, history, versions) to JSON,
encoded once; the save is atomic as a whole and the weights are checksummed; see :mod:`lanterna.io.artifact`.
Loading never unpickles, never imports a module named in a file and builds only ``nn.Module`` subclasses.
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

from ..errors import ArtifactError, CheckpointError, CheckpointVersionError, DamagedArtifactError, LanternaError
from .artifact import (
    decode_json,
    describe_value,
    find_unrestored,
    import_path,
    load_weights_strict,
    read_artifact,
    resolve_class,
    save_artifact,
    sniff,
)
from .checkpoint import load_checkpoint, verify_checkpoint

if TYPE_CHECKING:
    from ..results import Fitted

__all__ = ["save_fitted", "load_fitted"]


# ---------------------------------------------------------------------------- save


def save_fitted(fitted: Fitted, path: str | os.PathLike[str]) -> Path:
    """Write ``fitted``'s weights (safetensors) and metadata (JSON), atomically as a whole; see
    :meth:`lanterna.Fitted.save`. Values that cannot be stored (a function as an hparam ...) are recorded by
    their description and named in a warning; ``ln.load`` then asks for them."""
    from .. import __version__

    setup = fitted.setup
    spec = setup.module if setup is not None else fitted.model
    if inspect.isclass(spec) and issubclass(spec, nn.Module):
        kind, module_path = "class", import_path(spec)
    elif isinstance(spec, nn.Module):
        kind, module_path = "instance", import_path(type(spec))
    else:
        kind, module_path = "factory", import_path(type(fitted.model))
    optimizer = setup.optimizer if setup is not None else None
    meta: dict[str, Any] = {
        "module": module_path,
        "module_kind": kind,
        "factory": import_path(spec) if kind == "factory" else None,
        "hparams": dict(setup.hparams) if setup is not None else {},
        "opt_hparams": dict(setup.opt_hparams) if setup is not None else {},
        "optimizer": None if optimizer is None else (import_path(optimizer) or f"not stored: "
                                                     f"{describe_value(optimizer)}"),
        "loss": setup.loss if setup is not None else None,
        "loss_weights": setup.loss_weights if setup is not None else None,
        "metrics": list(fitted.metrics),
        "history": fitted.history,
        "status": fitted.status,
        "total_time": float(fitted.total_time),
        "versions": {"lanterna": __version__, "torch": torch.__version__,
                     "python": ".".join(map(str, sys.version_info[:3]))},
    }
    unsaved: list[str] = []
    out = save_artifact(path, fitted.model.state_dict(), meta, unsaved=unsaved)
    needed = [u for u in unsaved if u.startswith(("hparams", "opt_hparams"))]
    if needed:
        warnings.warn(
            "fitted.save: " + "; ".join(needed) + " cannot be stored (only plain values, tuples, tensors, dtypes, "
            "nn.Module classes and parameterless module instances are); they are recorded by description. "
            "ln.load(path) will ask for them: pass module= a built instance, or a factory that supplies them.",
            stacklevel=3,
        )
    return out


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


_META_TYPES: dict[str, Any] = {"module": str, "module_kind": str, "hparams": dict, "opt_hparams": dict,
                               "history": list, "metrics": list, "status": str, "total_time": (int, float)}


def _check_meta(meta: Mapping[str, Any], path: Path) -> None:
    """The metadata's entries have their types (an edited or damaged lanterna.json is a typed error)."""
    bad = [f"{key!r} is a {type(meta[key]).__name__}" for key, kind in _META_TYPES.items()
           if meta.get(key) is not None and not isinstance(meta[key], kind)]
    if isinstance(meta.get("history"), list) and not all(isinstance(r, dict) for r in meta["history"]):
        bad.append("'history' holds entries that are not per-epoch records (objects)")
    if bad:
        raise DamagedArtifactError(f"The metadata of {str(path)!r} is damaged or was badly edited: "
                                   + "; ".join(bad) + ". Save the model again.")


def _build_module(module: Any, meta: Mapping[str, Any]) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, setup module spec, hparams)``."""
    if isinstance(module, nn.Module):
        return module, module, {}
    recorded = meta.get("module")
    if module is not None:
        if not callable(module):
            raise ArtifactError(f"module= must be an nn.Module subclass, a factory or an instance; got {module!r}.")
        spec = module
    elif meta.get("module_kind") == "factory":
        raise ArtifactError(
            f"The model was built by the factory {meta.get('factory') or '(unknown)'}; ln.load calls only "
            "nn.Module subclasses named in metadata. Pass module=<the factory> (or a module instance)."
        )
    elif meta.get("module_kind") == "instance":
        raise ArtifactError(
            f"The model was given to ln.setup as a built {recorded or 'module'} instance, so the arguments it "
            "was built with are unknown. Pass module= an instance built the same way (or its class or factory)."
        )
    elif not recorded:
        raise ArtifactError("The metadata does not name an importable model class (it was defined inside a "
                            "function or in an interactive session); pass module=YourModule to ln.load.")
    else:
        try:
            spec = resolve_class(recorded)
        except ArtifactError as e:
            raise ArtifactError(f"{e} Pass module=YourModule to ln.load.") from None
    hparams = meta.get("hparams")
    if not isinstance(hparams, dict):
        raise ArtifactError("The metadata holds no hparams; pass module= a built instance (or a factory taking "
                            "no arguments).")
    name = getattr(spec, "__name__", repr(spec))
    missing = find_unrestored(hparams, "hparams")
    if missing and inspect.isclass(spec):
        raise ArtifactError(
            f"{name} cannot be rebuilt from the metadata: " + "; ".join(missing) + f". Pass module= a built "
            f"instance ({name}(...)), or a factory that supplies what is missing: module=lambda **hp: "
            f"{name}(**hp, ...) (it gets the other hparams)."
        )
    if missing:  # a factory given by the caller supplies them
        hparams = {k: v for k, v in hparams.items() if not find_unrestored(v)}
    try:
        model = spec(**hparams)
    except TypeError as e:
        raise ArtifactError(f"Could not build {name}(**{hparams}): {e}. Pass module= (a class, factory or "
                            "instance) that builds the saved architecture.") from None
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"module={name} returned a {type(model).__name__}, not an nn.Module.")
    return model, spec, dict(hparams)


def _restored_optimizer(recorded: Any) -> Any:
    """The recorded optimizer class (a ``torch.optim.Optimizer`` subclass among imported modules), else None
    with a warning: a later ``fit`` of the loaded model would use the default."""
    if recorded is None:
        return None
    try:
        return resolve_class(recorded, torch.optim.Optimizer)
    except ArtifactError as e:
        reason = recorded if isinstance(recorded, str) and recorded.startswith("not stored") else str(e)
        warnings.warn(f"ln.load: the optimizer was not restored ({reason}); a later .fit() of the loaded model "
                      "would use the default torch.optim.Adam.", stacklevel=3)
        return None


def load_fitted(
    path: str | os.PathLike[str],
    module: Any = None,
    *,
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    accelerator: Any = None,
) -> Fitted:
    """Rebuild a :class:`~lanterna.Fitted` from ``fitted.save(path)`` (or from a lanterna checkpoint file).

    The weights' SHA-256 checksum is verified first (:class:`~lanterna.errors.DamagedArtifactError` names a
    damaged file). The module comes from ``module`` (a class built with the saved hparams, a factory called
    with them, or an instance used as is) or else from the recorded import path, looked up only among the
    modules already imported (a module named in a file is never imported) and used only if it is an
    ``nn.Module`` subclass. Weights are loaded strictly: a different architecture raises
    :class:`~lanterna.errors.ModelMismatchError` naming the missing, unexpected and differently shaped
    entries. The loss and metrics are rebuilt from their recorded classes (``nn.Module`` subclasses only)
    unless given; one that cannot be is left out with a warning. Pickle files are refused unread.

    Args:
        path: the folder or ``.safetensors`` file ``fitted.save`` wrote, or a lanterna checkpoint.
        module: the model's class, a factory, or a built instance; default: the recorded class.
        loss: the loss for ``evaluate``; default: the recorded one.
        metrics: the metrics for ``evaluate``; default: the recorded ones.
        accelerator: where the model runs; default ``ln.Accelerator()``.

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
    _check_meta(meta, path)
    model, spec, hparams = _build_module(module, meta)
    load_weights_strict(model, state_dict, where=f"saved model {str(path)!r}")
    loss_known, loss_weights = True, None
    if loss is None:
        loss, loss_weights = meta.get("loss"), meta.get("loss_weights")
        missing = find_unrestored(loss, "loss") + find_unrestored(loss_weights, "loss_weights")
        if missing:  # not the model's own loss method in its place
            warnings.warn(f"ln.load: the recorded loss was not restored ({'; '.join(missing)}); pass loss= to "
                          "evaluate with it.", stacklevel=2)
            loss, loss_weights, loss_known = None, None, False
    if metrics is None:
        metrics = []
        for i, metric in enumerate(meta.get("metrics") or []):
            missing = find_unrestored(metric, f"metrics[{i}]")
            if missing:
                warnings.warn(f"ln.load: a recorded metric was not restored ({'; '.join(missing)}); pass "
                              "metrics= to evaluate with it.", stacklevel=2)
            else:
                metrics.append(metric)
    opt_hparams = dict(meta.get("opt_hparams") or {})
    missing = find_unrestored(opt_hparams, "opt_hparams")
    if missing:
        warnings.warn(f"ln.load: {'; '.join(missing)}; these opt_hparams are left out (set them with "
                      "set_opt_hparams before fitting again).", stacklevel=2)
        opt_hparams = {k: v for k, v in opt_hparams.items() if not find_unrestored(v)}
    has_step = callable(getattr(model, "step", None))
    loss_fn = None
    if loss_known:
        try:
            loss_fn = build_loss(loss, loss_weights, model, has_step)
        except LanternaError:
            loss_fn = None  # no loss recorded or given: evaluate reports the metrics only
    if accelerator is not None and not isinstance(accelerator, Accelerator):
        raise LanternaError(f"ln.load(accelerator={accelerator!r}): give an ln.Accelerator, e.g. "
                            "accelerator=ln.Accelerator(device='cpu').")
    acc = accelerator or Accelerator()
    forward_model = acc.prepare_model(model)
    setup = Setup(module=spec, loss=loss, optimizer=_restored_optimizer(meta.get("optimizer")),
                  metrics=list(metrics), loss_weights=loss_weights, hparams=dict(hparams), opt_hparams=opt_hparams)
    history = [dict(r) for r in (meta.get("history") or [])]
    return Fitted(model, setup, history, accelerator=acc, forward_model=forward_model, loss_fn=loss_fn,
                  metrics=list(metrics), total_time=float(meta.get("total_time") or 0.0),
                  status=str(meta.get("status") or "loaded"))
