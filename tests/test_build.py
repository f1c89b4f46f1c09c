"""The kernel cache (issue 3): one build for many processes, recovery, keys, configuration, fallback.

Every test gets its own empty ROUNDPIPE_CACHE_DIR and TMPDIR, and anything that
depends on import-time state runs in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IMPORT_AND_REPORT, LAST_JSON, TESTS_DIR, entries, make_cc, needs_compiler, result_of, run_python

from roundpipe import _build

# builds and falls back in subprocesses of its own; each test with an empty cache of its own
pytestmark = [pytest.mark.native_optional, pytest.mark.usefixtures("cache")]


def import_and_report(timeout: float = 180, **env: str) -> dict:
    proc = run_python(IMPORT_AND_REPORT + LAST_JSON, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return result_of(proc)


# ---- 1. many processes, one build; a build killed mid-way -------------------

RACER = """
import json, os, sys, time
import torch
ready, go = sys.argv[1], sys.argv[2]
open(os.path.join(ready, str(os.getpid())), "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go):  # start the imports together, as torchrun's ranks do
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.002)
import roundpipe.optim as rpo
from roundpipe import _build
result = {"native": rpo.native_available(), "from_cache": _build.INFO.from_cache, "key": _build.INFO.key}
"""


def test_eight_processes_on_an_empty_cache_build_once(tmp_path, cache, monkeypatch):
    """Also shows that ROUNDPIPE_CACHE_DIR and CC are honoured."""
    log = tmp_path / "compiles.log"
    cc = make_cc(tmp_path, log=log)
    monkeypatch.setenv("CC", cc)
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER + LAST_JSON, str(ready), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS_DIR)
             for _ in range(8)]
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < 8 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a process died before the race"
            time.sleep(0.02)
        go.touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        results.append(result_of(subprocess.CompletedProcess(p.args, p.returncode, out, err)))
    assert all(r["native"] for r in results)
    assert len({r["key"] for r in results}) == 1
    compiles = log.read_text().splitlines()
    # one build for all eight: each C file (cffi's wrapper and every kernel source) compiled
    # once, all into the same private build directory
    assert len(compiles) == len(_build.kernel_sources()) + 1, compiles
    assert len({re.search(r"\.build-[^/ ]+", c).group(0) for c in compiles}) == 1, compiles
    assert sum(not r["from_cache"] for r in results) == 1  # one built, seven waited and loaded it
    assert [e.name for e in entries(cache)] == [results[0]["key"]]
    assert json.loads((cache / results[0]["key"] / "meta.json").read_text())["inputs"]["compiler"] == cc
    assert not list(cache.glob(".build-*"))


def test_a_build_killed_mid_way_does_not_block_the_next_import(tmp_path, cache, monkeypatch):
    slow, started = tmp_path / "slow", tmp_path / "started"
    slow.touch()
    monkeypatch.setenv("CC", make_cc(tmp_path, slow=slow, started=started))
    # (the import alone builds nothing now: kernels build on first use; native_available() builds them all)
    victim = subprocess.Popen([sys.executable, "-c", "import roundpipe.optim as o; o.native_available()"], cwd=TESTS_DIR,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert victim.poll() is None, "the build finished or failed before it could be killed"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.02)
        assert list(cache.glob(".build-*")) and not entries(cache)  # mid-build: no entry yet
        os.kill(victim.pid, signal.SIGKILL)  # with the build lock held
        victim.wait(timeout=30)
        slow.unlink()
        after = import_and_report(timeout=120)  # bounded: flock died with its holder
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)  # the orphaned, sleeping compiler wrapper
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert after["native"] and not after["from_cache"]
    assert [e.name for e in entries(cache)] == [after["key"]]
    assert not list(cache.glob(".build-*")), "the dead builder's temporary directory was not swept"


# ---- 2. atomic install: corrupt entries are rebuilt -------------------------


def _corrupt(entry: Path, how: str) -> None:
    meta_path = entry / "meta.json"
    meta = json.loads(meta_path.read_text())
    artefact = entry / meta["artefact"]
    if how == "truncated":
        data = artefact.read_bytes()
        artefact.write_bytes(data[: len(data) // 2])
    elif how == "garbage-with-matching-sha256":  # passes the hash check, fails to load
        artefact.write_bytes(b"\x7fELF not really a shared object" * 64)
        meta["sha256"] = hashlib.sha256(artefact.read_bytes()).hexdigest()
        meta_path.write_text(json.dumps(meta))
    elif how == "meta-garbage":
        meta_path.write_text('{"key": ')
    elif how == "artefact-missing":
        artefact.unlink()
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "garbage-with-matching-sha256", "meta-garbage", "artefact-missing"])
def test_a_corrupt_entry_is_rebuilt(how, built, cache):
    shutil.copytree(built, cache)
    (entry,) = entries(cache)
    _corrupt(entry, how)
    after = import_and_report()
    assert after["native"] and not after["from_cache"] and after["key"] == entry.name
    found = _build._open_entry(entry, entry.name, _build._trusted_uids())  # intact and trusted again
    assert found is not None
    os.close(found.fd)
    assert not [p for p in cache.iterdir() if ".broken-" in p.name or p.name.startswith(".build-")]


def test_an_intact_entry_loads_without_a_lock_or_a_write(built, cache):
    """A prebuilt cache on a read-only file system (a container image) must load as is."""
    shutil.copytree(built, cache)
    no_writes = """
