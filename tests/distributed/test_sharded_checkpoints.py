"""The on-disk rules of FSDP's sharded checkpoints, checked in one process (the torchrun tests write real ones):
a folder is a checkpoint only once committed under its name; a damaged shard is told from a whole one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lanterna.errors import DamagedCheckpointError
from lanterna.integrations.even_batches import EvenBatches, empty_like
from lanterna.integrations.fsdp import METADATA_FILE, STATE_FILE, ShardedCheckpoints
from lanterna.io.artifact_read import file_sha256
from lanterna.io.atomic import TEMP_MARKER, sweep_temp_files
from lanterna.io.checkpoint import remove_checkpoint, save_checkpoint


def fake_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"shard of rank 0" * 10)
    (folder / METADATA_FILE).write_bytes(b"metadata")
    files = {p.name: file_sha256(p) for p in folder.iterdir()}
    save_checkpoint(folder / STATE_FILE, {"model": {}, "epoch": step, "step": step,
                                          "sharded": {"format": "torch.distributed.checkpoint", "files": files}})
    return folder


def test_only_committed_folders_are_found_newest_first_and_temp_folders_are_swept(tmp_path: Path) -> None:
    store = ShardedCheckpoints(world=None)  # type: ignore[arg-type]
    fake_checkpoint(tmp_path / "resume-epoch-0001.pt", 1)
    fake_checkpoint(tmp_path / "resume-epoch-0002.pt", 2)
    half = fake_checkpoint(tmp_path / f".resume-epoch-0003.pt{TEMP_MARKER}dcp0123", 3)  # killed before commit
    (tmp_path / "resume-epoch-0004.pt").mkdir()  # no state.pt: never complete
    damaged: list[Path] = []
    found = store.scan(tmp_path, pattern="resume-*.pt", on_damaged=lambda p, e: damaged.append(p))
    assert [f.step for f in found] == [2, 1]
    assert damaged == [tmp_path / "resume-epoch-0004.pt"]
    for info in found:
        store.verify(info.state, info.path)
    assert half in sweep_temp_files(tmp_path) and not half.exists()


def test_a_flipped_byte_in_a_shard_or_a_missing_shard_is_a_damaged_checkpoint(tmp_path: Path) -> None:
    store = ShardedCheckpoints(world=None)  # type: ignore[arg-type]
    ck = fake_checkpoint(tmp_path / "a.pt", 1)
    (info,) = store.scan(tmp_path, pattern="*.pt")
    data = bytearray((ck / "__0_0.distcp").read_bytes())
    data[3] ^= 1
    (ck / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match="__0_0.distcp"):
        store.verify(info.state, info.path)
    (ck / "__0_0.distcp").unlink()
    with pytest.raises(DamagedCheckpointError, match="missing"):
        store.verify(info.state, info.path)
    remove_checkpoint(ck)
    assert not ck.exists()


def test_even_batches_on_one_process_is_the_source_itself_and_empty_batches_keep_structure() -> None:
    from lanterna.core.world import Local
    from lanterna.data import make_source

    x, y = torch.arange(14.0).view(7, 2), torch.arange(7)
    src = make_source((x, y), train=False, options={"batch_size": 3})
    even = EvenBatches(src, Local())
    assert even.num_batches() == 3
    assert [b[0].shape[0] for b in even] == [3, 3, 1]
    ex, ey = empty_like({"x": x, "pair": (y, 5)})["x"], empty_like((x, y))[1]
    assert ex.shape == (0, 2) and ey.dtype == torch.int64 and ey.shape == (0,)
