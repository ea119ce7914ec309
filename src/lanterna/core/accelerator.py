"""Devices, precision and compilation (README.md "Devices"; compilation: docs/saving.md "Compile")."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LanternaError

__all__ = ["Accelerator", "default_device"]

_PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
_NO_DETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the values with which cuBLAS is deterministic
_DEVICE_HINTS = {"gpu": "cuda", "nvidia": "cuda", "rocm": "cuda", "metal": "mps", "apple": "mps"}
_PRECISION_HINTS = {"bf16": "bf16-mixed", "bfloat16": "bf16-mixed", "16": "16-mixed", "fp16": "16-mixed",
                    "float16": "16-mixed", "half": "16-mixed", "fp32": "32", "float32": "32"}


def default_device() -> torch.device:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> list[str]:
    """The devices this torch can run on here, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def _checked_device(spec: Any) -> torch.device:
    """``torch.device(spec)``, refusing (before any training) a device that does not exist here."""
    available = ", ".join(repr(n) for n in available_devices())
    fix = f"Available: {available}; pass one of them, or device=None to pick the best one."
    shown = repr(spec)
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        spec, shown = f"cuda:{spec}", f"{spec!r} (cuda:{spec})"  # torch's meaning of a bare index
    if not isinstance(spec, (str, torch.device)):
        raise LanternaError(f"Accelerator(device={shown}): not a device; give a string such as 'cuda', 'cuda:1', "
                            f"'mps' or 'cpu', or a torch.device. {fix}")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        hint = _DEVICE_HINTS.get(str(spec).strip().lower().split(":")[0])
        raise LanternaError(f"Accelerator(device={shown}): not a device torch knows"
                            + (f" (did you mean {hint!r}?)" if hint else "") + f". {fix}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise LanternaError(f"Accelerator(device={shown}): CUDA is not available ({why}). {fix}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise LanternaError(f"Accelerator(device={shown}): there are {count} CUDA device(s). {fix}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LanternaError(f"Accelerator(device={shown}): MPS is not available (Apple-silicon Macs only). {fix}")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            raise LanternaError(f"Accelerator(device={shown}): {device.type} is not available. {fix}")
    return device


class Accelerator:
    """Where and how the model runs.

    >>> import lanterna as ln
    >>> acc = ln.Accelerator(device="cpu", precision="bf16-mixed")
    >>> acc.device
    device(type='cpu')

    Args:
        device: ``None`` picks cuda → mps → cpu; or any torch device spec. A device that is not available
            here (``"cuda"`` on a CPU-only torch, ``"mps"`` off a Mac, an unknown name) is an error at once.
        precision: ``"32"``, ``"bf16-mixed"`` (autocast to bfloat16) or ``"16-mixed"`` (float16 with a
            gradient scaler).
        compile: ``torch.compile`` for training and inference: ``True`` (its default mode), a mode —
            ``"default"``, ``"reduce-overhead"`` (CUDA graphs: for small, launch-bound models on a GPU),
            ``"max-autotune"`` (autotuned kernels and CUDA graphs), ``"max-autotune-no-cudagraphs"`` — or a dict
            of ``torch.compile`` arguments (``{"mode": ..., "fullgraph": True, "backend": ...}``). Anything else
            is an error at once.
        strategy: ``None`` / ``"auto"``: DDP when launched by torchrun with WORLD_SIZE > 1 (one process
            otherwise); ``"ddp"`` the same; ``"fsdp"``: under torchrun, parameters, gradients and optimizer
            state sharded across the ranks with torch's ``fully_shard`` (FSDP2; one process otherwise: a plain
            fit); ``"none"``: never distribute, even under torchrun.
        fsdp_units: with ``strategy="fsdp"``, the module classes each instance of which is sharded as one unit
            (its parameters gathered for its forward and backward only), e.g.
            ``(nn.TransformerEncoderLayer,)``; the whole model is always the outer unit. ``None``: the model's
            direct children that hold parameters.
        deterministic: ``True``: for the duration of each fit (and of ``predict`` / ``evaluate``), torch's
            deterministic algorithms (``torch.use_deterministic_algorithms(True)``), cuDNN benchmarking off and
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8``; all three are restored afterwards, also when fit fails. An op
            with no deterministic implementation is then an error naming it; ``"warn"`` warns instead.
            Pass ``seed=`` to fit as well: this switch does not seed.

    >>> import torch
    >>> acc = ln.Accelerator(device="cpu", deterministic=True)
    >>> with acc.run_context():
    ...     torch.are_deterministic_algorithms_enabled()
    True
    >>> torch.are_deterministic_algorithms_enabled()
    False
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        precision: str = "32",
        compile: bool | str | dict[str, Any] = False,
        strategy: str | None = None,
        deterministic: bool | str = False,
        fsdp_units: Sequence[type[nn.Module]] | None = None,
    ) -> None:
        if str(precision) not in _PRECISIONS:
            hint = _PRECISION_HINTS.get(str(precision).lower().replace("_", "-"))
            raise LanternaError(
                f"Accelerator(precision={precision!r}): use one of '32' (or '32-true'), 'bf16-mixed', '16-mixed'"
                + (f" (did you mean precision={hint!r}?)" if hint else "") + "."
            )
        precision = str(precision)
        if deterministic not in (True, False, "warn"):
            raise LanternaError(f"Accelerator(deterministic={deterministic!r}): use True, False or 'warn' "
                                "(deterministic algorithms, warning instead of failing on ops that have none).")
        if strategy not in (None, "auto", "ddp", "fsdp", "none"):
            raise LanternaError(f"strategy={strategy!r} is not one of None, 'auto', 'ddp', 'fsdp', 'none'.")
        if fsdp_units is not None:
            if strategy != "fsdp":
                raise LanternaError(f"fsdp_units= is for strategy='fsdp' (got strategy={strategy!r}); pass "
                                    "Accelerator(strategy='fsdp', fsdp_units=(...)).")
            units = tuple(fsdp_units) if isinstance(fsdp_units, (tuple, list, set, frozenset)) else (fsdp_units,)
            if not units or not all(isinstance(u, type) and issubclass(u, nn.Module) for u in units):
                raise LanternaError(f"fsdp_units={fsdp_units!r}: give nn.Module classes, e.g. "
                                    "fsdp_units=(nn.TransformerEncoderLayer,).")
            fsdp_units = units
        if strategy == "fsdp" and precision == "16-mixed":
            raise LanternaError("Accelerator(strategy='fsdp', precision='16-mixed'): float16 under FSDP needs a "
                                "grad scaler that agrees across shards, which lanterna does not provide; use "
                                "precision='bf16-mixed' (no scaler needed) or '32'.")
        self.device = _checked_device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = precision
        self.compile = _checked_compile(compile)
        self.strategy = strategy
        self.fsdp_units: tuple[type[nn.Module], ...] | None = fsdp_units
        self.amp_dtype = _PRECISIONS[precision]
        self.deterministic = deterministic

    def __repr__(self) -> str:
        extra = f", deterministic={self.deterministic!r}" if self.deterministic else ""
        if self.strategy is not None:
            extra += f", strategy={self.strategy!r}"
        return (f"Accelerator(device={str(self.device)!r}, precision={self.precision!r}, compile={self.compile!r}"
                f"{extra})")

    @contextlib.contextmanager
    def run_context(self) -> Iterator[None]:
        """The global settings of a fit (``deterministic``), put back as they were when it ends, also on an
        error. Nothing is changed when ``deterministic`` is False."""
        if not self.deterministic:
            yield
            return
        saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.benchmark, os.environ.get(_CUBLAS_VAR))
        torch.use_deterministic_algorithms(True, warn_only=self.deterministic == "warn")
        torch.backends.cudnn.benchmark = False
        if saved[3] not in _CUBLAS_DETERMINISTIC:  # keep a user's own deterministic setting (":16:8")
            os.environ[_CUBLAS_VAR] = ":4096:8"
        try:
            yield
        except Exception as e:  # torch's own error, or lanterna's first-batch error around it
            found = _NO_DETERMINISTIC.search(str(e))
            if found is None or self.deterministic == "warn":
                raise
            raise LanternaError(
                f"Accelerator(deterministic=True): the op {found.group(1)} has no deterministic implementation in "
                "torch, so this fit cannot be deterministic. Use another op, or Accelerator(deterministic='warn') "
                "to warn instead of failing (that op then stays non-deterministic), or deterministic=False."
            ) from e
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.benchmark = saved[2]
            if saved[3] is None:
                os.environ.pop(_CUBLAS_VAR, None)
            else:
                os.environ[_CUBLAS_VAR] = saved[3]

    @property
    def non_blocking(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def make_scaler(self) -> Any:
        if self.precision != "16-mixed":
            return None
        return torch.amp.GradScaler(self.device.type)

    def compile_options(self) -> dict[str, Any] | None:
        """The arguments given to ``torch.compile`` (None: no compilation): ``{}`` for ``compile=True``,
        ``{"mode": m}`` for a mode, the dict itself for a dict.

        Returns:
            A new dict, or None.

        >>> import lanterna as ln
        >>> ln.Accelerator(device="cpu", compile="max-autotune").compile_options()
        {'mode': 'max-autotune'}
        """
        spec = self.compile
        if spec is False:
            return None
        if spec is True:
            return {}
        return {"mode": spec} if isinstance(spec, str) else dict(spec)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled model runs as CUDA graphs: a CUDA device with mode ``"reduce-overhead"`` or
        ``"max-autotune"``, or inductor options with ``"triton.cudagraphs": True``. A graph's outputs are
        overwritten when it next runs, so lanterna then updates metrics at every batch instead of buffering
        the predictions (docs/performance.md, "GPU path")."""
        opts = self.compile_options()
        if opts is None or self.device.type != "cuda":
            return False
        options = opts.get("options") or {}
        return opts.get("mode") in _CUDA_GRAPH_MODES or bool(options.get("triton.cudagraphs"))

    def prepare_model(self, model: nn.Module) -> Callable[..., Any]:
        """Move the model to the device; return the callable used for forward passes."""
        model.to(self.device)
        opts = self.compile_options()
        if opts is None:
            return model
        try:
            return _CompiledOrEager(torch.compile(model, **opts), model, mark_steps=self.uses_cuda_graphs)
        except Exception as e:  # a backend that cannot even wrap the model
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); running eagerly.", stacklevel=3)
            return model


class _CompiledOrEager:
    """A ``torch.compile``'d module that falls back to the eager module, with one warning that says why, when
    compilation fails at a call (compilation is lazy: a missing C++ compiler or an unsupported construct
    shows up at the first forward, not when wrapping). Under CUDA graphs (``mark_steps``) every call starts a
    new step of torch's CUDA-graph trees (``torch.compiler.cudagraph_mark_step_begin``): each batch's forward
    is one replay, whose outputs the loop consumes within the batch."""

    def __init__(self, compiled: Callable[..., Any], model: nn.Module, mark_steps: bool = False) -> None:
        self.compiled, self.model, self.eager, self.mark_steps = compiled, model, False, mark_steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager:
            return self.model(*args, **kwargs)
        try:
            if self.mark_steps:
                torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, torch._dynamo.exc.TorchDynamoException):
                raise
            cause = getattr(e, "inner_exception", None) or e
            first = next((line for line in str(cause).splitlines() if line.strip()), "")
            warnings.warn(
                f"torch.compile could not compile {type(self.model).__name__} ({type(e).__name__}: "
                f"{type(cause).__name__}: {first}); "
                "running it eagerly instead: same results, without the speed-up. Fix the compiler backend (e.g. "
                "a C++ compiler for inductor on CPU, Triton on GPU) or pass Accelerator(compile=False).",
                stacklevel=2,
            )
            self.eager = True
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_COMPILE_HELP = ("Accelerator(compile=...) takes True or False, a torch.compile mode ('default', 'reduce-overhead' "
                 "for CUDA graphs, 'max-autotune', 'max-autotune-no-cudagraphs'), or a dict of torch.compile "
                 "arguments such as {'mode': 'reduce-overhead', 'fullgraph': True}")


