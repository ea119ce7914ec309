"""Debug runs (Lightning's ``limit_train_batches`` / ``limit_val_batches``, ``fast_dev_run``, ``overfit_batches``):
:class:`LimitBatches`, :class:`FastDevRun` and :class:`OverfitBatches` (docs/callbacks.md, "Debug runs").

Each replaces the fit's batch sources at ``on_fit_begin`` with a :class:`lanterna.data.limit.FirstBatches`
(so the loop, ``ctx.num_batches`` and per-epoch schedules see the shorter epochs) and puts them back at
``on_fit_end``. No per-batch hook: they cost nothing per batch.
"""

from __future__ import annotations

import abc
from typing import Any

from ..core.callback import Callback
from ..core.context import Context
from ..data.limit import FirstBatches, in_dataset_order
from ..errors import LanternaError

__all__ = ["LimitBatches", "FastDevRun", "OverfitBatches"]


def _count(value: Any, name: str, fractions: bool) -> int | float | None:
    """``value`` checked: None, an int >= 1, or (with ``fractions``) a float in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LanternaError(f"{name}={value!r}: give a number of batches (an int >= 1)"
                            + (" or a fraction of them (a float in (0, 1])." if fractions else "."))
    if isinstance(value, int):
        if value < 1:
            raise LanternaError(f"{name}={value!r}: give at least 1 batch (leave validation out by not passing "
                                "valid_data).")
        return value
    if not fractions or not 0.0 < value <= 1.0:
        what = "a fraction in (0, 1] or an int >= 1" if fractions else "an int >= 1"
        raise LanternaError(f"{name}={value!r}: give {what}.")
    return value


class _BatchLimit(Callback, abc.ABC):
    """Swaps the fit's batch sources at fit begin and puts them back at fit end."""

    order = -900  # before every on_fit_begin that reads the sources (LRScheduler's OneCycleLR, AutoResume)

    def __init__(self) -> None:
        self._saved: tuple[Any, Any] | None = None
        self._made: list[Any] = []  # sources this callback built (closed at fit end)

    def on_fit_begin(self, ctx: Context) -> None:
        if isinstance(ctx.train_data, FirstBatches) or isinstance(ctx.valid_data, FirstBatches):
            raise LanternaError(f"{type(self).__name__}: another of LimitBatches, FastDevRun, OverfitBatches is "
                                "already limiting the batches of this fit; use only one of them.")
        self._saved, self._made = (ctx.train_data, ctx.valid_data), []
        self.limit(ctx)

    @abc.abstractmethod
    def limit(self, ctx: Context) -> None:
        """Swap in the limited sources (``ctx.train_data`` / ``ctx.valid_data``)."""

    def on_fit_end(self, ctx: Context) -> None:
        if self._saved is not None:
            ctx.train_data, ctx.valid_data = self._saved
            self._saved = None
        for source in self._made:
            source.close()
        self._made = []


class LimitBatches(_BatchLimit):
    """Run only the first batches of each phase, every epoch (Lightning's ``limit_train_batches`` /
    ``limit_val_batches``): for a quick look at a long epoch, or a smoke test of a pipeline.

    The epoch's shuffle is drawn as for a whole epoch and the first batches of it are used; the epoch's
    metrics and loss are over those batches. Per-epoch callbacks (schedulers, checkpoints, early stopping)
    run as usual at the end of each shortened epoch.

    Args:
        train: training batches per epoch: an int >= 1, or a float in (0, 1] for that fraction of the batches
            (rounded down, at least 1); None: all.
        valid: validation batches per epoch, the same way; ignored without validation data.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> data = (torch.randn(100, 3), torch.randn(100, 1))
    >>> fitted = setup.fit(data, epochs=2, valid_data=data, verbose=False,
    ...                    callbacks=[ln.callbacks.LimitBatches(train=2, valid=0.5)])
    >>> fitted.context.step  # 2 optimizer steps in each of the 2 epochs (of 4 batches of 32)
    4
    """

    def __init__(self, train: int | float | None = None, valid: int | float | None = None) -> None:
        super().__init__()
        if train is None and valid is None:
            raise LanternaError("LimitBatches(): give train= and/or valid=, e.g. LimitBatches(train=5, valid=2).")
        self.train = _count(train, "LimitBatches(train)", fractions=True)
        self.valid = _count(valid, "LimitBatches(valid)", fractions=True)

    def __repr__(self) -> str:
        return f"LimitBatches(train={self.train!r}, valid={self.valid!r})"

    def limit(self, ctx: Context) -> None:
        if self.train is not None:
            ctx.train_data = FirstBatches(ctx.train_data, self._batches(ctx.train_data, self.train, "train"))
        if self.valid is not None and ctx.valid_data is not None:
            ctx.valid_data = FirstBatches(ctx.valid_data, self._batches(ctx.valid_data, self.valid, "valid"))

    @staticmethod
    def _batches(source: Any, limit: int | float, name: str) -> int:
        if isinstance(limit, int):
            return limit
        total = source.num_batches()
        if total is None:
            raise LanternaError(
                f"LimitBatches({name}={limit!r}): the {name} data does not know its number of batches (an "
                f"IterableDataset?), so a fraction of it cannot be taken. Give a number of batches: {name}=10."
            )
        return max(1, int(total * limit))


