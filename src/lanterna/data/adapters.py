"""Data adapters: any accepted data form → a :class:`BatchSource` (docs/models.md, "Data forms").

Accepted: a DataLoader, a Dataset, a tuple/list ``(x, y)`` of tensors / NumPy arrays / pandas objects
(nested tuples and dicts for several inputs or targets), and, for prediction, ``x`` alone.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Mapping
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

__all__ = ["custom_sampler", "loader_options", "make_source", "split_valid", "to_tensor_leaves"]

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
        if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:  # torch has few operations on wide unsigned ints
            arr = arr.astype(np.int64)
        elif not arr.flags.writeable:  # pandas copy-on-write views are read-only; torch warns on those
            arr = arr.copy()
        obj = torch.from_numpy(arr)
    if not isinstance(obj, Tensor):
        hint = ""
        if isinstance(obj, (bool, int, float, complex, str)):
            hint = (" Python lists or dicts of plain values are not converted: make tensors or arrays first, "
                    "e.g. torch.tensor(values) or np.asarray(values).")
        raise DataError(f"{where} is a {type(obj).__name__}; expected {_SUPPORTED}.{hint}")
    if obj.is_floating_point() and obj.dtype != torch.float32:
        obj = obj.float()
    elif obj.dtype in _SMALL_INTS:
        obj = obj.long()
    return obj


_SMALL_INTS = tuple(getattr(torch, name) for name in ("int8", "int16", "int32", "uint8", "uint16", "uint32", "uint64")
                    if hasattr(torch, name))


def to_tensor_leaves(data: Any, what: str = "data") -> tuple[list[Tensor], Any]:
    """Flatten in-memory data into tensors (float → float32, integers → int64) and a structure spec."""
    leaves, spec = flatten(data)
    if not leaves:
        raise DataError(f"The {what} holds no tensors or arrays; expected {_SUPPORTED}.")
    tensors = [_leaf_to_tensor(leaf, f"Item {i} of the {what}") for i, leaf in enumerate(leaves)]
    # (x, y) or (x1, x2, y) hold a few arrays; many items are usually a list of samples
    hint = (" If this is a list of samples, stack them into one tensor per field (torch.stack) or wrap them in a "
            "Dataset." if isinstance(data, (tuple, list)) and len(data) > 3 else "")
    for i, t in enumerate(tensors):
        if t.dim() == 0:
            raise DataError(f"Item {i} of the {what} is a scalar; every item needs a first (sample) dimension.{hint}")
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:6]) + (", ..." if len(tensors) > 6 else "")
        raise DataError(
            f"The {what}'s {len(tensors)} tensors/arrays have different numbers of samples (first dimensions: "
            f"{shapes}). Inputs and targets must have one row per sample.{hint}"
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


def custom_sampler(dl: DataLoader) -> str | None:
    """The class name of ``dl``'s sampler (or batch sampler) when it is not one that ``DataLoader`` builds from
    ``batch_size`` and ``shuffle`` over the whole dataset; None for those (which lanterna may rebuild).

    >>> from torch.utils.data import DataLoader
    >>> from lanterna.data.adapters import custom_sampler
    >>> custom_sampler(DataLoader(range(10), batch_size=2, shuffle=True)) is None
    True
    """
    if dl.batch_size is None or type(dl.batch_sampler) is not BatchSampler:
        return type(dl.batch_sampler).__name__
    sampler = dl.sampler
    if type(sampler) is RandomSampler:
        if sampler.replacement or sampler._num_samples is not None:
            return type(sampler).__name__
    elif type(sampler) is not SequentialSampler:
        return type(sampler).__name__
    try:
        whole = len(sampler.data_source) == len(dl.dataset)  # type: ignore[arg-type]
    except TypeError:
        whole = False
    return None if whole else type(sampler).__name__


def _loader_is_plain(dl: DataLoader) -> bool:
    """True when a DataLoader has the default sampler, batch sampler and collate (fast path allowed)."""
    return custom_sampler(dl) is None and dl.collate_fn is default_collate


def _flat_spec(n: int) -> Any:
    return ("tuple", [None] * n)


_LOADER_KEYS = frozenset(inspect.signature(DataLoader.__init__).parameters) - {"self", "dataset"}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


# the options lanterna reads itself (the rest go to DataLoader as they are): test and requirement
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (0: load in the main process)"),
    "prefetch_factor": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or None"),
    "timeout": (lambda v: isinstance(v, numbers.Real) and not _is_bool(v) and v >= 0, "a number of seconds >= 0"),
    "generator": (lambda v: v is None or isinstance(v, torch.Generator), "a torch.Generator or None"),
    **{k: (_is_bool, "True or False") for k in ("shuffle", "drop_last", "pin_memory", "persistent_workers",
                                                 "in_order")},
}


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``dataloader_options``: known keys, values of the right type (NumPy scalars made Python's)."""
    if options is not None and not isinstance(options, Mapping):
        raise DataError(
            f"dataloader_options must be a dict such as {{'batch_size': 64}}; got a {type(options).__name__}."
        )
    opts = dict(options or {})
    if "dataset" in opts:
        raise DataError("dataloader_options cannot contain 'dataset'; pass the data itself.")
    for key in opts:
        if key not in _LOADER_KEYS:
            close = difflib.get_close_matches(str(key), _LOADER_KEYS, n=1)
            raise DataError(
                f"dataloader_options has an unknown option {key!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f". DataLoader takes: {', '.join(sorted(_LOADER_KEYS))}."
            )
    for key, (ok, need) in _OPTION_RULES.items():
        if key in opts:
            value = opts[key]
            if not ok(value):
                raise DataError(f"dataloader_options[{key!r}]={value!r} is not valid: {key} must be {need}.")
            if _is_int(value):
                opts[key] = int(value)
            elif _is_bool(value):
                opts[key] = bool(value)
    return opts