import roundpipe._build as b
def refuse(*args, **kwargs):
    raise PermissionError(13, "read-only file system (simulated)")
b._unwritable = refuse
b._FileLock.__enter__ = refuse
b.tempfile.mkdtemp = refuse
"""
    proc = run_python(no_writes + IMPORT_AND_REPORT + LAST_JSON, timeout=180)
    result = result_of(proc)
    assert result["native"] and result["from_cache"] and result["warnings"] == []


# ---- 3. the key ------------------------------------------------------------


def _fake_cpuinfo(path: Path, model: str, flags: str) -> Path:
    path.write_text(f"processor\t: 0\nvendor_id\t: Fake\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nvendor_id\t: Fake\nmodel name\t: {model}\nflags\t\t: {flags}\n")
    return path


HOST_A = "fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512vl"
HOST_B = "fpu sse sse2 avx avx2 fma f16c"


def test_the_key_follows_the_cpu_flag_source(tmp_path, monkeypatch):
    needs_compiler()
    keys, inputs = {}, {}
    for host, flags in (("a", HOST_A), ("b", HOST_B)):
        monkeypatch.setattr(_build, "CPUINFO", str(_fake_cpuinfo(tmp_path / host, f"Fake {host}", flags)))
        assert _build.cpu_flags() == " ".join(sorted(flags.split()))
        assert _build.cpu_model() == f"Fake {host}"
        inputs[host] = _build.key_inputs()
        keys[host] = _build.cache_key(inputs[host])
    assert keys["a"] != keys["b"]
    assert {k for k in inputs["a"] if inputs["a"][k] != inputs["b"][k]} == {"cpu_flags"}


def test_the_key_covers_every_input():
    needs_compiler()
    inputs = _build.key_inputs()
    required = {"cpu_flags", "compiler", "compiler_version", "compile_flags", "link_flags",
                "source_sha256", "python_abi", "cffi_version", "cache_version", "openmp_runtime"}
    assert required <= set(inputs)
    import cffi

    assert inputs["cffi_version"] == cffi.__version__
    assert sys.implementation.cache_tag in inputs["python_abi"]
    assert inputs["compile_flags"] == _build.COMPILE_FLAGS
    assert inputs["compiler_version"].strip()
    key = _build.cache_key(inputs)
    for name, value in inputs.items():
        changed = {**inputs, name: [value, "changed"]}
        assert _build.cache_key(changed) != key, f"{name} does not affect the key"


def test_the_key_covers_the_source_and_cdef(tmp_path, monkeypatch):
    needs_compiler()
    before = _build.key_inputs()["source_sha256"]
    kernels = tmp_path / "_kernels"
    shutil.copytree(_build.KERNEL_DIR, kernels)
    names = sorted(p.name for p in kernels.iterdir() if p.suffix in (".c", ".h"))
    assert {"engine.c", "engine.h", "runner.h", "adam.c", "adam.h"} <= set(names)
    for name in names:  # every C file and header, the cdef's among them
        original = (kernels / name).read_bytes()
        (kernels / name).write_bytes(original + b"\n/* edited */\n")
        with monkeypatch.context() as mp:
            mp.setattr(_build, "KERNEL_DIR", kernels)
            mp.setattr(_build, "ENGINE_SOURCE", kernels / "engine.c")
            mp.setattr(_build, "ENGINE_HEADER", kernels / "engine.h")
            assert _build.key_inputs()["source_sha256"] != before, name
        (kernels / name).write_bytes(original)


def test_cc_with_arguments_is_one_compiler_identity(monkeypatch):
    real = needs_compiler()
    monkeypatch.setenv("CC", f"{os.path.basename(real)} -DROUNDPIPE_TEST=1")
    assert _build.compiler_command() == [shutil.which(os.path.basename(real)), "-DROUNDPIPE_TEST=1"]
    with_args = _build.key_inputs()
    monkeypatch.setenv("CC", real)
    assert _build.cache_key(with_args) != _build.cache_key(_build.key_inputs())


def test_two_hosts_sharing_a_cache_get_separate_entries(tmp_path, cache):
    """Two CPUs, one home directory: each gets its own entry, and meta.json says why."""
    needs_compiler()
    fakes = {h: str(_fake_cpuinfo(tmp_path / h, f"Fake {h}", f)) for h, f in (("a", HOST_A), ("b", HOST_B))}
    code = f"""
