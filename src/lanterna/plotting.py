"""History plots (matplotlib, an optional extra: ``pip install 'lanterna[plot]'``)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_history", "new_figure"]

_SETS = (("train", "C0", "-"), ("valid", "C1", "--"))


def _require_matplotlib() -> Any:
    try:
        import matplotlib

        if not _has_display() and matplotlib.get_backend().lower() != "agg":
            matplotlib.use("Agg")  # headless (CI, servers): render to files without a GUI
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'lanterna[plot]'") from e
    return plt


def _has_display() -> bool:
    gui = sys.platform in ("darwin", "win32") or "ipykernel" in sys.modules
    return gui or bool(os.environ.get("DISPLAY"))


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure that is shown exactly once: in Jupyter (the inline backend) by the notebook's display
    of the returned Figure, and not a second time by pyplot at the end of the cell; elsewhere it stays in pyplot
    (the current figure, for ``plt.show()`` or ``plt.savefig``).

    Args:
        figsize: width and height in inches.

    >>> from lanterna.plotting import new_figure
    >>> fig = new_figure((4, 3))
    >>> ax = fig.subplots(); fig.get_size_inches().tolist()
    [4.0, 3.0]
    """
    plt = _require_matplotlib()  # imports pyplot: in a fresh kernel this registers the inline PNG display
    fig = plt.figure(figsize=figsize)
    if "inline" in plt.get_backend():
        plt.close(fig)  # out of pyplot's manager; fig.savefig and the notebook's display still work
    return fig


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def plot_history(history: list[dict[str, Any]], metrics: Sequence[str] | None = None) -> Any:
    """One panel per metric (loss first, then the metrics in history order), the training curve solid and
    the validation curve dashed against the epoch; returns the matplotlib Figure (in a notebook it is shown
    once, by the cell's result).

    Args:
        history: ``fitted.history``, a list of per-epoch dicts with ``train_<name>`` / ``valid_<name>`` keys.
        metrics: the metric names to plot (``["loss", "mae"]``); default all with numeric values.

    >>> from lanterna.plotting import plot_history
    >>> fig = plot_history([{"epoch": 1, "train_loss": 2.0, "valid_loss": 2.5},
    ...                     {"epoch": 2, "train_loss": 1.0, "valid_loss": 1.5}])
    >>> len(fig.axes)
    1
    >>> fig.savefig("history.png")
    >>> import os; os.path.getsize("history.png") > 0
    True
    """
    names: list[str] = []
    for rec in history:
        for key, value in rec.items():
            set_name, _, metric = key.partition("_")
            known = metric in names or not metric
            if set_name in ("train", "valid") and not known and _number(value) is not None:
                names.append(metric)
    if "loss" in names:
        names.insert(0, names.pop(names.index("loss")))
    if metrics is not None:
        unknown = [m for m in metrics if m not in names]
        if unknown:
            raise ValueError(f"No numeric history for {unknown}; available: {names}.")
        names = list(metrics)
    if not names:
        raise ValueError("The history has no numeric train_/valid_ metrics to plot.")
    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    fig = new_figure((4.8 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.flat)
    for ax, name in zip(flat[: len(names)], names, strict=True):
        for set_name, color, style in _SETS:
            pts = [(rec.get("epoch", i + 1), _number(rec.get(f"{set_name}_{name}")))
                   for i, rec in enumerate(history)]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, style, color=color, linewidth=1.8, marker="o" if len(xs) <= 30 else None,
                    markersize=3.5, label=set_name)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False)
    for ax in flat[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
