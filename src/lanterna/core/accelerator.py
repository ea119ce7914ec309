"""Devices, precision and compilation (API.md §8)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import LanternaError

__all__ = ["Accelerator", "default_device"]

_PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def default_device() -> torch.device:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Accelerator:
    """Where and how the model runs.

    >>> acc = Accelerator(device="cpu", precision="bf16-mixed")
    >>> acc.device
    device(type='cpu')

    Args:
        device: ``None`` picks cuda → mps → cpu; or any torch device spec.
        precision: ``"32"``, ``"bf16-mixed"`` (autocast to bfloat16) or ``"16-mixed"`` (float16 with a
            gradient scaler).
        compile: ``True`` or a dict of ``torch.compile`` options, for training and inference.
        strategy: ``None`` / ``"auto"``: DDP when launched by torchrun with WORLD_SIZE > 1 (one process
            otherwise); ``"ddp"`` the same; ``"none"``: never distribute, even under torchrun.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        precision: str = "32",
        compile: bool | dict[str, Any] = False,
        strategy: str | None = None,
    ) -> None:
        precision = str(precision)
        if precision not in _PRECISIONS:
            raise LanternaError(f"precision={precision!r} is not one of {sorted(_PRECISIONS)}.")
        if strategy not in (None, "auto", "ddp", "none"):
            raise LanternaError(f"strategy={strategy!r} is not one of None, 'auto', 'ddp', 'none'.")
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = precision
        self.compile = compile
        self.strategy = strategy
        self.amp_dtype = _PRECISIONS[precision]

    def __repr__(self) -> str:
        return f"Accelerator(device={str(self.device)!r}, precision={self.precision!r}, compile={self.compile!r})"

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
