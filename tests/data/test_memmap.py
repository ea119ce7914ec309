"""Memory-mapped arrays batched per step (data/memmap.py; API.md §8): the same batches and weights as the in-memory
fast path, bit for bit; never read whole (RSS measured in a subprocess); ordinary arrays and pandas unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lanterna as ln
from lanterna.data import MemmapBatches, TensorBatches, make_source, split_valid
from lanterna.data.memmap import batch_dtype, is_memory_mapped
from lanterna.errors import DataError

N = 203


@pytest.fixture
def arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    """float64 features, float64 targets, int32 class labels and uint16 counts, saved as .npy files."""
    rng = np.random.default_rng(0)
    data = {
        "x": rng.standard_normal((N, 5)),
        "y": rng.standard_normal((N, 1)),
        "labels": rng.integers(0, 3, N).astype(np.int32),
        "counts": rng.integers(0, 60000, (N, 2)).astype(np.uint16),
    }
    for name, arr in data.items():
        np.save(tmp_path / f"{name}.npy", arr)
    return data


def mapped(tmp_path: Path, name: str) -> np.ndarray:
    return np.load(tmp_path / f"{name}.npy", mmap_mode="r")


def fit(data, **kw) -> ln.Fitted:
    return (ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()])
            .set_hparams(in_features=5, out_features=1)
            .fit(data, epochs=3, seed=0, verbose=False, **kw))


def same_weights(a: ln.Fitted, b: ln.Fitted) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_memmap_and_np_memmap_are_detected_ordinary_arrays_and_pandas_are_not(arrays, tmp_path: Path) -> None:
    m = np.memmap(tmp_path / "raw.bin", dtype=np.float32, mode="w+", shape=(N, 5))
    m[:] = arrays["x"]
    for x in (mapped(tmp_path, "x"), m, m[10:], np.asarray(m)):
        assert is_memory_mapped(x)
        assert isinstance(make_source((x, arrays["y"][: len(x)]), train=True), MemmapBatches)
    for x in (arrays["x"], np.array(m), pd.DataFrame(arrays["x"]), torch.from_numpy(arrays["x"])):
        assert not is_memory_mapped(x)
        src = make_source((x, arrays["y"]), train=True)
        assert type(src) is TensorBatches and all(isinstance(t, torch.Tensor) for t in src.leaves)


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_same_batches_as_the_tensor_path_same_dtypes(arrays, tmp_path: Path, shuffle: bool) -> None:
    names = ["x", "labels", "counts"]
    opts = {"batch_size": 16, "shuffle": shuffle, "generator": torch.Generator().manual_seed(5)}
    mm = make_source(tuple(mapped(tmp_path, n) for n in names), train=True, options=opts)
    opts["generator"] = torch.Generator().manual_seed(5)
    ref = make_source(tuple(arrays[n] for n in names), train=True, options=opts)
    assert isinstance(mm, MemmapBatches) and type(ref) is TensorBatches
    for _ in range(2):  # two epochs: reshuffled alike
        got, want = list(mm), list(ref)
        assert len(got) == len(want) == mm.num_batches() == 13
        for g, w in zip(got, want):
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(g, w))
    assert [t.dtype for t in got[0]] == [torch.float32, torch.int64, torch.int64]
    assert batch_dtype(np.dtype("float16")) == torch.float32 and batch_dtype(np.dtype("bool")) == torch.bool


def test_a_fit_on_a_memmap_ends_with_the_weights_of_the_tensor_path(arrays, tmp_path: Path) -> None:
    x, y = mapped(tmp_path, "x"), mapped(tmp_path, "y")
    as_tensors = (torch.from_numpy(arrays["x"]).float(), torch.from_numpy(arrays["y"]).float())
    assert same_weights(fit((x, y)), fit(as_tensors))
    # a validation fraction (split by index, both parts still mapped) and sample weights
    w = np.random.default_rng(1).random(N)
    a = fit((x, y), valid_data=0.2, sample_weight=w)
    b = fit((arrays["x"], arrays["y"]), valid_data=0.2, sample_weight=w)
    assert same_weights(a, b)
    assert a.history == [{**h, "epoch_time": a.history[i]["epoch_time"]} for i, h in enumerate(b.history)]
    tr, va = split_valid((x, y), 0.2, generator=torch.Generator().manual_seed(0))
    assert isinstance(tr, MemmapBatches) and isinstance(va, MemmapBatches)
    assert (tr.num_samples, va.num_samples) == (162, 41)
    # evaluate and predict over the mapped arrays: the values of the in-memory ones
    assert torch.equal(a.predict(x), a.predict(arrays["x"]))
    assert a.evaluate((x, y)).metrics == a.evaluate((arrays["x"], arrays["y"])).metrics


def test_a_stratified_split_reads_the_class_labels_like_the_tensor_path(arrays, tmp_path: Path) -> None:
    x, labels = mapped(tmp_path, "x"), mapped(tmp_path, "labels")
    tr, va = split_valid((x, labels), 0.3, generator=torch.Generator().manual_seed(2))
    rtr, rva = split_valid((arrays["x"], arrays["labels"]), 0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat([b[1] for b in va]), torch.cat([b[1] for b in rva]))
    assert torch.equal(tr.index, torch.as_tensor(np.sort(tr.index.numpy())))  # rows, not copies


def test_rows_not_contiguous_in_the_file_and_copy_on_write_maps(arrays, tmp_path: Path) -> None:
    """A column slice is read through the mapping (pages dropped each batch); mode="c" keeps the user's changes."""
    wide = np.load(tmp_path / "x.npy", mmap_mode="r")[:, 1:4]
    got = torch.cat([b[0] for b in make_source((wide,), train=False, options={"batch_size": 50})])
    assert torch.equal(got, torch.from_numpy(arrays["x"][:, 1:4]).float())
    cow = np.load(tmp_path / "x.npy", mmap_mode="c")
    cow[0] = 42.0
    got = torch.cat([b[0] for b in make_source((cow,), train=False, options={"batch_size": 50})])
    assert torch.equal(got[0], torch.full((5,), 42.0))
    assert torch.equal(got[1:], torch.from_numpy(arrays["x"][1:]).float())


