"""The examples in the docstrings of src/lanterna run and hold: one test per module that has examples.

Each module's examples run in a fresh temporary working directory (an example may write files), on one thread,
each docstring in a namespace of its own (an example imports what it uses).
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "lanterna"
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_names() -> list[str]:
    """Every module of src/lanterna by its import name, walked on disk (namespace packages included)."""
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = ("lanterna",) + path.relative_to(SRC).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_tests(name: str) -> list[doctest.DocTest]:
    """The doctests found in module ``name``, only those defined in it (not re-exported ones).

    Each docstring's examples run in a namespace of their own, not the module's: an example imports what it
    uses, so a reader can paste it as it stands.
    """
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module, name, globs={"__name__": "__main__"}) if t.examples]


def has_examples(name: str) -> bool:
    try:
        return bool(module_tests(name))
    except (ValueError, ImportError):  # examples that do not parse, a module that does not import: its test says so
        return True


MODULES = [name for name in module_names() if has_examples(name)]


def test_some_modules_have_examples():
    assert len(MODULES) >= 10, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    failures: list[str] = []

    class Collect(doctest.DocTestRunner):
        def report_failure(self, out, test, example, got):
            failures.append(f"{test.name} line {example.lineno}:\n  {example.source.strip()}\n"
                            f"expected: {example.want.strip()}\ngot: {got.strip()}")

        def report_unexpected_exception(self, out, test, example, exc_info):
            failures.append(f"{test.name} line {example.lineno}:\n  {example.source.strip()}\n"
                            f"raised {exc_info[0].__name__}: {exc_info[1]}")

    runner = Collect(optionflags=OPTIONS)
    try:
        tests = module_tests(name)
    except ValueError as e:
        pytest.fail(f"the examples of {name} do not parse: {e}")
    try:
        for test in tests:
            runner.run(test, out=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert not failures, (f"{len(failures)} failing example(s) in {name} (each docstring runs in a namespace of "
                          "its own: import what it uses):\n\n" + "\n\n".join(failures))
