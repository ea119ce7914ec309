"""FSDP2 under ``torchrun``: ``Accelerator(strategy="fsdp", fsdp_units=...)`` (README.md, "torchrun").

Each rank holds a shard of every parameter, gradient and optimizer state (torch's ``fully_shard``): a unit's
parameters are all-gathered for its forward and backward, and its gradients reduce-scattered after the
backward. What lanterna adds around torch's engine:

- the model: rank 0's initial weights are broadcast first (as DDP does), then each ``fsdp_units`` instance is
  sharded as a unit, innermost first, and the model as the outer unit; mixed precision is FSDP's own
  ``MixedPrecisionPolicy`` (parameters cast to bfloat16 for compute, gradients reduced in float32, outputs
  given in float32), so autocast is off under FSDP;
- every rank runs the same number of batches in every phase, also validation and predict (each forward
  all-gathers): a rank whose shard ran out runs empty batches (:mod:`.even_batches`);
- gradient accumulation: the deferred micro-batches neither reduce-scatter nor reshard
  (``set_requires_gradient_sync`` / ``set_reshard_after_backward``);
- checkpoints (:class:`ShardedCheckpoints`) through ``torch.distributed.checkpoint``: each rank writes its
  shards, then rank 0 writes ``state.pt`` (everything else, checksummed, the DCP metadata and the SHA-256 of
  every shard file) and renames the folder into place: a checkpoint is complete exactly when its folder has
  its name. Nothing is unpickled on load: the DCP metadata is read by ``torch.load(weights_only=True)``
  allowing only DCP's metadata classes, and only after its checksum matched;
- ``fitted.save`` gathers the full model (:meth:`FullyShardedWorld.full_state_dict`) and rank 0 writes it: the
  folder loads in a plain process with ``ln.load``.

>>> from lanterna.integrations.fsdp import FullyShardedWorld
>>> FullyShardedWorld.strategy
'fsdp'
"""

from __future__ import annotations

import copy
import io
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.sources import BatchSource
from ..errors import CheckpointError, DamagedCheckpointError, ModelMismatchError
from ..io.artifact_read import file_sha256
from ..io.atomic import TEMP_MARKER, explain_write_error, fsync_dir
from ..io.checkpoint import CheckpointInfo, load_checkpoint, remove_checkpoint, save_checkpoint, verify_checkpoint
from .distributed import Distributed
from .even_batches import EvenBatches

__all__ = ["FullyShardedWorld", "ShardedCheckpoints", "from_env"]

STATE_FILE = "state.pt"
METADATA_FILE = "dcp-metadata.pt"


