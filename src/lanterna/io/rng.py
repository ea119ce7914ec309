"""Capture and restore every random number generator a training run draws from.

Python's ``random``, NumPy's global generator, torch's CPU generator, every initialised CUDA device's
generator (and MPS's), plus any ``torch.Generator`` objects given by name (a DataLoader's or a sampler's
generator: the in-memory shuffle state). The captured state holds only tensors, ints, floats, strings and
tuples, so it round-trips through ``torch.load(weights_only=True)``. Capturing draws nothing: a checkpoint
taken in the middle of a run leaves the run's random streams untouched.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The state of all global generators, and of ``generators`` (name → ``torch.Generator``).

    >>> import torch
    >>> from lanterna.io.rng import capture_rng_state, restore_rng_state
    >>> state = capture_rng_state()
    >>> a = torch.rand(3)
    >>> restore_rng_state(state)
    >>> torch.equal(a, torch.rand(3))
    True
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    kind, keys, pos, has_gauss, cached = np_state
    state: dict[str, Any] = {
        "python": (int(version), tuple(int(k) for k in internal), None if gauss is None else float(gauss)),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": [],
        "mps": None,
        "generators": {},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        try:
            state["mps"] = mps.get_rng_state()
        except RuntimeError:
            state["mps"] = None
    for name, gen in (generators or {}).items():
        state["generators"][name] = gen.get_state()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what :func:`capture_rng_state` captured (generators matched by name; names missing on either
    side are left alone).

    >>> import torch
    >>> from lanterna.io.rng import capture_rng_state, restore_rng_state
    >>> g = torch.Generator().manual_seed(0)
    >>> s = capture_rng_state({"loader": g})
    >>> x = torch.rand(2, generator=g)
    >>> restore_rng_state(s, {"loader": g})
    >>> torch.equal(x, torch.rand(2, generator=g))
    True
    """
    py = state.get("python")
    if py is not None:
        version, internal, gauss = py
        random.setstate((int(version), tuple(int(k) for k in internal), gauss))
    npst = state.get("numpy")
    if npst is not None:
        kind, keys, pos, has_gauss, cached = npst
        keys_np = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((kind, keys_np.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], i)
    if state.get("mps") is not None and getattr(torch, "mps", None) is not None:
        with contextlib.suppress(RuntimeError):
            torch.mps.set_rng_state(state["mps"])
    saved = state.get("generators") or {}
    for name, gen in (generators or {}).items():
        if name in saved:
            gen.set_state(saved[name])
