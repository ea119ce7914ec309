"""Data adapters: any accepted data form → a :class:`BatchSource` (API.md §2).

Accepted: a DataLoader, a Dataset, a tuple/list ``(x, y)`` of tensors / NumPy arrays / pandas objects
(nested tuples and dicts for several inputs or targets), and, for prediction, ``x`` alone.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate

from ..errors import DataError
from .sources import BatchSource, LoaderBatches, TensorBatches
from .structure import flatten

__all__ = ["loader_options", "make_source", "split_valid", "to_tensor_leaves"]

_LOADER_DEFAULTS: dict[str, Any] = {"batch_size": 32}
_SUPPORTED = (
    "a torch DataLoader, a Dataset, a tensor / NumPy array / pandas object, or a tuple (x, y) of them"
)


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "pandas" and hasattr(obj, "to_numpy")


def _leaf_to_tensor(obj: Any, where: str) -> Tensor:
    if _is_pandas(obj):
        obj = obj.to_numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object or not (
            np.issubdtype(obj.dtype, np.number) or np.issubdtype(obj.dtype, np.bool_)
        ):
            raise DataError(
                f"{where} has dtype {obj.dtype}, which is not numeric. Convert it first, e.g. "
                "df.astype('float32') or pd.get_dummies(df) for categorical columns."
            )
        arr = np.ascontiguousarray(obj)
        if not arr.flags.writeable:  # pandas copy-on-write views are read-only; torch warns on those
            arr = arr.copy()
        obj = torch.from_numpy(arr)
    if not isinstance(obj, Tensor):
        hint = ""
        if isinstance(obj, (bool, int, float, complex, str)):
            hint = (" Python lists or dicts of plain values are not converted: make tensors or arrays first, "
                    "e.g. torch.tensor(values) or np.asarray(values).")
        raise DataError(f"{where} is a {type(obj).__name__}; expected {_SUPPORTED}.{hint}")
    if obj.is_floating_point() and obj.dtype == torch.float64:
        obj = obj.float()
    elif obj.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        obj = obj.long()
    return obj


def to_tensor_leaves(data: Any, what: str = "data") -> tuple[list[Tensor], Any]:
    """Flatten in-memory data into tensors (float → float32, integers → int64) and a structure spec."""
    leaves, spec = flatten(data)
    if not leaves:
        raise DataError(f"The {what} holds no tensors or arrays; expected {_SUPPORTED}.")
    tensors = [_leaf_to_tensor(leaf, f"Item {i} of the {what}") for i, leaf in enumerate(leaves)]
    for i, t in enumerate(tensors):
        if t.dim() == 0:
            raise DataError(f"Item {i} of the {what} is a scalar; every item needs a first (sample) dimension.")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise DataError(
            f"The {what}'s tensors/arrays have different numbers of samples (first dimensions: {shapes}). "
            "Inputs and targets must have one row per sample."
        )
    if sizes == {0}:
        raise DataError(f"The {what} is empty (0 samples). Pass at least one sample.")
    return tensors, spec


def _tensor_dataset_leaves(ds: Dataset) -> list[Tensor] | None:
    """Tensors of a TensorDataset, or of a (nested) Subset of one; None for any other dataset."""
    if isinstance(ds, TensorDataset):
        return list(ds.tensors)
    if isinstance(ds, Subset):
        inner = _tensor_dataset_leaves(ds.dataset)
        if inner is None:
            return None
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        return [t.index_select(0, idx) for t in inner]
    return None


def _loader_is_plain(dl: DataLoader) -> bool:
    """True when a DataLoader has the default sampler, batch sampler and collate (fast path allowed)."""
    sampler = dl.sampler
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler._num_samples is not None:
            return False
    elif type(sampler) is not SequentialSampler:
        return False
    return type(dl.batch_sampler) is BatchSampler and dl.collate_fn is default_collate


def _flat_spec(n: int) -> Any:
    return ("tuple", [None] * n)


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    bad = {"dataset"} & opts.keys()
    if bad:
        raise DataError("dataloader_options cannot contain 'dataset'; pass the data itself.")
    return opts


def make_source(
    data: Any,
    *,
    train: bool,
    options: Mapping[str, Any] | None = None,
    what: str = "data",
) -> BatchSource:
    """Turn ``data`` into a batch source. ``train`` decides the default shuffling.

    >>> src = make_source((torch.randn(10, 3), torch.randn(10, 1)), train=True, options={"batch_size": 4})
    >>> src.num_batches()
    3
    """
    if isinstance(data, DataLoader):
        if options:
            raise DataError(
                f"dataloader_options were given together with a DataLoader as {what}; they only apply where "
                "lanterna builds the loader. Set them on your DataLoader or pass the Dataset instead."
            )
        return _from_loader(data, what)
    opts = _check_options(options)
    if isinstance(data, Dataset):
        return _from_dataset(data, train=train, options=opts, what=what)
    if isinstance(data, (Tensor, np.ndarray, tuple, list, Mapping)) or _is_pandas(data):
        if isinstance(data, (tuple, list)) and len(data) == 0:
            raise DataError(f"The {what} is an empty tuple/list; pass (x, y) or x.")
        leaves, spec = to_tensor_leaves(data, what)
        return _tensor_source(leaves, spec, train=train, options=opts, what=what)
    raise DataError(f"Unsupported {what} of type {type(data).__name__}; expected {_SUPPORTED}.")


def _tensor_source(
    leaves: list[Tensor], spec: Any, *, train: bool, options: dict[str, Any], what: str
) -> TensorBatches:
    known = {"batch_size", "shuffle", "drop_last", "generator", "num_workers", "pin_memory",
             "persistent_workers", "prefetch_factor", "timeout", "worker_init_fn"}
    unknown = set(options) - known
    if unknown:
        raise DataError(
            f"dataloader_options {sorted(unknown)} cannot apply to in-memory {what}; "
            "wrap the data in a Dataset and DataLoader for custom samplers or collate functions."
        )
    batch_size = options.get("batch_size", _LOADER_DEFAULTS["batch_size"])
    if batch_size is None or int(batch_size) < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}.")
    gen = options.get("generator")
    return TensorBatches(
        leaves,
        spec,
        batch_size=int(batch_size),
        shuffle=bool(options.get("shuffle", train)),
        drop_last=bool(options.get("drop_last", False)),
        loader_generator=gen,
        sampler_generator=gen,
    )


def _from_loader(dl: DataLoader, what: str) -> BatchSource:
    leaves = _tensor_dataset_leaves(dl.dataset) if _loader_is_plain(dl) else None
    if leaves is not None:
        if len(leaves[0]) == 0:
            raise DataError(f"The {what} DataLoader's dataset is empty (0 samples).")
        return TensorBatches(
            leaves,
            _flat_spec(len(leaves)),
            batch_size=dl.batch_size,  # type: ignore[arg-type]
            shuffle=type(dl.sampler) is RandomSampler,
            drop_last=dl.drop_last,
            loader_generator=dl.generator,
            sampler_generator=getattr(dl.sampler, "generator", None),
        )
    try:
        n = len(dl)
    except TypeError:
        n = None
    if n == 0:
        raise DataError(
            f"The {what} DataLoader yields no batches (empty dataset, or drop_last with fewer samples than "
            "batch_size). Pass a non-empty dataset or lower batch_size."
        )
    return LoaderBatches(dl)


def _from_dataset(ds: Dataset, *, train: bool, options: dict[str, Any], what: str) -> BatchSource:
    iterable = isinstance(ds, IterableDataset)
    if not iterable:
        try:
            n = len(ds)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if n == 0:
            raise DataError(f"The {what} dataset is empty (0 samples). Pass a dataset with samples.")
    plain = not ({"sampler", "batch_sampler", "collate_fn"} & options.keys())
    leaves = _tensor_dataset_leaves(ds) if plain and not iterable else None
    if leaves is not None:
        return _tensor_source(leaves, _flat_spec(len(leaves)), train=train, options=options, what=what)
    opts = {**_LOADER_DEFAULTS, **options}
    if "batch_sampler" in opts:  # it sets the batch size itself; DataLoader refuses both
        opts.pop("batch_size", None)
    if iterable:
        if opts.get("shuffle"):
            raise DataError("An IterableDataset cannot be shuffled by the loader; shuffle inside the dataset.")
        opts.pop("shuffle", None)
    elif "sampler" not in opts and "batch_sampler" not in opts:
        opts.setdefault("shuffle", train)
    if opts.get("num_workers", 0) == 0:
        opts.pop("persistent_workers", None)
        opts.pop("prefetch_factor", None)
    return LoaderBatches(DataLoader(ds, **opts), build=(ds, opts, frozenset(options)))  # tuned at to_device


# --------------------------------------------------------------------------- validation split


def _class_labels(target: Any) -> Tensor | None:
    """Integer class labels (1-D, or (N, 1)) when the target holds them; None otherwise."""
    is_labels = isinstance(target, Tensor) and not target.is_floating_point() and not target.is_complex()
    if is_labels and (target.dim() == 1 or (target.dim() == 2 and target.shape[1] == 1)):
        return target.reshape(-1).cpu()
    return None


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by our caller point at the first frame outside lanterna."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


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
) -> tuple[BatchSource, BatchSource]:
    """Hold out ``fraction`` of ``data`` at random (stratified by class when targets are class labels)."""
    if isinstance(fraction, bool) or not (0.0 < float(fraction) < 1.0):
        raise DataError(
            f"valid_data={fraction!r}: a validation fraction must lie strictly between 0 and 1 "
            "(e.g. valid_data=0.2), or pass validation data itself."
        )
    if isinstance(data, DataLoader):
        if options:
            raise DataError("dataloader_options cannot be combined with a DataLoader; set them on the loader.")
        return _split_loader(data, fraction, generator)
    train_src = make_source(data, train=True, options=options)
    if isinstance(train_src, TensorBatches):
        n = train_src.num_samples
        if n < 2:
            raise DataError("valid_data as a fraction needs at least 2 samples.")
        target = train_src.leaves[-1] if len(train_src.leaves) > 1 else None
        tr, va = _split_indices(n, float(fraction), _class_labels(target), generator)
        valid_src = train_src.subset(va, shuffle=False)
        valid_src.drop_last = False  # validation always covers every held-out sample
        return train_src.subset(tr), valid_src
    ds = data
    tr, va = _split_dataset(ds, fraction, generator)
    opts = dict(options or {})
    valid_opts = {**opts, "shuffle": False, "drop_last": False}
    return (
        make_source(Subset(ds, tr.tolist()), train=True, options=opts),
        make_source(Subset(ds, va.tolist()), train=False, options=valid_opts),
    )


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
        labels = _class_labels(torch.as_tensor(targets))
    return _split_indices(n, float(fraction), labels, gen)


def loader_options(dl: DataLoader) -> dict[str, Any]:
    """The options to rebuild ``dl`` over another dataset or sampler (all but dataset/sampler/shuffle)."""
    opts: dict[str, Any] = {
        "batch_size": dl.batch_size, "num_workers": dl.num_workers, "collate_fn": dl.collate_fn,
        "pin_memory": dl.pin_memory, "drop_last": dl.drop_last, "timeout": dl.timeout,
        "worker_init_fn": dl.worker_init_fn, "generator": dl.generator,
    }
    if dl.num_workers > 0:
        opts.update(prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers)
    return opts


def _split_loader(dl: DataLoader, fraction: float, gen: torch.Generator) -> tuple[BatchSource, BatchSource]:
    if dl.batch_size is None:
        raise DataError(
            "valid_data as a fraction cannot rebuild a DataLoader that uses a custom batch_sampler; "
            "pass a separate validation loader."
        )
    leaves = _tensor_dataset_leaves(dl.dataset)
    if leaves is not None:
        labels = _class_labels(leaves[-1]) if len(leaves) > 1 else None
        tr, va = _split_indices(len(leaves[0]), float(fraction), labels, gen)
    else:
        tr, va = _split_dataset(dl.dataset, fraction, gen)
    opts = loader_options(dl)
    shuffle = isinstance(dl.sampler, RandomSampler)
    train_dl = DataLoader(Subset(dl.dataset, tr.tolist()), shuffle=shuffle, **opts)
    valid_dl = DataLoader(Subset(dl.dataset, va.tolist()), shuffle=False, **{**opts, "drop_last": False})
    train_src, valid_src = _from_loader(train_dl, "training data"), _from_loader(valid_dl, "validation data")
    for src in (train_src, valid_src):
        if isinstance(src, LoaderBatches):
            src.owned = True
    return train_src, valid_src
