"""Data adapters: any accepted data form → a :class:`BatchSource` (docs/models.md, "Data forms").

Accepted: a DataLoader, a Dataset, a tuple/list ``(x, y)`` of tensors / NumPy arrays / pandas objects
(nested tuples and dicts for several inputs or targets), and, for prediction, ``x`` alone. Memory-mapped arrays
are batched per step (:mod:`lanterna.data.memmap`), IterableDatasets split across processes and DataLoader
workers (:mod:`lanterna.data.streams`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset, TensorDataset

from ..errors import DataError
from .memmap import MemmapBatches, is_memory_mapped
from .options import (
    _LOADER_DEFAULTS,
    _check_options,
    _loader_is_plain,
    _user_stacklevel,
    custom_sampler,
    loader_options,
)
from .sources import BatchSource, LoaderBatches, TensorBatches
from .streams import StreamBatches
from .structure import flatten
from .weights import WeightedCollate, WeightedSamples, check_sample_weight

__all__ = ["make_source", "to_tensor_leaves"]

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


def to_tensor_leaves(data: Any, what: str = "data", *, keep_mapped: bool = False) -> tuple[list[Any], Any]:
    """Flatten in-memory data into tensors (float → float32, integers → int64) and a structure spec.

    With ``keep_mapped``, memory-mapped arrays are checked but left as they are (never read whole).
    """
    leaves, spec = flatten(data)
    if not leaves:
        raise DataError(f"The {what} holds no tensors or arrays; expected {_SUPPORTED}.")
    tensors = [_mapped_leaf(leaf, f"Item {i} of the {what}") if keep_mapped and is_memory_mapped(leaf)
               else _leaf_to_tensor(leaf, f"Item {i} of the {what}") for i, leaf in enumerate(leaves)]
    # (x, y) or (x1, x2, y) hold a few arrays; many items are usually a list of samples
    hint = (" If this is a list of samples, stack them into one tensor per field (torch.stack) or wrap them in a "
            "Dataset." if isinstance(data, (tuple, list)) and len(data) > 3 else "")
    for i, t in enumerate(tensors):
        if len(t.shape) == 0:
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


def _mapped_leaf(arr: np.ndarray, where: str) -> np.ndarray:
    """A memory-mapped array checked like any array (numeric dtype), without reading it."""
    if arr.ndim > 0:
        if arr.dtype.isnative or arr.dtype.kind not in "biufc":  # torch takes native byte order only
            _leaf_to_tensor(arr[:0], where)  # the dtype checks of in-memory data, on no rows
        else:
            raise DataError(f"{where} is a memory-mapped array with non-native byte order ({arr.dtype}); save "
                            "it in this machine's byte order (arr.astype(arr.dtype.newbyteorder('='))).")
    return arr


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


def _flat_spec(n: int) -> Any:
    return ("tuple", [None] * n)


def make_source(
    data: Any,
    *,
    train: bool,
    options: Mapping[str, Any] | None = None,
    what: str = "data",
    sample_weight: Any = None,
) -> BatchSource:
    """Turn ``data`` into a batch source (the forms of docs/models.md, "Data forms").

    Args:
        data: a DataLoader (used as is: ``options`` must be empty), a Dataset, or in-memory data.
        train: training data is shuffled by default; other data (validation, evaluation, prediction) is
            never shuffled and never drops its last batch: ``shuffle=True`` / ``drop_last=True`` in
            ``options`` are then ignored with a warning.
        options: ``dataloader_options``, validated here (unknown keys and bad values are errors).
        what: how errors and warnings name the data ("validation data" ...).
        sample_weight: one weight per sample (in-memory data, a map-style Dataset or a DataLoader over one):
            the source then yields ``(batch, weights)`` (:mod:`lanterna.data.weights`).

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
        if sample_weight is not None:
            return _weighted_loader(data, sample_weight, what)
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
        if sample_weight is not None:
            return _weighted_dataset(data, sample_weight, train=train, options=opts, what=what)
        return _from_dataset(data, train=train, options=opts, what=what)
    if isinstance(data, (Tensor, np.ndarray, tuple, list, Mapping)) or _is_pandas(data):
        if isinstance(data, (tuple, list)) and len(data) == 0:
            raise DataError(f"The {what} is an empty tuple/list; pass (x, y) or x.")
        leaves, spec = to_tensor_leaves(data, what, keep_mapped=True)
        if sample_weight is not None:
            weight = check_sample_weight(sample_weight, int(leaves[0].shape[0]), what)
            device = next((t.device for t in leaves if isinstance(t, Tensor)), torch.device("cpu"))
            src = _tensor_source([*leaves, weight.to(device)], spec, train=train, options=opts, what=what)
            src.weighted = True
            return src
        return _tensor_source(leaves, spec, train=train, options=opts, what=what)
    raise DataError(f"Unsupported {what} of type {type(data).__name__}; expected {_SUPPORTED}.")


