"""TensorBoard in Keras's layout, on seed 001's flow: a LeNet-like CNN on 1×28×28 images, SGD with momentum,
CrossEntropy and accuracy. The event files are read back with tensorboard's own EventAccumulator, and served
by a real ``tensorboard`` process whose HTTP API returns the scalars."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lanterna as ln

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


class GarmentClassifier(nn.Module):
    """Seed 001's LeNet-5 variant (narrower, to keep the test fast)."""

    def __init__(self, c1: int = 4, c2: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.c2 = c2
        self.fc1 = nn.Linear(c2 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, self.c2 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


def _images(n: int, seed: int):
    """1×28×28 images: class k is a bright horizontal bar at a class-specific height, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    for k in range(10):
        rows = slice(2 + 2 * k, 4 + 2 * k)
        x[y == k, 0, rows, 4:24] += 1.5
    return x, y


def _setup():
    return ln.setup(GarmentClassifier, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.SGD,
                    metrics=[ln.metrics.Accuracy()]).set_opt_hparams(lr=0.02, momentum=0.9)


EPOCHS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    log_dir = tmp_path_factory.mktemp("tb") / "fashion_trainer"
    fitted = _setup().set_hparams(c1=4, c2=8).fit(
        _images(320, 0), epochs=EPOCHS, valid_data=_images(96, 1), seed=0, verbose=False,
        dataloader_options={"batch_size": 32},
        callbacks=[ln.callbacks.TensorBoard(log_dir, histogram_freq=2, hparams=True)])
    return fitted, log_dir


def _scalars(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_keras_layout_one_point_per_epoch_for_train_and_valid(run):
    fitted, log_dir = run
    assert fitted.history[-1]["valid_acc"] > 0.5  # it learned: the curves are real
    train, valid = _scalars(log_dir / "train"), _scalars(log_dir / "valid")
    assert set(train.Tags()["scalars"]) == {"loss", "acc", "lr"}
    assert set(valid.Tags()["scalars"]) == {"loss", "acc"}
    for acc, set_name in ((train, "train"), (valid, "valid")):
        for tag in ("loss", "acc"):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == list(range(1, EPOCHS + 1))
            expected = [r[f"{set_name}_{tag}"] for r in fitted.history]
            assert [e.value for e in events] == pytest.approx(expected, rel=1e-6)
    assert [e.value for e in train.Scalars("lr")] == pytest.approx([0.02] * EPOCHS)


def test_histograms_and_hparams_flags(run):
    fitted, log_dir = run
    train = _scalars(log_dir / "train")
    hists = train.Tags()["histograms"]
    assert "weights/conv1.weight" in hists and "gradients/fc2.bias" in hists
    assert [e.step for e in train.Histograms("weights/conv1.weight")] == [2]  # every 2 epochs
    grad = train.Histograms("gradients/conv1.weight")[0].histogram_value
    assert grad.num == 4 * 1 * 5 * 5 and grad.max > grad.min
    root = EventAccumulator(str(log_dir))
    root.Reload()
    content = root.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in content and "_hparams_/session_start_info" in content
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["c1"].number_value == 4 and hp["opt_lr"].number_value == 0.02
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {(m.name.group, m.name.tag) for m in exp.metric_infos} == {
        ("train", "loss"), ("train", "acc"), ("valid", "loss"), ("valid", "acc")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensorboard_cli() -> str:
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.exists():
        return str(exe)
    found = shutil.which("tensorboard")
    if found is None:
        pytest.skip("the tensorboard command is not installed next to the Python interpreter")
    return found


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - localhost only
        return json.loads(r.read().decode())


@pytest.mark.slow
def test_a_real_tensorboard_server_serves_the_scalars(run, tmp_path):
    fitted, log_dir = run
    port = _free_port()
    with open(tmp_path / "tb.log", "w") as log:
        proc = subprocess.Popen(
            [_tensorboard_cli(), "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port),
             "--load_fast", "false", "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, points, last_error = time.monotonic() + 90, {}, None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}:\n{(tmp_path / 'tb.log').read_text()}")
            try:
                for run_name in ("train", "valid"):
                    points[run_name] = _get_json(f"{base}/data/plugin/scalars/scalars?run={run_name}&tag=loss")
                if all(len(p) == EPOCHS for p in points.values()):
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
                last_error = e
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the scalars within 90 s (last error: {last_error}); "
                        f"log:\n{(tmp_path / 'tb.log').read_text()[-2000:]}")
        runs = _get_json(f"{base}/data/runs")
        assert {"train", "valid"} <= set(runs)
        for run_name in ("train", "valid"):
            steps = [p[1] for p in points[run_name]]
            values = [p[2] for p in points[run_name]]
            assert steps == list(range(1, EPOCHS + 1))
            assert values == pytest.approx([r[f"{run_name}_loss"] for r in fitted.history], rel=1e-6)
        acc = _get_json(f"{base}/data/plugin/scalars/scalars?run=valid&tag=acc")
        assert [p[2] for p in acc] == pytest.approx([r["valid_acc"] for r in fitted.history], rel=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_default_log_dir_is_runs_timestamp_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = _images(32, 2)
    cb = ln.callbacks.TensorBoard()
    _setup().fit((x, y), epochs=1, verbose=False, callbacks=[cb])
    dirs = list((tmp_path / "runs").iterdir())
    assert len(dirs) == 1 and dirs[0].name.endswith("_" + socket.gethostname())
    assert cb.log_dir == Path("runs") / dirs[0].name
    assert (dirs[0] / "train").is_dir() and not (dirs[0] / "valid").exists()  # no validation, no valid/ run
    assert _scalars(dirs[0] / "train").Scalars("loss")[0].step == 1


def test_only_the_main_process_writes(tmp_path):
    class NotMain(ln.Callback):
        order = -500

        def on_fit_begin(self, ctx):
            ctx.is_main = False

    _setup().fit(_images(32, 2), epochs=1, verbose=False,
                 callbacks=[NotMain(), ln.callbacks.TensorBoard(tmp_path / "tb")])
    assert not (tmp_path / "tb").exists()


def test_files_are_whole_after_a_failing_callback(tmp_path):
    class Boom(ln.Callback):
        order = 800

        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                raise RuntimeError("boom")

    with pytest.raises(ln.CallbackError, match="Boom raised in on_epoch_end"):
        _setup().fit(_images(32, 2), epochs=5, verbose=False,
                     callbacks=[Boom(), ln.callbacks.TensorBoard(tmp_path / "tb")])
    assert [e.step for e in _scalars(tmp_path / "tb" / "train").Scalars("loss")] == [1, 2]


@pytest.mark.slow
def test_tensorboard_is_imported_lazily_with_a_clear_error_when_missing(monkeypatch):
    code = ("import sys, lanterna as ln; ln.setup; ln.callbacks.EarlyStopping(); "
            "assert 'tensorboard' not in sys.modules, 'imported eagerly'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    # with tensorboard missing, constructing the callback names the extra to install
    for name in [m for m in sys.modules if m.startswith(("tensorboard", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'lanterna\[tensorboard\]'"):
        ln.callbacks.TensorBoard()
    monkeypatch.undo()
    with pytest.raises(ln.LanternaError, match="histogram_freq"):
        ln.callbacks.TensorBoard(histogram_freq=-1)