def test_clear_errors_for_non_numeric_truncated_and_foreign_byte_order_files(arrays, tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match="not numeric"):
        make_source((np.load(tmp_path / "s.npy", mmap_mode="r"),), train=True)
    np.save(tmp_path / "be.npy", arrays["x"].astype(">f8"))
    with pytest.raises(DataError, match="byte order"):
        make_source((np.load(tmp_path / "be.npy", mmap_mode="r"),), train=True)
    x = mapped(tmp_path, "x")
    src = make_source((x,), train=False, options={"batch_size": 100})
    os.truncate(tmp_path / "x.npy", x.offset + 150 * 5 * 8)  # the header, then 150 of the 203 rows
    with pytest.raises(DataError, match="shorter than its array"):
        list(src)


def test_a_fingerprint_tells_other_files_and_rows_apart_without_reading_them(arrays, tmp_path: Path) -> None:
    src = make_source((mapped(tmp_path, "x"), mapped(tmp_path, "y")), train=True)
    again = make_source((mapped(tmp_path, "x"), mapped(tmp_path, "y")), train=True)
    assert src.fingerprint() == again.fingerprint()
    assert src.subset(torch.arange(10)).fingerprint() != src.fingerprint()
    changed = arrays["x"].copy()
    changed[-1, 0] += 1.0
    np.save(tmp_path / "x2.npy", changed)
    other = make_source((np.load(tmp_path / "x2.npy", mmap_mode="r"), mapped(tmp_path, "y")), train=True)
    assert other.fingerprint() != src.fingerprint()


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch, lanterna as ln
    from torch import nn
    torch.set_num_threads(1)

    def rss_mb(field="VmRSS"):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024

    class Peak(ln.Callback):
        peak = 0.0
        def on_train_batch_end(self, ctx):
            Peak.peak = max(Peak.peak, rss_mb())
        on_predict_batch_end = on_train_batch_end

    x, y = np.load(sys.argv[1], mmap_mode="r"), np.load(sys.argv[2], mmap_mode="r")
    setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=x.shape[1], out_features=1)
    opts = {"batch_size": int(sys.argv[3])}
    setup.fit((x[:2048], y[:2048]), epochs=1, verbose=False, dataloader_options=opts)  # every code path warm
    base = rss_mb()
    fitted = setup.fit((x, y), epochs=1, verbose=False, seed=0, dataloader_options=opts, callbacks=[Peak()])
    fitted.predict(x, dataloader_options=opts, callbacks=[Peak()])
    peak, hwm = Peak.peak, rss_mb("VmHWM")
    np.asarray(x).sum()  # reading it whole through the mapping: the measurement sees mapped pages
    print(json.dumps({"base": base, "peak": peak, "hwm": hwm, "whole": rss_mb(), "file_mb": x.nbytes / 2**20}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_120_mb_memmap_trains_and_predicts_with_rss_growth_bounded_by_a_few_batches(tmp_path: Path) -> None:
    rows, cols, bs = 240_000, 64, 1024  # float64: 117 MiB; a batch is 0.5 MiB read + 0.25 MiB of float32
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float64, shape=(rows, cols))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 20_000):  # written in chunks: the test process never holds it either
        x[start:start + 20_000] = rng.standard_normal((min(20_000, rows - start), cols))
    x.flush()
    np.save(tmp_path / "y.npy", rng.standard_normal((rows, 1)))
    del x
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                           str(bs)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = max(m["peak"], m["hwm"]) - m["base"]
    assert growth < 16, m  # a few batches (< 1 MiB each) and a constant; not the 117 MiB file
    assert m["whole"] - m["base"] > 100, m  # the same measurement counts the file when it is read whole
