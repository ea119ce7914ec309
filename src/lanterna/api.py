"""The composition root: ``ln.setup(...) → Setup → .fit(...) → Fitted`` (README.md, "Quick start").

(Over 350 lines: ``Setup.fit`` assembles every part of a fit — sources, model, optimizers, context, callbacks,
the continued fit's restore — and its long docstrings are the public reference; the parts themselves live in
``core/``, ``data/`` and ``callbacks/``.)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .callbacks.lr_scheduler import LRRecorder
from .callbacks.metrics import MetricsCallback
from .callbacks.nan import TerminateOnNaN
from .callbacks.progress import ProgressPrinter, make_printer
from .core.accelerator import Accelerator
from .core.callback import Callback, Hooks
from .core.checks import check_first_batch
from .core.context import Context
from .core.loop import fit_loop
from .core.losses import build_loss
from .core.step import Stepper
from .core.world import Local
from .data import BatchSource, make_source, split_valid
from .errors import DataError, LanternaError, NonFiniteLossError, UnexpectedArgumentError
from .metrics.base import LanternaMetric, MetricSet, split_metric_spec
from .results import Fitted

__all__ = ["setup", "Setup", "seed_everything", "LossFunction", "LossSpec", "OptimizerSpec", "MetricSpec"]

#: A loss: ``loss(pred, target) -> scalar tensor`` (an ``nn.Module`` such as ``nn.MSELoss()``, or a function).
LossFunction = Callable[[Any, Any], torch.Tensor]
#: ``loss=``: one loss, one per output of a multi-output model (a list), or one per output key (a dict).
LossSpec = LossFunction | Sequence[LossFunction] | Mapping[str, LossFunction]
#: ``optimizer=``: an optimizer class (``torch.optim.AdamW``) or a factory ``(params, **opt_hparams) -> Optimizer``.
OptimizerSpec = type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]
#: ``metrics=``: an ``ln.metrics`` object or ``torchmetrics.Metric`` / ``MetricCollection`` (an ``nn.Module``), a
#: list of them, or an ``ln.metrics.MetricSet`` (different metrics for training and validation).
MetricSpec = LanternaMetric | nn.Module | Sequence[LanternaMetric | nn.Module] | MetricSet


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators.

    Args:
        seed: the seed (NumPy gets it modulo 2**32).

    >>> import random, torch
    >>> import lanterna as ln
    >>> ln.seed_everything(3); first = (random.random(), torch.rand(2))
    >>> ln.seed_everything(3); second = (random.random(), torch.rand(2))
    >>> first[0] == second[0], torch.equal(first[1], second[1])
    (True, True)
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclasses.dataclass(frozen=True)
class Setup:
    """A declared training setup: module, loss, optimizer, metrics and hyperparameters. Immutable; every
    ``set_*`` returns a new Setup, so one Setup can be fitted many times.

    Made by :func:`setup`; the fields are its arguments plus the hyperparameters.

    Args:
        module: the model: an ``nn.Module`` class, a factory called with the hparams, or a built instance.
        loss: the loss function (or one per output of a multi-output model: a list or a dict).
        optimizer: an optimizer class or a factory ``(params, **opt_hparams) -> Optimizer``; default Adam.
        metrics: metrics computed every epoch (a list, or a :class:`~lanterna.metrics.MetricSet`).
        loss_weights: the weights of the losses of a multi-output model.
        hparams: keyword arguments the module is built with (``set_hparams``).
        opt_hparams: keyword arguments the optimizer is built with (``set_opt_hparams``).

    >>> import lanterna as ln
    >>> from torch import nn
    >>> s = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1)
    >>> s.hparams
    {'in_features': 3, 'out_features': 1}
    """

    module: type[nn.Module] | Callable[..., nn.Module] | nn.Module
    loss: LossSpec | None = None
    optimizer: OptimizerSpec | None = None
    metrics: MetricSpec | None = None
    loss_weights: Sequence[float] | Mapping[str, float] | None = None
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    opt_hparams: dict[str, Any] = dataclasses.field(default_factory=dict)

    def set_hparams(self, **hparams: Any) -> Setup:
        """Arguments the module (class or factory) is built with at fit time."""
        return dataclasses.replace(self, hparams={**self.hparams, **hparams})

    def set_opt_hparams(self, **opt_hparams: Any) -> Setup:
        """Arguments the optimizer is built with (``lr=0.01``, ``weight_decay=...``)."""
        return dataclasses.replace(self, opt_hparams={**self.opt_hparams, **opt_hparams})

    # ------------------------------------------------------------------ building blocks
    def build_model(self) -> nn.Module:
        """Instantiate the module with the hparams (or return the given instance)."""
        m = self.module
        if isinstance(m, nn.Module):
            if self.hparams:
                raise LanternaError(
                    f"set_hparams({', '.join(self.hparams)}) needs a module class or factory, but setup() got an "
                    f"instance of {type(m).__name__}. Pass the class (ln.setup({type(m).__name__}, ...))."
                )
            return m
        if not callable(m):
            raise LanternaError(
                f"setup() needs an nn.Module subclass, a factory returning a module, or a module instance; "
                f"got {type(m).__name__}."
            )
        name = getattr(m, "__name__", type(m).__name__)
        try:
            inspect.signature(m).bind(**self.hparams)
        except TypeError as e:
            raise LanternaError(
                f"{name} cannot be built with hparams {self.hparams}: {e}. Set its arguments with .set_hparams(...)."
            ) from None
        except ValueError:
            pass
        model = m(**self.hparams)
        if not isinstance(model, nn.Module):
            raise LanternaError(f"The factory {name} returned {type(model).__name__}, not an nn.Module.")
        return model

    def build_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """The optimizers, created after the model is on its device: the module's ``set_optimizers`` or
        ``optimizer(model.parameters(), **opt_hparams)`` (default Adam; on CUDA, Adam/AdamW/SGD get
        ``fused=True`` unless ``fused`` or ``foreach`` is set, see ``lanterna.core.fused``)."""
        from .core.fused import fused_opt_hparams

        if callable(getattr(model, "set_optimizers", None)):
            made = model.set_optimizers(**self.opt_hparams)  # type: ignore[operator]
            opts = dict(made) if isinstance(made, Mapping) else {"opt": made}
        else:
            factory = self.optimizer or torch.optim.Adam
            if isinstance(factory, torch.optim.Optimizer):
                raise LanternaError(
                    f"optimizer= got an instance of {type(factory).__name__}; pass the class "
                    f"(optimizer=torch.optim.{type(factory).__name__}) and its options with .set_opt_hparams(...). "
                    "lanterna creates it after the model is on its device."
                )
            # a factory with param_groups(model) (ln.with_param_groups) chooses the groups itself
            groups = getattr(factory, "param_groups", None)
            params = groups(model) if callable(groups) else model.parameters()
            try:
                opts = {"opt": factory(params, **fused_opt_hparams(factory, self.opt_hparams, model))}
            except (TypeError, ValueError) as e:  # an unknown argument; torch's range checks (lr < 0, betas)
                name = getattr(factory, "__name__", type(factory).__name__)
                raise LanternaError(f"Could not create the optimizer with {self.opt_hparams} ({name}): {e}. Fix "
                                    "the values given to .set_opt_hparams(...).") from e
        for name, opt in opts.items():
            if not isinstance(opt, torch.optim.Optimizer):
                raise LanternaError(f"Optimizer {name!r} is a {type(opt).__name__}, not a torch.optim.Optimizer.")
        _check_param_coverage(model, opts)
        return opts

    # ------------------------------------------------------------------ fit
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
        """Train and return a :class:`Fitted`.

        Args:
            data: training data in any form of docs/models.md, "Data forms".
            epochs: an int, or ``(min_epochs, max_epochs)``: early stopping never stops before min_epochs.
            valid_data: validation data, or a fraction in (0, 1) of ``data`` held out (seeded, stratified).
            callbacks: ``ln.Callback`` objects; a built-in one given here replaces the default of its type.
            verbose: None (auto: luz-style lines, a live bar on terminals), True, or False (silent).
            accelerator: an ``ln.Accelerator`` (device, precision, compile).
            dataloader_options: options where lanterna builds the loader (batch_size=32, shuffle, ...).
            seed: seeds model init, shuffling and the validation split.
            sample_weight: one non-negative weight per sample of ``data`` (a 1-D tensor/array; in-memory data or a
                map-style Dataset): the loss is ``Σ w·l / Σ w`` per batch and over the epoch, the ln metrics are
                weighted too; a ``valid_data`` fraction keeps its samples' weights (docs/models.md).
            **unexpected: none is taken: another library's keyword (``batch_size=64``, ``epoch=``,
                ``validation_data=``, ``lr=``) raises :class:`~lanterna.errors.UnexpectedArgumentError` naming the
                lanterna way (``dataloader_options={"batch_size": 64}``, ``epochs=``, ``valid_data=``,
                ``.set_opt_hparams(lr=...)``); mypy flags it too.

        >>> import lanterna as ln, torch
        >>> from torch import nn
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> fitted = ln.setup(nn.Linear, loss=nn.MSELoss()).set_hparams(in_features=3, out_features=1).fit(
        ...     (x, y), epochs=2, verbose=False)
        >>> len(fitted.history)
        2
        """
        if unexpected:  # batch_size=, epoch=, lr= ...: typed NoReturn so that mypy flags them too
            raise UnexpectedArgumentError("fit", unexpected, self.fit)
        return self._fit(data, epochs=epochs, valid_data=valid_data, callbacks=callbacks, verbose=verbose,
                         accelerator=accelerator, dataloader_options=dataloader_options, seed=seed,
                         sample_weight=sample_weight)

    def _fit(self, data: Any, *, epochs: Any, valid_data: Any, callbacks: Any, verbose: bool | None,
             accelerator: Accelerator | None, dataloader_options: Mapping[str, Any] | None, seed: int | None,
             sample_weight: Any = None, previous: Fitted | None = None) -> Fitted:
        """:meth:`fit`, or with ``previous`` (``Fitted.fit``) more epochs of its model, optimizers, schedulers
        and grad scaler, numbered on from its last epoch."""
        min_epochs, max_epochs = _epochs(epochs)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise LanternaError(f"seed={seed!r}: give an integer seed, e.g. seed=42.")
        if accelerator is not None and not isinstance(accelerator, Accelerator):
            raise LanternaError(f"fit(accelerator={accelerator!r}): give an ln.Accelerator, e.g. "
                                "accelerator=ln.Accelerator(device='cpu', precision='bf16-mixed').")
        acc = accelerator or (previous.accelerator if previous is not None else Accelerator())
        if seed is not None:
            seed_everything(seed)
        ddp = _distributed(acc, seed)
        split_seed = _split_seed(valid_data, seed if ddp is None else ddp.seed, previous)
        train_src, valid_src = _sources(data, valid_data, dataloader_options, split_seed, sample_weight)
        model = self.build_model() if previous is None else previous.model
        forward_model = eval_forward_model = acc.prepare_model(model)
        if ddp is not None:
            train_src = ddp.shard(train_src, train=True)
            valid_src = ddp.shard(valid_src, train=False) if valid_src is not None else None
            forward_model = ddp.wrap(forward_model, model)
            train_src = ddp.balance(train_src, training=True)  # every rank runs as many batches (even_batches.py)
            valid_src = ddp.balance(valid_src, training=False) if valid_src is not None else None
            acc = ddp.adapt(acc)
        train_src.to_device(acc.device)
        if valid_src is not None:
            valid_src.to_device(acc.device)
        state = previous.training_state() if previous is not None else {}
        optimizers = previous.optimizers if previous is not None and previous.optimizers else None
        if optimizers is None:
            optimizers = self.build_optimizers(model)
            _load_optimizer_states(optimizers, state.get("optimizers"))
        has_step = callable(getattr(model, "step", None))
        loss_fn = build_loss(self.loss, self.loss_weights, model, has_step)
        train_metrics, valid_metrics = split_metric_spec(self.metrics)

        ctx = Context(
            model=model, forward_model=forward_model, eval_forward_model=eval_forward_model, optimizers=optimizers,
            loss_fn=loss_fn, accelerator=acc, device=acc.device, scaler=acc.make_scaler(), setup=self,
            custom_step=has_step, train_data=train_src, valid_data=valid_src, min_epochs=min_epochs,
            max_epochs=max_epochs, verbose=verbose is not False, world=ddp if ddp is not None else Local(),
        )
        defaults: list[Callback] = [TerminateOnNaN(), MetricsCallback(train_metrics, valid_metrics),
                                    LRRecorder()]
        printer = make_printer(verbose) if ctx.is_main else None
        if printer is not None:
            defaults.append(printer)
        merged = _merge_callbacks(defaults, [] if callbacks is None else callbacks)
        if previous is not None:
            merged.append(_go_on(ctx, previous, state))
        ctx.hooks = Hooks(merged)
        ctx.stepper = Stepper(ctx)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)

        if valid_src is not None and not has_step:
            check_first_batch(ctx, valid_src)  # a wrong validation batch fails now, not after an epoch

        t0 = time.perf_counter()

        def fitted() -> Fitted:
            return Fitted(
                model=model, setup=self, history=ctx.history, optimizers=optimizers, accelerator=acc,
                forward_model=eval_forward_model, loss_fn=loss_fn, metrics=valid_metrics or train_metrics,
                total_time=time.perf_counter() - t0, status=ctx.status, context=ctx, distributed=ddp,
                split_seed=split_seed,
            )

        try:
            with acc.run_context():  # Accelerator(deterministic=True): set for the fit, restored after
                fit_loop(ctx)
        except NonFiniteLossError as e:
            e.fitted = fitted()  # the model at the last good step: the run is not lost
            raise
        finally:
            for src in (train_src, valid_src):
                if src is not None:
                    src.close()
        return fitted()


def setup(
    module: type[nn.Module] | Callable[..., nn.Module] | nn.Module,
    *,
    loss: LossSpec | None = None,
    optimizer: OptimizerSpec | None = None,
    metrics: MetricSpec | None = None,
    loss_weights: Sequence[float] | Mapping[str, float] | None = None,
) -> Setup:
    """Declare what to train and how (README.md, "Quick start").

    Args:
        module: the model: an ``nn.Module`` class (built with the hparams of ``set_hparams``), a factory
            called with them, or a built instance.
        loss: the loss function; for a multi-output model, one per output (a list) or per output key (a dict).
        optimizer: an optimizer class or a factory ``(params, **opt_hparams) -> Optimizer``; default Adam.
        metrics: metrics computed every epoch: ``ln.metrics`` objects or torchmetrics metrics, a list of them,
            or a :class:`~lanterna.metrics.MetricSet`.
        loss_weights: the weights of the losses of a multi-output model (a list, or a dict by output key).

    Returns:
        An immutable :class:`Setup`; ``set_hparams``, ``set_opt_hparams`` and ``fit`` come next.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> s = ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=torch.optim.Adam, metrics=[ln.metrics.MAE()])
    >>> fitted = s.set_hparams(in_features=3, out_features=1).fit((torch.randn(64, 3), torch.randn(64, 1)),
    ...                                                           epochs=2, verbose=False)
    >>> [sorted(h) for h in fitted.history][-1]
    ['epoch', 'epoch_time', 'lr', 'train_loss', 'train_mae']
    """
    return Setup(module=module, loss=loss, optimizer=optimizer, metrics=metrics, loss_weights=loss_weights)


# ---------------------------------------------------------------------------- helpers


def _epochs(epochs: Any) -> tuple[int, int]:
    """``(min_epochs, max_epochs)`` from fit's ``epochs``: whole numbers only (2.5, True, "3" are refused)."""
    pair = isinstance(epochs, (tuple, list))
    values = tuple(epochs) if pair else (0, epochs)
    if len(values) != 2 or any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) for e in values):
        raise LanternaError(
            f"epochs={epochs!r}: give an integer number of epochs, or a pair of integers (min_epochs, max_epochs), "
            "e.g. epochs=20 or epochs=(5, 50)."
        )
    lo, hi = (int(e) for e in values)
    if hi < 1 or lo < 0 or lo > hi:
        raise LanternaError(f"epochs={epochs!r}: need 1 <= max_epochs and 0 <= min_epochs <= max_epochs.")
    return lo, hi


