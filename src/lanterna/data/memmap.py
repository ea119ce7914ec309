"""Memory-mapped arrays (``np.load(path, mmap_mode="r")``, ``np.memmap``) batched per step, never read whole
(docs/models.md, "Streams and data larger than memory").

A batch reads its rows from the file with ``os.pread`` (one read per run of consecutive rows), converts them with
the rules of in-memory data (floating → float32, integers → int64) and puts them on the device: the same samples,
in the same order and with the same random draws as the in-memory fast path (:class:`~lanterna.data.TensorBatches`),
so a fit on a mapped file and on the same data as a tensor end with identical weights.

Why ``pread`` and not the mapping: pages of a mapping count in the process's RSS once touched, and on recent
kernels a page-cache fault maps a whole large folio (up to 2 MB) at once, so a shuffled batch of 256 rows could map
up to 512 MB. ``pread`` copies only the rows into the batch: RSS grows by the batches in flight, whatever the size
of the file (the file stays in the kernel's page cache, which is not RSS and is reclaimed under pressure). It costs
about as much per row as a page fault. Arrays whose rows are not contiguous in the file (a column slice, Fortran
order) and copy-on-write maps (``mode="c"``, whose changes are not in the file) are read through the mapping
instead, whose pages are dropped after every batch (``madvise(MADV_DONTNEED)``; not for ``mode="c"``).

>>> import numpy as np, tempfile, os
>>> from lanterna.data.memmap import is_memory_mapped
>>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
>>> np.save(path, np.zeros((4, 2)))
>>> is_memory_mapped(np.load(path, mmap_mode="r")), is_memory_mapped(np.zeros(3))
(True, False)
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .sources import TensorBatches
from .structure import unflatten

__all__ = ["MemmapBatches", "batch_dtype", "is_memory_mapped"]

_PREAD = hasattr(os, "pread")
_PREADV = hasattr(os, "preadv")
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view``; the count read (short only at the end of the file)."""
    done = 0
    while done < len(view):  # one call reads it all, but for reads over 2 GB (Linux's cap per call)
        part = view[done:]
        if _PREADV:
            got = os.preadv(fd, [part], offset + done)
        else:
            data = os.pread(fd, len(part), offset + done)
            part[: len(data)] = data
            got = len(data)
        if got == 0:
            break
        done += got
    return done


def _root_memmap(obj: Any) -> np.memmap | None:
    """The ``np.memmap`` that holds the mapping under ``obj`` (obj itself, or an array it views), or None."""
    while isinstance(obj, np.ndarray):
        if isinstance(obj, np.memmap) and isinstance(obj.base, mmap.mmap):
            return obj
        obj = obj.base
    return None


def is_memory_mapped(obj: Any) -> bool:
    """Whether ``obj`` is a NumPy array over a memory-mapped file (``np.memmap``, ``np.load(..., mmap_mode=...)``,
    or a view of one), which lanterna batches per step instead of reading it whole.

    Args:
        obj: any object.

    Returns:
        True for memory-mapped arrays.

    >>> import numpy as np, tempfile, os
    >>> from lanterna.data.memmap import is_memory_mapped
    >>> m = np.memmap(os.path.join(tempfile.mkdtemp(), "a.bin"), dtype=np.float32, mode="w+", shape=(6, 2))
    >>> is_memory_mapped(m[2:]), is_memory_mapped(np.array(m))
    (True, False)
    """
    return isinstance(obj, np.ndarray) and _root_memmap(obj) is not None


def batch_dtype(dtype: np.dtype) -> torch.dtype:
    """The dtype batches of a NumPy ``dtype`` get: the rules of in-memory data (docs/models.md, "Data forms").

    Args:
        dtype: the array's dtype.

    Returns:
        float32 for floating data, int64 for integers (and wide unsigned ones), the torch equivalent otherwise.

    >>> import numpy as np
    >>> from lanterna.data.memmap import batch_dtype
    >>> batch_dtype(np.dtype("float64")), batch_dtype(np.dtype("uint8")), batch_dtype(np.dtype("bool"))
    (torch.float32, torch.int64, torch.bool)
    """
    if dtype.kind == "f":
        return torch.float32
    if dtype.kind in "iu":
        return torch.int64
    return torch.from_numpy(np.zeros(0, dtype=dtype.newbyteorder("="))).dtype


