"""The ``valid_data`` fraction: a random hold-out of the training data, stratified by class when the targets are
class labels; data drawn by a custom sampler is refused (docs/models.md, "Data forms").
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset

from ..errors import DataError
from .adapters import _from_loader, _tensor_dataset_leaves, _user_stacklevel, make_source
from .memmap import MemmapBatches
from .options import custom_sampler, loader_options
from .sources import BatchSource, LoaderBatches, TensorBatches
from .weights import check_sample_weight

__all__ = ["split_valid"]

#: a float target (shape (N,) or (N, 1)) is class labels when its values are integral and this few (0/1 for BCE)
MAX_FLOAT_CLASSES = 32


def _class_labels(target: Any) -> Tensor | None:
    """Class labels (1-D) when the target holds them: integer targets, and float targets whose values are all
    integral with few distinct values (0/1 for BCE), of shape (N,) or (N, 1); None otherwise."""
    if not isinstance(target, Tensor) or target.is_complex():
        return None
    if not (target.dim() == 1 or (target.dim() == 2 and target.shape[1] == 1)):
        return None
    labels = target.reshape(-1).cpu()
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not torch.equal(labels, labels.round()):
            return None
        if torch.unique(labels).numel() > min(MAX_FLOAT_CLASSES, len(labels) // 2):
            return None  # integral regression values (counts, years), not classes
    return labels


def _split_indices(n: int, fraction: float, labels: Tensor | None, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    if labels is None:
        perm = torch.randperm(n, generator=gen)
        n_valid = min(max(int(round(fraction * n)), 1), n - 1)
        return perm[n_valid:].sort().values, perm[:n_valid].sort().values
    train_parts, valid_parts = [], []
    one_sided: dict[str, list[Any]] = {"training": [], "validation": []}
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(fraction * len(idx)))
        if k == 0:
            one_sided["training"].append(cls)
        elif k == len(idx):
            one_sided["validation"].append(cls)
        valid_parts.append(idx[:k])
        train_parts.append(idx[k:])
    train_idx = torch.cat(train_parts).sort().values
    valid_idx = torch.cat(valid_parts).sort().values
    if len(train_idx) == 0 or len(valid_idx) == 0:
        return _split_indices(n, fraction, None, gen)
    for side, classes in one_sided.items():
        if classes:
            warnings.warn(
                f"valid_data={fraction}: class(es) {classes[:10]}{' ...' if len(classes) > 10 else ''} ended up "
                f"only in the {side} part of the split (too few samples). Metrics for them will be missing on "
                "one side; use more data or a different fraction.",
                stacklevel=_user_stacklevel(),
            )
    return train_idx, valid_idx


def split_valid(
    data: Any,
    fraction: float,
    *,
    generator: torch.Generator,
    options: Mapping[str, Any] | None = None,
    sample_weight: Any = None,
) -> tuple[BatchSource, BatchSource]:
    """Hold out ``fraction`` of ``data`` at random, as ``(train_source, valid_source)``.

    Stratified by class when the targets are class labels (integer targets, and float targets whose values are
    0/1 or a few integral values), read from in-memory data, a TensorDataset, or a dataset's ``targets``.
    Data drawn by a custom sampler or batch sampler (a ``WeightedRandomSampler`` ...) is refused: its indices
    and weights refer to the whole dataset, so split the dataset yourself and pass ``valid_data=DataLoader(...)``.

    Args:
        data: training data in any splittable form of docs/models.md, "Data forms" (not an IterableDataset).
        fraction: the share held out, strictly between 0 and 1.
        generator: draws the split (seed it for a reproducible split; under torchrun, alike on every rank).
        options: ``dataloader_options`` for the loaders lanterna builds (validation: never shuffled).
        sample_weight: one weight per sample of ``data``; both parts keep their samples' weights.

    >>> import torch
    >>> from lanterna.data.split import split_valid
    >>> tr, va = split_valid((torch.randn(10, 3), torch.randn(10, 1)), 0.2, generator=torch.Generator())
    >>> tr.num_samples, va.num_samples
    (8, 2)
    """
    if isinstance(fraction, bool) or not (0.0 < float(fraction) < 1.0):
        raise DataError(
            f"valid_data={fraction!r}: a validation fraction must lie strictly between 0 and 1 "
            "(e.g. valid_data=0.2), or pass validation data itself."
        )
    if isinstance(data, DataLoader):
        if options:
            raise DataError("dataloader_options cannot be combined with a DataLoader; set them on the loader.")
        if sample_weight is not None:  # the weights go into the loader's dataset, then it is split as any other
            data = make_source(data, train=True, sample_weight=sample_weight, what="training data")
            if isinstance(data, LoaderBatches):
                data = data.loader
            else:
                return _split_tensors(data, fraction, generator)
        return _split_loader(data, fraction, generator)
    for key in ("sampler", "batch_sampler"):
        if isinstance(options, Mapping) and options.get(key) is not None:
            raise _custom_sampler_error(fraction, type(options[key]).__name__)
    train_src = make_source(data, train=True, options=options, sample_weight=sample_weight)
    if isinstance(train_src, TensorBatches):
        return _split_tensors(train_src, fraction, generator)
    ds = data
    tr, va = _split_dataset(ds, fraction, generator)
    opts = dict(options or {})
    valid_opts = {**opts, "shuffle": False, "drop_last": False}
    w = None if sample_weight is None else check_sample_weight(sample_weight, len(ds), "training data")
    return (
        make_source(Subset(ds, tr.tolist()), train=True, options=opts, sample_weight=None if w is None else w[tr]),
        make_source(Subset(ds, va.tolist()), train=False, options=valid_opts,
                    sample_weight=None if w is None else w[va]),
    )


def _split_tensors(train_src: TensorBatches, fraction: float, generator: torch.Generator
                   ) -> tuple[BatchSource, BatchSource]:
    n = train_src.num_samples
    if n < 2:
        raise DataError("valid_data as a fraction needs at least 2 samples.")
    leaves = train_src.leaves[:-1] if train_src.weighted else train_src.leaves  # the weights are the last leaf
    target = leaves[-1] if len(leaves) > 1 else None
    if isinstance(train_src, MemmapBatches) and target is not None:
        # class labels are read as batches would hold them (float32, int64), never the whole of a large leaf
        target = train_src.column(len(leaves) - 1) if target.dim() == 1 or target.shape[1:] == (1,) else None
    tr, va = _split_indices(n, float(fraction), _class_labels(target), generator)
    valid_src = train_src.subset(va, shuffle=False)
    valid_src.drop_last = False  # validation always covers every held-out sample
    return train_src.subset(tr), valid_src


def _split_dataset(ds: Any, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        raise DataError(
            "valid_data as a fraction cannot split an IterableDataset (it has no indices). "
            "Pass a separate validation dataset or loader as valid_data."
        )
    n = len(ds)
    if n < 2:
        raise DataError("valid_data as a fraction needs at least 2 samples.")
    labels = None
    targets = getattr(ds, "targets", None)
    if targets is not None:
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):  # not numbers: no stratification
            targets = None
        labels = _class_labels(targets) if targets is not None and targets.shape[:1] == (n,) else None
    return _split_indices(n, float(fraction), labels, gen)


def _custom_sampler_error(fraction: float, name: str) -> DataError:
    return DataError(
        f"valid_data={fraction} cannot split data drawn by a {name}: lanterna would rebuild the loader over the "
        "training part without it (its indices and weights refer to the whole dataset). Split the dataset "
        "yourself (torch.utils.data.Subset or random_split), build the training DataLoader with its sampler over "
        "the training part, and pass valid_data=DataLoader(validation part)."
    )


def _split_loader(dl: DataLoader, fraction: float, gen: torch.Generator) -> tuple[BatchSource, BatchSource]:
    if isinstance(dl.dataset, IterableDataset) or not hasattr(dl.dataset, "__len__"):
        _split_dataset(dl.dataset, fraction, gen)  # raises: no indices to split
    name = custom_sampler(dl)
    if name is not None:
        raise _custom_sampler_error(fraction, name)
    leaves = _tensor_dataset_leaves(dl.dataset)
    if leaves is not None:
        labels = _class_labels(leaves[-1]) if len(leaves) > 1 else None
        tr, va = _split_indices(len(leaves[0]), float(fraction), labels, gen)
    else:
        tr, va = _split_dataset(dl.dataset, fraction, gen)
    opts = loader_options(dl)
    train_part = Subset(dl.dataset, tr.tolist())
    shuffle = type(dl.sampler) is RandomSampler  # its own generator, when it was given one, keeps drawing the order
    sampler = RandomSampler(train_part, generator=dl.sampler.generator) if shuffle else None  # type: ignore[attr-defined]
    train_dl = DataLoader(train_part, sampler=sampler, **opts)
    valid_dl = DataLoader(Subset(dl.dataset, va.tolist()), shuffle=False, **{**opts, "drop_last": False})
    train_src, valid_src = _from_loader(train_dl, "training data"), _from_loader(valid_dl, "validation data")
    for src in (train_src, valid_src):
        if isinstance(src, LoaderBatches):
            src.owned = True
    return train_src, valid_src