def _distributed(acc: Accelerator, seed: int | None) -> Any:
    """The DDP environment under torchrun (WORLD_SIZE > 1), else None; imported only when needed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if acc.strategy == "fsdp":
        from .integrations.fsdp import from_env
    else:
        from .integrations.distributed import from_env  # type: ignore[assignment]

    ddp = from_env(acc, seed)
    if ddp is not None:
        acc.device = ddp.device
    return ddp


def _sources(
    data: Any, valid_data: Any, options: Mapping[str, Any] | None, seed: int | None, sample_weight: Any = None
) -> tuple[BatchSource, BatchSource | None]:
    """The training and validation sources. ``seed`` draws a ``valid_data`` fraction's split: under torchrun it
    is the seed every rank agreed on, so all ranks hold out the same samples."""
    if data is None:
        raise DataError("fit() needs training data: a DataLoader, a Dataset or (x, y) tensors/arrays.")
    if isinstance(valid_data, (float, int, np.floating, np.integer)) and not isinstance(valid_data, bool):
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))  # see _split_seed
        return split_valid(data, float(valid_data), generator=gen, options=options, sample_weight=sample_weight)
    train_src = make_source(data, train=True, options=options, what="training data", sample_weight=sample_weight)
    if valid_data is None:
        return train_src, None
    valid_opts = {**options, "shuffle": False, "drop_last": False} if options else None
    if isinstance(valid_data, DataLoader) and valid_opts is not None:
        from .data.adapters import _user_stacklevel

        warnings.warn(  # the training data is not a DataLoader here: make_source refused that
            f"dataloader_options {sorted(options)} apply to the training data only: "  # type: ignore[arg-type]
            "valid_data is a DataLoader, which keeps its own settings. Set them on that DataLoader, or pass its "
            "Dataset as valid_data.",
            stacklevel=_user_stacklevel(),
        )
        valid_opts = None
    return train_src, make_source(valid_data, train=False, options=valid_opts, what="validation data")


def _is_fraction(valid_data: Any) -> bool:
    return isinstance(valid_data, (float, int, np.floating, np.integer)) and not isinstance(valid_data, bool)


def _split_seed(valid_data: Any, seed: int | None, previous: Fitted | None) -> int | None:
    """The seed of a ``valid_data`` fraction's split: ``seed``; else the one the fit being continued drew (the
    same samples stay held out); else one drawn now from the global generator."""
    if not _is_fraction(valid_data):
        return seed
    if seed is None and previous is not None:
        seed = previous.split_seed
    return seed if seed is not None else int(torch.randint(2**62, ()).item())


def _load_optimizer_states(optimizers: Mapping[str, torch.optim.Optimizer], states: Any) -> None:
    """Put saved optimizer states (``fitted.save(path, optimizer=True)``) into freshly built optimizers."""
    if not states:
        return
    if set(states) != set(optimizers):
        raise LanternaError(f"The saved optimizer states are for {sorted(states)}, but this setup builds "
                            f"{sorted(optimizers)}; continue with the setup the model was saved with.")
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(states[name])
        except (ValueError, KeyError, TypeError) as e:
            raise LanternaError(f"The saved state of optimizer {name!r} does not fit {type(opt).__name__} over "
                                f"this model's parameters ({e}); continue with the setup it was saved with.") from e


class _GoOn(Callback):
    """Continues a fit (``Fitted.fit``): after every callback's ``on_fit_begin`` (so a new LRScheduler has made
    its scheduler), puts back the schedulers' and the grad scaler's states of the fit that is continued."""

    runs_last = True
    order = 999  # before EarlyStopping, ModelCheckpoint and AutoResume

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state

    def on_fit_begin(self, ctx: Context) -> None:
        saved = self.state.get("schedulers") or []
        if saved and len(saved) != len(ctx.schedulers):
            warnings.warn(f"fitted.fit: the fit being continued had {len(saved)} scheduler(s) and this one has "
                          f"{len(ctx.schedulers)}; their states are not carried over (pass the same "
                          "LRScheduler callbacks to continue them).", stacklevel=2)
        else:
            for scheduler, (cls_name, sched_state) in zip(ctx.schedulers, saved):
                if type(scheduler).__name__ != cls_name:
                    raise LanternaError(f"fitted.fit: the fit being continued stepped a {cls_name}, this one a "
                                        f"{type(scheduler).__name__}; pass the same LRScheduler to continue it.")
                scheduler.load_state_dict(sched_state)
        if ctx.scaler is not None and self.state.get("scaler"):
            ctx.scaler.load_state_dict(self.state["scaler"])


def _go_on(ctx: Context, previous: Fitted, state: Mapping[str, Any]) -> Callback:
    """Number the new epochs on from ``previous``'s and carry its history and step count; the callback that
    restores its schedulers and scaler once the new callbacks are set up."""
    start = int(previous.history[-1]["epoch"]) if previous.history else 0
    ctx.start_epoch = start
    ctx.min_epochs, ctx.max_epochs = ctx.min_epochs + start, ctx.max_epochs + start
    ctx.history = list(previous.history)
    ctx.step = int(state.get("step") or 0)
    return _GoOn(state)


def _merge_callbacks(defaults: list[Callback], user: Any) -> list[Callback]:
    if isinstance(user, Callback) or not isinstance(user, (list, tuple)):
        raise LanternaError(f"callbacks= takes a list of ln.Callback instances; got {user!r}. Wrap it in a list: "
                            f"callbacks=[{type(user).__name__}(...)].")
    user = list(user)
    for cb in user:
        if not isinstance(cb, Callback):
            raise LanternaError(
                f"callbacks must be ln.Callback instances; got {cb!r}. Did you pass a class instead of an instance?"
            )
    user_types = {type(cb) for cb in user}
    own_printer = any(isinstance(cb, ProgressPrinter) for cb in user)  # LiveProgress replaces ProgressPrinter too
    return [cb for cb in defaults if type(cb) not in user_types
            and not (own_printer and isinstance(cb, ProgressPrinter))] + user


def _check_param_coverage(model: nn.Module, opts: Mapping[str, torch.optim.Optimizer]) -> None:
    owner: dict[int, str] = {}
    for name, opt in opts.items():
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in owner:
                    pname = next((n for n, q in model.named_parameters() if q is p), "<unnamed>")
                    raise LanternaError(
                        f"Parameter {pname} is in optimizers {owner[id(p)]!r} and {name!r}; each parameter may be "
                        "in only one optimizer. Split the parameters in set_optimizers."
                    )
                owner[id(p)] = name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter(s) are in no optimizer and will not be trained: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Add them in set_optimizers, or set "
            "requires_grad=False to freeze them on purpose.",
            stacklevel=3,
        )