import json
from roundpipe import _build
result = []
for host in ("a", "b", "a"):
    _build.CPUINFO = {fakes!r}[host]
    _build.build_and_load()
    result.append({{"host": host, "key": _build.INFO.key, "from_cache": _build.INFO.from_cache}})
"""
    proc = run_python(code + LAST_JSON, timeout=180)
    runs = result_of(proc)
    assert runs[0]["key"] != runs[1]["key"] and runs[2]["key"] == runs[0]["key"]
    assert [r["from_cache"] for r in runs] == [False, False, True]
    found = entries(cache)
    assert sorted(e.name for e in found) == sorted({runs[0]["key"], runs[1]["key"]})
    metas = {}
    for entry in found:
        meta = json.loads((entry / "meta.json").read_text())  # next to the artefact
        assert meta["key"] == entry.name == _build.cache_key(meta["inputs"])
        artefact = entry / meta["artefact"]
        assert artefact.is_file() and hashlib.sha256(artefact.read_bytes()).hexdigest() == meta["sha256"]
        assert meta["build_seconds"] > 0
        metas[entry.name] = meta
    assert metas[runs[0]["key"]]["inputs"]["cpu_flags"] == " ".join(sorted(HOST_A.split()))
    assert metas[runs[1]["key"]]["inputs"]["cpu_flags"] == " ".join(sorted(HOST_B.split()))


# ---- 4. configuration -------------------------------------------------------


def test_an_unwritable_cache_root_builds_privately_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    root = blocker / "cache"  # root can't write here either: it is under a regular file
    monkeypatch.setenv("ROUNDPIPE_CACHE_DIR", str(root))
    result = import_and_report()
    assert result["native"] and result["private"]
    assert len(result["warnings"]) == 1, result["warnings"]
    (warning,) = result["warnings"]
    assert warning.startswith("RuntimeWarning") and str(root) in warning and "not writable" in warning
    assert "ROUNDPIPE_CACHE_DIR" in warning
    assert not result["root_exists"]  # the private build directory is deleted after loading
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left in TMPDIR


def test_no_cache_builds_privately_and_leaves_nothing(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ROUNDPIPE_NO_CACHE", "1")
    result = import_and_report()
    assert result["native"] and not result["from_cache"] and result["private"]
    assert result["warnings"] == []
    assert not result["root_exists"]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not cache.exists()


# ---- 5. no compiler, or a compile error --------------------------------------

FALLBACK_RUN = """
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import roundpipe.optim as rpo

    def train(cls, **kw):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen).requires_grad_() for n in (1, 17, 1000)]
        opt = cls(params, lr=1e-2, weight_decay=0.1, amsgrad=True, **kw)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().view(torch.int32) for p in params] + [
            s.view(torch.int32) for p in params for s in opt.state[p].values() if s.dim()]

    same = all(torch.equal(a, b) for a, b in zip(train(rpo.Adam), train(torch.optim.Adam, fused=True)))
    same_w = all(torch.equal(a, b) for a, b in zip(train(rpo.AdamW), train(torch.optim.AdamW, fused=True)))
    rpo.Adam([torch.zeros(3, requires_grad=True)])  # more optimizers: still one warning
    native = rpo.native_available()
