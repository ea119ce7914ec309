"""A model's layer table: names, types, output shapes, parameter counts, totals (``ln.summary``, ``fitted.summary``).

Output shapes come from forward hooks on one forward pass of an example input (eval mode, no gradients; each
module's train/eval mode is restored after). The table is what Keras's ``model.summary()`` and Lightning's
``ModelSummary`` show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .data.structure import call_model, move_to
from .errors import ModelCallError

__all__ = ["summary", "ModelSummary", "LayerRow"]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One module of the table.

    Attributes:
        name: the module's dotted name in the model (``"encoder.0"``).
        type: its class name.
        output_shape: a ``torch.Size`` for a tensor output, a tuple / dict of them for a structured output,
            ``None`` when the module did not run (or no example input was given). The first call's output.
        params: parameters of the module and its submodules (a shared parameter counted once).
        trainable_params: those of ``params`` with ``requires_grad``.
    """

    name: str
    type: str
    output_shape: Any
    params: int
    trainable_params: int

    @property
    def trainable(self) -> str:
        """``"yes"``, ``"no"``, ``"partial"`` or ``"-"`` (no parameters)."""
        if not self.params:
            return "-"
        if self.trainable_params == self.params:
            return "yes"
        return "no" if not self.trainable_params else "partial"


class ModelSummary:
    """The table returned by :func:`summary` and ``fitted.summary()``; ``str``/``repr`` is the table.

    Attributes:
        model_type: the model's class name.
        rows: one :class:`LayerRow` per submodule, in registration order.
        total_params, trainable_params, non_trainable_params: counts over the model's distinct parameters.
        size_bytes: bytes held by the parameters and buffers (what a saved model's weights take).
        input_shape, output_shape: the example input's and the model's output's shapes (``None`` without input).
        input_from: where the example input came from, when lanterna chose it.
    """

    def __init__(self, model_type: str, rows: list[LayerRow], total_params: int, trainable_params: int,
                 size_bytes: int, input_shape: Any = None, output_shape: Any = None,
                 input_from: str | None = None) -> None:
        self.model_type = model_type
        self.rows = rows
        self.total_params = total_params
        self.trainable_params = trainable_params
        self.size_bytes = size_bytes
        self.input_shape = input_shape
        self.output_shape = output_shape
        self.input_from = input_from

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def size_mb(self) -> float:
        """``size_bytes`` in MB (10**6 bytes)."""
        return self.size_bytes / 1e6

    def __str__(self) -> str:
        shapes = self.input_shape is not None
        header = ["Name", "Type"] + (["Output shape"] if shapes else []) + ["Params", "Trainable"]
        table = [[r.name, r.type] + ([format_shape(r.output_shape)] if shapes else [])
                 + [f"{r.params:,}", r.trainable] for r in self.rows]
        widths = [max(len(c) for c in col) for col in zip(header, *table)]
        right = {len(header) - 2}  # the parameter counts

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "─" * len(line(header))
        out = [f"Model: {self.model_type}"]
        if shapes:
            where = f" ({self.input_from})" if self.input_from else ""
            out.append(f"Input: {format_shape(self.input_shape)}{where} → output: {format_shape(self.output_shape)}")
        out += [rule, line(header), rule, *(line(r) for r in table), rule]
        size = f"{self.size_mb:,.2f}" if self.size_mb >= 0.01 else f"{self.size_mb:.2g}"
        out += [f"Total params: {self.total_params:,}", f"Trainable params: {self.trainable_params:,}",
                f"Non-trainable params: {self.non_trainable_params:,}",
                f"Size (parameters and buffers): {size} MB"]
        if not shapes:
            out.append("Output shapes: pass example_input (one batch input) to see them.")
        return "\n".join(out)

    __repr__ = __str__


def format_shape(shape: Any) -> str:
    """``[8, 16]`` for a tensor's shape, ``([8, 16], [8])`` for a tuple output, ``{'mu': [8, 1]}`` for a dict,
    ``-`` when unknown."""
    if shape is None:
        return "-"
    if isinstance(shape, torch.Size):
        return "[" + ", ".join(map(str, shape)) + "]"
    if isinstance(shape, Mapping):
        return "{" + ", ".join(f"{k!r}: {format_shape(v)}" for k, v in shape.items()) + "}"
    if isinstance(shape, (tuple, list)):
        return "(" + ", ".join(format_shape(v) for v in shape) + ")"
    return type(shape).__name__


