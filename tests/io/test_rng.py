"""RNG capture/restore: every stream comes back, capturing draws nothing, the state survives weights_only."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from lanterna.io import capture_rng_state, restore_rng_state, save_checkpoint
from lanterna.io.checkpoint import sanitize


def _draw(gen):
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist(),
            random.gauss(0, 1), float(np.random.randn()))


def test_all_streams_restored_after_a_weights_only_round_trip():
    gen = torch.Generator().manual_seed(5)
    random.gauss(0, 1)  # leave a cached gaussian in Python's and NumPy's state
    np.random.randn()
    state = capture_rng_state({"loader": gen})
    buf = io.BytesIO()
    torch.save(sanitize(state), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    first = _draw(gen)
    restore_rng_state(loaded, {"loader": gen})
    assert _draw(gen) == first


def test_capture_and_save_consume_no_randomness(tmp_path):
    gen = torch.Generator().manual_seed(1)
    before = capture_rng_state({"g": gen})
    state = capture_rng_state({"g": gen})
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}, "rng": state})
    after = capture_rng_state({"g": gen})
    assert before["python"] == after["python"]
    assert torch.equal(before["numpy"][1], after["numpy"][1]) and before["numpy"][2] == after["numpy"][2]
    assert torch.equal(before["torch"], after["torch"])
    assert torch.equal(before["generators"]["g"], after["generators"]["g"])
