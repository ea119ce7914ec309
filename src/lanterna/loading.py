"""``ln.load(path, module=None)``: a :class:`~lanterna.Fitted` rebuilt from ``fitted.save(path)`` (docs/saving.md).

Above :mod:`lanterna.api` and :mod:`lanterna.results` (it builds a ``Setup`` and a ``Fitted``), while the files
themselves are read and written below, in :mod:`lanterna.io.fitted`: so no import circle. The module is built
from ``module=`` or from the recorded class, looked up only among the modules already imported and used only if
it is an ``nn.Module`` subclass; nothing is unpickled.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import Setup
from .core.accelerator import Accelerator
from .core.losses import build_loss
from .errors import ArtifactError, LanternaError
from .io.encoding import find_unrestored
from .io.fitted import read_fitted
from .io.resolve import load_weights_strict, resolve_class
from .results import Fitted

__all__ = ["load_fitted"]


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

    Returns:
        The :class:`~lanterna.Fitted`, ready for ``predict``, ``evaluate`` and ``save``.

    Raises:
        DamagedArtifactError: when the file does not match its recorded checksum.
        ModelMismatchError: when the weights do not fit the module (missing, unexpected or reshaped entries).

    >>> import lanterna as ln, tempfile, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
    ...     (x, y), epochs=1, verbose=False)
    >>> path = fitted.save(tempfile.mkdtemp() + "/model")
    >>> again = ln.load(path)
    >>> torch.equal(again.predict(x), fitted.predict(x))
    True
    """
    path = Path(path)
    state_dict, meta = read_fitted(path)
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
                  status=str(meta.get("status") or "loaded"), saved_state=_training_state(meta))


def _training_state(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ``fitted.save(path, optimizer=True)`` kept for ``ln.load(path).fit(...)``: plain data (state dicts of
    tensors and numbers), loaded into optimizers and schedulers the setup builds, never called."""
    state = meta.get("training_state")
    if not isinstance(state, Mapping):
        return None
    missing = find_unrestored(state, "training_state")
    if missing:
        warnings.warn(f"ln.load: the saved training state is incomplete ({'; '.join(missing)}); fit() starts "
                      "the optimizers afresh.", stacklevel=3)
        return None
    return dict(state)
