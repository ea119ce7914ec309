"""Parameter groups and initialisation: weight decay on weights but not on biases and norm layers,
per-module optimizer options, and an init function applied when the module is built.

>>> import lanterna as ln
>>> import torch
>>> from torch import nn
>>> x, y = torch.randn(32, 3), torch.randn(32, 1)
>>> fitted = (ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=ln.with_param_groups(torch.optim.AdamW))
...           .set_hparams(in_features=3, out_features=1).set_opt_hparams(lr=1e-3, weight_decay=1e-2)
...           .fit((x, y), epochs=1, verbose=False))
>>> [(g["name"], g["weight_decay"]) for g in fitted.optimizers["opt"].param_groups]
[('decay', 0.01), ('no_decay', 0.0)]
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import LanternaError

__all__ = ["NORM_LAYERS", "param_groups", "with_param_groups", "ParamGroupOptimizer", "with_init"]

#: Module types whose parameters (scale and shift) are never decayed.
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm, lazy variants
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    ) if t is not None
)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _no_decay_names(model: nn.Module, exclude: Iterable[str]) -> set[str]:
    """Names of the parameters that get no weight decay: biases, norm-layer parameters, ``exclude`` globs."""
    exclude = tuple(exclude)
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name == "bias" or _matches(full, exclude):
                out.add(full)
    return out


def _option_key(name: str, options: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The ``options`` key that applies to parameter ``name``: the longest module prefix or a matching glob."""
    best: str | None = None
    for key in options:
        hit = name == key or name.startswith(key + ".") or fnmatch.fnmatchcase(name, key)
        if hit and (best is None or len(key) > len(best)):
            best = key
    return best


