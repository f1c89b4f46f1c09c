"""The wheel ships the kernel as source (and nothing compiled); tests run against the installed package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import roundpipe
from roundpipe import _build

REPO = Path(__file__).resolve().parent.parent


def test_wheel_carries_kernel_source_and_no_binary(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("roundpipe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("roundpipe/_kernels/adam.c", "roundpipe/_kernels/adam.h", "roundpipe/py.typed",
                   "roundpipe/_build.py", "roundpipe/optim/adam.py", "roundpipe/__main__.py",
                   "roundpipe/bench/__init__.py", "roundpipe/bench/cli.py", "roundpipe/bench/competitors.py"):
        assert needed in names, f"{needed} missing from {wheel.name}"
    compiled = [n for n in names if n.endswith((".so", ".o", ".pyd", ".dylib"))]
    assert not compiled, compiled


def test_installed_package_finds_its_kernel_source():
    # wherever roundpipe is imported from, the builder reads the source that ships beside it
    assert _build.KERNEL_SOURCE.is_file() and _build.KERNEL_HEADER.is_file()
    assert _build.KERNEL_SOURCE.parent.parent == Path(roundpipe.__file__).resolve().parent
