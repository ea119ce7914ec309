"""MLflowLogger and WandbLogger with the real libraries: MLflow on a SQLite tracking store in a temp folder, read
back with ``MlflowClient``; W&B in offline mode, read back from the run's ``.wandb`` file (wandb's own protobuf
records, in its leveldb-log framing)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lanterna as ln

mlflow = pytest.importorskip("mlflow")  # slow to import: once for the module
from mlflow.tracking import MlflowClient  # noqa: E402


def _data(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[0.2], [-1.3], [-0.5]]) + 0.1 * torch.randn(n, 1, generator=g)


def _setup():
    return (ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
            .set_hparams(in_features=3, out_features=1).set_opt_hparams(lr=0.05, betas=(0.9, 0.99)))


class Crash(ln.Callback):
    def __init__(self, epoch: int, order: int = 0) -> None:
        self.epoch, self.order = epoch, order

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("power cut")


class CtrlC(ln.Callback):
    def on_epoch_end(self, ctx):
        if ctx.epoch == 2:
            ctx.interrupted = True  # what the first Ctrl-C sets


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: about 2 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    return uri, MlflowClient(uri), root


@pytest.fixture
def experiment(store, request):
    uri, client, root = store
    name = request.node.name
    exp_id = client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
    return name, exp_id, uri, client


def _runs(client, exp_id):
    return client.search_runs([exp_id])


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_mlflow_run_holds_the_fit(experiment, tmp_path):
    name, exp_id, uri, client = experiment
    logger = ln.callbacks.MLflowLogger(experiment=name, run_name="adam", tracking_uri=uri)
    fitted = _setup().fit(_data(), epochs=3, valid_data=_data(16, 1), verbose=False, callbacks=[logger])

    (run,) = _runs(client, exp_id)
    assert run.info.run_id == logger.run_id and run.info.run_name == "adam"
    assert run.info.status == "FINISHED" and run.data.tags["lanterna.status"] == "completed"
    assert run.data.params == {"in_features": "3", "out_features": "1", "opt_lr": "0.05", "opt_betas": "[0.9, 0.99]"}
    keys = {"epoch", "lr", "train_loss", "train_mae", "valid_loss", "valid_mae", "epoch_time"}
    assert set(fitted.history[0]) == keys and set(run.data.metrics) == keys
    for key in keys:  # exact values, one per epoch, step = epoch
        assert _history(client, run.info.run_id, key) == [(h["epoch"], float(h[key])) for h in fitted.history]

    local = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    loaded = ln.load(local)
    assert torch.equal(loaded.model.weight, fitted.model.weight) and loaded.history == fitted.history


def test_mlflow_failed_and_interrupted_runs(experiment):
    name, exp_id, uri, client = experiment
    with pytest.raises(ln.CallbackError, match="power cut"):
        _setup().fit(_data(), epochs=4, verbose=False,
                     callbacks=[ln.callbacks.MLflowLogger(experiment=name, run_name="crash", tracking_uri=uri),
                                Crash(2)])
    fitted = _setup().fit(_data(), epochs=4, verbose=False,
                          callbacks=[ln.callbacks.MLflowLogger(experiment=name, run_name="ctrl-c", tracking_uri=uri),
                                     CtrlC()])
    runs = {r.info.run_name: r for r in _runs(client, exp_id)}
    crash, ctrl_c = runs["crash"], runs["ctrl-c"]
    assert crash.info.status == "FAILED" and crash.data.tags["lanterna.status"] == "failed"
    assert [s for s, _ in _history(client, crash.info.run_id, "train_loss")] == [1]  # epoch 2 crashed before
    assert client.list_artifacts(crash.info.run_id) == []  # no model from a failed fit
    assert ctrl_c.info.status == "KILLED" and ctrl_c.data.tags["lanterna.status"] == "interrupted"
    assert _history(client, ctrl_c.info.run_id, "train_loss") == [(h["epoch"], h["train_loss"]) for h in fitted.history]
    assert len(fitted.history) == 2 and [a.path for a in client.list_artifacts(ctrl_c.info.run_id)] == ["model"]


def test_mlflow_resume_continues_the_run(experiment, tmp_path):
    """Epoch 2 is logged, then the fit crashes before AutoResume checkpoints it: the rerun resumes from epoch 1,
    trains epoch 2 again and continues the same run, each epoch logged once."""
    name, exp_id, uri, client = experiment
    resume = tmp_path / "resume"

    def run(*extra):
        logger = ln.callbacks.MLflowLogger(experiment=name, tracking_uri=uri)
        return _setup().fit(_data(), epochs=4, seed=0, verbose=False,
                            callbacks=[logger, ln.callbacks.AutoResume(resume), *extra]), logger

    with pytest.raises(ln.CallbackError):
        run(Crash(2, order=850))  # after the logger (800), before AutoResume (runs last)
    (first,) = _runs(client, exp_id)
    assert first.info.status == "FAILED" and [s for s, _ in _history(client, first.info.run_id, "epoch")] == [1, 2]

    fitted, logger = run()
    (only,) = _runs(client, exp_id)
    assert only.info.run_id == first.info.run_id == logger.run_id and only.info.status == "FINISHED"
    assert len(fitted.history) == 4
    for key in ("epoch", "train_loss", "train_mae"):
        assert _history(client, only.info.run_id, key) == [(h["epoch"], float(h[key])) for h in fitted.history]


def test_mlflow_rank_other_than_main_logs_nothing(experiment):
    name, exp_id, uri, client = experiment

    class NotMain(ln.Callback):
        order = -2000

        def on_fit_begin(self, ctx):
            ctx.is_main = False

    logger = ln.callbacks.MLflowLogger(experiment=name, tracking_uri=uri)
    _setup().fit(_data(), epochs=2, verbose=False, callbacks=[NotMain(), logger])
    assert _runs(client, exp_id) == [] and logger.run_id is None


def test_missing_mlflow_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without mlflow gives
    with pytest.raises(ImportError, match="pip install mlflow"):
        ln.callbacks.MLflowLogger()


# ---------------------------------------------------------------------------- W&B (offline)

BLOCK = 32768


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then leveldb-log
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _wandb_run(path: Path) -> dict:
    out: dict = {"config": {}, "history": [], "exit": None, "artifacts": [], "id": None}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"] = rec.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update
                                  if not i.key.startswith("_")})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update
                                  if not i.key.startswith("_")})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out["history"].append({k: v for k, v in items.items() if not k.startswith("_")}
                                  | {"_step": rec.history.step.num})
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.type, sorted(m.path for m in rec.artifact.manifest.contents)))
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return tmp_path


def _offline_runs(root: Path) -> list[dict]:
    return [_wandb_run(f) for f in sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))]


def test_wandb_offline_run_holds_the_fit(wandb_offline, tmp_path):
    resume = tmp_path / "resume"
    with pytest.raises(ln.CallbackError):
        _setup().fit(_data(), epochs=3, seed=0, verbose=False,
                     callbacks=[ln.callbacks.WandbLogger(project="demo"), ln.callbacks.AutoResume(resume), Crash(2)])
    fitted = _setup().fit(_data(), epochs=3, seed=0, verbose=False,
                          callbacks=[ln.callbacks.WandbLogger(project="demo"), ln.callbacks.AutoResume(resume)])
    first, second = _offline_runs(wandb_offline)  # offline, a resumed run is a second folder: synced into one
    assert first["id"] == second["id"]
    assert first["config"] == second["config"] == {"in_features": 3, "out_features": 1, "opt_lr": 0.05,
                                                   "opt_betas": [0.9, 0.99]}
    assert (first["exit"], second["exit"]) == (1, 0)
    logged = first["history"] + second["history"]
    assert [h["_step"] for h in logged] == [1, 2, 3]  # epoch 2 crashed before the logger: logged once, after
    for h, rec in zip(logged, fitted.history):
        assert {k: v for k, v in h.items() if k != "_step"} == {k: float(v) for k, v in rec.items()}
    assert first["artifacts"] == []
    saved = fitted.save(tmp_path / "same")  # the artifact holds what fitted.save writes (names hash the weights)
    assert second["artifacts"] == [("model", sorted(p.name for p in saved.iterdir()))]
