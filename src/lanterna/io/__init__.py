"""Files: atomic writes, the checkpoint format, RNG capture and restore, safe model artifacts.

Nothing here imports the rest of lanterna (except :mod:`lanterna.errors`; :mod:`lanterna.io.fitted`, behind
``fitted.save`` / ``ln.load``, builds a ``Fitted`` inside its functions), nor ever unpickles a file.

>>> from lanterna.io import save_checkpoint, load_checkpoint, capture_rng_state
"""

from .artifact import read_artifact, resolve_module_class, save_artifact
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
