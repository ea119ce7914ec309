"""What fit returns: :class:`Fitted` (model, history, predict, evaluate, plot) and :class:`Evaluation`.

(Over 350 lines: ``Fitted`` is the public object users work with — predict, evaluate, fit on, save, export,
summary — and most of its length is their documented signatures; each delegates to the module that does the work.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor, nn

from .callbacks.metrics import MetricsCallback
from .callbacks.progress import format_value
from .core.accelerator import Accelerator
from .core.callback import Callback, Hooks
from .core.context import Context
from .core.loop import run_phase
from .core.step import Stepper
from .core.world import Local
from .data import batch_size_of, make_source, split_batch
from .data.streams import StreamBatches, stream_order
from .errors import DataError, LanternaError, UnexpectedArgumentError
from .metrics.base import split_metric_spec

if TYPE_CHECKING:
    from .api import Setup
    from .summary import ModelSummary

__all__ = ["Fitted", "Evaluation"]


class Evaluation:
    """Metrics over a whole data set. ``.metrics`` is ``{"loss": …, "mae": …}``; ``repr`` prints one
    ``name: value`` per line.

    Args:
        metrics: the values by name (``"loss"`` first), as ``Fitted.evaluate`` computes them.

    >>> from lanterna.results import Evaluation
    >>> Evaluation({"loss": 0.92712, "mae": 0.7348})
    loss: 0.9271
    mae: 0.7348
    """

    def __init__(self, metrics: dict[str, Any]) -> None:
        self.metrics = dict(metrics)

    def __getitem__(self, name: str) -> Any:
        return self.metrics[name]

    def __repr__(self) -> str:
        return "\n".join(f"{k}: {format_value(v)}" for k, v in self.metrics.items())


class Fitted:
    """A trained model and its history (README.md; saving and export: docs/saving.md).

    ``Setup.fit`` and :func:`~lanterna.load` make it; most arguments are also its attributes.

    Args:
        model: the trained model (put in eval mode).
        setup: the ``ln.Setup`` that was fitted (None for a loaded model without one).
        history: one dict per epoch (``epoch``, ``train_loss``, ``valid_*`` ...).
        optimizers: the optimizers by name, as they ended the fit.
        accelerator: where the model runs; default: the model's device.
        forward_model: what predict calls (the compiled model); default: ``model``.
        loss_fn: the loss ``evaluate`` reports.
        metrics: the metrics ``evaluate`` computes.
        total_time: the fit's wall time in seconds.
        status: how the fit ended: ``"completed"``, ``"stopped_early"``, ``"stopped"``, ``"interrupted"`` ...
        context: the fit's :class:`~lanterna.Context`.
        distributed: under torchrun, the processes that predict / evaluate shard and gather over; else None.
        split_seed: the seed of the ``valid_data=<fraction>`` split, if one was made.
        saved_state: the optimizer and callback state read back by :func:`~lanterna.load`.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
    ...     (x, y), epochs=1, verbose=False)
    >>> fitted.predict(x).shape
    torch.Size([64, 1])
    """

    def __init__(
        self,
        model: nn.Module,
        setup: Setup | None,
        history: list[dict[str, Any]],
        *,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        accelerator: Accelerator | None = None,
        forward_model: Any = None,
        loss_fn: Any = None,
        metrics: Sequence[Any] | None = None,
        total_time: float = 0.0,
        status: str = "completed",
        context: Context | None = None,
        distributed: Any = None,
        split_seed: int | None = None,
        saved_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.setup = setup
        self.history = history
        self.optimizers = optimizers or {}
        self.accelerator = accelerator or Accelerator(device=_model_device(model))
        self.forward_model = forward_model if forward_model is not None else model
        self.loss_fn = loss_fn
        self.metrics = list(metrics or [])
        self.total_time = total_time
        self.status = status
        self.context = context
        self.distributed = distributed  # under torchrun: predict/evaluate shard and gather
        self.split_seed = split_seed  # the seed of a valid_data fraction's split (a continued fit reuses it)
        self._saved_state = dict(saved_state or {})  # ln.load of fitted.save(path, optimizer=True)

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.setup.hparams) if self.setup is not None else {}

    @property
    def opt_hparams(self) -> dict[str, Any]:
        return dict(self.setup.opt_hparams) if self.setup is not None else {}

    # ------------------------------------------------------------------ training on
    def fit(
        self,
        data: Any,
        *,
        epochs: int | tuple[int, int] = 10,
        valid_data: Any = None,
        callbacks: Sequence[Callback] | None = None,
        verbose: bool | None = None,
        accelerator: Accelerator | None = None,
        dataloader_options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        sample_weight: Any = None,
        **unexpected: NoReturn,
    ) -> Fitted:
        """Train this model ``epochs`` more epochs and return a new :class:`Fitted`: the same model (trained in
        place, as Keras does), its optimizers, its schedulers' and grad scaler's states go on; epochs are
        numbered on from the last one and the history is appended. Callbacks are given anew (pass the same
        ``LRScheduler`` to continue its schedule). Without ``seed`` the random generators go on too, so two calls
        of 3 epochs end with the weights of one call of 6 (CPU); a ``valid_data`` fraction holds out the same
        samples as before. A model from ``ln.load`` continues when it was saved with ``optimizer=True``.

        Args:
            data: training data, as in ``Setup.fit``.
            epochs: how many epochs more (an int, or ``(min, max)`` for early stopping).
            valid_data: validation data or a fraction of ``data``, as in ``Setup.fit``.
            callbacks: the callbacks of this call, as in ``Setup.fit``.
            verbose: as in ``Setup.fit``.
            accelerator: as in ``Setup.fit``; by default the one the model was trained with.
            dataloader_options: as in ``Setup.fit``.
            seed: as in ``Setup.fit``; without it the random generators go on.
            sample_weight: as in ``Setup.fit``.

        Returns:
            A new ``Fitted`` whose history holds the earlier epochs and the new ones.
            **unexpected: none is taken (``batch_size=``, ``lr=`` ...: as in ``Setup.fit``).

        >>> import lanterna as ln, torch
        >>> from torch import nn
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> setup = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
        >>> more = setup.fit((x, y), epochs=2, verbose=False).fit((x, y), epochs=3, verbose=False)
        >>> [h["epoch"] for h in more.history]
        [1, 2, 3, 4, 5]
        """
        if unexpected:  # batch_size=, epoch=, lr= ...: typed NoReturn so that mypy flags them too
            raise UnexpectedArgumentError("fit", unexpected, self.fit)
        if self.setup is None:
            raise LanternaError("This Fitted has no setup to train on with (it was built by hand); fit it with "
                                "ln.setup(...).fit, or load it with ln.load(path).")
        return self.setup._fit(data, epochs=epochs, valid_data=valid_data, callbacks=callbacks, verbose=verbose,
                               accelerator=accelerator, dataloader_options=dataloader_options, seed=seed,
                               sample_weight=sample_weight, previous=self)

    def training_state(self) -> dict[str, Any]:
        """What :meth:`fit` continues from and ``save(path, optimizer=True)`` stores: the optimizers' state
        dicts, the schedulers' (class name and state dict), the grad scaler's and the optimizer step count.

        >>> import lanterna as ln, torch
        >>> from torch import nn
        >>> fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        ...     (torch.randn(8, 3), torch.randn(8, 1)), epochs=1, verbose=False)
        >>> sorted(fitted.training_state()), fitted.training_state()["step"]
        (['optimizers', 'scaler', 'schedulers', 'step'], 1)
        """
        ctx = self.context
        if ctx is None:
            return dict(self._saved_state)
        return {
            "optimizers": {name: opt.state_dict() for name, opt in ctx.optimizers.items()},
            "schedulers": [(type(s).__name__, s.state_dict()) for s in ctx.schedulers],
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            "step": ctx.step,
        }

    # ------------------------------------------------------------------ inference
    def _context(self, callbacks: Sequence[Callback] | None, builtin: Sequence[Callback] = ()) -> Context:
        for cb in callbacks or ():
            if not isinstance(cb, Callback):
                raise LanternaError(f"callbacks must be ln.Callback instances; got {cb!r}.")
        ctx = Context(model=self.model, forward_model=self.forward_model, accelerator=self.accelerator,
                      device=self.accelerator.device, loss_fn=self.loss_fn, verbose=False,
                      optimizers=self.optimizers, history=self.history, setup=self.setup,
                      custom_step=callable(getattr(self.model, "step", None)),
                      world=self.distributed if self.distributed is not None else Local(),
                      hooks=Hooks([*builtin, *(callbacks or ())]))
        ctx.stepper = Stepper(ctx)
        return ctx

    def _source(self, data: Any, options: Mapping[str, Any] | None, what: str, sample_weight: Any = None) -> Any:
        source = make_source(data, train=False, options=options, what=what,  # warns on shuffle / drop_last
                             sample_weight=sample_weight)
        if self.distributed is not None:
            source = self.distributed.shard(source, train=False)
        if what == "prediction data" and isinstance(source, StreamBatches):
            source = source.with_positions()  # its shards interleave: predictions are put back in stream order
        if self.distributed is not None:
            source = self.distributed.balance(source, training=False)  # FSDP: every forward is a collective
        return source.to_device(self.accelerator.device)

    def predict(self, data: Any, *, dataloader_options: Mapping[str, Any] | None = None,
                callbacks: Sequence[Callback] | None = None) -> Any:
        """Predictions as a CPU tensor concatenated over batches (a tuple/dict for multi-output models).

        Eval mode, no autograd, batches moved to the device one at a time. ``predict((x, y))`` ignores y.
        Under mixed precision the 16-bit outputs of autocast are returned as float32.

        Args:
            data: any data form of fit (a DataLoader, a Dataset, tensors/arrays, ``x`` alone or ``(x, y)``).
            dataloader_options: options where lanterna builds the loader (``batch_size`` ...).
            callbacks: ``ln.Callback`` objects; they get ``on_predict_begin``, ``on_predict_batch_begin``,
                ``on_predict_batch_end`` (``ctx.pred`` is the batch's output) and ``on_predict_end``.

        >>> import lanterna as ln, torch
        >>> from torch import nn
        >>> ln.Fitted(nn.Linear(3, 1), None, []).predict(torch.zeros(5, 3)).shape
        torch.Size([5, 1])
        """
        source = self._source(data, dataloader_options, "prediction data")
        ctx = self._context(callbacks)
        hooks = ctx.hooks
        self.model.eval()
        non_blocking = self.accelerator.device.type == "cuda"
        # under autocast the outputs come in 16 bits; predictions are given in the model's own float32
        mixed = self.accelerator.precision in ("bf16-mixed", "16-mixed")
        outs: list[Any] = []
        ctx.set_name, ctx.num_batches = "predict", source.num_batches()
        try:
            hooks.on_predict_begin(ctx)
            with torch.no_grad(), self.accelerator.run_context():
                for i, batch in enumerate(source, 1):
                    ctx.iter, ctx.batch = i, batch
                    ctx.input, ctx.target = split_batch(batch)
                    ctx.batch_size = batch_size_of(ctx.input)
                    hooks.on_predict_batch_begin(ctx)
                    ctx.pred = ctx.stepper.forward(ctx.input)
                    hooks.on_predict_batch_end(ctx)
                    outs.append(_to_cpu(ctx.pred, non_blocking, mixed))
            hooks.on_predict_end(ctx)
        finally:
            source.close()
        if non_blocking:
            torch.cuda.synchronize(self.accelerator.device)
        stream = _stream_of(source)
        if stream is not None and stream.keyed:  # every rank gets all of them, in stream order
            return stream_order(_concat(outs) if outs else None, stream.positions(), self.distributed)
        if self.distributed is not None:  # every rank gets all predictions, in dataset order
            n_total = self.distributed.total_samples(source)
            return _map_tensors(lambda t: self.distributed.gather_in_order(
                t.to(self.accelerator.device), n_total).cpu(), _concat(outs))
        return _concat(outs)

    def evaluate(
        self, data: Any, *, metrics: Sequence[Any] | None = None,
        dataloader_options: Mapping[str, Any] | None = None, callbacks: Sequence[Callback] | None = None,
        sample_weight: Any = None,
    ) -> Evaluation:
        """Loss and metrics over all of ``data`` (sample-weighted, exact) → :class:`Evaluation`.

        A module with its own ``step(ctx)`` is evaluated through it, with ``ctx.training`` False (as in
        validation); its ``ctx.loss`` and ``ctx.log`` values are in the result.

        Args:
            data: any data form of fit, with targets.
            metrics: replaces the fit's metrics for this evaluation.
            dataloader_options: options where lanterna builds the loader (``batch_size`` ...).
            callbacks: ``ln.Callback`` objects; they get the ``on_valid_*`` hooks.
            sample_weight: one non-negative weight per sample of ``data``: weighted loss and metrics.

        >>> import lanterna as ln, torch
        >>> from torch import nn
        >>> model, x = nn.Linear(3, 1), torch.randn(8, 3)
        >>> result = ln.Fitted(model, None, [], loss_fn=nn.MSELoss()).evaluate((x, torch.zeros(8, 1)))
        >>> torch.isclose(torch.tensor(result["loss"]), model(x).detach().pow(2).mean())
        tensor(True)
        """
        source = self._source(data, dataloader_options, "evaluation data", sample_weight)
        metric_list = self.metrics if metrics is None else metrics
        metrics_cb = MetricsCallback([], split_metric_spec(metric_list)[1])
        ctx = self._context(callbacks, [metrics_cb])
        ctx.valid_data, ctx.valid_name = source, "test"  # the module's own step(ctx) runs, as in validation
        metrics_cb.on_fit_begin(ctx)
        ctx.record = {}
        try:
            with self.accelerator.run_context():
                run_phase(ctx, training=False)
        finally:
            source.close()
        self.model.eval()
        values = {k[len("test_"):]: v for k, v in ctx.record.items() if k.startswith("test_")}
        if not values and self.loss_fn is None and not metric_list:
            raise DataError(
                "evaluate() has nothing to compute: this Fitted has no loss and no metrics (a loaded model whose "
                "loss was not rebuilt?). Pass metrics=[...], or ln.load(path, loss=nn.MSELoss()) for a loss."
            )
        if not values:
            raise DataError("evaluate() found nothing to compute: the data has no targets (pass (x, y), not x alone).")
        return Evaluation(values)

    # ------------------------------------------------------------------ history
    def metrics_df(self) -> Any:
        """History in long form: a pandas DataFrame with columns ``epoch, set, metric, value``."""
        import pandas as pd

        rows = []
        for rec in self.history:
            for key, value in rec.items():
                set_name, _, metric = key.partition("_")
                if set_name in ("train", "valid") and metric:
                    rows.append({"epoch": rec["epoch"], "set": set_name, "metric": metric, "value": value})
        return pd.DataFrame(rows, columns=["epoch", "set", "metric", "value"])

    def plot(self, metrics: Sequence[str] | None = None) -> Any:
        """A matplotlib Figure of the history: one panel per metric, train and valid curves."""
        from .plotting import plot_history

        return plot_history(self.history, metrics=metrics)

    # ------------------------------------------------------------------ files (docs/saving.md)
    def save(self, path: str | os.PathLike[str], optimizer: bool = False) -> Path:
        """Save the weights (safetensors, with a SHA-256 checksum) and metadata (JSON: module import path,
        hparams, opt_hparams, optimizer, loss, metrics, history, versions) to the folder ``path`` (or one
        ``.safetensors`` file); reload with ``ln.load(path)``. Tuples, NaN/Inf, tensors, dtypes and module
        classes round-trip exactly; a value that cannot be stored (a function as an hparam) is named in a
        warning and ``ln.load`` asks for it. The save is atomic as a whole: a kill at any moment leaves the
        previous model or the new one. Nothing is pickled.

        Args:
            path: a folder (created if needed), or a file name ending in ``.safetensors``.
            optimizer: also keep the optimizers', schedulers' and grad scaler's states
                (:meth:`training_state`), so that ``ln.load(path).fit(...)`` continues training.

        Returns:
            The path written.

        Under torchrun with ``strategy="fsdp"`` call it on every rank: the full model is gathered from the shards
        and rank 0 writes it; the folder loads in a plain process.

        >>> import tempfile, lanterna as ln, torch
        >>> from torch import nn
        >>> fitted = ln.Fitted(nn.Linear(3, 1), None, [])
        >>> path = fitted.save(tempfile.mkdtemp() + "/model")
        >>> torch.equal(ln.load(path, module=nn.Linear(3, 1)).model.weight, fitted.model.weight)
        True
        """
        from .io.fitted import save_fitted  # below this module (lanterna.io imports nothing above it)

        world = self.distributed
        if world is None or not world.shards_parameters:  # one process, or DDP: every rank holds the whole model
            return save_fitted(self, path, training_state=self.training_state() if optimizer else None)
        if optimizer:
            raise LanternaError(
                "fitted.save(path, optimizer=True) under FSDP: the optimizer state is sharded across the ranks and "
                "is not gathered into one file. Save the model alone (fitted.save(path)), and keep the training "
                "state with ln.callbacks.AutoResume or ModelCheckpoint, whose sharded checkpoints resume it.")
        weights = world.full_state_dict(self.model)  # a collective: every rank calls save
        error: BaseException | None = None
        out = Path(path)
        if world.is_main:
            try:
                out = save_fitted(self, path, weights=weights)
            except Exception as e:
                error = e
        if world.any(error is not None):
            if error is not None:
                raise error
            raise LanternaError(f"fitted.save({str(path)!r}) failed on rank 0 (see its error); nothing was written.")
        return out

    def export(self, path: str | os.PathLike[str], example_input: Any, format: str = "onnx",
               **options: Any) -> Path:
        """Export the model for inference: ``format="onnx"`` (checked with onnxruntime when installed),
        ``"torchscript"`` or ``"exported_program"`` (``torch.export``). The file is reloaded with the standard
        loader and its outputs compared with the model's on ``example_input``. Returns the path.

        >>> import tempfile, torch, lanterna as ln
        >>> from torch import nn
        >>> model = nn.Linear(3, 1)
        >>> p = ln.Fitted(model, None, []).export(tempfile.mkdtemp() + "/m.pt2", torch.randn(2, 3),
        ...                                       format="exported_program")
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(torch.export.load(p).module()(x), model(x))
        True
        """
        from .integrations.export import export

        return export(self.model, path, example_input, format=format, **options)

    def summary(self, example_input: Any = None, *, depth: int | None = None) -> ModelSummary:
        """The model's layer table: name, type, output shape, parameters, trainable, with totals
        (:func:`lanterna.summary`).

        Args:
            example_input: one batch input for the output shapes. ``None``: the last batch input the fit saw
                (kept by the fit at no cost); a loaded model has none, so its table has no shapes.
            depth: show modules down to this nesting depth only (1: the direct children); ``None``: all.

        Returns:
            a ``ModelSummary``: printing it shows the table; ``.rows`` and ``.total_params`` hold the numbers.

        >>> import lanterna as ln, torch
        >>> from torch import nn
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        ...     (x, y), epochs=1, verbose=False, dataloader_options={"batch_size": 16})
        >>> s = fitted.summary()
        >>> s.total_params, s.output_shape
        (4, torch.Size([16, 1]))
        """
        from .summary import _summarize

        input_from = None
        if example_input is None and self.context is not None and self.context.input is not None:
            example_input, input_from = self.context.input, "the last batch the fit saw"
        return _summarize(self.model, example_input, depth=depth, input_from=input_from)

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        epochs = len(self.history)
        lines = ["A lanterna `Fitted`", "── Time " + "─" * 30, f"• Total time: {_fmt_time(self.total_time)}"]
        if epochs:
            per_epoch = _fmt_time(self.total_time / epochs)
            lines.append(f"• Avg time per epoch: {per_epoch} ({epochs} epochs, {self.status})")
            last = self.history[-1]
            lines += ["", "── Results " + "─" * 27, "Metrics observed in the last epoch."]
            for set_name, title in (("train", "Training"), ("valid", "Validation")):
                keys = [k for k in last if k.startswith(set_name + "_")]
                if keys:
                    lines.append(f"ℹ {title}:")
                    lines += [f"{k[len(set_name) + 1:]}: {format_value(last[k])}" for k in keys]
        lines += ["", "── Model " + "─" * 29,
                  f"An nn.Module ({type(self.model).__name__}) containing {n_params:,} parameters"
                  + (f" ({n_train:,} trainable)." if n_train != n_params else ".")]
        return "\n".join(lines)


def _stream_of(source: Any) -> StreamBatches | None:
    """The stream under ``source`` (itself, or inside the wrappers of a distributed phase), or None."""
    while not isinstance(source, StreamBatches) and hasattr(source, "source"):
        source = source.source
    return source if isinstance(source, StreamBatches) else None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_cpu(obj: Any, non_blocking: bool, to_float32: bool = False) -> Any:
    if isinstance(obj, Tensor):
        if to_float32 and obj.dtype in (torch.float16, torch.bfloat16):
            obj = obj.float()
        return obj.detach().to("cpu", non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v, non_blocking, to_float32) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_cpu(v, non_blocking, to_float32) for v in obj)
    return obj


def _map_tensors(fn: Any, obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    return tuple(_map_tensors(fn, v) for v in obj)


def _concat(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(outs) if first.dim() > 0 else torch.stack(outs)
    if isinstance(first, Mapping):
        return {k: _concat([o[k] for o in outs]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(_concat([o[i] for o in outs]) for i in range(len(first)))
    return outs


def _fmt_time(seconds: float) -> str:
    if seconds >= 60:
        return f"{int(seconds // 60)}m {seconds % 60:.0f}s"
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds * 1000:.0f}ms"
