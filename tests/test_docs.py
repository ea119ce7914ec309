"""Every ```python block of README.md and docs/*.md runs: one test per page.

A page's blocks run in order in one namespace (a block may use what an earlier block of the page defined), in a
fresh temporary working directory, on one thread, with torch seeded. A block whose first line is
``# not run: <reason>`` is skipped (for what cannot run here: several machines, a GPU); other fences
(```text, ```bash, plain ```) are not code to run.
"""

from __future__ import annotations

import re
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)$")
NOT_RUN = "# not run:"


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first line number, info string, code)`` for every fenced block of a markdown text, dedented."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = m["indent"], i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        blocks.append((start + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """The page's runnable python blocks: ``(first code line number, code)``."""
    return [(line, code) for line, info, code in code_blocks(page.read_text(encoding="utf-8"))
            if info.split()[:1] == ["python"] and not code.lstrip().startswith(NOT_RUN)]


def test_fences_parse():
    text = "a\n```python\nx = 1\n```\n\n  ```python\n  # not run: needs two machines\n  y\n  ```\n```text\nz\n```\n"
    assert code_blocks(text) == [(3, "python", "x = 1\n"), (7, "python", "# not run: needs two machines\ny\n"),
                                 (11, "text", "z\n")]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python block to run")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # A module of its own, as a script's __main__ would be: classes a page defines are importable by name
    # (ln.load rebuilds a saved model from its class's import path).
    module = types.ModuleType(f"lanterna_docs_{page.stem.lower()}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        for line, code in blocks:
            where = f"{page.relative_to(ROOT).as_posix()}, the block at line {line}"
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception:
                pytest.fail(f"{where} failed:\n{traceback.format_exc(limit=-3)}")
    finally:
        torch.set_num_threads(threads)


MISSING_DOC = re.compile(r"API\.md|\bseeds? 00[0-4]")


def test_no_pointers_to_files_users_do_not_have():
    """Docstrings, comments and docs point to the repository's own docs, not to documents outside it."""
    files = [*PAGES, *sorted((ROOT / "src" / "lanterna").rglob("*.py"))]
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if MISSING_DOC.search(line)]
    assert not hits, "\n".join(hits)


def test_relative_links_resolve():
    link = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)")
    broken = [f"{p.relative_to(ROOT)}: {target}" for p in PAGES for target in link.findall(p.read_text("utf-8"))
              if not (p.parent / target).exists()]
    assert not broken, broken
