"""Devices, precision and compilation (README.md "Devices"; compilation: docs/saving.md "Compile")."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
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
        compile: ``True`` or a dict of ``torch.compile`` options, for training and inference.
        strategy: ``None`` / ``"auto"``: DDP when launched by torchrun with WORLD_SIZE > 1 (one process
            otherwise); ``"ddp"`` the same; ``"none"``: never distribute, even under torchrun.
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
        compile: bool | dict[str, Any] = False,
        strategy: str | None = None,
        deterministic: bool | str = False,
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
        if strategy not in (None, "auto", "ddp", "none"):
            raise LanternaError(f"strategy={strategy!r} is not one of None, 'auto', 'ddp', 'none'.")
        self.device = _checked_device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = precision
        self.compile = compile
        self.strategy = strategy
        self.amp_dtype = _PRECISIONS[precision]
        self.deterministic = deterministic

    def __repr__(self) -> str:
        extra = f", deterministic={self.deterministic!r}" if self.deterministic else ""
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

    def prepare_model(self, model: nn.Module) -> Callable[..., Any]:
        """Move the model to the device; return the callable used for forward passes."""
        model.to(self.device)
        if not self.compile:
            return model
        opts = self.compile if isinstance(self.compile, dict) else {}
        try:
            return _CompiledOrEager(torch.compile(model, **opts), model)
        except Exception as e:  # a backend that cannot even wrap the model
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); running eagerly.", stacklevel=3)
            return model


class _CompiledOrEager:
    """A ``torch.compile``'d module that falls back to the eager module, with one warning that says why, when
    compilation fails at a call (compilation is lazy: a missing C++ compiler or an unsupported construct
    shows up at the first forward, not when wrapping)."""

    def __init__(self, compiled: Callable[..., Any], model: nn.Module) -> None:
        self.compiled, self.model, self.eager = compiled, model, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager:
            return self.model(*args, **kwargs)
        try:
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