def _tensor_source(
    leaves: list[Any], spec: Any, *, train: bool, options: dict[str, Any], what: str
) -> TensorBatches:
    """The in-memory fast path over ``leaves`` (tensors; memory-mapped arrays make it a MemmapBatches)."""
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
    kwargs: dict[str, Any] = dict(batch_size=batch_size, shuffle=options.get("shuffle", train),
                                  drop_last=options.get("drop_last", False), loader_generator=gen,
                                  sampler_generator=gen)
    if any(isinstance(t, np.ndarray) for t in leaves):
        return MemmapBatches(leaves, spec, what=what, **kwargs)
    return TensorBatches(leaves, spec, **kwargs)


def _weighted_dataset(ds: Dataset, sample_weight: Any, *, train: bool, options: dict[str, Any],
                      what: str) -> BatchSource:
    """A map-style dataset with one weight per sample: a TensorDataset takes the fast path with the weights as
    one more leaf; any other one is wrapped in WeightedSamples (and its collate function in WeightedCollate)."""
    if isinstance(ds, IterableDataset):
        raise DataError(f"sample_weight needs a map-style dataset (indexable, with a length): the {what} is an "
                        "IterableDataset. Yield the weight inside each sample and compute the loss in step(ctx).")
    weight = check_sample_weight(sample_weight, len(ds), what)  # type: ignore[arg-type]
    plain = not ({"sampler", "batch_sampler", "collate_fn"} & options.keys())
    leaves = _tensor_dataset_leaves(ds) if plain else None
    if leaves is not None:
        src = _tensor_source([*leaves, weight.to(leaves[0].device)], _flat_spec(len(leaves)), train=train,
                             options=options, what=what)
        src.weighted = True
        return src
    if options.get("batch_size", 1) is None:
        raise DataError("sample_weight needs batches: dataloader_options['batch_size'] is None.")
    opts = {**options, "collate_fn": WeightedCollate(options.get("collate_fn"))}
    src = _from_dataset(WeightedSamples(ds, weight), train=train, options=opts, what=what)  # type: ignore[assignment]
    src.weighted = True
    return src


def _weighted_loader(dl: DataLoader, sample_weight: Any, what: str) -> BatchSource:
    """The user's DataLoader with one weight per sample of its (map-style) dataset: the same batches (its own
    sampler / batch sampler and options), each with its weights."""
    if isinstance(dl.dataset, IterableDataset) or dl.batch_sampler is None:
        raise DataError(f"sample_weight needs a DataLoader over a map-style dataset that makes batches; the {what} "
                        "DataLoader has an IterableDataset or batch_size=None.")
    weight = check_sample_weight(sample_weight, len(dl.dataset), what)  # type: ignore[arg-type]
    if _loader_is_plain(dl):
        leaves = _tensor_dataset_leaves(dl.dataset)
        if leaves is not None:
            src = _from_loader(DataLoader(TensorDataset(*leaves, weight), batch_size=dl.batch_size,
                                          sampler=dl.sampler, drop_last=dl.drop_last, generator=dl.generator), what)
            if isinstance(src, TensorBatches):
                src.weighted = True
                return src
    wrapped = WeightedSamples(dl.dataset, weight)
    opts = {**loader_options(dl), "collate_fn": WeightedCollate(dl.collate_fn)}
    if custom_sampler(dl) is None:  # rebuilt like the original: the same draws, so the same batches
        shuffled = type(dl.sampler) is RandomSampler
        sampler = RandomSampler(wrapped, generator=dl.sampler.generator) if shuffled else None  # type: ignore[attr-defined]
        loader = DataLoader(wrapped, sampler=sampler, **opts)
    else:  # the user's own (batch) sampler draws the indices
        opts = {k: v for k, v in opts.items() if k not in ("batch_size", "drop_last")}
        loader = DataLoader(wrapped, batch_sampler=dl.batch_sampler, **opts)
    return LoaderBatches(loader, owned=True, weighted=True)


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
    if isinstance(dl.dataset, IterableDataset):  # split across processes and workers (data/streams.py)
        return StreamBatches.from_loader(dl)
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
        if iterable:  # split across processes and workers (data/streams.py)
            return StreamBatches(ds, opts, user_keys=frozenset(options))
        loader = DataLoader(ds, **opts)
    except (TypeError, ValueError) as e:
        raise DataError(f"dataloader_options {dict(options)} could not build a DataLoader for the {what}: {e}") from e
    return LoaderBatches(loader, build=(ds, opts, frozenset(options)))  # tuned at to_device


