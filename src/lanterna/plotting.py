"""History plots (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["plot_history"]


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg",) and not _has_display():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'lanterna[plot]'") from e
    return plt


def _has_display() -> bool:
    import os
    import sys

    return bool(os.environ.get("DISPLAY")) or sys.platform in ("darwin", "win32") or "ipykernel" in sys.modules


def plot_history(history: list[dict[str, Any]], metrics: Sequence[str] | None = None) -> Any:
    """One panel per metric (loss first), train and valid curves against the epoch; returns the Figure.

    >>> fig = plot_history([{"epoch": 1, "train_loss": 2.0, "valid_loss": 2.5},
    ...                     {"epoch": 2, "train_loss": 1.0, "valid_loss": 1.5}])
    >>> len(fig.axes)
    1
    """
    plt = _require_matplotlib()
    names: list[str] = []
    for rec in history:
        for key in rec:
            set_name, _, metric = key.partition("_")
            if set_name in ("train", "valid") and metric and metric not in names:
                names.append(metric)
    if metrics is not None:
        names = [m for m in metrics if m in names]
    if not names:
        raise ValueError("The history has no train_/valid_ metrics to plot.")
    ncols = min(len(names), 3)
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for set_name, style in (("train", "-"), ("valid", "--")):
            pts = [(r["epoch"], r[f"{set_name}_{name}"]) for r in history if isinstance(r.get(f"{set_name}_{name}"),
                                                                                        (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, marker="o" if len(xs) < 20 else None, markersize=3, label=set_name)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
