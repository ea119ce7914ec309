"""fitted.plot(): one panel per metric, train vs valid, rendered to a real PNG."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    import torch
    from torch import nn

    import lanterna as ln

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = x @ torch.tensor([[0.2], [-1.3], [-0.5]]) + 0.3 * torch.randn(200, 1, generator=g)
    return ln.setup(nn.Linear, loss=nn.MSELoss(), metrics=[ln.metrics.MAE(), ln.metrics.RMSE()]).set_hparams(
        in_features=3, out_features=1).set_opt_hparams(lr=0.05).fit((x, y), epochs=6, valid_data=0.25, seed=0,
                                                                    verbose=False)


def test_png_is_a_non_trivial_image(fitted, tmp_path):
    fig = fitted.plot()
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in axes] == ["loss", "mae", "rmse"]
        for ax in axes:
            labels = [line.get_label() for line in ax.get_lines()]
            assert labels == ["train", "valid"]
            assert [len(line.get_xdata()) for line in ax.get_lines()] == [6, 6]
        loss_train = axes[0].get_lines()[0].get_ydata()
        assert list(loss_train) == pytest.approx([r["train_loss"] for r in fitted.history])
        path = tmp_path / "history.png"
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    assert path.stat().st_size > 10_000
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w > 600 and h > 200 and w > h  # three panels side by side
    rgb = (img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colours = np.unique(rgb, axis=0)
    assert len(colours) > 20  # lines, markers, text, grid, anti-aliasing: a real drawing
    # the train (matplotlib's C0 blue) and valid (C1 orange) curves are both drawn
    for ref in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(rgb.astype(int) - ref).sum(axis=1) < 30).sum() > 50


def test_select_metrics_and_errors(fitted):
    fig = fitted.plot(metrics=["mae"])
    try:
        assert [ax.get_title() for ax in fig.axes] == ["mae"]
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match=r"No numeric history for \['acc'\]; available: \['loss', 'mae', 'rmse'\]"):
        fitted.plot(metrics=["acc"])


def test_train_only_history_and_non_numeric_values_are_skipped():
    from lanterna.plotting import plot_history

    history = [{"epoch": e, "train_loss": 1.0 / e, "train_per_class": [0.1, 0.2], "lr": 0.1} for e in (1, 2, 3)]
    fig = plot_history(history)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["loss"]
        assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train"]
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="no numeric"):
        plot_history([{"epoch": 1, "lr": 0.1}])
