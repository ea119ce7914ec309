"""CSVLogger: one row per epoch, history keys as columns, overwrite on a new fit, append on resume."""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import luz_net_setup, make_luz_data
from torch import nn

import lanterna as ln


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _setup():
    return ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.05)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x.sum(1, keepdim=True)


def test_one_row_per_epoch_with_history_keys_as_columns(tmp_path):
    path = tmp_path / "logs" / "history.csv"  # the folder is created
    fitted = _setup().fit(_data(), epochs=3, valid_data=_data(16, 1), verbose=False,
                          callbacks=[ln.callbacks.CSVLogger(path)])
    header, rows = _rows(path)
    assert header == list(fitted.history[0])
    assert header[:2] == ["epoch", "lr"] and {"train_loss", "train_mae", "valid_loss", "valid_mae",
                                             "epoch_time"} <= set(header)
    assert len(rows) == 3
    for row, rec in zip(rows, fitted.history, strict=True):
        assert int(row["epoch"]) == rec["epoch"]
        for key in header[1:]:
            assert float(row[key]) == rec[key]  # full precision


def test_a_new_fit_overwrites_and_a_new_key_adds_a_column(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("stale,content\n1,2\n")

    class LateLog(ln.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.epoch >= 2:
                ctx.log("late", 1.5)

    _setup().fit(_data(), epochs=3, verbose=False, callbacks=[LateLog(), ln.callbacks.CSVLogger(path)])
    header, rows = _rows(path)
    assert header[-1] == "train_late" and "stale" not in header
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["train_late"] for r in rows] == ["", "1.5", "1.5"]


class FakeResume(ln.Callback):
    """What AutoResume does at fit begin: restore the history and set start_epoch."""

    order = -500

    def __init__(self, history):
        self.history = history

    def on_fit_begin(self, ctx):
        ctx.history = [dict(r) for r in self.history]
        ctx.start_epoch = len(self.history)


def test_appends_on_resume_and_drops_rows_of_epochs_trained_again(tmp_path):
    path = tmp_path / "h.csv"
    first = _setup().fit(_data(), epochs=3, verbose=False, callbacks=[ln.callbacks.CSVLogger(path)])
    assert len(_rows(path)[1]) == 3
    # the run died after epoch 3 was logged but only epoch 2 was checkpointed: epoch 3 is trained again
    second = _setup().fit(_data(), epochs=5, verbose=False,
                          callbacks=[FakeResume(first.history[:2]), ln.callbacks.CSVLogger(path)])
    assert [r["epoch"] for r in second.history] == [1, 2, 3, 4, 5]
    header, rows = _rows(path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert float(rows[0]["train_loss"]) == first.history[0]["train_loss"]
    assert float(rows[2]["train_loss"]) == second.history[2]["train_loss"]
    assert float(rows[2]["train_loss"]) != first.history[2]["train_loss"]


def test_resume_without_the_file_writes_the_restored_history_first(tmp_path):
    path = tmp_path / "fresh.csv"
    first = _setup().fit(_data(), epochs=2, verbose=False)
    _setup().fit(_data(), epochs=3, verbose=False, callbacks=[FakeResume(first.history), ln.callbacks.CSVLogger(path)])
    _, rows = _rows(path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[1]["train_loss"]) == first.history[1]["train_loss"]


def test_only_the_main_process_writes(tmp_path):
    class NotMain(ln.Callback):
        order = -500

        def on_fit_begin(self, ctx):
            ctx.is_main = False

    _setup().fit(_data(), epochs=1, verbose=False, callbacks=[NotMain(), ln.callbacks.CSVLogger(tmp_path / "h.csv")])
    assert not (tmp_path / "h.csv").exists()


def test_bad_path(tmp_path):
    with pytest.raises(ln.LanternaError, match="is a folder"):
        ln.callbacks.CSVLogger(tmp_path)
    with pytest.raises(ln.LanternaError, match="give a file path"):
        ln.callbacks.CSVLogger(3)


class Trained(ln.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, ctx):
        self.batches += 1


def _writes(folder):
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def _unwritable(kind, tmp_path):
    if kind == "parent is a file":
        (tmp_path / "taken").write_text("a file, not a folder")
        return tmp_path / "taken" / "h.csv"
    if kind == "read-only folder":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        if _writes(folder):  # root ignores permission bits
            folder.chmod(0o700)
            pytest.skip("this user can write into read-only folders (root)")
        return folder / "h.csv"
    # a read-only file system (sysfs is mounted read-only, for root too)
    if not sys.platform.startswith("linux") or not os.path.isdir("/sys") or _writes(Path("/sys")):
        pytest.skip("needs a read-only /sys")
    return Path("/sys/lanterna-history.csv")


@pytest.mark.parametrize("kind", ["parent is a file", "read-only folder", "read-only file system"])
def test_an_unwritable_path_is_an_error_before_training_naming_the_path(tmp_path, kind):
    path = _unwritable(kind, tmp_path)
    trained = Trained()
    try:
        with pytest.raises(ln.LanternaError, match="CSVLogger cannot write " + re.escape(repr(str(path)))) as err:
            _setup().fit(_data(), epochs=2, verbose=False, callbacks=[trained, ln.callbacks.CSVLogger(path)])
    finally:
        if kind == "read-only folder":
            path.parent.chmod(0o700)
    assert trained.batches == 0  # refused at fit begin, not after epoch 1
    if kind == "parent is a file":
        assert f"{str(tmp_path / 'taken')!r} is a file, not a folder" in str(err.value)
    assert not path.exists()


def test_the_check_at_fit_begin_leaves_an_existing_log_to_resume_untouched(tmp_path):
    path = tmp_path / "h.csv"
    first = _setup().fit(_data(), epochs=2, verbose=False, callbacks=[ln.callbacks.CSVLogger(path)])
    before = path.read_text()

    class Stop(ln.Callback):
        def on_fit_begin(self, ctx):
            raise ln.LanternaError("stop after the loggers' fit begin")

        order = 700  # after CSVLogger (600)

    with pytest.raises(ln.LanternaError, match="stop after"):
        _setup().fit(_data(), epochs=3, verbose=False,
                     callbacks=[FakeResume(first.history), ln.callbacks.CSVLogger(path), Stop()])
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["h.csv"]


def test_csv_logger_appends_on_resume(tmp_path):
    pd = pytest.importorskip("pandas")
    x, y = make_luz_data(64)
    csv = tmp_path / "log.csv"

    class Crash(ln.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 3:
                raise RuntimeError("simulated crash")

    def run(extra=()):
        return luz_net_setup().fit((x, y), epochs=4, seed=0, verbose=False,
                               callbacks=[ln.callbacks.AutoResume(tmp_path / "state"), ln.callbacks.CSVLogger(csv),
                                          *extra])

    with pytest.raises(Exception, match="simulated crash"):
        run([Crash()])
    assert len(pd.read_csv(csv)) == 2
    f = run()
    df = pd.read_csv(csv)
    assert list(df["epoch"]) == [1, 2, 3, 4]
    assert list(df["train_loss"]) == pytest.approx([h["train_loss"] for h in f.history])
