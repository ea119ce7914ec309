"""Metadata as JSON, with a few tagged types: what :mod:`lanterna.io.artifact` and the checkpoints store.

:func:`encode_json` turns a value into JSON in one pass (tuples, non-finite floats, dtypes, devices, tensors,
module classes and parameterless module instances are tagged); :func:`decode_json` gives it back, looking classes
up only among the modules already imported (:func:`~lanterna.io.resolve.resolve_class`) and giving an
:class:`Unrestored` for what it does not give back.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError
from .resolve import _short, import_path, resolve_class

__all__ = ["Unrestored", "find_unrestored", "describe_value", "encode_json", "decode_json"]

# constructor arguments torch keeps under other names (legacy loss flags, factory kwargs)
_UNSTORED_ARGS = frozenset({"size_average", "reduce", "device", "dtype"})
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class _Unencodable(ValueError):
    pass


class Unrestored:
    """What :func:`decode_json` gives for a value it does not give back: one that could not be stored
    (a function, an arbitrary object), or a class that is refused or not imported. ``reason`` says which;
    ``ln.load`` reports it where the value is needed (:func:`find_unrestored`).

    >>> from lanterna.io.encoding import Unrestored
    >>> Unrestored("not stored")
    <not restored: not stored>
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<not restored: {self.reason}>"


