"""``python -m roundpipe info|build|clean`` (issue 3, item 7), each run in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTS_DIR, entries, make_cc, needs_compiler

import roundpipe

pytestmark = [pytest.mark.native_optional,  # each command runs in a subprocess with its own settings
              pytest.mark.usefixtures("cache")]


def cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roundpipe", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, cwd=TESTS_DIR)


def rows(stdout: str) -> dict[str, str]:
    """info's `name   value` rows (the first 14 columns are the name)."""
    return {line[:14].strip(): line[14:].strip() for line in stdout.splitlines() if line[:14].strip()}


def test_info_says_what_this_host_uses(cache):
    real_cc = needs_compiler()
    first = cli("info", OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    info = rows(first.stdout)
    (entry,) = entries(cache)
    meta = json.loads((entry / "meta.json").read_text())
    assert info["roundpipe"].split()[0] == roundpipe.__version__
    assert info["cache dir"].split()[0] == str(cache)
    assert info["cache key"] == entry.name == meta["key"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    if model:
        assert info["cpu"].startswith(model.group(1).strip())
    simd = info["simd"].split("  (")[0].split()
    flags = set(meta["inputs"]["cpu_flags"].split())
    assert set(simd) <= flags, set(simd) - flags  # only features this CPU has
    if os.uname().machine == "x86_64":
        assert {"avx", "avx2"} & set(simd) or not {"avx", "avx2"} & flags
    assert info["compiler"].split()[0] == real_cc
    assert info["compile flags"].split() == meta["inputs"]["compile_flags"]
    assert info["kernel"].startswith("native")
    assert info["artefact"] == str(entry / meta["artefact"])
    assert info["from cache"].startswith("no")
    assert info["build time"].startswith(f"{meta['build_seconds']:.2f} s")
    assert info["openmp"] == meta["inputs"]["openmp_runtime"]
    assert info["threads"].split()[0] == "1"  # OMP_NUM_THREADS, as torch and the kernel see it

    again = rows(cli("info").stdout)
    assert again["from cache"] == "yes" and again["cache key"] == entry.name


def test_info_on_the_fallback_says_why():
    proc = cli("info", CC="/nonexistent")
    assert proc.returncode == 0, proc.stderr
    info = rows(proc.stdout)
    assert info["kernel"].startswith("FALLBACK")
    assert "CC='/nonexistent'" in info["reason"] and "to fix" in info["reason"]
    assert proc.stderr == ""  # the reason row replaces the warning


def test_build_ahead_then_clean(cache):
    needs_compiler()
    built = cli("build")
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("built ")
    (entry,) = entries(cache)
    meta = json.loads((entry / "meta.json").read_text())
    assert str(entry / meta["artefact"]) in built.stdout

    again = cli("build")
    assert again.returncode == 0 and again.stdout.startswith("up to date: ")
    forced = cli("build", "--force")
    assert forced.returncode == 0 and forced.stdout.startswith("built ")
    assert [e.name for e in entries(cache)] == [entry.name]
    assert json.loads((entry / "meta.json").read_text())["built_at"] >= meta["built_at"]

    (cache / "not-ours.txt").write_text("a user's file in a mistaken cache dir")
    (cache / "notes").mkdir()
    cleaned = cli("clean")
    assert cleaned.returncode == 0, cleaned.stderr
    assert cleaned.stdout.startswith("removed 1 cache entry")
    assert sorted(p.name for p in cache.iterdir()) == ["not-ours.txt", "notes"]
    assert cli("clean").stdout.startswith("nothing to clean")


def _error_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {
        "no compiler": (["build"], {"CC": "/nonexistent"}),
        "compile error": (["build"], {"CC": make_cc(tmp_path, fail_with="adam.c:9:9: error: simulated 5521")}),
        "unwritable cache": (["build"], {"ROUNDPIPE_CACHE_DIR": str(blocker / "cache")}),
        "no cache": (["build"], {"ROUNDPIPE_NO_CACHE": "1"}),
        "required native": (["info"], {"CC": "/nonexistent", "ROUNDPIPE_REQUIRE_NATIVE": "1"}),
        "unknown command": (["frobnicate"], {}),
        "no command": ([], {}),
        "bad option": (["info", "--repeat", "many"], {}),
    }


@pytest.mark.parametrize("case", ["no compiler", "compile error", "unwritable cache", "no cache",
                                  "required native", "unknown command", "no command", "bad option"])
def test_errors_are_one_readable_line(case, tmp_path):
    args, env = _error_cases(tmp_path)[case]
    proc = cli(*args, **env)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("roundpipe: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    if case == "compile error":
        assert "simulated 5521" in lines[0] and "to fix" in lines[0]


def test_info_timing_measures_cold_and_warm_imports():
    needs_compiler()
    proc = cli("info", "--timing", "--repeat", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    number = r"\s+(\d+\.\d+) s"
    assert re.search(r"import torch alone" + number, out), out
    assert re.search(r"cold: import torch, roundpipe\.optim" + number, out), out
    assert re.search(r"warm: import torch, roundpipe\.optim" + number, out), out
    assert re.search(r"warm import adds \d+\.\d ms over import torch", out), out
    assert re.search(r"cold first import \d+\.\d+ s", out), out