def make_source(
    data: Any,
    *,
    train: bool,
    options: Mapping[str, Any] | None = None,
    what: str = "data",
) -> BatchSource:
    """Turn ``data`` into a batch source (the forms of docs/models.md, "Data forms").

    Args:
        data: a DataLoader (used as is: ``options`` must be empty), a Dataset, or in-memory data.
        train: training data is shuffled by default; other data (validation, evaluation, prediction) is
            never shuffled and never drops its last batch: ``shuffle=True`` / ``drop_last=True`` in
            ``options`` are then ignored with a warning.
        options: ``dataloader_options``, validated here (unknown keys and bad values are errors).
        what: how errors and warnings name the data ("validation data" ...).

    >>> import torch
    >>> from lanterna.data.adapters import make_source
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
    if not train:
        ignored = [k for k in ("shuffle", "drop_last") if opts.get(k)]
        if ignored:
            warnings.warn(
                f"dataloader_options {', '.join(f'{k}=True' for k in ignored)} ignored for the {what}: "
                "validation, evaluation and prediction data are never shuffled and never drop their last batch.",
                stacklevel=_user_stacklevel(),
            )
            opts.update(dict.fromkeys(ignored, False))
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
    # the first four shape the batches; the rest set up worker processes, which in-memory data does not need
    known = {"batch_size", "shuffle", "drop_last", "generator", "num_workers", "pin_memory",
             "persistent_workers", "prefetch_factor", "timeout", "worker_init_fn",
             "multiprocessing_context", "pin_memory_device", "in_order"}
    unknown = set(options) - known
    if unknown:
        raise DataError(
            f"dataloader_options {sorted(unknown)} cannot apply to in-memory {what}; "
            "wrap the data in a Dataset and DataLoader for custom samplers or collate functions."
        )
    batch_size = options.get("batch_size", _LOADER_DEFAULTS["batch_size"])
    if batch_size is None:
        raise DataError("dataloader_options['batch_size']=None: in-memory data needs a positive integer batch_size "
                        "(batch_size must be a positive integer).")
    gen = options.get("generator")
    return TensorBatches(
        leaves,
        spec,
        batch_size=batch_size,
        shuffle=options.get("shuffle", train),
        drop_last=options.get("drop_last", False),
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
    try:
        loader = DataLoader(ds, **opts)
    except (TypeError, ValueError) as e:
        raise DataError(f"dataloader_options {dict(options)} could not build a DataLoader for the {what}: {e}") from e
    return LoaderBatches(loader, build=(ds, opts, frozenset(options)))  # tuned at to_device


# --------------------------------------------------------------------------- validation split


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

    >>> import torch
    >>> from lanterna.data.adapters import split_valid
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
        return _split_loader(data, fraction, generator)
    for key in ("sampler", "batch_sampler"):
        if isinstance(options, Mapping) and options.get(key) is not None:
            raise _custom_sampler_error(fraction, type(options[key]).__name__)
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
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):  # not numbers: no stratification
            targets = None
        labels = _class_labels(targets) if targets is not None and targets.shape[:1] == (n,) else None
    return _split_indices(n, float(fraction), labels, gen)


def loader_options(dl: DataLoader) -> dict[str, Any]:
    """The options to rebuild ``dl`` over another dataset or sampler (all but dataset/sampler/shuffle)."""
    opts: dict[str, Any] = {
        "batch_size": dl.batch_size, "num_workers": dl.num_workers, "collate_fn": dl.collate_fn,
        "pin_memory": dl.pin_memory, "drop_last": dl.drop_last, "timeout": dl.timeout,
        "worker_init_fn": dl.worker_init_fn, "generator": dl.generator,
    }
    if dl.num_workers > 0:
        opts.update(prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers,
                    multiprocessing_context=dl.multiprocessing_context)
    if getattr(dl, "pin_memory_device", ""):
        opts["pin_memory_device"] = dl.pin_memory_device
    if getattr(dl, "in_order", True) is False:
        opts["in_order"] = False
    return opts


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