def param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    *,
    exclude: Iterable[str] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into optimizer parameter groups.

    Weights get ``weight_decay`` (or, when it is None, the optimizer's own ``weight_decay`` from
    ``set_opt_hparams``); biases, the parameters of normalisation layers (:data:`NORM_LAYERS`) and the names
    matching an ``exclude`` glob get ``weight_decay=0``. ``options`` maps a submodule name (``"head"``,
    ``"encoder.layer1"``) or a glob over parameter names to per-group options such as ``{"lr": 1e-4}``; the
    longest matching key wins. Frozen parameters (``requires_grad=False``) are left out. Each group carries a
    ``"name"`` such as ``"decay"``, ``"no_decay"`` or ``"head.decay"``.

    This is the hand-built ``[{'params': net[0].weight, 'weight_decay': wd}, {'params': net[0].bias}]``
    for any model; use it in ``set_optimizers`` or with a plain optimizer.

    Args:
        model: the model whose trainable parameters are grouped.
        weight_decay: the weight decay of the weights; None: the optimizer's own.
        exclude: globs over parameter names that get no weight decay either.
        options: per-group options by submodule name or parameter-name glob (``{"head": {"lr": 1e-4}}``).

    Returns:
        The parameter groups: dicts with ``"params"``, ``"name"`` and, where set, ``"weight_decay"`` and the
        options.

    Raises:
        LanternaError: when ``model`` is not an ``nn.Module``, has no trainable parameters, or an ``options``
            entry is not a dict or sets ``params``.

    >>> import torch
    >>> from torch import nn
    >>> from lanterna import param_groups
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    >>> groups = param_groups(net, weight_decay=1e-2)
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups]
    [('decay', 2, 0.01), ('no_decay', 4, 0.0)]
    >>> opt = torch.optim.SGD(groups, lr=0.1)
    >>> [g["weight_decay"] for g in opt.param_groups]
    [0.01, 0.0]
    """
    if not isinstance(model, nn.Module):
        raise LanternaError(f"param_groups() needs an nn.Module, got {type(model).__name__}.")
    options = dict(options or {})
    for key, opts in options.items():
        if not isinstance(opts, Mapping):
            raise LanternaError(f"param_groups(options=...): the options of {key!r} must be a dict, e.g. "
                                f"{{{key!r}: {{'lr': 1e-4}}}}; got {type(opts).__name__}.")
        if "params" in opts:
            raise LanternaError(f"param_groups(options=...): {key!r} may not set 'params'; it selects them.")
    no_decay = _no_decay_names(model, exclude)
    groups: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    used_keys: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = _option_key(name, options)  # type: ignore[assignment]
        if key is not None:
            used_keys.add(key)
        groups.setdefault((key, name not in no_decay), []).append(p)
    unused = [k for k in options if k not in used_keys]
    if unused:
        names = [n for n, p in model.named_parameters() if p.requires_grad][:8]
        raise LanternaError(
            f"param_groups(options=...): {unused} match no trainable parameter. Keys are submodule names or "
            f"globs over parameter names such as {names}."
        )
    out: list[dict[str, Any]] = []
    for key in [None, *options]:  # type: ignore[assignment]
        for decay in (True, False):
            params = groups.get((key, decay))
            if not params:
                continue
            group: dict[str, Any] = {"params": params, **(options[key] if key is not None else {})}
            if not decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group.setdefault("weight_decay", float(weight_decay))
            suffix = "decay" if decay else "no_decay"
            group["name"] = f"{key}.{suffix}" if key is not None else suffix
            out.append(group)
    if not out:
        raise LanternaError(f"{type(model).__name__} has no trainable parameters to put in an optimizer.")
    return out


class ParamGroupOptimizer:
    """An optimizer factory for ``ln.setup(optimizer=...)`` that builds the optimizer over
    :func:`param_groups` of the model (see :func:`with_param_groups`)."""

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        weight_decay: float | None = None,
        *,
        exclude: Iterable[str] = (),
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer):
            raise LanternaError(
                f"with_param_groups() needs an optimizer class such as torch.optim.AdamW, got {optimizer!r}."
            )
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.exclude = tuple(exclude)
        self.options = dict(options or {})
        self.__name__ = getattr(optimizer, "__name__", type(optimizer).__name__)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """What the optimizer is built over (lanterna calls this with the model on its device)."""
        return param_groups(model, self.weight_decay, exclude=self.exclude, options=self.options)

    def __call__(self, params: Any, **opt_hparams: Any) -> torch.optim.Optimizer:
        params = list(params)
        if params and not isinstance(params[0], Mapping):
            if self.options or self.exclude:
                raise LanternaError(
                    "with_param_groups(options=/exclude=) needs the model; call it as "
                    "opt.param_groups(model) and pass the result, or let ln.setup build the optimizer."
                )
            # Bare tensors without names: weights are the tensors of 2+ dimensions; biases and the
            # scale/shift of norm layers are 1-D.
            decay = [p for p in params if p.dim() >= 2]
            rest = [p for p in params if p.dim() < 2]
            params = [g for g in (
                {"params": decay, "name": "decay", **({} if self.weight_decay is None
                                                       else {"weight_decay": float(self.weight_decay)})},
                {"params": rest, "name": "no_decay", "weight_decay": 0.0},
            ) if g["params"]]
        return self.optimizer(params, **opt_hparams)

    def __repr__(self) -> str:
        return f"with_param_groups({self.__name__}, weight_decay={self.weight_decay!r})"


def with_param_groups(
    optimizer: Callable[..., torch.optim.Optimizer],
    weight_decay: float | None = None,
    *,
    exclude: Iterable[str] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ParamGroupOptimizer:
    """The one-line way to decay weights but not biases and norm layers: wrap the optimizer class.

    The weight decay is ``weight_decay``, or the ``weight_decay`` of ``set_opt_hparams``; biases and
    norm-layer parameters always get 0. ``options`` gives per-module options (``{"head": {"lr": 1e-2}}``),
    as in :func:`param_groups`.

    Args:
        optimizer: the optimizer class (or factory) to wrap, such as ``torch.optim.AdamW``.
        weight_decay: the weight decay of the weights; None: the ``weight_decay`` of ``set_opt_hparams``.
        exclude: globs over parameter names that get no weight decay either.
        options: per-group options by submodule name or parameter-name glob, as in :func:`param_groups`.

    Returns:
        A factory ``(params, **opt_hparams) -> Optimizer`` to pass as ``optimizer=``.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> setup = (ln.setup(nn.Linear, loss=nn.MSELoss(), optimizer=ln.with_param_groups(torch.optim.AdamW))
    ...          .set_hparams(in_features=3, out_features=1).set_opt_hparams(lr=1e-3, weight_decay=1e-2))
    >>> opt = ln.with_param_groups(torch.optim.AdamW, weight_decay=1e-2)(nn.Linear(3, 1).parameters(), lr=1e-3)
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in opt.param_groups]  # weight, bias
    [('decay', 1, 0.01), ('no_decay', 1, 0.0)]
    """
    return ParamGroupOptimizer(optimizer, weight_decay, exclude=exclude, options=options)


def with_init(module: type[nn.Module] | Callable[..., nn.Module], init: Callable[[nn.Module], Any]) -> Any:
    """The module, built as usual with the hparams and then passed through ``model.apply(init)`` — a
    hand-written loop's ``net.apply(init_weights)`` as part of the setup. With ``fit(seed=...)`` the init is seeded too.

    For an ``nn.Module`` class the result is a subclass that keeps the class's name, import path and
    signature: hparams are checked against it, ``isinstance(model, Net)`` holds, and a saved model reloads
    with ``ln.load(path)`` as the class itself. For a factory function the result is a factory.
    The alternative is to call ``self.apply(init_weights)`` at the end of the module's ``__init__``.

    Args:
        module: an ``nn.Module`` class or a factory function returning a module.
        init: a function applied to every submodule, as ``model.apply(init)``.

    Returns:
        A subclass of ``module`` (for a class) or a factory (for a function) whose models are initialised.

    Raises:
        LanternaError: when ``module`` is a built instance or not callable, ``init`` is not callable, or the
            factory returns something other than an ``nn.Module``.

    >>> import lanterna as ln, torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self, d_in):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(d_in, 300), nn.ReLU(), nn.Linear(300, 1))
    ...     def forward(self, x):
    ...         return self.net(x)
    >>> def init_weights(m):
    ...     if type(m) == nn.Linear:
    ...         nn.init.normal_(m.weight, std=0.01)
    >>> setup = ln.setup(ln.with_init(Net, init_weights), loss=nn.MSELoss()).set_hparams(d_in=300)
    >>> fitted = setup.fit((torch.randn(8, 300), torch.randn(8, 1)), epochs=1, verbose=False)
    >>> isinstance(fitted.model, Net), round(float(fitted.model.net[0].weight.detach().std()), 2)  # default: 0.03
    (True, 0.01)
    """
    if isinstance(module, nn.Module):
        raise LanternaError(
            f"with_init() takes the module class (or a factory), not an instance of {type(module).__name__}; "
            f"for an instance call instance.apply({getattr(init, '__name__', 'init')}) yourself."
        )
    if not callable(module) or not callable(init):
        raise LanternaError("with_init(module, init): module must be an nn.Module class and init a function.")
    if isinstance(module, type) and issubclass(module, nn.Module):
        def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            module.__init__(self, *args, **kwargs)
            subclass, self.__class__ = self.__class__, module  # init sees the class itself: type(m) == nn.Linear
            try:
                self.apply(init)
            finally:
                self.__class__ = subclass

        return type(module)(module.__name__, (module,), {  # type: ignore[misc]
            "__init__": __init__, "__module__": module.__module__, "__qualname__": module.__qualname__,
            "__doc__": module.__doc__, "__signature__": inspect.signature(module), "lanterna_init": init,
        })

    def build(*args: Any, **hparams: Any) -> nn.Module:
        model = module(*args, **hparams)
        if not isinstance(model, nn.Module):
            raise LanternaError(f"{getattr(module, '__name__', module)!r} returned {type(model).__name__}, "
                                "not an nn.Module.")
        model.apply(init)
        return model

    functools.update_wrapper(build, module, updated=())
    build.lanterna_init = init  # type: ignore[attr-defined]
    return build
