"""The fit's state (core/state.py, issue 12): the checkpoint dict keeps its keys and their order, its "meta"
describes the module as fitted.save does (one schema), a checkpoint written before that schema still resumes
and loads, and the batch skipper of a resumed epoch (data/resume.py) skips exactly what was trained."""

from __future__ import annotations

import pytest
import torch
from conftest import Net, make_luz_data
from torch import nn

import lanterna as ln
from lanterna.data import TensorBatches
from lanterna.data.resume import SkipBatches
from lanterna.io import load_checkpoint, read_artifact, save_checkpoint
from lanterna.io.encoding import decode_json

X, Y = make_luz_data(96)
KEYS = ["format", "format_version", "model", "optimizers", "schedulers", "scaler", "epoch", "step", "stop_training",
        "history", "rng", "callbacks", "meta", "versions", "integrity"]
OLD_META = {"module", "optimizers", "param_shapes", "schedulers", "hparams", "opt_hparams"}  # lanterna <= #11


def _setup():
    return ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam).set_hparams(d_in=3, d_hidden=8, d_out=1)


def _to_file(tmp_path):
    return ln.callbacks.ModelCheckpoint(tmp_path / "c.pt", monitor="train_loss")


class CrashAtEpoch(ln.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_checkpoint_keys_and_their_order_are_those_of_the_format(tmp_path):
    _setup().fit((X, Y), epochs=1, seed=0, verbose=False, callbacks=[_to_file(tmp_path)])
    state = load_checkpoint(tmp_path / "c.pt")
    assert list(state) == KEYS
    assert state["epoch"] == 1 and state["step"] == 3 and state["format_version"] == 1


def test_checkpoint_meta_describes_the_module_as_fitted_save_does(tmp_path):
    fitted = _setup().set_opt_hparams(lr=0.01).fit(
        (X, Y), epochs=1, seed=0, verbose=False, callbacks=[_to_file(tmp_path)])
    meta = decode_json(load_checkpoint(tmp_path / "c.pt")["meta"])
    _, saved = read_artifact(fitted.save(tmp_path / "model"))
    expected = {"module": "conftest:Net", "module_kind": "class", "factory": None,
                "hparams": {"d_in": 3, "d_hidden": 8, "d_out": 1}, "opt_hparams": {"lr": 0.01},
                "optimizer": "torch.optim.adam:Adam"}
    assert {k: meta[k] for k in expected} == expected
    assert {k: saved[k] for k in expected} == expected
    assert meta["optimizers"] == {"opt": "torch.optim.adam.Adam"}
    assert meta["param_shapes"] == {"opt": [[[8, 3], [8], [1, 8], [1]]]}


def test_a_checkpoint_with_the_old_meta_still_resumes_and_loads(tmp_path):
    reference = _setup().fit((X, Y), epochs=3, seed=0, verbose=False)
    folder = tmp_path / "resume"
    with pytest.raises(ln.CallbackError, match="simulated crash"):
        _setup().fit((X, Y), epochs=3, seed=0, verbose=False,
                     callbacks=[ln.callbacks.AutoResume(folder), CrashAtEpoch(3)])
    path = folder / "resume-epoch-0002.pt"
    old = load_checkpoint(path)
    old["meta"] = {k: v for k, v in old["meta"].items() if k in OLD_META}
    save_checkpoint(path, old)

    loaded = ln.load(path)  # builds Net from the old meta's module and hparams
    assert all(torch.equal(loaded.model.state_dict()[k], old["model"][k]) for k in old["model"])
    assert loaded.history == old["history"]

    resumed = _setup().fit((X, Y), epochs=3, seed=0, verbose=False, callbacks=[ln.callbacks.AutoResume(folder)])
    want, got = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    drop = lambda h: [{k: v for k, v in r.items() if k != "epoch_time"} for r in h]  # noqa: E731
    assert drop(resumed.history) == drop(reference.history)


def test_skip_batches_skips_the_trained_batches_then_runs_after_skip_once():
    src = TensorBatches([torch.arange(10.0)], ("tuple", [None]), batch_size=3)
    calls = []
    skipper = SkipBatches(src, 2, lambda: calls.append("after_skip"))
    seen = []
    for batch in skipper:
        seen.append((list(calls), batch[0].tolist()))
    assert seen == [(["after_skip"], [6.0, 7.0, 8.0]), (["after_skip"], [9.0])]
    assert skipper.num_batches() == 2 and skipper.num_samples == 10
    with pytest.raises(ln.CheckpointError, match="after batch 5 of an epoch.*only 4 batches"):
        list(SkipBatches(src, 5))
