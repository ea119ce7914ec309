"""Classes by import path, looked up without importing or calling anything, and strict weight loading.

A class named in a file is looked up only among the modules already in ``sys.modules`` and must be a subclass of
the expected base (``nn.Module``); :func:`load_weights_strict` names every entry that does not fit the model.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ModelMismatchError

__all__ = ["import_path", "resolve_class", "resolve_module_class", "load_weights_strict"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_MISSING = object()


def import_path(obj: Any) -> str | None:
    """``"package.module:QualName"`` of a class or function, or None when it cannot be imported by name
    (defined in a function, or in ``__main__``' when that is not a file).

    >>> from torch import nn
    >>> from lanterna.io.resolve import import_path
    >>> import_path(nn.Linear)
    'torch.nn.modules.linear:Linear'
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def resolve_class(path: Any, base: type = nn.Module) -> type:
    """The class named ``"package.module:QualName"``, only if it is a ``base`` subclass, looked up among the
    modules already imported (``sys.modules``), attribute by attribute without running any code: a module
    named in a file is never imported (that would run its top-level code) and nothing is called. Anything
    else raises :class:`ArtifactError`.

    Args:
        path: the recorded import path.
        base: the class it must derive from (``nn.Module``; ``torch.optim.Optimizer`` for an optimizer).

    >>> from lanterna.io.resolve import resolve_class
    >>> resolve_class("torch.nn.modules.linear:Linear")
    <class 'torch.nn.modules.linear.Linear'>
    """
    if not isinstance(path, str) or not _MODULE_PATH.match(path):
        raise ArtifactError(f"The metadata names {path!r}, which is not an import path 'package.module:ClassName'.")
    mod_name, qual = path.split(":")
    obj: Any = sys.modules.get(mod_name)
    if obj is None:
        raise ArtifactError(
            f"{path!r} is in the module {mod_name!r}, which is not imported: ln.load never imports a module named "
            f"in a file (that would run its code). If you trust it, import {mod_name} yourself first."
        )
    for part in qual.split("."):
        obj = inspect.getattr_static(obj, part, _MISSING)  # no __getattr__, no descriptor runs
        if obj is _MISSING:
            raise ArtifactError(f"{path!r}: the module {mod_name} has no attribute {qual!r}.")
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
        name = "nn.Module" if base is nn.Module else f"{base.__module__}.{base.__qualname__}"
        raise ArtifactError(
            f"Refused: the metadata names {path!r}, which is {kind}, not an {name} subclass; lanterna builds "
            f"only {name} subclasses from metadata, and called nothing."
        )
    return obj


def resolve_module_class(path: str) -> type[nn.Module]:
    """:func:`resolve_class` for an ``nn.Module`` subclass.

    >>> from lanterna.io.resolve import resolve_module_class
    >>> resolve_module_class("torch.nn.modules.activation:Tanh")
    <class 'torch.nn.modules.activation.Tanh'>
    """
    return resolve_class(path, nn.Module)


def load_weights_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str = "file") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a :class:`ModelMismatchError` that names the
    missing, unexpected and differently shaped entries (and their shapes) instead of torch's error, and the
    entries of another kind of dtype (integers into floats ...: ``load_state_dict`` would convert them
    silently; another float precision is converted as torch does).

    >>> import torch
    >>> from torch import nn
    >>> from lanterna.io.resolve import load_weights_strict
    >>> m, saved = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> load_weights_strict(m, saved.state_dict())
    >>> torch.equal(m.weight, saved.weight)
    True
    >>> load_weights_strict(m, nn.Linear(3, 1).state_dict())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lanterna.errors.ModelMismatchError: ...weight: saved (1, 3), model (1, 2)...
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: saved {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    shapes += [
        f"{k}: saved {state_dict[k].dtype}, model {expected[k].dtype}"
        for k in expected
        if k in state_dict and _dtype_kind(state_dict[k].dtype) != _dtype_kind(expected[k].dtype)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the {where}: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected (in the {where}, not in the model): {_few(unexpected)}")
        if shapes:
            parts.append(f"different shapes or dtypes: {_few(shapes)}")
        raise ModelMismatchError(
            f"The weights of the {where} do not fit {type(model).__name__}: " + "; ".join(parts) + ". Build the "
            "module with the same architecture and hparams as when it was saved (or pass the right module=)."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise ModelMismatchError(f"The weights of the {where} do not fit {type(model).__name__}: {_short(e)}") from None


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "int"


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