class FullyShardedWorld(Distributed):
    """One process of an FSDP2 job: the collectives of :class:`~lanterna.integrations.distributed.Distributed`,
    the model sharded with ``fully_shard``, and sharded checkpoints (:attr:`checkpoints`).

    Args:
        rank: this process's rank.
        world_size: the number of processes.
        local_rank: its rank on this machine.
        device: its device.
        seed: the seed every rank agreed on (shuffling, the validation split).
        units: the module classes sharded as units (``Accelerator(fsdp_units=...)``); None: the model's direct
            children that hold parameters.
        param_dtype: the compute dtype of mixed precision (``torch.bfloat16``), or None.
    """

    strategy = "fsdp"
    shards_parameters = True

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int,
                 units: Sequence[type[nn.Module]] | None = None, param_dtype: torch.dtype | None = None) -> None:
        super().__init__(rank, world_size, local_rank, device, seed)
        self.units = tuple(units) if units else None
        self.param_dtype = param_dtype
        self.root: nn.Module | None = None
        self.checkpoints = ShardedCheckpoints(self)

    def __repr__(self) -> str:
        return f"FullyShardedWorld(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # ----------------------------------------------------------------- model and data
    def adapt(self, accelerator: Any) -> Any:
        """The accelerator the step uses: without autocast, as FSDP's mixed-precision policy casts instead."""
        if accelerator.amp_dtype is None:
            return accelerator
        adapted = copy.copy(accelerator)
        adapted.amp_dtype = None
        return adapted

    def wrap(self, forward_model: Any, model: nn.Module) -> Any:
        """Shard ``model`` in place (``fully_shard`` per unit, then the whole); a model already sharded (a fit
        continued) is kept as it is."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(model, FSDPModule):
            self.root = model
            return forward_model
        if not any(p.requires_grad for p in model.parameters()):
            return forward_model
        with torch.no_grad():  # every rank starts from rank 0's weights, as under DDP
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, src=0)
        policy = root_policy = MixedPrecisionPolicy()
        if self.param_dtype is not None:  # outputs in float32 at the model's edge only: inside, units pass 16 bits
            policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
            root_policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32,
                                               output_dtype=torch.float32)
        if self.units is not None:
            units = [m for m in model.modules() if m is not model and isinstance(m, self.units)]
        else:
            units = [c for c in model.children() if any(p.requires_grad for p in c.parameters())]
        for unit in reversed(units):  # innermost first: a unit inside another is sharded on its own
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=root_policy)
        self.root = model
        if forward_model is model:
            return model
        return torch.compile(model)

    def balance(self, source: BatchSource, *, training: bool) -> BatchSource:
        """Every phase in step across ranks: each forward all-gathers parameters (training and evaluation)."""
        if self.root is None:
            return source
        return EvenBatches(source, self)

    def set_grad_sync(self, enabled: bool) -> None:
        """Deferred micro-batches of gradient accumulation: no reduce-scatter and no reshard until the last."""
        root = self.root
        if root is not None:
            root.set_requires_gradient_sync(enabled)  # type: ignore[operator]
            root.set_reshard_after_backward(enabled)  # type: ignore[operator]

    @staticmethod
    def total_samples(source: BatchSource) -> int:
        """Samples over all ranks of a source made by :meth:`shard` (and :meth:`balance`)."""
        while isinstance(source, EvenBatches):
            source = source.source
        return Distributed.total_samples(source)

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The whole model's state dict on rank 0 (on the CPU), an empty dict on the others; a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full: Any = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full  # type: ignore[no-any-return]


def from_env(accelerator: Any, seed: int | None) -> FullyShardedWorld | None:
    """A :class:`FullyShardedWorld` when launched by torchrun with WORLD_SIZE > 1, else None (the process group
    set up as :func:`lanterna.integrations.distributed.from_env` does)."""
    from .distributed import from_env as distributed_from_env

    def make(rank: int, world_size: int, local_rank: int, device: torch.device, seed: int) -> FullyShardedWorld:
        return FullyShardedWorld(rank, world_size, local_rank, device, seed, units=accelerator.fsdp_units,
                                 param_dtype=accelerator.amp_dtype)

    return distributed_from_env(accelerator, seed, make=make)  # type: ignore[return-value]


def _metadata_classes() -> list[Any]:
    """The classes of a DCP ``Metadata`` object: the only ones its reader may build."""
    from torch.distributed.checkpoint import filesystem, metadata

    return [metadata.Metadata, metadata.TensorStorageMetadata, metadata.ChunkStorageMetadata,
            metadata.TensorProperties, metadata.MetadataIndex, metadata.BytesStorageMetadata,
            metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo]


def _reader(folder: Path) -> Any:
    """DCP's file reader, with its metadata read from our weights-only file instead of DCP's pickle."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self) -> Any:
            with torch.serialization.safe_globals(_metadata_classes()):
                meta = torch.load(folder / METADATA_FILE, map_location="cpu", weights_only=True)
            meta.storage_meta = None
            return meta

    return Reader(folder)