result = {"native": native, "same": same, "same_w": same_w,
          "warnings": [(w.category.__name__, str(w.message)) for w in caught]}
"""


def _fallback_cases(tmp_path: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    return {
        "CC=/nonexistent": ({"CC": "/nonexistent"}, ["CC='/nonexistent'", "To fix:", "set CC"]),
        "no cc on PATH": ({"PATH": str(empty_bin)}, ["no C compiler found", "To fix:", "apt-get install gcc"]),
        "compile error": ({"CC": make_cc(tmp_path, fail_with="adam.c:1:1: error: simulated failure 7341")},
                          ["compiling the kernel failed", "error: simulated failure 7341",
                           "compilation terminated.", "To fix:"]),
    }


@pytest.mark.parametrize("case", ["CC=/nonexistent", "no cc on PATH", "compile error"])
def test_without_a_working_compiler_adam_falls_back_with_one_warning(case, tmp_path, cache):
    env, must_say = _fallback_cases(tmp_path)[case]
    proc = run_python(FALLBACK_RUN + LAST_JSON, env=env, timeout=180)
    result = result_of(proc)
    assert result["native"] is False
    assert result["same"] and result["same_w"], "the fallback is not torch's fused Adam/AdamW"
    assert len(result["warnings"]) == 1, result["warnings"]
    category, message = result["warnings"][0]
    assert category == "RuntimeWarning"
    assert "torch's fused CPU Adam" in message and "ROUNDPIPE_REQUIRE_NATIVE=1" in message
    for text in must_say:
        assert text in message, (text, message)
    assert not cache.exists() or not entries(cache)


@pytest.mark.parametrize("case", ["CC=/nonexistent", "compile error"])
def test_require_native_turns_the_fallback_into_an_import_error(case, tmp_path):
    env, must_say = _fallback_cases(tmp_path)[case]
    code = """
import json, warnings
result = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for attempt in range(2):  # and again: a caught ImportError must not turn into a silent fallback
        try:
            import roundpipe.optim
            result.append("imported")
        except ImportError as exc:
            result.append(str(exc))
result.append(len(caught))
"""
    proc = run_python(code + LAST_JSON, env={**env, "ROUNDPIPE_REQUIRE_NATIVE": "1"}, timeout=180)
    *errors, n_warnings = result_of(proc)
    assert n_warnings == 0
    for error in errors:
        assert "ROUNDPIPE_REQUIRE_NATIVE=1" in error
        for text in must_say[:2]:
            assert text in error


# ---- 6. one OpenMP runtime ---------------------------------------------------


def test_one_openmp_runtime_is_mapped_after_a_step():
    needs_compiler()
    code = """