def find_unrestored(value: Any, where: str = "value") -> list[str]:
    """``"where: reason"`` for each :class:`Unrestored` inside ``value`` (dicts, lists, tuples).

    >>> from lanterna.io.encoding import Unrestored, find_unrestored
    >>> find_unrestored({"act": Unrestored("refused"), "n": 3}, "hparams")
    ["hparams['act']: refused"]
    """
    if isinstance(value, Unrestored):
        return [f"{where}: {value.reason}"]
    if isinstance(value, Mapping):
        items = [(_sub(where, k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return []
    return [found for w, v in items for found in find_unrestored(v, w)]


def describe_value(value: Any) -> str:
    """A short description of a value the metadata cannot hold, for messages.

    >>> import torch
    >>> from lanterna.io.encoding import describe_value
    >>> describe_value(torch.tanh)
    'the function torch.tanh'
    """
    if inspect.isclass(value):
        return f"the class {import_path(value) or value.__qualname__}"
    if inspect.isroutine(value):
        name = getattr(value, "__name__", None) or repr(value)
        module = getattr(value, "__module__", None)
        return f"the function {module}.{name}" if module else f"the function {name}"
    return f"a {type(value).__module__}.{type(value).__qualname__} object"


def _sub(where: str, key: Any) -> str:
    return f"{where}[{key!r}]" if where else str(key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Encoder:
    def __init__(self, tensors: list[torch.Tensor] | None, unsaved: list[str] | None) -> None:
        self.tensors, self.unsaved = tensors, unsaved

    def __call__(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, torch.dtype):
            return {"__dtype__": _dtype_name(value)}
        if isinstance(value, torch.device):
            return {"__device__": str(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, where)
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__tuple__": [self(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self(v, _sub(where, k)) for k, v in value.items()}
            return {"__dict__": [[self(k, f"{where} key {k!r}"), self(v, _sub(where, k))] for k, v in value.items()]}
        if isinstance(value, nn.Module):
            return self._module(value, where)
        if inspect.isclass(value) and issubclass(value, nn.Module) and import_path(value):
            return {"__class__": import_path(value)}
        if isinstance(value, np.generic):
            return self(value.item(), where)
        return self.unstored(where, describe_value(value))

    def unstored(self, where: str, what: str) -> dict[str, str]:
        if self.unsaved is None:
            raise _Unencodable(f"{where} is {what}, which JSON metadata cannot hold.")
        self.unsaved.append(f"{where} ({what})")
        return {"__unsaved__": what}

    def _tensor(self, value: torch.Tensor, where: str) -> Any:
        t = value.detach()
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            return self.unstored(where, f"a {t.layout} {'quantized ' if t.is_quantized else ''}tensor on {t.device}")
        if self.tensors is None:  # inline (checkpoint metadata): small tensors only
            if t.numel() > 4096 or t.is_complex():
                return self.unstored(where, f"a tensor of {t.numel()} {_dtype_name(t.dtype)} elements")
            return {"__tensor__": self(t.cpu().tolist(), where), "__dtype__": _dtype_name(t.dtype)}
        key = str(len(self.tensors))
        self.tensors.append(t.to("cpu").clone(memory_format=torch.contiguous_format))
        return {"__tensor__": key, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

    def _ndarray(self, value: np.ndarray, where: str) -> Any:
        what = f"a NumPy array of {value.dtype}"
        if self.tensors is None or value.dtype.kind not in "biufc":
            return self.unstored(where, what)
        try:
            t = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError:
            return self.unstored(where, what)
        key = self._tensor(t, where)["__tensor__"]
        return {"__ndarray__": key, "dtype": str(value.dtype), "shape": list(value.shape)}

    def _module(self, module: nn.Module, where: str) -> Any:
        """A parameterless module (an activation, a loss, a metric) as its class and constructor arguments,
        read back from its attributes; anything else is not stored (it is rebuilt by ``module=``)."""
        cls = type(module)
        path, why, kwargs = import_path(cls), None, {}
        if path is None:
            why = "its class is defined inside a function"
        elif next(module.parameters(), None) is not None or next(module.children(), None) is not None:
            why = "it has parameters or submodules"
        else:
            try:
                params = inspect.signature(cls).parameters.values()
            except (TypeError, ValueError):
                params, why = [], "its constructor's signature is unknown"  # type: ignore[assignment]
            for p in params:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if hasattr(module, p.name):
                    kwargs[p.name] = getattr(module, p.name)
                elif p.name not in _UNSTORED_ARGS:
                    why = f"its constructor argument {p.name!r} is not one of its attributes"
                    break
        if why is not None:
            return self.unstored(where, f"a {cls.__module__}.{cls.__qualname__} instance: {why}")
        out = {"__module__": path, "kwargs": self(kwargs, f"{where}.kwargs")}
        label = getattr(module, "_lanterna_name", None)
        if isinstance(label, str):
            out["name"] = label
        return out


def encode_json(value: Any, where: str = "value", *, tensors: list[torch.Tensor] | None = None,
                unsaved: list[str] | None = None) -> Any:
    """A JSON-ready form of ``value``, in one pass: tuples, non-finite floats, dicts with non-string keys,
    ``torch.dtype``/``torch.device``, ``nn.Module`` subclasses (by import path) and parameterless module
    instances (class + constructor arguments) are tagged so that :func:`decode_json` gives them back.

    Tensors (and NumPy arrays) are appended to ``tensors`` and referenced by their index (exact, any size);
    without ``tensors`` they are written inline as lists (at most 4096 elements). A value that cannot be
    stored (a function, an arbitrary object) raises ``ValueError`` naming ``where``; with ``unsaved`` (a list)
    it becomes an ``{"__unsaved__": ...}`` placeholder instead and its description is appended there.

    Args:
        value: what to encode.
        where: its name in messages (``"hparams"``).
        tensors: where tensors go, or None for inline tensors.
        unsaved: where unstorable values are listed, or None to raise for them.

    >>> from torch import nn
    >>> from lanterna.io.encoding import decode_json, encode_json
    >>> decode_json(encode_json({"sizes": (32, 16), "eps": float("inf"), "act": nn.Tanh}))
    {'sizes': (32, 16), 'eps': inf, 'act': <class 'torch.nn.modules.activation.Tanh'>}
    """
    return _Encoder(tensors, unsaved)(value, where)


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor] | None) -> None:
        self.tensors = tensors

    def __call__(self, value: Any, where: str) -> Any:
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if not any(k.startswith("__") for k in value):
            return {k: self(v, _sub(where, k)) for k, v in value.items()}
        keys = set(value)
        if keys == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(self(v, f"{where}[{i}]") for i, v in enumerate(value["__tuple__"]))
        if keys == {"__float__"} and value["__float__"] in ("nan", "inf", "-inf"):
            return float(value["__float__"])
        if keys == {"__dtype__"}:
            return _dtype(value["__dtype__"], where)
        if keys == {"__device__"} and isinstance(value["__device__"], str):
            try:
                return torch.device(value["__device__"])
            except RuntimeError:
                pass
        if keys == {"__tensor__", "dtype", "shape"}:
            return self._tensor(value["__tensor__"], value, where)
        if keys == {"__ndarray__", "dtype", "shape"}:
            t = self._tensor(value["__ndarray__"], None, where)
            array = t.numpy()
            if str(array.dtype) != value["dtype"] or list(array.shape) != value["shape"]:
                raise ArtifactError(f"{where}: the stored array is not the {value['dtype']} {value['shape']} recorded.")
            return array
        if keys == {"__tensor__", "__dtype__"}:  # inline
            return torch.tensor(self(value["__tensor__"], where), dtype=_dtype(value["__dtype__"], where))
        if keys == {"__dict__"} and isinstance(value["__dict__"], list):
            try:
                return {self(k, f"{where} key"): self(v, _sub(where, k)) for k, v in value["__dict__"]}
            except (TypeError, ValueError):
                pass
        if keys == {"__class__"}:
            try:
                return resolve_class(value["__class__"])
            except ArtifactError as e:
                return Unrestored(str(e))
        if keys in ({"__module__", "kwargs"}, {"__module__", "kwargs", "name"}) and isinstance(value["kwargs"], dict):
            return self._module(value, where)
        if keys == {"__unsaved__"}:
            return Unrestored(f"it was not stored when saved ({value['__unsaved__']})")
        raise ArtifactError(f"{where} is a tagged value lanterna does not know ({sorted(keys)}): the metadata was "
                            "edited or written by another lanterna.")

    def _tensor(self, key: Any, record: Mapping[str, Any] | None, where: str) -> torch.Tensor:
        if self.tensors is None or not isinstance(key, str) or key not in self.tensors:
            raise ArtifactError(f"{where} refers to a stored tensor {key!r} that the weights file does not hold.")
        t = self.tensors[key]
        if record is not None and (record["dtype"] != _dtype_name(t.dtype) or record["shape"] != list(t.shape)):
            raise ArtifactError(f"{where}: the stored tensor is {_dtype_name(t.dtype)} {list(t.shape)}, not the "
                                f"{record['dtype']} {record['shape']} recorded.")
        return t

    def _module(self, value: Mapping[str, Any], where: str) -> Any:
        try:
            cls = resolve_class(value["__module__"])
        except ArtifactError as e:
            return Unrestored(str(e))
        kwargs = self(value["kwargs"], f"{where}.kwargs")
        missing = find_unrestored(kwargs, f"{cls.__qualname__} argument")
        if missing:
            return Unrestored("; ".join(missing))
        try:
            obj = cls(**kwargs)
        except Exception as e:  # a constructor that refuses its recorded arguments
            return Unrestored(f"{cls.__qualname__}(**{kwargs}) could not be built: {_short(e)}")
        if isinstance(value.get("name"), str):
            obj._lanterna_name = value["name"]
        return obj


def decode_json(value: Any, tensors: Mapping[str, torch.Tensor] | None = None, where: str = "metadata") -> Any:
    """Inverse of :func:`encode_json`. Classes are looked up only among imported modules
    (:func:`~lanterna.io.resolve.resolve_class`); a refused or missing class, or a value that was not stored,
    comes back as an :class:`Unrestored`. Malformed tags raise :class:`ArtifactError` naming ``where``.

    Args:
        value: the JSON value.
        tensors: the stored tensors, by the keys :func:`encode_json` gave them.
        where: its name in messages.

    >>> from lanterna.io.encoding import decode_json
    >>> decode_json({"__dtype__": "float16"})
    torch.float16
    """
    return _Decoder(tensors)(value, where)


def _dtype(name: Any, where: str) -> torch.dtype:
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ArtifactError(f"{where}: unknown dtype {name!r}.")
    return dtype