class _MappedLeaf:
    """One memory-mapped array: where its rows lie in its file, and how a batch of them is read."""

    def __init__(self, array: np.ndarray) -> None:
        root = _root_memmap(array)
        assert root is not None
        self.array = np.asarray(array)  # a plain ndarray view: no np.memmap wrapping of every result
        self.mmap: mmap.mmap = root.base  # type: ignore[assignment]
        self.private = root.mode == "c"  # copy-on-write: changes live in the mapping only
        self.dtype = array.dtype
        self.out = batch_dtype(array.dtype)
        self.np_out = torch.empty(0, dtype=self.out).numpy().dtype
        self.row_shape = tuple(array.shape[1:])
        self.row_bytes = array.dtype.itemsize * math.prod(self.row_shape)
        c_strides, step = [], array.dtype.itemsize
        for d in reversed(self.row_shape):
            c_strides.append(step)
            step *= d
        contiguous_rows = tuple(reversed(c_strides)) == tuple(array.strides[1:]) or self.row_bytes == 0
        self.stride = int(array.strides[0]) if array.shape[0] > 1 else self.row_bytes
        name = root.filename
        self.path = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None  # None: opened from a file object
        self.pread = (_PREAD and contiguous_rows and self.stride >= self.row_bytes and not self.private
                      and self.path is not None)
        if self.pread:
            root_ptr = root.__array_interface__["data"][0]
            self.offset = int(root.offset) + (array.__array_interface__["data"][0] - root_ptr)
        self.adjacent = self.stride == self.row_bytes  # consecutive rows are one read
        self._buffer: np.ndarray | None = None

    def read(self, fd: int | None, rows: np.ndarray | slice) -> np.ndarray:
        """Rows ``rows`` (a slice or an index array, in batch order) as a new array of the batch dtype."""
        if not self.pread or fd is None:
            part = self.array[rows] if isinstance(rows, slice) else np.take(self.array, rows, axis=0)
            out = np.array(part, dtype=self.np_out, copy=True)
            if not self.private and _DONTNEED is not None:
                self.mmap.madvise(_DONTNEED)  # the pages this batch mapped
            return out
        rb, stride = self.row_bytes, self.stride
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.array.shape[0])
            total = max(stop - start, 0)
            offsets = [start * stride + self.offset] if self.adjacent else list(range(start * stride + self.offset,
                                                                                      stop * stride + self.offset,
                                                                                      stride))
            lengths = [total * rb] if self.adjacent else None
        else:
            total = len(rows)
            lengths = None  # one row per read
            if self.adjacent and total > 1:  # runs of consecutive rows are one read each
                firsts = np.concatenate(([0], np.flatnonzero(np.diff(rows) != 1) + 1))
                if len(firsts) < total:
                    lengths = (np.diff(np.concatenate((firsts, [total]))) * rb).tolist()
                    rows = rows[firsts]
            offsets = (rows * stride + self.offset).tolist()
        out = np.empty((total, *self.row_shape), dtype=self.np_out)
        if len(offsets) == 1:  # one read (a batch of consecutive rows): straight into the batch's array
            same = self.np_out == self.dtype
            buf = out if same else self._scratch(total)  # rows are read in the file's dtype, then converted
            view = memoryview(buf.reshape(-1).view(np.uint8)) if buf.size else memoryview(bytearray())  # type: ignore[arg-type]
            self._check(_read_into(fd, view, offsets[0]), total)
            if not same:
                np.copyto(out, buf, casting="unsafe")
            return out
        pread = os.pread  # one system call per run: its cost is most of a shuffled batch's
        if lengths is None:
            data = b"".join([pread(fd, rb, o) for o in offsets])
        else:
            data = b"".join([pread(fd, n, o) for o, n in zip(offsets, lengths)])
        self._check(len(data), total)
        np.copyto(out, np.frombuffer(data, dtype=self.dtype).reshape(out.shape), casting="unsafe")
        return out

    def _check(self, got: int, rows: int) -> None:
        if got != rows * self.row_bytes:
            raise DataError(f"The memory-mapped file {self.path} is shorter than its array ({self.array.shape[0]} "
                            f"rows of {self.row_bytes} bytes): was it truncated while training?")

    def _scratch(self, rows: int) -> np.ndarray:
        """A buffer of ``rows`` rows in the file's dtype, reused from batch to batch (no allocation churn)."""
        if self._buffer is None or len(self._buffer) < rows:
            self._buffer = np.empty((rows, *self.row_shape), dtype=self.dtype)
        return self._buffer[:rows]

    def release(self) -> None:
        """Drop the mapping's pages from this process (they stay in the page cache)."""
        if not self.private and _DONTNEED is not None:
            self.mmap.madvise(_DONTNEED)