import json, os
import torch, roundpipe.optim as rpo
torch.set_num_threads(2)
p = torch.randn(1 << 20, requires_grad=True)
p.grad = torch.randn(1 << 20)
opt = rpo.Adam([p])
opt.step()
names = ("libgomp", "libiomp", "libomp")
mapped = set()
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split(None, 5)
        if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(names):
            mapped.add(os.path.realpath(fields[5].strip()))
result = {"native": rpo.native_available(), "mapped": sorted(mapped),
          "torch_lib": os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))}
"""
    result = result_of(run_python(code + LAST_JSON, timeout=180))
    assert result["native"], "the native kernel did not load: this test would prove nothing"
    assert len(result["mapped"]) == 1, result["mapped"]
    torch_runtimes = [p for p in os.listdir(result["torch_lib"]) if p.startswith(("libgomp", "libiomp", "libomp"))]
    if torch_runtimes:  # the pip wheel ships its own: that one, not the system's
        assert os.path.dirname(result["mapped"][0]) == result["torch_lib"]


def test_the_default_cache_root_is_platformdirs_user_cache(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.delenv("ROUNDPIPE_CACHE_DIR")
    for xdg in (None, str(tmp_path / "xdg")):
        if xdg is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert _build.cache_root() == Path(platformdirs.user_cache_dir("roundpipe"))


# ---- 7. one rule at a time: a cold first step builds the engine and its rule only (issue 23) ----

FIRST_STEP = """
import json, torch
import roundpipe.optim as rpo
from roundpipe import _build
name = NAME
p = torch.nn.Parameter(torch.ones(100))
p.grad = torch.full((100,), 0.5)
opt = getattr(rpo, name)([p], lr=0.1)
opt.step()
result = {"native": opt._kernel is not None, "from_cache": _build.INFO.from_cache, "key": _build.INFO.key,
          "rule": _build.INFO.key_inputs.get("rule"), "moved": bool((p != 1).all())}
"""


def first_step(name: str) -> str:
    return FIRST_STEP.replace("NAME", repr(name)) + LAST_JSON


def test_a_cold_first_step_builds_the_engine_and_its_rule_only(tmp_path, cache, monkeypatch):
    log = tmp_path / "compiles.log"
    monkeypatch.setenv("CC", make_cc(tmp_path, log=log))
    proc = run_python(first_step("SGD"), timeout=180)
    first = result_of(proc)
    assert first["native"] and first["moved"] and not first["from_cache"] and first["rule"] == "sgd"
    compiled = [re.search(r"-c (\S+)", line).group(1) for line in log.read_text().splitlines()]
    assert sorted(Path(c).name for c in compiled) == sorted(
        ["engine.c", "sgd.c", _build.module_name("sgd") + ".c"]), compiled  # not every rule's C
    assert [e.name for e in entries(cache)] == [first["key"]]
    again = result_of(run_python(first_step("SGD"), timeout=180))
    assert again["from_cache"] and again["key"] == first["key"]
    assert len(log.read_text().splitlines()) == 3  # loaded, not rebuilt


def test_after_a_full_build_every_rule_loads_the_one_module(tmp_path, cache, monkeypatch):
    """`python -m roundpipe build` builds every rule into one module, which every optimizer then uses."""
    log = tmp_path / "compiles.log"
    monkeypatch.setenv("CC", make_cc(tmp_path, log=log))
    built = import_and_report()  # native_available(): the module of every rule
    n_compiles = len(log.read_text().splitlines())
    assert n_compiles == len(_build.kernel_sources()) + 1
    for name in ("Adam", "SGD", "Lion"):
        res = result_of(run_python(first_step(name), timeout=180))
        assert res["native"] and res["moved"] and res["from_cache"] and res["rule"] is None
        assert res["key"] == built["key"]
    assert len(log.read_text().splitlines()) == n_compiles  # nothing more was compiled
    assert [e.name for e in entries(cache)] == [built["key"]]


def test_an_unknown_rule_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="no kernel rule 'nope'"):
        _build.load_kernel("nope")
    assert _build._failed is None