def _shape_of(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.shape
    if isinstance(obj, Mapping):
        return {k: _shape_of(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return tuple(_shape_of(v) for v in obj)
    return obj if obj is None else type(obj).__name__


def _count(params: Any) -> tuple[int, int]:
    total = trainable = 0
    for p in params:
        if nn.parameter.is_lazy(p):
            raise ModelCallError("The model has lazy parameters that are not initialized yet (nn.LazyLinear and "
                                 "alike); pass example_input so that a forward pass gives them their shapes.")
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def summary(module: nn.Module, example_input: Any = None, *, depth: int | None = None) -> ModelSummary:
    """A table of ``module``'s layers: name, type, output shape, parameters, trainable; with totals.

    Args:
        module: any ``nn.Module``.
        example_input: one batch input, as fit gives it to the model: a tensor (``module(x)``), a tuple
            (``module(*x)``) or a dict (``module(**x)``); moved to the module's device. The output shapes come
            from one forward pass of it (eval mode, no gradients, modes restored after). ``None``: no shapes.
        depth: show modules down to this nesting depth only (1: the direct children); ``None``: all.

    Returns:
        a :class:`ModelSummary`: printing it shows the table; ``.rows``, ``.total_params``,
        ``.trainable_params``, ``.non_trainable_params`` and ``.size_mb`` hold the numbers.

    Raises:
        ModelCallError: the module cannot run on ``example_input``.

    >>> import torch, lanterna as ln
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> s = ln.summary(net, torch.randn(4, 3))
    >>> s.total_params, s.rows[0].output_shape
    (41, torch.Size([4, 8]))
    >>> print(s)
    Model: Sequential
    Input: [4, 3] → output: [4, 1]
    ─────────────────────────────────────────────
    Name  Type    Output shape  Params  Trainable
    ─────────────────────────────────────────────
    0     Linear  [4, 8]            32  yes
    1     ReLU    [4, 8]             0  -
    2     Linear  [4, 1]             9  yes
    ─────────────────────────────────────────────
    Total params: 41
    Trainable params: 41
    Non-trainable params: 0
    Size (parameters and buffers): 0.00016 MB
    """
    return _summarize(module, example_input, depth=depth)


def _summarize(module: nn.Module, example_input: Any, *, depth: int | None = None,
               input_from: str | None = None) -> ModelSummary:
    if not isinstance(module, nn.Module):
        raise TypeError(f"summary needs an nn.Module, got {type(module).__name__}.")
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth={depth!r}: pass a positive int (1: the direct children) or None (all).")
    modules = [(name, m) for name, m in module.named_modules() if name] or [("(model)", module)]
    shapes: dict[int, Any] = {}
    input_shape = output_shape = None
    if example_input is not None:
        device = next((p.device for p in module.parameters() if not nn.parameter.is_lazy(p)), None)
        if device is not None:
            example_input = move_to(example_input, device)

        def record(m: nn.Module, args: Any, out: Any) -> None:
            shapes.setdefault(id(m), _shape_of(out))  # the first call's output

        modes = [(m, m.training) for m in module.modules()]
        handles = [m.register_forward_hook(record) for _, m in modules if m is not module]
        try:
            module.eval()
            with torch.no_grad():
                output = call_model(module, example_input)
        except Exception as e:
            raise ModelCallError(
                f"{type(module).__name__} cannot run on example_input ({type(e).__name__}: {e}). Pass one batch "
                "input as fit gives it: a tensor, a tuple of positional inputs or a dict of keyword inputs."
            ) from e
        finally:
            for h in handles:
                h.remove()
            for m, training in modes:
                m.training = training
        input_shape, output_shape = _shape_of(example_input), _shape_of(output)
        shapes.setdefault(id(module), output_shape)
    rows = []
    for name, m in modules:
        if depth is not None and name.count(".") + 1 > depth:
            continue
        total, trainable = _count(m.parameters())
        rows.append(LayerRow(name, type(m).__name__, shapes.get(id(m)), total, trainable))
    total, trainable = _count(module.parameters())
    size = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return ModelSummary(type(module).__name__, rows, total, trainable, size, input_shape, output_shape, input_from)
