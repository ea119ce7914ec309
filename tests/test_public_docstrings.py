"""Every public class and function of lanterna documents itself: Args for each parameter, Returns, an example.

For each name in the ``__all__`` of lanterna, lanterna.callbacks, lanterna.metrics and lanterna.tuning that is a
class or a function (exception classes aside), the docstring has an ``Args:`` section naming every parameter of its
signature (for a class, those of ``__init__``; a dataclass the user never builds, such as Context, may list
them under ``Attributes:``), a ``>>>`` example, and for a function whose return annotation is
not None, a ``Returns:`` section. The examples themselves run in tests/test_doctests.py.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

MODULES = ["lanterna", "lanterna.callbacks", "lanterna.metrics", "lanterna.tuning"]
SKIPPED_PARAMETERS = {"self", "unexpected"}  # ``**unexpected`` only catches misspelled options to name them
OPTIONAL = {"lanterna.callbacks.TensorBoard": "tensorboard", "lanterna.callbacks.MLflowLogger": "mlflow",
            "lanterna.callbacks.WandbLogger": "wandb"}


def public_names() -> list[str]:
    names = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return names


def resolve(qualified: str):
    module_name, _, name = qualified.rpartition(".")
    if qualified in OPTIONAL:
        pytest.importorskip(OPTIONAL[qualified])
    return getattr(importlib.import_module(module_name), name)


def documented(obj) -> bool:
    if inspect.isclass(obj):
        return not issubclass(obj, BaseException)
    return inspect.isfunction(obj)


def parameters(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and target is object.__init__:
        return []
    signature = inspect.signature(target)
    return [name for name in signature.parameters if name not in SKIPPED_PARAMETERS and not name.startswith("_")]


def section(doc: str, title: str) -> str | None:
    """The body of the Google-style section ``title`` of ``doc`` (its indented lines), None when absent."""
    match = re.search(rf"^(?P<indent>[ ]*){title}:[ ]*\n(?P<body>(?:(?P=indent)[ ]+\S.*\n|[ ]*\n)*)", doc + "\n",
                      re.MULTILINE)
    return match["body"] if match else None


NAMES = public_names()


def test_names_found():
    assert "lanterna.setup" in NAMES and "lanterna.metrics.MetricSet" in NAMES


@pytest.mark.parametrize("qualified", NAMES)
def test_public_docstring(qualified):
    obj = resolve(qualified)
    if not documented(obj):
        pytest.skip("not a class or function (or an exception class)")
    doc = inspect.cleandoc(obj.__doc__ or "")
    problems = []
    names = parameters(obj)
    args = section(doc, "Args")
    if args is None and inspect.isclass(obj):  # a dataclass made by lanterna, not the user: its fields
        args = section(doc, "Attributes")
    if names and args is None:
        problems.append(f"no Args: section (parameters: {names})")
    elif names:
        listed = set(re.findall(r"^[ ]+\**(\w+)(?:[ ]*\(.*?\))?:", args, re.MULTILINE))
        missing = [name for name in names if name not in listed]
        if missing:
            problems.append(f"Args: does not describe {missing}")
    if ">>>" not in doc:
        problems.append("no >>> example")
    if inspect.isfunction(obj):
        returns = inspect.signature(obj).return_annotation
        if returns not in (None, "None", inspect.Signature.empty) and section(doc, "Returns") is None:
            problems.append("no Returns: section")
    assert not problems, f"{qualified}: " + "; ".join(problems)
