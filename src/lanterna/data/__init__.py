"""Data adapters: anything accepted by fit/predict/evaluate → batches on the device."""

from .adapters import make_source, to_tensor_leaves
from .memmap import MemmapBatches
from .sources import BatchSource, LoaderBatches, TensorBatches
from .split import split_valid
from .streams import ShardedStream, StreamBatches
from .structure import batch_size_of, call_model, move_to, split_batch

__all__ = [
    "BatchSource",
    "LoaderBatches",
    "MemmapBatches",
    "ShardedStream",
    "StreamBatches",
    "TensorBatches",
    "batch_size_of",
    "call_model",
    "make_source",
    "move_to",
    "split_batch",
    "split_valid",
    "to_tensor_leaves",
]
