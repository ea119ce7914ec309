"""The checkpoint file: loads with torch.load(weights_only=True), "model" is the state_dict, and any damage
(truncation, bit flips, an empty file, a missing checksum, a newer format) is a typed error."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lanterna as ln
from lanterna.io import checkpoint as ckpt_mod
from lanterna.io import load_checkpoint, save_checkpoint, scan_checkpoints
from lanterna.io.checkpoint import FORMAT_VERSION, content_digest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _state(step=3):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, {"model": model.state_dict(), "optimizers": {"opt": opt.state_dict()}, "epoch": 2,
                   "step": step, "history": [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}],
                   "payload": torch.arange(1000, dtype=torch.float32)}


def test_round_trip_with_plain_torch_load(tmp_path):
    model, state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION and "sha256" in raw["integrity"]
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(raw["model"])
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), model(x))
    loaded = load_checkpoint(path)
    assert loaded["history"] == state["history"] and loaded["step"] == 3
    torch.optim.Adam(fresh.parameters()).load_state_dict(loaded["optimizers"]["opt"])


def _expect_damaged(path):
    with pytest.raises(ln.DamagedCheckpointError):
        load_checkpoint(path)


def test_truncated_zero_byte_and_checksumless_files_are_typed_errors(tmp_path):
    _, state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 10, 20):
        path.write_bytes(data[:cut])
        _expect_damaged(path)
    path.write_bytes(b"")
    _expect_damaged(path)
    torch.save({"model": state["model"], "epoch": 2}, path)  # a plain torch.save: no integrity record
    _expect_damaged(path)
    path.write_bytes(b"\x80\x04K\x01.")  # a bare pickle
    _expect_damaged(path)


def test_a_flip_in_the_tensor_data_is_detected(tmp_path):
    _, state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(torch.arange(1000, dtype=torch.float32).numpy().tobytes()[400:432]) + 5
    assert at > 5
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ln.DamagedCheckpointError, match="checksum"):
        load_checkpoint(path)


def test_no_bit_flip_anywhere_yields_altered_content(tmp_path):
    _, state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    good = path.read_bytes()
    reference = content_digest({k: v for k, v in load_checkpoint(path).items() if k != "integrity"})
    rng = random.Random(0)
    for offset in rng.sample(range(len(good)), 80):
        data = bytearray(good)
        data[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(path)
        except ln.DamagedCheckpointError:
            continue
        # a flip in zip padding or metadata that leaves every value intact is harmless
        assert content_digest({k: v for k, v in loaded.items() if k != "integrity"}) == reference


def test_a_newer_format_version_is_refused_clearly(tmp_path):
    _, state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(ln.CheckpointVersionError, match="newer lanterna"):
        load_checkpoint(path)


def test_state_that_weights_only_cannot_load_is_refused_at_save(tmp_path):
    class Opaque:
        pass

    with pytest.raises(ln.CheckpointError, match=r"callbacks.*Opaque"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}, "callbacks": {"Mine": {"thing": Opaque()}}})
    assert not any(tmp_path.iterdir())


def test_full_disk_leaves_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch):
    _, state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state)
    before = path.read_bytes()

    def full_disk_save(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk_save)
    with pytest.raises(ln.CheckpointError, match="No space left"):
        save_checkpoint(path, {**state, "step": 4})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]


def test_latest_goes_by_recorded_step_not_by_name(tmp_path):
    _, state = _state()
    save_checkpoint(tmp_path / "zzz.pt", {**state, "step": 5, "epoch": 1})
    save_checkpoint(tmp_path / "aaa.pt", {**state, "step": 9, "epoch": 2})
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04garbage")
    damaged = []
    found = scan_checkpoints(tmp_path, on_damaged=lambda p, e: damaged.append(p.name))
    assert [c.path.name for c in found] == ["aaa.pt", "zzz.pt"]
    assert damaged == ["broken.pt"]


# ---------------------------------------------------------------------------- real write failures

_CHILD = """
import json, resource, signal, sys, torch
sys.path.insert(0, {src!r})
import lanterna as ln
from lanterna.io import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing us
save_checkpoint({path!r}, {{"model": {{"w": torch.ones(4)}}, "epoch": 1}})
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_checkpoint({path!r}, {{"model": {{"w": torch.zeros(100_000)}}, "epoch": 2}})
    print(json.dumps({{"error": None}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__, "message": str(e), "cause": repr(e.__cause__)}}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_a_file_size_limit_is_a_checkpoint_error_naming_path_and_cause(tmp_path):
    target = tmp_path / "c.pt"
    code = _CHILD.format(src=SRC, path=str(target))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["error"] == "CheckpointError"
    assert str(target) in result["message"] and "file size limit" in result["message"]
    assert "enforce fail" not in result["message"] and "File too large" in result["cause"]
    assert load_checkpoint(target)["epoch"] == 1  # the previous file survives
    assert os.listdir(tmp_path) == ["c.pt"]


def test_a_full_tmpfs_is_a_checkpoint_error_and_the_previous_file_survives(tmp_path):
    mnt = _mount_tmpfs(tmp_path, "size=256k")
    try:
        path = mnt / "c.pt"
        save_checkpoint(path, {"model": {"w": torch.ones(4)}, "epoch": 1})
        before = path.read_bytes()
        with pytest.raises(ln.CheckpointError, match=r"c\.pt.*disk is full \(No space left on device\)") as info:
            save_checkpoint(path, {"model": {"w": torch.zeros(100_000)}, "epoch": 2})
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
        assert path.read_bytes() == before
        assert os.listdir(mnt) == ["c.pt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_read_only_folder_is_a_checkpoint_error_naming_it(tmp_path):
    if os.name == "posix" and os.geteuid() == 0:  # root writes through file modes: use a read-only mount
        folder = _mount_tmpfs(tmp_path, "size=64k,ro")
        words = "read-only file system"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        words = "permission denied"
    try:
        with pytest.raises(ln.CheckpointError, match=rf"{folder}.*{words}"):
            save_checkpoint(folder / "c.pt", {"model": {"w": torch.ones(4)}})
    finally:
        if os.name == "posix" and os.geteuid() == 0:
            subprocess.run(["umount", str(folder)], check=False)
        else:
            folder.chmod(0o755)


def _mount_tmpfs(tmp_path, options):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not allowed here")
    return mnt
