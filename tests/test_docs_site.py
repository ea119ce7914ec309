"""The docs site (mkdocs.yml) builds with ``mkdocs build --strict``, as ``make docs`` does.

--strict turns every warning into a failure: a broken link between pages, a docstring the Google-style parser
cannot read (an ``Args:`` entry naming no parameter), a reference that resolves to nothing. One build serves every
test of this file (about 5 s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lanterna as ln

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = sorted((ROOT / "docs" / "reference").glob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    warnings = "\n".join(line for line in (build.stdout + build.stderr).splitlines() if "WARNING" in line)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{warnings or build.stdout + build.stderr}"
    return out


def test_every_page_is_built(site):
    assert REFERENCE, "docs/reference/ has no page"
    pages = [*sorted((ROOT / "docs").glob("*.md")), *REFERENCE]
    missing = [p.name for p in pages if not (site / p.relative_to(ROOT / "docs").with_suffix("") / "index.html")
               .exists() and p.stem != "index"]
    assert (site / "index.html").exists() and not missing, missing


def test_reference_pages_render_the_docstrings(site):
    """Each reference page shows its objects with their parameters, and doctests as code, not as quotes."""
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert 'id="lanterna.setup"' in api and 'id="lanterna.Fitted.fit"' in api
    assert "Declare what to train" in api  # setup's docstring
    assert re.search(r"<td>\s*<code>sample_weight</code>", api)  # the Args table of Setup.fit / Fitted.fit
    for page in REFERENCE:
        html = (site / "reference" / page.stem / "index.html").read_text(encoding="utf-8")
        assert 'class="doc doc-object' in html, f"{page.name} renders no object"
        assert "<blockquote>" not in html, f"{page.name}: a >>> example rendered as a quote"
        assert ":class:`" not in html and ":meth:`" not in html, f"{page.name}: a Sphinx role left as text"


def test_public_names_have_a_reference_entry(site):
    """Every name lanterna exports (ln.*, ln.callbacks.*, ln.metrics.*, ln.tuning.*) is documented."""
    ids = set()
    for page in REFERENCE:
        ids |= {i.rsplit(".", 1)[-1] for i in re.findall(r'id="(lanterna\.[\w.]+)"',
                                                          (site / "reference" / page.stem / "index.html")
                                                          .read_text(encoding="utf-8"))}
    names = {n for mod in (ln, ln.callbacks, ln.metrics, ln.tuning) for n in mod.__all__
             if not isinstance(getattr(mod, n), type(ln)) and not n.startswith("_")}
    assert not sorted(names - ids), f"exported but not in docs/reference/: {sorted(names - ids)}"
