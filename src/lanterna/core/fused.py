"""Optimizers that apply or skip a step on the device, from a flag they read there.

torch's fused optimizers (Adam, AdamW, SGD, Adagrad with ``fused=True``) take a ``found_inf`` tensor, the
contract ``GradScaler`` uses: when it holds 1 the fused kernel leaves the parameters and the optimizer's state as
they are (the step counters are put back), and nothing is read by the host. The NaN guard
(:class:`~lanterna.callbacks.TerminateOnNaN`) sets that flag on the device, so on an accelerator it needs no
synchronisation per batch (docs/performance.md, "GPU path").

For that, when lanterna builds Adam, AdamW or SGD itself over a model on CUDA and ``set_opt_hparams`` sets
neither ``fused`` nor ``foreach``, it builds them with ``fused=True`` (:func:`fused_opt_hparams`): torch's
fastest implementation on CUDA, and one that can skip on the device. Any other optimizer keeps the guard's
per-step read of the flag.

>>> import torch
>>> from lanterna.core.fused import skips_on_device
>>> p = torch.nn.Parameter(torch.zeros(2))
>>> skips_on_device(torch.optim.Adam([p], fused=True)), skips_on_device(torch.optim.Adam([p]))
(True, False)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["AUTO_FUSED", "fused_opt_hparams", "skips_on_device"]

#: the optimizer classes lanterna builds with ``fused=True`` on CUDA (torch has fused CUDA kernels for them)
AUTO_FUSED: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fused_opt_hparams(factory: Any, opt_hparams: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``opt_hparams``, plus ``fused=True`` when ``factory`` is Adam, AdamW or SGD (itself, or wrapped by
    ``ln.with_param_groups``), every parameter of ``model`` is a floating-point tensor on a CUDA device, no
    embedding has sparse gradients, and ``opt_hparams`` sets none of ``fused``, ``foreach``, ``differentiable``.

    Args:
        factory: the optimizer class (or factory) lanterna is about to call.
        opt_hparams: the arguments of ``set_opt_hparams``.
        model: the model, already on its device.

    Returns:
        A new dict of the arguments to build the optimizer with.

    >>> import torch
    >>> from lanterna.core.fused import fused_opt_hparams
    >>> fused_opt_hparams(torch.optim.Adam, {"lr": 0.01}, torch.nn.Linear(3, 1))  # on the CPU: as given
    {'lr': 0.01}
    """
    out = dict(opt_hparams)
    inner = getattr(factory, "optimizer", None) if callable(getattr(factory, "param_groups", None)) else factory
    if inner not in AUTO_FUSED or any(key in out for key in ("fused", "foreach", "differentiable")):
        return out
    params = list(model.parameters())
    if not params or not all(p.device.type == "cuda" and p.is_floating_point() for p in params):
        return out
    if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules()):
        return out  # fused kernels take no sparse gradients
    out["fused"] = True
    return out


def skips_on_device(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` decides on the device to apply or skip its step from a ``found_inf`` attribute (GradScaler's
    contract: ``_step_supports_amp_scaling``, and a ``step`` without the older ``grad_scaler`` keyword); for
    torch's optimizers, every parameter group must be fused.

    Args:
        opt: an optimizer.

    Returns:
        True for torch's fused optimizers (and custom ones that follow the contract).

    >>> import torch
    >>> from lanterna.core.fused import skips_on_device
    >>> skips_on_device(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, fused=True))
    True
    """
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    try:
        if "grad_scaler" in inspect.signature(opt.step).parameters:
            return False
    except (TypeError, ValueError):
        return False
    if "fused" in getattr(opt, "defaults", {}):
        return all(group.get("fused") for group in opt.param_groups)
    return True
