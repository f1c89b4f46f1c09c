"""Shared fixtures and helpers. Tests import the installed roundpipe (run `pytest`, not `python -m pytest`).

The suite requires the native kernel: a build failure must make it red, not quietly test torch's
own fused Adam (the fallback) against itself. ROUNDPIPE_REQUIRE_NATIVE=1 is set here, before any
test module imports roundpipe, so a failed build raises ImportError in this process and in every
subprocess a test starts. Tests of the fallback opt out explicitly: they clear the variable for
their subprocesses (tests/test_build.py and tests/test_cli.py, through the `isolated_env` fixture)
and carry the `native_optional` mark.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

os.environ["ROUNDPIPE_REQUIRE_NATIVE"] = "1"  # before roundpipe is imported anywhere in this process

import pytest  # noqa: E402  (the environment above must be set first)
import torch  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "native_optional: the test does not need the native kernel in this process "
        "(it tests the fallback or the build in subprocesses of its own)")


_native_error: list[str | None] = []  # filled once, at session start


def pytest_sessionstart(session: pytest.Session) -> None:
    """Load the kernel once, with the environment the session started with (before any
    test's monkeypatch), and remember why it failed, if it did."""
    from roundpipe import _build

    try:
        kernel = _build.load_kernel()
    except ImportError as exc:
        _native_error.append(str(exc))
    else:
        _native_error.append(None if kernel is not None else f"the native kernel did not load: {_build.INFO.error}")


@pytest.fixture(autouse=True)
def _require_native_kernel(request: pytest.FixtureRequest) -> None:
    """Every test fails when the native kernel is not in use, except those marked native_optional."""
    error = _native_error[0] if _native_error else "the session did not try to load it"
    if error is not None and request.node.get_closest_marker("native_optional") is None:
        pytest.fail(f"roundpipe's native kernel is required by the test suite: {error}", pytrace=False)


# ---- bits ----------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that NaNs compare equal to themselves."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Every bit of a equals b's (NaN payloads and signs included). Raises, so it holds under -O."""
    ba, bb = bits(a), bits(b)
    if not torch.equal(ba, bb):
        diff = (ba != bb).nonzero().flatten()[:8].tolist()
        raise AssertionError(f"{what}: {int((ba != bb).sum())} of {ba.numel()} elements differ, e.g. at {diff}")


def assert_same_values_nan_anywhere(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """NaN in the same places, every other element bit-equal; NaN signs and payloads not compared."""
    a, b = a.detach(), b.detach()
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        raise AssertionError(f"{what}: NaN at different positions")
    assert_bits_equal(a[~na], b[~nb], f"{what} (values other than NaN)")


# ---- train twins and compare every bit --------------------------------------------------------

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""An optimizer class, or any callable with a class's signature: factory(params_or_groups, **kwargs)."""

GradsFn = Callable[[int, list[torch.Tensor]], "Sequence[torch.Tensor | None] | None"]
"""grads(step, params) -> one grad (or None) per param, or None when it set the grads itself."""

StepHook = Callable[[int, torch.optim.Optimizer, list[torch.Tensor]], None]
"""hook(step, opt, params): may edit hyperparameters, state, params (append to params to compare more)."""


class Run(NamedTuple):
    """What one twin trained: its params (flat, in the order compared) and its optimizer."""
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer


def randn_params(*shapes: int | tuple[int, ...], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Callable[[], list[torch.Tensor]]:
    """A params builder: fresh leaf tensors of these shapes, the same values on every call."""
    def build() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    return build


def randn_grads(seed: int = 1) -> GradsFn:
    """A grads function: a fresh draw per step, in each param's dtype, the same for every twin."""
    def grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        out: list[torch.Tensor | None] = []
        for p in params:
            if p.is_complex():
                out.append(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                out.append(torch.randn(p.shape, generator=gen).to(p.dtype))
        return out
    return grads


def _flat(params_or_groups: Sequence[Any]) -> list[torch.Tensor]:
    if params_or_groups and isinstance(params_or_groups[0], dict):
        return [p for g in params_or_groups for p in g["params"]]
    return list(params_or_groups)


def train(
    optimizer: OptimizerFactory,
    *,
    params: Callable[[], Sequence[Any]],
    grads: GradsFn,
    steps: int,
    kwargs: dict[str, Any] | None = None,
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
    threads: int | None = None,
) -> Run:
    """Train one optimizer: optimizer(params(), **deepcopy(kwargs)), then `steps` times:
    set the grads from grads(step, params), before_step, opt.step(), after_step.

    kwargs are deep-copied, so a Tensor lr is this run's own (LR schedulers edit it in place).
    threads: torch.set_num_threads for this run only (restored afterwards).
    """
    built = params()
    flat = _flat(built)
    opt = optimizer(built, **copy.deepcopy(kwargs or {}))
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for step in range(steps):
            gs = grads(step, flat)
            if gs is not None:
                for p, g in zip(flat, gs, strict=True):
                    p.grad = g
            if before_step is not None:
                before_step(step, opt, flat)
            opt.step()
            if after_step is not None:
                after_step(step, opt, flat)
    finally:
        torch.set_num_threads(before)
    return Run(flat, opt)


def _where(opt: torch.optim.Optimizer, p: torch.Tensor, k: int) -> str:
    for gi, group in enumerate(opt.param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                return f"group {gi} param {i} {tuple(p.shape)}"
    return f"param {k} {tuple(p.shape)} (in no group)"


def assert_same_run(ours: Run, ref: Run, what: str = "", *, nan_payloads: bool = True) -> None:
    """Every param and every state tensor of the two runs bit-equal, pair by pair in params order:
    the same number of params, the same state keys per param (no state on both sides counts as the
    same), the same dtype and shape, the same bits (NaN payloads included; with nan_payloads=False,
    NaN in the same places and every other bit equal). Non-tensor state values must be equal."""
    check = assert_bits_equal if nan_payloads else assert_same_values_nan_anywhere
    prefix = f"{what}: " if what else ""
    if len(ours.params) != len(ref.params):
        raise AssertionError(f"{prefix}{len(ours.params)} params vs {len(ref.params)}")
    for k, (a, b) in enumerate(zip(ours.params, ref.params, strict=True)):
        where = prefix + _where(ours.opt, a, k)
        for name, x, y in [("", a, b)] + _state_pairs(ours.opt, a, ref.opt, b, where):
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if (x.dtype, x.shape) != (y.dtype, y.shape):
                    raise AssertionError(f"{where}{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
                check(x, y, where + name)
            elif x != y:
                raise AssertionError(f"{where}{name}: {x!r} vs {y!r}")


def _state_pairs(oa: torch.optim.Optimizer, a: torch.Tensor, ob: torch.optim.Optimizer, b: torch.Tensor,
                 where: str) -> list[tuple[str, Any, Any]]:
    sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
    if sa.keys() != sb.keys():
        raise AssertionError(f"{where}: state keys {sorted(sa)} vs {sorted(sb)}")
    return [(f" state[{k!r}]", sa[k], sb[k]) for k in sb]


def train_twins(
    ours: OptimizerFactory,
    ref: OptimizerFactory,
    *,
    params: Callable[[], Sequence[Any]],
    grads: GradsFn,
    steps: int,
    kwargs: dict[str, Any] | None = None,
    ours_kwargs: dict[str, Any] | None = None,
    ref_kwargs: dict[str, Any] | None = None,
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
    threads: int | None = None,
    nan_payloads: bool = True,
    what: str = "",
) -> tuple[Run, Run]:
    """Train two optimizers from identical params on identical grads and compare every bit.

    The one helper for "ours is bit-identical to the reference", for any optimizer pair
    (Adam vs torch.optim.Adam(fused=True) today; SGD, Adagrad, Lion, ... as they come).

    Args:
        ours, ref: optimizer classes or factories, called as ours(params, **kwargs, **ours_kwargs).
        params: builds the params, called once per twin; it must return equal values each call.
            A list of tensors, or a list of param-group dicts (compared in flattened order).
        grads: grads(step, params) -> a grad or None per param (assigned as p.grad), or None when
            it set the grads itself (in place, through .data, ...). Called once per twin per step,
            so it must give equal values for equal (step, shapes): seed a generator per step
            (randn_grads does).
        steps: how many optimizer steps each twin takes.
        kwargs: hyperparameters for both, deep-copied per twin (a Tensor lr is not shared).
        ours_kwargs, ref_kwargs: for one side only, e.g. ref_kwargs={"fused": True}.
        before_step, after_step: hook(step, opt, params) around each step of each twin: LR
            schedulers, lr edits, state resets, param replacement (append new params to params).
        threads: torch's thread count while ours trains (ref trains at the current count).
        nan_payloads: False compares NaN positions only (and every other bit).
        what: a prefix for failure messages.

    Compares (assert_same_run): the same number of params, and pair by pair the param's bits,
    the same state keys, and every state tensor's dtype, shape and bits.

    Returns the two runs, (ours, ref), each a Run(params, opt), for further checks.
    """
    common = dict(params=params, grads=grads, steps=steps, before_step=before_step, after_step=after_step)
    a = train(ours, kwargs={**(kwargs or {}), **(ours_kwargs or {})}, threads=threads, **common)
    b = train(ref, kwargs={**(kwargs or {}), **(ref_kwargs or {})}, **common)
    assert_same_run(a, b, what, nan_payloads=nan_payloads)
    return a, b


# ---- processes and the build -----------------------------------------------------------------


@pytest.fixture
def threads() -> Iterable[None]:
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 300,
               args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (not the source tree's cwd) and return the result."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *(args or []), "-c", code], capture_output=True, text=True,
        timeout=timeout, env=full_env, cwd=TESTS_DIR,
    )


# Settings that change how roundpipe builds and loads its kernel; build tests clear them.
ISOLATED = ("CC", "ROUNDPIPE_REQUIRE_NATIVE", "ROUNDPIPE_NO_CACHE", "ROUNDPIPE_CACHE_DIR")
REAL_CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def needs_compiler() -> str:
    if REAL_CC is None:
        pytest.fail("these tests need a C compiler (cc, gcc or clang) on PATH")
    return REAL_CC


def make_cc(directory: Path, *, log: Path | None = None, slow: Path | None = None,
            started: Path | None = None, fail_with: str | None = None) -> str:
    """A compiler wrapper: logs each compile (-c) to `log`, sleeps while `slow` exists
    (touching `started` first), or fails compiles printing `fail_with`; otherwise runs cc."""
    real = needs_compiler()
    lines = ["#!/bin/sh", 'case " $* " in', '  *" -c "*)']
    if log:
        lines.append(f'    echo "$$ $*" >> "{log}"')
    if slow:
        lines.append(f'    if [ -e "{slow}" ]; then touch "{started}"; sleep 60; fi')
    if fail_with:
        lines += [f'    echo "{fail_with}" >&2', '    echo "compilation terminated." >&2', "    exit 1"]
    lines += ["    ;;", "esac", f'exec "{real}" "$@"', ""]
    path = directory / "fake-cc"
    path.write_text("\n".join(lines))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def entries(cache: Path) -> list[Path]:
    """The kernel entries in a cache root."""
    from roundpipe import _build

    return sorted(p for p in cache.iterdir() if p.is_dir() and _build._KEY_RE.fullmatch(p.name))


# ---- the build and cache tests' fixtures (test_build, test_cache_trust, test_cli) ----------

LAST_JSON = "print('RESULT ' + json.dumps(result))"


# Imports roundpipe.optim in a fresh process and reports what happened.
IMPORT_AND_REPORT = """
import json, os, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import roundpipe.optim as rpo
    from roundpipe import _build
    native = rpo.native_available()
result = {"native": native, "from_cache": _build.INFO.from_cache, "key": _build.INFO.key,
          "artefact": _build.INFO.artefact, "root": _build.INFO.cache_root,
          "root_exists": os.path.exists(_build.INFO.cache_root), "private": _build.INFO.private_root,
          "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}
"""


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a subprocess printed after 'RESULT '; fails the test with its output if none."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no result (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache root and TMPDIR of this test's own, and no inherited roundpipe settings
    (every test of test_build, test_cache_trust and test_cli uses it, through pytestmark)."""
    for name in ISOLATED:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "cache"
    monkeypatch.setenv("ROUNDPIPE_CACHE_DIR", str(root))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding one entry built for this host, to copy from."""
    needs_compiler()
    root = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        for name in ISOLATED:
            mp.delenv(name, raising=False)
        proc = run_python("import roundpipe.optim as o; assert o.native_available()",
                          env={"ROUNDPIPE_CACHE_DIR": str(root)}, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return root
