"""Shared fixtures. Tests import the installed roundpipe (run `pytest`, not `python -m pytest`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that NaNs compare equal to themselves."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    ba, bb = bits(a), bits(b)
    if not torch.equal(ba, bb):
        diff = (ba != bb).nonzero().flatten()[:8].tolist()
        raise AssertionError(f"{what}: {int((ba != bb).sum())} of {ba.numel()} elements differ, e.g. at {diff}")


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 300,
               args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (not the source tree's cwd) and return the result."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *(args or []), "-c", code], capture_output=True, text=True,
        timeout=timeout, env=full_env, cwd=os.path.dirname(os.path.abspath(__file__)),
    )
