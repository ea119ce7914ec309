"""DataLoader options: ``dataloader_options`` checked before any loader is built, a DataLoader's own options
read back to rebuild it over another dataset, and the test for a loader lanterna may rebuild (docs/models.md,
"Data forms").
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from ..errors import DataError

__all__ = ["custom_sampler", "loader_options"]

_LOADER_DEFAULTS: dict[str, Any] = {"batch_size": 32}


def custom_sampler(dl: DataLoader) -> str | None:
    """The class name of ``dl``'s sampler (or batch sampler) when it is not one that ``DataLoader`` builds from
    ``batch_size`` and ``shuffle`` over the whole dataset; None for those (which lanterna may rebuild).

    >>> from torch.utils.data import DataLoader
    >>> from lanterna.data.options import custom_sampler
    >>> custom_sampler(DataLoader(range(10), batch_size=2, shuffle=True)) is None
    True
    """
    if dl.batch_size is None or type(dl.batch_sampler) is not BatchSampler:
        return type(dl.batch_sampler).__name__
    sampler = dl.sampler
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler._num_samples is not None:
            return type(sampler).__name__
    elif type(sampler) is not SequentialSampler:
        return type(sampler).__name__
    try:
        whole = len(sampler.data_source) == len(dl.dataset)  # type: ignore[arg-type]
    except TypeError:
        whole = False
    return None if whole else type(sampler).__name__


def _loader_is_plain(dl: DataLoader) -> bool:
    """True when a DataLoader has the default sampler, batch sampler and collate (fast path allowed)."""
    return custom_sampler(dl) is None and dl.collate_fn is default_collate


_LOADER_KEYS = frozenset(inspect.signature(DataLoader.__init__).parameters) - {"self", "dataset"}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


# the options lanterna reads itself (the rest go to DataLoader as they are): test and requirement
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (0: load in the main process)"),
    "prefetch_factor": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or None"),
    "timeout": (lambda v: isinstance(v, numbers.Real) and not _is_bool(v) and v >= 0,  # type: ignore[operator]
                "a number of seconds >= 0"),
    "generator": (lambda v: v is None or isinstance(v, torch.Generator), "a torch.Generator or None"),
    **{k: (_is_bool, "True or False") for k in ("shuffle", "drop_last", "pin_memory", "persistent_workers",
                                                 "in_order")},
}


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``dataloader_options``: known keys, values of the right type (NumPy scalars made Python's)."""
    if options is not None and not isinstance(options, Mapping):
        raise DataError(
            f"dataloader_options must be a dict such as {{'batch_size': 64}}; got a {type(options).__name__}."
        )
    opts = dict(options or {})
    if "dataset" in opts:
        raise DataError("dataloader_options cannot contain 'dataset'; pass the data itself.")
    for key in opts:
        if key not in _LOADER_KEYS:
            close = difflib.get_close_matches(str(key), _LOADER_KEYS, n=1)
            raise DataError(
                f"dataloader_options has an unknown option {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f". DataLoader takes: {', '.join(sorted(_LOADER_KEYS))}."
            )
    for key, (ok, need) in _OPTION_RULES.items():
        if key in opts:
            value = opts[key]
            if not ok(value):
                raise DataError(f"dataloader_options[{key!r}]={value!r} is not valid: {key} must be {need}.")
            if _is_int(value):
                opts[key] = int(value)
            elif _is_bool(value):
                opts[key] = bool(value)
    return opts


def loader_options(dl: DataLoader) -> dict[str, Any]:
    """The options to rebuild ``dl`` over another dataset or sampler (all but dataset/sampler/shuffle)."""
    opts: dict[str, Any] = {
        "batch_size": dl.batch_size, "num_workers": dl.num_workers, "collate_fn": dl.collate_fn,
        "pin_memory": dl.pin_memory, "drop_last": dl.drop_last, "timeout": dl.timeout,
        "worker_init_fn": dl.worker_init_fn, "generator": dl.generator,
    }
    if dl.num_workers > 0:
        opts.update(prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers,
                    multiprocessing_context=dl.multiprocessing_context)
    if getattr(dl, "pin_memory_device", ""):
        opts["pin_memory_device"] = dl.pin_memory_device
    if getattr(dl, "in_order", True) is False:
        opts["in_order"] = False
    return opts


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by our caller point at the first frame outside lanterna."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level
