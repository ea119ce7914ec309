"""Warm objects shared by the fault tables: tiny data, setups and fitted models (built once per process, so
every row and every forked child reuses them), and a few odd models."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import harness  # noqa: F401 - puts tests/ on sys.path when run as a script
import pytest
import torch
from conftest import MLPClassifier, Net, make_blobs, make_luz_data
from torch import nn

import lanterna as ln

torch.set_num_threads(1)
# torch imports torch._dynamo (seconds) at the first optimizer a process builds: do it once here, so that the
# children forked from this process start warm.
torch.optim.Adam(nn.Linear(1, 1).parameters())

N = 64
QUIET = {"verbose": False}


def data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, 3)``, ``y (n, 1)``: the luz regression, fresh tensors."""
    return make_luz_data(n, seed)


def clf_data(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    return make_blobs(n)


def reg_setup(**opt: Any) -> ln.Setup:
    s = ln.setup(Net, loss=nn.MSELoss(), metrics=[ln.metrics.MAE()]).set_hparams(d_in=3, d_hidden=8, d_out=1)
    return s.set_opt_hparams(lr=0.01, **opt)


def clf_setup() -> ln.Setup:
    return ln.setup(MLPClassifier, loss=nn.CrossEntropyLoss(), metrics=[ln.metrics.Accuracy()]).set_hparams(
        d_in=4, d_hidden=8, n_classes=3).set_opt_hparams(lr=0.01)


def fit(setup: ln.Setup | None = None, train: Any = None, **kw: Any) -> ln.Fitted:
    """A 1-epoch, batch-16, seeded, silent fit of the regression setup (override anything)."""
    kw = {"epochs": 1, "seed": 0, "verbose": False, **kw}
    if train is None:
        train = data()
        kw.setdefault("dataloader_options", {"batch_size": 16})
    return (setup or reg_setup()).fit(train, **kw)


@functools.cache
def fitted_a() -> ln.Fitted:
    """The "previous" model of the persistence rows: 1 epoch."""
    return fit()


@functools.cache
def fitted_b() -> ln.Fitted:
    """The "new" model: other weights (seed 1) and a 2-epoch history."""
    return fit(epochs=2, seed=1)


def state_of(fitted: ln.Fitted) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in fitted.model.state_dict().items()}


class NaNGrad(nn.Module):
    """A finite loss whose gradient is NaN: ``0 * sqrt(p)`` at ``p = 0`` (value 0, gradient 0 * inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.0 * torch.sqrt(self.p)


class InfGrad(nn.Module):
    """A finite loss whose gradient is Inf: ``sqrt(p)`` at ``p = 0`` (value 0, gradient +inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.sqrt(self.p)


class Logger(nn.Module):
    """A custom step that also logs ``name`` through ``ctx.log`` (a history key only the step creates)."""

    log_name = "custom"

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def step(self, ctx: Any) -> None:
        ctx.pred = self(ctx.input)
        ctx.loss = nn.functional.mse_loss(ctx.pred, ctx.target)
        ctx.log(self.log_name, ctx.loss.detach())
        if ctx.training:
            ctx.backward(ctx.loss)
            ctx.step_optimizer()


def logger_cls(name: str) -> type[Logger]:
    return type("Logger_" + str(abs(hash(name))), (Logger,), {"log_name": name})


class Act(nn.Module):
    """A model built with a module class as an hparam (``act=nn.Tanh``)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, dtype: torch.dtype = torch.float32,
                 scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, dtype=dtype)
        self.act = act()
        self.register_buffer("scale", torch.ones(1) if scale is None else scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x.to(self.lin.weight.dtype))) * self.scale


# ---------------------------------------------------------------------------- the files of a saved model


def weights_file(path: Any) -> Any:
    """The safetensors file of a saved model: the path itself (single-file form), or the one in the folder
    (the name the metadata records, whatever the layout of this version of lanterna)."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return path
    files = sorted(f for f in path.iterdir() if f.suffix == ".safetensors" and not f.name.startswith("."))
    meta = meta_file(path)
    text = meta.read_text(errors="replace") if meta.exists() else ""
    named = [f for f in files if f.name in text]
    return (named or files or [path / "model.safetensors"])[0]


def meta_file(path: Any) -> Any:
    from pathlib import Path

    return Path(path) / "lanterna.json"


def edit_meta(path: Any, change: Any) -> None:
    """Rewrite the folder's lanterna.json with ``change(meta_dict)`` applied."""
    import json

    meta = json.loads(meta_file(path).read_text())
    change(meta)
    meta_file(path).write_text(json.dumps(meta))


def retarget(obj: Any, old: str, new: str, kwargs: dict | None = None) -> int:
    """Point every JSON object that names the class ``old`` at ``new`` instead (and give it ``kwargs``);
    returns how many were changed. Works whatever key the format uses for the class path."""
    count = 0
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            if isinstance(value, str) and value.replace(".", ":").endswith(old.replace(".", ":")) and (
                    value.split(":")[0].split(".")[0] == old.split(":")[0].split(".")[0]):
                obj[key] = new
                count += 1
                if kwargs is not None:
                    obj["kwargs"] = kwargs
            else:
                count += retarget(value, old, new, kwargs)
    elif isinstance(obj, list):
        for value in obj:
            count += retarget(value, old, new, kwargs)
    return count


def read_header(path: Any) -> tuple[dict, bytes]:
    """The JSON header and the data bytes of a safetensors file."""
    import json
    import struct

    raw = weights_file(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def write_raw(path: Any, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    """Write a safetensors file from a header (a dict, or raw bytes) and data; ``length`` overrides the
    8-byte header length."""
    import json
    import struct

    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    weights_file(path).write_bytes(struct.pack("<Q", n) + head + data)


# ---------------------------------------------------------------------------- checkpoints written by fits


def mc_fit(path: Path, seed: int) -> ln.Fitted:
    return fit(seed=seed, callbacks=[ln.callbacks.ModelCheckpoint(path, monitor="train_loss")])


class CrashAt(ln.Callback):
    """Raise at the end of epoch ``n``, after AutoResume saved it (a crash that keeps the resume state)."""

    order, runs_last = 5000, True

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, ctx: Any) -> None:
        if ctx.epoch == self.n:
            raise RuntimeError("crash")


def ar_fit(folder: Path, epochs: int = 3, **kw: Any) -> ln.Fitted:
    callbacks = [ln.callbacks.AutoResume(folder), *kw.pop("callbacks", [])]
    return fit(epochs=epochs, callbacks=callbacks, **kw)


@functools.cache
def ar_template() -> Path:
    """An AutoResume folder after a crash at the end of epoch 2 of 3 (checkpoints of epochs 1 and 2)."""
    folder = harness.scratch("lanterna-rel-shared-") / "state"
    with pytest.raises(RuntimeError):
        ar_fit(folder, callbacks=[CrashAt(2)])
    return folder


def saved_checkpoint(env: Any) -> Path:
    p = env.tmp / "ck" / "last.pt"
    mc_fit(p, 0)
    return p
