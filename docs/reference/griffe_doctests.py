"""Griffe extension for the API reference: lanterna's docstrings as mkdocstrings renders them.

lanterna writes its examples as bare doctests (``>>>`` runs, checked by tests/test_doctests.py) and names other
objects with Sphinx roles (``:class:`Fitted```). Markdown would read ``>>>`` as nested quotes and ``a[0][1]`` in
an output line as a link, so each top-level doctest run becomes a ``pycon`` code block and each role a code span.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|obj|exc|py:\w+):`~?([^`]+)`")
_DOCTEST_FLAG = re.compile(r"\s*#\s*doctest:.*$")


def markdown_docstring(text: str) -> str:
    """Fence every top-level ``>>>`` run (up to the next blank line) as ``pycon``, without doctest flags; roles
    become code spans and an RST literal-block ``::`` a colon (the indented block after it is code already)."""
    out: list[str] = []
    lines = text.split("\n")
    i, fenced = 0, False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith(">>>"):
            if not fenced:
                line = _ROLE.sub(r"`\1`", line)
                line = line[:-1] if line.endswith("::") else line
            out.append(line)
            i += 1
            continue
        if out and out[-1].strip():
            out.append("")
        out.append("```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(_DOCTEST_FLAG.sub("", lines[i]))
            i += 1
        out.append("```")
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    """Rewrites each docstring with :func:`markdown_docstring` once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
