"""What the test files of the rules whose reference is torch's for-loop step (test_rulesA.py:
NAdam, ASGD; test_rulesB.py: Adamax, RAdam) share: the fallback run without a compiler, and
the check that each rule's element loops are vectorized."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import run_python


def run_without_a_compiler(tmp_path: Path, body: str) -> None:
    """Run body (dedented Python that prints "ok" when its checks pass) in a fresh interpreter
    where no compiler is found, so every rule steps through its torch fallback."""
    code = textwrap.dedent(f"""
        import os, warnings
        os.environ["CC"] = "/nonexistent/cc"
        os.environ["ROUNDPIPE_CACHE_DIR"] = {str(tmp_path)!r}
        os.environ.pop("ROUNDPIPE_REQUIRE_NATIVE", None)
        warnings.simplefilter("ignore")
        import torch, roundpipe.optim as rpo
        assert not rpo.native_available()
    """) + textwrap.dedent(body)
    res = run_python(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def assert_loops_vectorized(tmp_path: Path, markers: dict[str, str]) -> None:
    """Every `for` loop of the function whose definition contains markers[name], in
    _kernels/<name>.c, is vectorized under the builder's flags (GCC's report)."""
    from test_vectorization import _report, _vectorized, loop_lines

    from roundpipe import _build
    cc = _build.find_compiler()
    for name, marker in markers.items():
        source = _build.KERNEL_DIR / f"{name}.c"
        done = _vectorized(_report(cc, source, tmp_path), f"{name}.c")
        lines = loop_lines(source.read_text(), marker)
        assert lines and not [n for n in lines if n not in done], f"{name}.c: loops {lines}, vectorized {sorted(done)}"
