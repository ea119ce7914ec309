"""Export a trained model for inference: ONNX, TorchScript or ``torch.export`` (docs/saving.md, "Export for inference").

Every export is reloaded with the format's standard loader and run on the example input; its outputs must
match the model's (``atol``/``rtol`` 1e-5), else :class:`~lanterna.errors.ExportError`. ONNX is checked
with onnxruntime when it is installed (``pip install 'lanterna[onnx]'``). The batch dimension (dim 0 of
every tensor input) is exported as dynamic where the model allows it.

ONNX inputs are named as they were given: a dict input's keys (``{"X": x, "mask": m}`` → ``X``, ``mask``), else
forward's parameter names (``forward(self, x, z)`` → ``x``, ``z``), so onnxruntime takes the same dict as the
model. Outputs are named ``output`` (one tensor), ``output_0``, ``output_1``.. (a tuple) or the keys of a dict
output. ``input_names=`` / ``output_names=`` override them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ExportError

__all__ = ["export", "FORMATS"]

FORMATS = ("onnx", "torchscript", "exported_program")


def _split_input(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch input as ``(args, kwargs)``, the way fit calls the model: a tensor → ``model(x)``, a tuple →
    ``model(*x)``, a dict → ``model(**x)``."""
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


def _map(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _dynamic_spec(obj: Any) -> Any:
    from torch.export import Dim

    if isinstance(obj, Tensor):
        return {0: Dim.AUTO} if obj.dim() >= 1 else None
    if isinstance(obj, Mapping):
        return {k: _dynamic_spec(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_dynamic_spec(v) for v in obj)
    return None


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Dim 0 of every tensor input dynamic, keyed by forward's parameter names (torch.export's form)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = inspect.signature(model.forward).parameters
    out = {}
    for name, value in bound.arguments.items():
        if params[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return None
        out[name] = _dynamic_spec(value)
    return out


def _leaf_names(name: str, value: Any) -> list[str]:
    """One name per tensor of ``value`` (in :func:`_tensors` order): ``name`` for a tensor, ``name_0``.. for a
    tuple, ``name_key`` for a dict."""
    if isinstance(value, Tensor):
        return [name]
    if isinstance(value, Mapping):
        return [n for k, v in value.items() for n in _leaf_names(f"{name}_{k}", v)]
    if isinstance(value, (tuple, list)):
        return [n for i, v in enumerate(value) for n in _leaf_names(f"{name}_{i}", v)]
    return []


def _input_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """ONNX input names, one per tensor of ``(args, kwargs)``: positional inputs take forward's parameter names
    (``forward(self, x, z)`` → ``x``, ``z``; ``*inputs`` → ``inputs_0``..), keyword inputs their dict keys as
    given."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind == inspect.Parameter.VAR_POSITIONAL), "input")
    names = []
    for i, value in enumerate(args):
        if i < len(positional):
            names += _leaf_names(positional[i], value)
        else:
            names += _leaf_names(var if len(args) == 1 and not positional else f"{var}_{i - len(positional)}",
                                 value)
    for key, value in kwargs.items():
        names += _leaf_names(str(key), value)
    return names


def _output_names(output: Any) -> list[str]:
    """ONNX output names: ``output`` for a tensor, ``output_0``.. for a tuple, the keys of a dict."""
    if isinstance(output, Mapping):
        return [n for k, v in output.items() for n in _leaf_names(str(k), v)]
    return _leaf_names("output", output)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _compare(expected: Any, got: list[Any], fmt: str, atol: float, rtol: float) -> None:
    exp = [t.detach().cpu() for t in _tensors(expected)]
    got_t = [torch.as_tensor(g).detach().cpu() for g in got]
    if len(exp) != len(got_t):
        raise ExportError(f"The {fmt} export returns {len(got_t)} outputs, the model {len(exp)}.")
    for i, (e, g) in enumerate(zip(exp, got_t)):
        if tuple(e.shape) != tuple(g.shape):
            raise ExportError(f"The {fmt} export's output {i} has shape {tuple(g.shape)}, the model's "
                              f"{tuple(e.shape)}.")
        if not torch.allclose(g.to(e.dtype), e, atol=atol, rtol=rtol, equal_nan=True):
            diff = (g.to(e.dtype) - e).abs().max().item()
            raise ExportError(f"The {fmt} export does not reproduce the model: output {i} differs by up to "
                              f"{diff:.3g} (tolerance atol={atol}, rtol={rtol}).")


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Any,
    *,
    format: str = "onnx",
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    **options: Any,
) -> Path:
    """Write ``model`` to ``path`` in ``format`` and check the reloaded file against the model.

    Args:
        model: the module (put in eval mode for the export, then restored).
        path: the output file (its folder is created).
        example_input: a batch input as fit gives it to the model: a tensor, a tuple (positional inputs)
            or a dict (keyword inputs).
        format: ``"onnx"`` (``torch.onnx.export``, dynamo exporter), ``"torchscript"`` (``torch.jit.trace``;
            ``method="script"`` for ``torch.jit.script``) or ``"exported_program"`` (``torch.export`` +
            ``torch.export.save``; reload with ``torch.export.load(path).module()``).
        dynamic_batch: export dim 0 of tensor inputs as dynamic (onnx, exported_program).
        check: reload and compare outputs (for onnx only when onnxruntime is installed).
        atol, rtol: the comparison's tolerances.
        options: passed to the exporter (e.g. ``opset_version=18``). ONNX names its inputs by a dict input's
            keys or forward's parameter names and its outputs ``output`` / ``output_0``.. / a dict output's
            keys; ``input_names=`` and ``output_names=`` replace them.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from lanterna.integrations.export import export
    >>> p = export(nn.Linear(3, 1), tempfile.mkdtemp() + "/m.pt2", torch.randn(4, 3), format="exported_program")
    >>> torch.export.load(p).module()(torch.randn(6, 3)).shape
    torch.Size([6, 1])
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not one of {', '.join(map(repr, FORMATS))}.")
    if not isinstance(model, nn.Module):
        raise ExportError(f"export needs an nn.Module, got {type(model).__name__}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args, kwargs = _split_input(_map(example_input, lambda t: t.to(device)))
    if not _tensors((args, kwargs)):
        raise ExportError("example_input holds no tensor; pass a batch input such as torch.randn(8, n_features).")
    with _eval(model):
        try:
            expected = model(*args, **kwargs)
        except Exception as e:
            raise ExportError(f"{type(model).__name__} cannot run on example_input ({type(e).__name__}: {e}). Pass "
                              "one batch input as fit gives it: a tensor, a tuple of positional inputs or a "
                              "dict of keyword inputs.") from e
        try:
            if format == "onnx":
                _to_onnx(model, path, args, kwargs, dynamic_batch, options, expected)
            elif format == "torchscript":
                _to_torchscript(model, path, args, kwargs, options)
            else:
                _to_exported_program(model, path, args, kwargs, dynamic_batch, options)
        except ExportError:
            raise
        except ImportError as e:
            raise ImportError(f"Exporting to {format} needs extra packages ({e}). Install them with "
                              "pip install 'lanterna[onnx]'.") from e
        except Exception as e:
            raise ExportError(f"torch could not export {type(model).__name__} to {format}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        if check:
            _check(format, path, args, kwargs, expected, device, atol, rtol,
                   options.get("input_names") or _input_names(model, args, kwargs))
    return path


def _to_onnx(model: nn.Module, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: bool,
             options: dict[str, Any], expected: Any) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{e.name} is not installed") from e
    opts = {"dynamo": True, "verbose": False, "external_data": False, **options}
    opts.setdefault("input_names", _input_names(model, args, kwargs))
    opts.setdefault("output_names", _output_names(expected))
    names = list(opts["input_names"]) + list(opts["output_names"])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExportError(f"ONNX input and output names must be unique; {', '.join(map(repr, repeated))} "
                          "names more than one. Pass input_names=[...] and output_names=[...] to export.")
    if dynamic and "dynamic_shapes" not in opts:
        opts["dynamic_shapes"] = _dynamic_shapes(model, args, kwargs)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" and alike
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, args, str(path), kwargs=kwargs or None, **opts)
    finally:
        registration.setLevel(level)


def _to_torchscript(model: nn.Module, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any],
                    options: dict[str, Any]) -> None:
    method = options.pop("method", "trace")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        if method == "script":
            scripted = torch.jit.script(model)
        elif method == "trace":
            if kwargs:
                scripted = torch.jit.trace(model, example_kwarg_inputs=kwargs, **options)
            else:
                scripted = torch.jit.trace(model, args, **options)
        else:
            raise ExportError(f"method={method!r}: TorchScript export is 'trace' or 'script'.")
        scripted.save(str(path))


def _to_exported_program(model: nn.Module, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any],
                         dynamic: bool, options: dict[str, Any]) -> None:
    opts = dict(options)
    if dynamic and "dynamic_shapes" not in opts:
        opts["dynamic_shapes"] = _dynamic_shapes(model, args, kwargs)
    program = torch.export.export(model, args, kwargs or None, **opts)
    torch.export.save(program, str(path))


def _check(fmt: str, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any], expected: Any,
           device: torch.device, atol: float, rtol: float, input_names: list[str] | None = None) -> None:
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return  # nothing to run the file with; the export itself succeeded
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = [t.detach().cpu().numpy() for t in _tensors((args, kwargs))]
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ExportError(f"The ONNX model takes {len(names)} inputs ({', '.join(names)}) but example_input "
                              f"holds {len(inputs)} tensors; cannot check it.")
        given = input_names if input_names is not None and set(input_names) == set(names) else names
        got = session.run(None, dict(zip(given, inputs)))  # by name: a mix-up of inputs shows as a mismatch
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            loaded = torch.jit.load(str(path), map_location=device)
        got = _tensors(loaded(*args, **kwargs))
    else:
        loaded = torch.export.load(str(path)).module()
        got = _tensors(loaded(*args, **kwargs))
    _compare(expected, got, fmt, atol, rtol)
