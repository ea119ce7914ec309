"""What a saved model says about itself: one description of the module, written by ``fitted.save`` (in
``lanterna.json``) and by every checkpoint (its ``"meta"`` entry), so both are read the same way.

The description names classes and functions only by import path (:func:`~lanterna.io.resolve.import_path`);
loading never imports them (:func:`~lanterna.io.resolve.resolve_class`).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .encoding import describe_value
from .resolve import import_path

__all__ = ["describe_module", "user_class"]


def user_class(model: nn.Module) -> type:
    """The class the user wrote: FSDP's ``fully_shard`` swaps a module's class for ``FSDP<Name>(FSDPModule,
    Name)``, which no import path names.

    Args:
        model: a module.

    Returns:
        its class, or the class it had before ``fully_shard``.

    >>> from torch import nn
    >>> from lanterna.io.model_meta import user_class
    >>> user_class(nn.Linear(2, 1)).__name__
    'Linear'
    """
    cls = type(model)
    while len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        cls = cls.__bases__[1]
    return cls


def describe_module(setup: Any, model: nn.Module | None) -> dict[str, Any]:
    """How ``model`` was built: ``module`` (the model class's import path), ``module_kind`` (``"class"``,
    ``"instance"`` or ``"factory"``: what ``ln.setup`` got), ``factory`` (its import path, for a factory),
    ``hparams``, ``opt_hparams`` (as given, not encoded) and ``optimizer`` (the setup's optimizer class by
    import path, a ``"not stored: ..."`` description, or None).

    Args:
        setup: the ``ln.setup(...)`` object the model came from, or None (a bare model).
        model: the built model.

    >>> from torch import nn
    >>> from lanterna.io.model_meta import describe_module
    >>> meta = describe_module(None, nn.Linear(2, 1))
    >>> meta["module"], meta["module_kind"], meta["hparams"]
    ('torch.nn.modules.linear:Linear', 'instance', {})
    """
    spec = setup.module if setup is not None else model
    if inspect.isclass(spec) and issubclass(spec, nn.Module):
        kind, module_path = "class", import_path(spec)
    elif isinstance(spec, nn.Module):
        kind, module_path = "instance", import_path(user_class(spec))
    else:
        kind, module_path = "factory", None if model is None else import_path(user_class(model))
    optimizer = setup.optimizer if setup is not None else None
    return {
        "module": module_path,
        "module_kind": kind,
        "factory": import_path(spec) if kind == "factory" else None,
        "hparams": dict(setup.hparams) if setup is not None else {},
        "opt_hparams": dict(setup.opt_hparams) if setup is not None else {},
        "optimizer": None if optimizer is None else (import_path(optimizer) or f"not stored: "
                                                     f"{describe_value(optimizer)}"),
    }
