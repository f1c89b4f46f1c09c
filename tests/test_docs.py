"""The documentation site (mkdocs.yml, docs/): every public class has a reference page, and the site builds.

The reference pages render the docstrings with mkdocstrings: a page shows a class when it holds
a ``::: roundpipe.optim.NAME`` line. A class without one, or a page left out of the nav, is a
class that users cannot look up, so it fails here. The strict build (broken links and anchors,
pages missing from the nav, docstrings that do not match their signature) needs the ``docs``
extra, which CI installs; without it that one test skips and says so.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import roundpipe.optim

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MKDOCS_YML = REPO / "mkdocs.yml"

# None of this needs the compiled kernel: the docs describe the package, whichever path it runs.
pytestmark = pytest.mark.native_optional

_DIRECTIVE = re.compile(r"^:::[ \t]+roundpipe\.optim\.(\w+)[ \t]*$", re.M)


def nav_pages() -> list[str]:
    """The Markdown files that mkdocs.yml's nav lists, relative to docs/, in nav order.

    Read with a pattern rather than a YAML parser, so that this check runs without the docs
    extra: every ``*.md`` named in the nav section (from ``nav:`` to the next top-level key).
    """
    text = MKDOCS_YML.read_text(encoding="utf-8")
    m = re.search(r"^nav:[ \t]*\n(?P<body>(?:[ \t]+.*\n|[ \t]*\n)*)", text, re.M)
    assert m, "mkdocs.yml has no nav: section"
    return re.findall(r"([\w./-]+\.md)\b", m.group("body"))


def public_classes() -> list[str]:
    return sorted(name for name in roundpipe.optim.__all__ if inspect.isclass(getattr(roundpipe.optim, name)))


def test_nav_pages_exist():
    pages = nav_pages()
    assert "index.md" in pages
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that docs/ lacks: {missing}"
    assert len(pages) == len(set(pages)), f"a page is listed twice in the nav: {pages}"


def test_every_public_class_has_a_reference_page_in_the_nav():
    rendered: dict[str, list[str]] = {}
    for page in nav_pages():
        for name in _DIRECTIVE.findall((DOCS / page).read_text(encoding="utf-8")):
            rendered.setdefault(name, []).append(page)
    classes = public_classes()
    assert {"Adam", "SGD", "FusedOptimizer"} <= set(classes)  # the check itself sees the classes
    missing = [name for name in classes if name not in rendered]
    assert not missing, (
        f"classes in roundpipe.optim.__all__ without a reference page: {missing}. Add "
        "docs/reference/<name in lower case>.md with a short intro and the line "
        "'::: roundpipe.optim.<Name>', and list it under Optimizers in mkdocs.yml's nav "
        "(docs/adding-an-optimizer.md, 'The reference page')")
    # private modules may be rendered on purpose (the tutorial shows roundpipe.optim._engine's hooks)
    unknown = sorted(n for n in rendered if not n.startswith("_") and n not in roundpipe.optim.__all__)
    assert not unknown, f"pages render names that roundpipe.optim does not export: {unknown}"


def test_readme_links_resolve():
    """The README is short and points into the docs: every relative link must name a file."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://|#|mailto:)([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets, "the README links nowhere"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_rst_math_extension_rewrites_torch_style_docstrings():
    pytest.importorskip("griffe", reason="the docs extra is not installed (pip install '.[docs]')")
    spec = importlib.util.spec_from_file_location("rst_math", DOCS / "_ext" / "rst_math.py")
    assert spec and spec.loader
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    doc = "See :class:`~x.Y`.\n\n.. math::\n    a \\leftarrow b\n    + c\n\nArgs:\n    lr: rate :math:`\\gamma`.\n" \
          "    foreach, fused: ignored,\n        with a warning.\n    eps: term.\n"
    out = ext.split_shared_args(ext.rst_math_to_arithmatex(doc))
    assert out == ("See `x.Y`.\n\n$$\na \\leftarrow b\n+ c\n$$\n\nArgs:\n    lr: rate $\\gamma$.\n"
                   "    foreach: ignored,\n        with a warning.\n    fused: ignored,\n        with a warning.\n"
                   "    eps: term.")


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`, as CI runs it: any warning (a broken link or anchor, a page not in
    the nav, a docstring argument that is not in the signature, a missing snippet) fails it."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"the docs extra is not installed ({module} is missing): pip install '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0, not a build warning
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS_YML), "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    site = tmp_path / "site"
    for name in public_classes():
        # the class's heading (mkdocstrings' anchor) is on some page of the built site
        anchor = f'id="roundpipe.optim.{name}"'
        assert any(anchor in p.read_text(encoding="utf-8") for p in site.rglob("*.html")), \
            f"no page of the built site renders roundpipe.optim.{name}"