class FastDevRun(LimitBatches):
    """A dry run of the whole fit (Lightning's ``fast_dev_run``): ``n`` training batches, ``n`` validation
    batches, one epoch, every hook fired once per batch. It finds a broken model, loss, metric, callback or
    data pipeline in seconds instead of after an epoch. Other callbacks run as usual (a ``ModelCheckpoint``
    still writes its file); ``epochs=`` is overridden to one epoch (one more epoch when continuing a fit).

    Args:
        n: batches of each phase (default 1).

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> data = (torch.randn(100, 3), torch.randn(100, 1))
    >>> fitted = setup.fit(data, epochs=50, valid_data=data, verbose=False, callbacks=[ln.callbacks.FastDevRun()])
    >>> len(fitted.history), fitted.context.step
    (1, 1)
    """

    def __init__(self, n: int = 1) -> None:
        checked = _count(n, "FastDevRun(n)", fractions=False)
        super().__init__(train=checked, valid=checked)
        self.n = checked

    def __repr__(self) -> str:
        return f"FastDevRun(n={self.n!r})"

    def limit(self, ctx: Context) -> None:
        super().limit(ctx)
        ctx.max_epochs = ctx.start_epoch + 1
        ctx.min_epochs = min(ctx.min_epochs, ctx.max_epochs)


class OverfitBatches(_BatchLimit):
    """Train and validate on the same first ``n`` training batches, in dataset order, every epoch (Lightning's
    ``overfit_batches``): a model that cannot drive the loss of a few batches towards zero has a bug (or too
    little capacity), whatever the data. Shuffling is turned off (the batches are the same every epoch);
    validation uses those batches too, with or without ``valid_data``, so ``valid_loss`` is the loss on them in
    eval mode.

    Args:
        n: training batches (default 1).

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.SGD).set_hparams(
    ...     in_features=3, out_features=1).set_opt_hparams(lr=0.3)
    >>> g = torch.Generator().manual_seed(1)
    >>> x, y = torch.randn(100, 3, generator=g), torch.randn(100, 1, generator=g)
    >>> fitted = setup.fit((x, y), epochs=100, verbose=False, callbacks=[ln.callbacks.OverfitBatches(n=1)],
    ...                    dataloader_options={"batch_size": 4}, seed=0)
    >>> fitted.history[-1]["valid_loss"] < fitted.history[0]["valid_loss"] / 100  # the same 4 samples, learnt
    True
    """

    def __init__(self, n: int = 1) -> None:
        super().__init__()
        self.n = _count(n, "OverfitBatches(n)", fractions=False)

    def __repr__(self) -> str:
        return f"OverfitBatches(n={self.n!r})"

    def limit(self, ctx: Context) -> None:
        ordered = in_dataset_order(ctx.train_data, repr(self))
        if ordered is not ctx.train_data:
            self._made.append(ordered)
        ctx.train_data = ctx.valid_data = FirstBatches(ordered, self.n)  # type: ignore[arg-type]
