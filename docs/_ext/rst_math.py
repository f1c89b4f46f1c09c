"""A Griffe extension for the docs site: reStructuredText math in docstrings, as arithmatex math.

The optimizers' docstrings follow torch's: the algorithm is a ``.. math::`` block and symbols in
the argument list are ``:math:`\\gamma``` roles, which read well in ``help()`` but mean nothing to
Markdown. mkdocstrings loads this file (mkdocs.yml, ``extensions:``) and rewrites each docstring,
before it is parsed, into what ``pymdownx.arithmatex`` renders with MathJax:

* a ``.. math::`` line and the lines indented below it become a ``$$ ... $$`` block at the
  directive's indentation;
* ``:math:`x``` becomes ``$x$``, and a cross-reference role (``:class:`FusedOptimizer```,
  ``:func:``, ``:meth:``, ...) becomes a code span;
* in an ``Args:`` section, an entry for several arguments at once (``foreach, fused: ...``)
  becomes one entry per argument with the same text, so that each is matched to its
  signature default (and none is reported as an unknown parameter).

The docstrings themselves stay as they are, so a new optimizer written in the same style renders
without any change. Only the site sees the rewritten text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":math:`([^`]+)`")
_XREF = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|obj|exc|data):`~?([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
_SECTION = re.compile(r"^(?P<indent>[ \t]*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments):[ \t]*$")
_MULTI = re.compile(r"^(?P<indent>[ \t]+)(?P<names>[A-Za-z_]\w*(?:,[ \t]*[A-Za-z_]\w*)+):(?P<text>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_shared_args(text: str) -> str:
    """``a, b: text`` entries of an Args section as one ``a: text`` and one ``b: text`` entry."""
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # the indentation of the Args: header we are in
    i = 0
    while i < len(lines):
        line = lines[i]
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        head = _SECTION.match(line)
        if head is not None:
            section = len(head.group("indent"))
            out.append(line)
            i += 1
            continue
        m = _MULTI.match(line) if section is not None else None
        if m is None:
            out.append(line)
            i += 1
            continue
        width = len(m.group("indent"))
        more = []  # the entry's continuation lines
        i += 1
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > width:
            more.append(lines[i])
            i += 1
        for name in m.group("names").split(","):
            out += [f"{m.group('indent')}{name.strip()}:{m.group('text')}", *more]
    return "\n".join(out)


def rst_math_to_arithmatex(text: str) -> str:
    """The docstring text with every ``.. math::`` block and ``:math:`` role rewritten."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m is None:
            out.append(_XREF.sub(r"`\1`", _ROLE.sub(r"$\1$", lines[i])))
            i += 1
            continue
        indent = m.group("indent")
        body = [m.group("rest")] if m.group("rest").strip() else []
        i += 1
        # The block: every following line that is blank or indented deeper than the directive.
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        trailing = 0
        while body and not body[-1].strip():  # blank lines after the block stay after it
            body.pop()
            trailing += 1
        depth = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        out += [f"{indent}$$", *(indent + b[depth:] if b.strip() else "" for b in body), f"{indent}$$"]
        out += [""] * trailing
    return "\n".join(out)


class RstMath(griffe.Extension):
    """Rewrites reStructuredText math in every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = split_shared_args(rst_math_to_arithmatex(obj.docstring.value))