class MemmapBatches(TensorBatches):
    """Batches gathered per step from memory-mapped arrays (and in-memory tensors beside them), with the
    semantics and random draws of :class:`~lanterna.data.TensorBatches` (module docstring).

    Args:
        leaves: the data's leaves: memory-mapped NumPy arrays and CPU tensors, one row per sample.
        spec: the structure the leaves are unflattened into (``lanterna.data.structure.flatten``'s).
        index: the rows of the leaves this source holds, in order (a 1-D int64 tensor); None for all of them.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        drop_last: drop the last, short batch.
        loader_generator: the generator a DataLoader would draw its base seed from.
        sampler_generator: the generator a RandomSampler would shuffle with.
        weighted: the last leaf is the samples' weights, yielded beside each batch.
        what: how errors name the data.

    >>> import numpy as np, tempfile, os, torch
    >>> from lanterna.data.memmap import MemmapBatches
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(path, np.arange(10.0).reshape(5, 2))
    >>> src = MemmapBatches([np.load(path, mmap_mode="r")], ("tuple", [None]), batch_size=2)
    >>> [b[0][:, 0].tolist() for b in src]
    [[0.0, 2.0], [4.0, 6.0], [8.0]]
    """

    def __init__(
        self,
        leaves: Sequence[np.ndarray | Tensor],
        spec: Any,
        *,
        index: Tensor | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        loader_generator: torch.Generator | None = None,
        sampler_generator: torch.Generator | None = None,
        weighted: bool = False,
        what: str = "data",
    ) -> None:
        parts: list[_MappedLeaf | Tensor] = []
        views: list[Tensor] = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                parts.append(leaf.cpu())
                views.append(leaf)
                continue
            if not leaf.dtype.isnative:
                raise DataError(f"Item {i} of the {what} is a memory-mapped array with non-native byte order "
                                f"({leaf.dtype}); save it in this machine's byte order "
                                "(arr.astype(arr.dtype.newbyteorder('='))).")
            parts.append(_MappedLeaf(leaf))
            with warnings.catch_warnings():  # a view of the mapping, never written (torch warns on read-only)
                warnings.simplefilter("ignore", UserWarning)
                views.append(torch.from_numpy(np.asarray(leaf)))
        super().__init__(views, spec, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                         loader_generator=loader_generator, sampler_generator=sampler_generator, weighted=weighted)
        self.parts = parts
        self.index = None if index is None else index.to(torch.int64).cpu()
        self._index_np = None if self.index is None else self.index.numpy()
        self.num_samples = int(views[0].shape[0]) if self.index is None else len(self.index)
        self.device: torch.device | None = None

    def to_device(self, device: torch.device) -> MemmapBatches:
        """Batches go to ``device`` (the arrays stay where they are: on disk).

        Args:
            device: where the loop runs.

        Returns:
            This source.
        """
        self.device = device
        # on CUDA each batch is a host-to-device copy: the loop's side stream overlaps it (data/prefetch.py)
        self._stage_device = device if device.type == "cuda" else None
        return self

    def subset(self, indices: Tensor, *, shuffle: bool | None = None) -> MemmapBatches:
        """A new source over the samples ``indices`` of this one (still mapped), same options unless overridden.

        Args:
            indices: a 1-D index tensor into this source's samples.
            shuffle: override the shuffling.

        Returns:
            The new source.
        """
        indices = indices.to(torch.int64).cpu()
        index = indices if self.index is None else self.index.index_select(0, indices)
        new = MemmapBatches.__new__(MemmapBatches)
        new.__dict__.update(self.__dict__)
        new.index, new._index_np, new.num_samples = index, index.numpy(), len(index)
        new.shuffle = self.shuffle if shuffle is None else shuffle
        return new

    def column(self, i: int) -> Tensor:
        """Leaf ``i`` of all this source's samples, read and converted (for small leaves such as targets).

        Args:
            i: the leaf.

        Returns:
            A CPU tensor of the batch dtype.
        """
        rows: np.ndarray | slice = slice(0, self.num_samples) if self._index_np is None else self._index_np
        part = self.parts[i]
        if isinstance(part, Tensor):
            return part[rows] if isinstance(rows, slice) else part.index_select(0, torch.from_numpy(rows))
        fds = self._open()
        try:
            return torch.from_numpy(part.read(fds.get(part.path or ""), rows))
        finally:
            for fd in fds.values():
                os.close(fd)

    def fingerprint(self) -> bytes:
        """A cheap summary of the data, read without touching the mappings: each file's path, size and
        modification time, the arrays' shapes and dtypes, their first and last rows, the in-memory leaves' sums
        and the rows this source holds (for ``lanterna.data.resume.data_fingerprint``, whose sums over the
        leaves would read the files whole).

        Returns:
            Bytes to hash.
        """
        parts: list[bytes] = []
        first_last = np.array([0, max(self.leaves[0].shape[0] - 1, 0)], dtype=np.int64)
        fds = self._open()
        try:
            for part in self.parts:
                if isinstance(part, _MappedLeaf):
                    if part.path is not None:
                        st = os.stat(part.path)
                        parts.append(f"{part.path}|{st.st_size}|{st.st_mtime_ns}".encode())
                    parts.append(f"{part.array.shape}|{part.dtype}".encode())
                    parts.append(part.read(fds.get(part.path or ""), first_last).tobytes())
                else:
                    parts.append(part.sum(dtype=torch.float64).numpy().tobytes())
        finally:
            for fd in fds.values():
                os.close(fd)
        if self.index is not None:
            parts.append(self.index.numpy().tobytes())
        return b"|".join(parts)

    def release(self) -> None:
        """Drop the pages of the mappings that anything touched (a data fingerprint, a label check) from RSS."""
        for part in self.parts:
            if isinstance(part, _MappedLeaf):
                part.release()

    def _open(self) -> dict[str, int]:
        fds: dict[str, int] = {}
        for part in self.parts:
            if isinstance(part, _MappedLeaf) and part.pread and part.path is not None and part.path not in fds:
                fds[part.path] = os.open(part.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fds

    def __iter__(self) -> Iterator[Any]:
        order = self.epoch_order()
        n = self.num_samples if order is None else len(order)
        bs = self.batch_size
        stop = n - n % bs if self.drop_last else n
        order_np = None if order is None else order.numpy()
        index = self._index_np
        device = self.device if self.device is not None and self.device.type != "cpu" else None
        pin = device is not None and device.type == "cuda"  # pinned: the copy runs asynchronously
        self.release()  # pages that others touched (a fingerprint, a check) leave RSS
        fds = self._open()
        try:
            for start in range(0, stop, bs):
                rows: np.ndarray | slice
                if order_np is None:
                    rows = slice(start, start + bs) if index is None else index[start : start + bs]
                else:
                    pos = order_np[start : start + bs]
                    rows = pos if index is None else index[pos]
                parts = []
                for part in self.parts:
                    if isinstance(part, _MappedLeaf):
                        t = torch.from_numpy(part.read(fds.get(part.path or ""), rows))
                    else:
                        t = part[rows] if isinstance(rows, slice) else part.index_select(0, torch.from_numpy(rows))
                    if device is not None:
                        t = t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)
                    parts.append(t)
                if self.weighted:
                    *parts, weight = parts
                    yield (tuple(parts) if self._flat else unflatten(parts, self.spec)), weight
                else:
                    yield tuple(parts) if self._flat else unflatten(parts, self.spec)
        finally:
            for fd in fds.values():
                os.close(fd)

