"""Jupyter, for real: notebooks built with nbformat and executed by nbclient on an ipykernel kernel running this
venv's python. The README quick start for 200 epochs leaves one live display (not a widget per epoch) holding
luz's lines, the saved notebook stays small, each plot cell shows exactly one picture (the LR finder's too, in a
fresh kernel) and nothing is written to stderr."""

from __future__ import annotations

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

QUICK_START = """\
import torch
from torch import nn
import lanterna as ln

class Net(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))
    def forward(self, x):
        return self.net(x)

torch.manual_seed(0)
x = torch.randn(128, 3); y = x @ torch.tensor([0.2, -1.3, -0.5]) + torch.randn(128)
fitted = (ln.setup(Net, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
            .set_hparams(d_in=3, d_hidden=32, d_out=1)
            .fit((x, y.unsqueeze(1)), epochs=200, valid_data=0.25, dataloader_options={"batch_size": 32}))
fitted.evaluate((x, y.unsqueeze(1))); preds = fitted.predict(x)
"""

# luz's lines as §4 prints them, computed from the history (the reference the live display must end with)
EXPECTED_LINES = """\
import json
from lanterna.callbacks.progress import format_value
lines = []
for rec in fitted.history:
    lines += [f"Epoch {rec['epoch']}/200",
              f"Train metrics: Loss: {format_value(rec['train_loss'])} - MAE: {format_value(rec['train_mae'])}",
              f"Valid metrics: Loss: {format_value(rec['valid_loss'])} - MAE: {format_value(rec['valid_mae'])}"]
print(json.dumps(lines))
"""

LR_FINDER_PLOT = """\
result = ln.lr_finder(ln.setup(Net, loss=nn.MSELoss()).set_hparams(d_in=3, d_hidden=32, d_out=1),
                      (x, y.unsqueeze(1)), steps=20, seed=0)
result.plot()
"""

HISTORY_PLOT = "fitted.plot()\n"


def _kernel_spec(tmp_path) -> str:
    """A kernel spec for this interpreter in a private Jupyter path (nothing installed in the user's folders)."""
    folder = tmp_path / "jupyter" / "kernels" / "lanterna-test"
    folder.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "lanterna-test", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    return str(tmp_path / "jupyter")


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def test_a_200_epoch_quick_start_notebook_is_one_live_display_one_picture_per_plot_and_no_stderr(
        tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", _kernel_spec(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # as in Jupyter: ipykernel picks the inline backend
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (QUICK_START, LR_FINDER_PLOT, HISTORY_PLOT,
                                                           EXPECTED_LINES)]
    client = nbclient.NotebookClient(nb, kernel_name="lanterna-test", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    path = tmp_path / "quick_start.ipynb"
    nbformat.write(nb, path)

    fit_cell, lr_cell, plot_cell, lines_cell = nb.cells
    for cell in nb.cells:
        assert [o for o in cell.outputs if o.output_type == "error"] == []
        assert [o.text for o in cell.outputs if o.get("name") == "stderr"] == []  # no warning, no red text
        for out in cell.outputs:  # nothing that needs saved widget state to be read
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {})

    # the fit: one display, updated in place, ending with exactly luz's lines (no stale bar)
    assert len(fit_cell.outputs) <= 3, [o.output_type for o in fit_cell.outputs]
    displays = [o for o in fit_cell.outputs if o.output_type == "display_data"]
    assert len(displays) == 1
    expected = json.loads(lines_cell.outputs[0].text)
    assert len(expected) == 600
    assert displays[0].data["text/plain"].splitlines() == expected
    assert set(displays[0].data) == {"text/plain"}  # the live bar (HTML) is gone

    # one picture per plot cell: the returned Figure, not again by pyplot; the LR finder's in a fresh kernel
    assert _images(lr_cell) == 1 and len(lr_cell.outputs) == 1
    assert _images(plot_cell) == 1 and len(plot_cell.outputs) == 1
    assert os.path.getsize(path) < 200_000


def test_the_live_display_shows_a_bar_with_the_fits_eta_above_the_lines_and_ends_with_the_lines(monkeypatch,
                                                                                                  capsys):
    """NotebookProgress against a recording display handle: what the kernel is sent, update by update."""
    import re

    import torch
    from torch import nn

    import lanterna as ln
    from lanterna.callbacks.progress import NotebookProgress, format_value

    sent = []

    class Handle:
        def update(self, bundle, raw):
            sent.append(bundle)

    def display(bundle, raw, display_id):
        sent.append(bundle)
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    monkeypatch.setattr("lanterna.callbacks.progress.in_notebook", lambda: True)  # the default printer is ours
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        (x, y), epochs=3, valid_data=0.25, seed=0, callbacks=[NotebookProgress(refresh_per_second=1e9)],
        dataloader_options={"batch_size": 16})
    assert capsys.readouterr().out == ""  # the lines are in the display, not printed a second time
    live = sent[1:-1]
    assert sent[1]["text/plain"].splitlines() == ["Epoch 1/3 Train: 0/3 [00:00 elapsed, ETA ?]", "Epoch 1/3"]
    bar = re.compile(r"Epoch [123]/3 (Train: \d/3|Valid: \d/1)( - Loss: [\d.]+)? \[\d\d:\d\d elapsed, ETA \d\d:\d\d\]")
    assert all(bar.fullmatch(b["text/plain"].splitlines()[0]) for b in live[1:])
    assert all("<progress" in b["text/html"] for b in live)
    assert any("Epoch 3/3 Valid: 1/1" in b["text/plain"] for b in live)
    expected = []
    for rec in fitted.history:
        expected += [f"Epoch {rec['epoch']}/3", f"Train metrics: Loss: {format_value(rec['train_loss'])}",
                     f"Valid metrics: Loss: {format_value(rec['valid_loss'])}"]
    assert sent[-1] == {"text/plain": "\n".join(expected)}
