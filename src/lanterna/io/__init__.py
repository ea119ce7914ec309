"""Files: atomic writes, the checkpoint format, RNG capture and restore, safe model artifacts.

Nothing here imports the rest of lanterna (except :mod:`lanterna.errors` and the version string), nor ever
unpickles a file: :mod:`lanterna.io.fitted` writes and reads the saved-model files from plain values, and
:mod:`lanterna.loading` (above :mod:`lanterna.api` and :mod:`lanterna.results`) rebuilds a ``Fitted`` from them.

>>> import tempfile, torch
>>> from lanterna.io import load_checkpoint, save_checkpoint
>>> path = save_checkpoint(tempfile.mkdtemp() + "/c.pt", {"model": {"w": torch.ones(2)}, "epoch": 3})
>>> load_checkpoint(path)["epoch"]
3
"""

from .artifact import save_artifact
from .artifact_read import read_artifact
from .atomic import atomic_write, atomic_write_bytes, fsync_dir, sweep_temp_files
from .checkpoint import (
    FORMAT_VERSION,
    CheckpointInfo,
    content_digest,
    load_checkpoint,
    sanitize,
    save_checkpoint,
    scan_checkpoints,
    verify_checkpoint,
)
from .resolve import resolve_module_class
from .rng import capture_rng_state, restore_rng_state

__all__ = [
    "FORMAT_VERSION",
    "CheckpointInfo",
    "atomic_write",
    "atomic_write_bytes",
    "capture_rng_state",
    "content_digest",
    "fsync_dir",
    "load_checkpoint",
    "read_artifact",
    "resolve_module_class",
    "restore_rng_state",
    "sanitize",
    "save_artifact",
    "save_checkpoint",
    "scan_checkpoints",
    "sweep_temp_files",
    "verify_checkpoint",
]