def _known_modes() -> tuple[str, ...]:
    """The modes of this torch's inductor (imported only to name them in an error, or for a mode lanterna does
    not list)."""
    try:
        from torch._inductor import list_mode_options

        return tuple(list_mode_options())
    except Exception:  # pragma: no cover - a torch without inductor
        return _COMPILE_MODES


def _checked_mode(mode: Any, shown: str) -> None:
    if isinstance(mode, str) and (mode in _COMPILE_MODES or mode in _known_modes()):
        return
    modes = _known_modes()
    close = difflib.get_close_matches(str(mode), modes, n=1)
    raise LanternaError(f"Accelerator(compile={shown}): {mode!r} is not a torch.compile mode"
                        + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; the modes are {', '.join(repr(m) for m in modes)}. {_COMPILE_HELP}.")


def _checked_compile(spec: Any) -> bool | str | dict[str, Any]:
    """``compile=`` as given, once checked: a bool, a known mode, or a dict of ``torch.compile``'s arguments
    (known names; ``mode`` a known mode; not both ``mode`` and ``options``, which torch refuses)."""
    shown = repr(spec)
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, str):
        if spec.strip().lower() in ("true", "false", "yes", "no"):
            raise LanternaError(f"Accelerator(compile={shown}) is a string; pass the bool compile="
                                f"{spec.strip().lower() in ('true', 'yes')}. {_COMPILE_HELP}.")
        _checked_mode(spec, shown)
        return spec
    if isinstance(spec, dict):
        accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
        for key in spec:
            if key not in accepted:
                close = difflib.get_close_matches(str(key), accepted, n=1)
                raise LanternaError(f"Accelerator(compile={shown}): {key!r} is not an argument of torch.compile"
                                    + (f" (did you mean {close[0]!r}?)" if close else "")
                                    + f"; it takes {', '.join(accepted)}.")
        if spec.get("mode") is not None:
            _checked_mode(spec["mode"], shown)
            if spec.get("options") is not None:
                raise LanternaError(f"Accelerator(compile={shown}): torch.compile takes 'mode' or 'options', not "
                                    "both; put the mode's settings in 'options' (a mode is a set of options), or "
                                    "drop one.")
        return dict(spec)
    raise LanternaError(f"Accelerator(compile={shown}): a value of type {type(spec).__name__} is not a compile "
                        f"setting. {_COMPILE_HELP}.")