class ShardedCheckpoints:
    """Checkpoints of an FSDP fit: a folder per checkpoint, written by all ranks together.

    Layout of ``name.pt/``: the shard files of ``torch.distributed.checkpoint`` (model parameters and optimizer
    state tensors), ``dcp-metadata.pt`` (where each shard lies) and ``state.pt`` (a lanterna checkpoint:
    every other part of the training state, the optimizers' hyperparameters, the checksums of the files).

    Args:
        world: the :class:`FullyShardedWorld`.
    """

    def __init__(self, world: FullyShardedWorld) -> None:
        self.world = world

    # ----------------------------------------------------------------- write
    def save(self, ctx: Any, path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
        """Write ``state`` (:func:`lanterna.core.state.training_state`) to the folder ``path``; every rank calls
        it. The folder appears under its name only once complete; a failure on any rank is a
        :class:`CheckpointError` on every rank, and leaves the previous checkpoint at ``path`` as it was."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        path = Path(path)
        world, root = self.world, self.world.root
        assert root is not None
        tensors: dict[str, Any] = {"model": get_model_state_dict(root), "optimizers": {}}
        hyper: dict[str, Any] = {}
        for name, opt in ctx.optimizers.items():
            osd: Any = get_optimizer_state_dict(root, opt)
            states = osd["state"]
            tensors["optimizers"][name] = {fqn: {k: v for k, v in s.items() if isinstance(v, Tensor)}
                                           for fqn, s in states.items()}
            hyper[name] = {"param_groups": osd["param_groups"],
                           "other": {fqn: {k: v for k, v in s.items() if not isinstance(v, Tensor)}
                                     for fqn, s in states.items()}}
        token = self._token()
        tmp = path.with_name(f".{path.name}{TEMP_MARKER}dcp{token}")
        error: BaseException | None = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            meta = dcp.save(tensors, checkpoint_id=tmp)
        except Exception as e:  # a full disk, a read-only folder ...
            error = e
        if not world.any(error is not None) and world.is_main:  # any(): a collective, on every rank
            try:
                self._commit(path, tmp, meta, state, hyper)
            except Exception as e:
                error = e
        failed = world.any(error is not None)
        if failed:
            if world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = explain_write_error(error) if isinstance(error, OSError) else (
                f"{type(error).__name__}: {error}" if error is not None else "another rank failed to write its shards")
            raise CheckpointError(f"Could not write the sharded checkpoint {str(path)!r}: {cause}. The previous "
                                  "checkpoint (if any) is unchanged.") from error
        return path

    def _token(self) -> str:
        """A name for this write's temp folder, the same on every rank (drawn from no random generator)."""
        t = torch.tensor([int.from_bytes(os.urandom(6), "big") if self.world.is_main else 0], dtype=torch.int64,
                         device=self.world.device)
        dist.broadcast(t, src=0)
        return f"{int(t.item()):012x}"

    def _commit(self, path: Path, tmp: Path, meta: Any, state: dict[str, Any], hyper: dict[str, Any]) -> None:
        (tmp / ".metadata").unlink(missing_ok=True)  # DCP's own (a pickle): replaced by the weights-only one
        meta.storage_meta = None
        buf = io.BytesIO()
        torch.save(meta, buf)
        (tmp / METADATA_FILE).write_bytes(buf.getvalue())
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        body = {**state, "model": {}, "sharded": {"format": "torch.distributed.checkpoint", "files": files,
                                                   "world_size": self.world.world_size},
                "sharded_optimizers": hyper}
        save_checkpoint(tmp / STATE_FILE, body)  # atomic, checksummed: the last file written
        fsync_dir(tmp)
        old = path.with_name(f".{path.name}{TEMP_MARKER}dcp-replaced")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)  # the commit: the folder has its name only when complete
        fsync_dir(path.parent)
        if old.exists():
            remove_checkpoint(old)

    # ----------------------------------------------------------------- read
    def scan(self, folder: str | os.PathLike[str], *, pattern: str,
             on_damaged: Callable[[Path, CheckpointError], None] | None = None) -> list[CheckpointInfo]:
        """The complete sharded checkpoints in ``folder`` (latest first by recorded step and epoch)."""
        found: list[CheckpointInfo] = []
        folder = Path(folder)
        if not folder.is_dir():
            return found
        for p in sorted(folder.glob(pattern)):
            if TEMP_MARKER in p.name or not p.is_dir():
                continue
            try:
                state = load_checkpoint(p / STATE_FILE, verify=False)
            except CheckpointError as e:
                if on_damaged is not None:
                    on_damaged(p, e)
                continue
            found.append(CheckpointInfo(p, int(state.get("epoch", 0) or 0), int(state.get("step", 0) or 0), state))
        found.sort(key=lambda c: (c.step, c.epoch), reverse=True)
        return found

    def verify(self, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
        """:class:`DamagedCheckpointError` unless ``state.pt`` and every shard file match their checksums."""
        path = Path(path)
        verify_checkpoint(state, path / STATE_FILE)
        files = (state.get("sharded") or {}).get("files") or {}
        if METADATA_FILE not in files:
            raise DamagedCheckpointError(f"The sharded checkpoint {str(path)!r} records no DCP metadata file.")
        for name, digest in files.items():
            f = path / Path(name).name
            if not f.is_file() or file_sha256(f) != digest:
                raise DamagedCheckpointError(f"The sharded checkpoint {str(path)!r} is damaged: its file {name} is "
                                             "missing or does not match its SHA-256 checksum.")

    def load(self, ctx: Any, path: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
        """Load the model's and optimizers' shards of the checkpoint at ``path`` into ``ctx`` (checked first:
        a checkpoint of another model is a :class:`ModelMismatchError` and changes nothing); returns ``state``
        with their live state dicts, for :func:`lanterna.core.state.restore_training_state` to load the rest."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(path)
        root = self.world.root
        assert root is not None
        reader = _reader(path)
        meta = reader.read_metadata()
        saved = {k[len("model."):]: tuple(v.size) for k, v in meta.state_dict_metadata.items()
                 if k.startswith("model.") and hasattr(v, "size")}
        live = {k: tuple(v.shape) for k, v in root.state_dict().items()}
        diff = ([f"missing in the checkpoint: {', '.join(sorted(set(live) - set(saved))[:6])}"]
                if set(live) - set(saved) else [])
        diff += ([f"not in this model: {', '.join(sorted(set(saved) - set(live))[:6])}"]
                 if set(saved) - set(live) else [])
        diff += [f"{k}: saved {saved[k]}, this model {live[k]}" for k in live if k in saved and saved[k] != live[k]]
        if diff:
            raise ModelMismatchError(f"The checkpoint {path} does not fit {type(root).__name__}: {'; '.join(diff)}. "
                                     "Resume with the same setup, or delete it to start afresh. Nothing was loaded.")
        hyper = state.get("sharded_optimizers") or {}
        if set(hyper) != set(ctx.optimizers):
            raise CheckpointError(f"The checkpoint {path} holds optimizers {sorted(hyper)}, this fit "
                                  f"{sorted(ctx.optimizers)}. Nothing was loaded.")
        model_sd = get_model_state_dict(root)
        osds: dict[str, Any] = {name: get_optimizer_state_dict(root, opt) for name, opt in ctx.optimizers.items()}
        target: dict[str, Any] = {"model": model_sd,
                  "optimizers": {name: {fqn: {k: v for k, v in s.items() if isinstance(v, Tensor)}
                                        for fqn, s in osd["state"].items()} for name, osd in osds.items()}}
        dcp.load(target, storage_reader=reader)
        set_model_state_dict(root, model_sd)
        for name, opt in ctx.optimizers.items():
            saved_h = hyper[name]
            states = {fqn: {**target["optimizers"][name].get(fqn, {}), **(saved_h.get("other") or {}).get(fqn, {})}
                      for fqn in osds[name]["state"]}
            full: Any = {"state": states, "param_groups": saved_h["param_groups"]}
            set_optimizer_state_dict(root, opt, full)
        return {**state, "model": root.state_dict(),
                "optimizers": {name: opt.state_dict() for name, opt in ctx.optimizers.items()}}

