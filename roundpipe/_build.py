"""Build, cache and load the C kernel. The only module that knows about cffi.

The kernel (``_kernels/adam.c``) is compiled for the exact host CPU the first
time it is needed, and the result is cached in a directory named by a hash of
everything that affects the binary (the cache *key*):

* the CPU feature flags (``/proc/cpuinfo``; elsewhere the compiler's
  ``-march=native`` macros),
* the compiler's path and ``--version`` banner, and the compile flags,
* the kernel source and its cdef,
* the Python ABI tag, the cffi version and the OpenMP runtime linked against,
* ``CACHE_VERSION``, bumped to invalidate every entry at once.

A cache entry is ``<root>/<key>/`` holding the extension module and
``meta.json`` (the key's inputs, the artefact's sha256, the build time).

Concurrency and recovery: a build holds an ``fcntl`` lock on
``<root>/<key>.lock``; the kernel drops it when the holder dies, so a killed
build never blocks the next one. A build writes into a private temporary
directory under the root and is moved into place with ``os.replace``: a reader
sees a complete entry or none. An entry whose artefact does not match the
sha256 in its ``meta.json``, or does not load, is moved aside and rebuilt.

Environment:
  ``ROUNDPIPE_CACHE_DIR``      the cache root (default: platformdirs' user cache)
  ``CC``                       the compiler (default: cc, gcc, clang)
  ``ROUNDPIPE_REQUIRE_NATIVE`` 1: fail with ImportError instead of falling back
  ``ROUNDPIPE_NO_CACHE``       1: always build into a private temporary directory
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CACHE_VERSION = "1"
MODULE_NAME = "_roundpipe_adam"
KERNEL_DIR = Path(__file__).resolve().parent / "_kernels"
KERNEL_SOURCE = KERNEL_DIR / "adam.c"
KERNEL_HEADER = KERNEL_DIR / "adam.h"  # doubles as the cffi cdef
LOCK_TIMEOUT_S = 600.0  # a build takes ~1 s; waiting this long means something is wrong
COMPILE_TIMEOUT_S = 300.0

# Flags for compiling adam.c. Each one is there for a reason:
COMPILE_FLAGS = [
    "-O3",
    "-march=native",  # the exact host CPU: the cache key carries its flags
    "-fopenmp",  # threads across chunks (compile step only; see _link_args)
    "-fno-math-errno",  # sqrtf becomes vsqrtps; otherwise no vectorization, ~4x slower
    "-ffp-contract=off",  # no implicit FMA: a*b+c rounds twice, as torch's vector code
    "-fPIC",
    "-std=gnu11",  # _Float16 and __attribute__
    "-fvisibility=hidden",  # export only cffi's PyInit (it marks itself visible)
    "-w",  # cffi's generated wrapper is not warning-clean; the kernel is checked in tests
]
OPENMP_RUNTIME_NAMES = ("libgomp", "libiomp5", "libomp")


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why and how to fix it."""


@dataclass
class KernelInfo:
    """What the last load did: shown by ``python -m roundpipe info``."""

    key: str = ""
    key_inputs: dict[str, Any] = field(default_factory=dict)
    cache_root: str = ""
    artefact: str = ""
    from_cache: bool = False
    build_seconds: float | None = None
    load_seconds: float | None = None
    error: str | None = None


INFO = KernelInfo()
_lock = threading.Lock()
_module: ModuleType | None = None
_failed: BuildError | None = None


# ---- the key ---------------------------------------------------------------


def cpu_flags() -> str:
    """The host CPU's feature flags, as one sorted space-separated string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm64
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    # Elsewhere: what -march=native turns on is exactly what the binary depends on.
    try:
        out = subprocess.run(
            [find_compiler(), "-march=native", "-dM", "-E", "-x", "c", os.devnull],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        return " ".join(sorted(line for line in out.splitlines() if "__" in line))
    except (OSError, subprocess.SubprocessError, BuildError):
        return platform.machine() + " " + platform.processor()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find_compiler() -> str:
    """The C compiler: $CC if set, else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC")
    candidates = [cc.split()[0]] if cc else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    if cc:
        raise BuildError(f"CC={cc!r} is not an executable on PATH; set CC to a C compiler")
    raise BuildError(
        "no C compiler found (tried cc, gcc, clang); install one "
        "(e.g. `apt-get install gcc`) or set CC to its path"
    )


def compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"the compiler {cc} does not run: {exc}; set CC to a working C compiler") from exc
    return out.stdout.splitlines()[0] if out.stdout else f"unknown (exit {out.returncode})"


def openmp_runtime() -> str | None:
    """The OpenMP runtime already mapped into this process (torch's), if any.

    Linking the kernel against that exact file makes the dynamic loader reuse
    it, so the process has one thread pool and one OMP_NUM_THREADS, not two
    runtimes fighting over the cores.
    """
    import torch  # noqa: F401  (loads torch's runtime)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if os.path.basename(path).startswith(OPENMP_RUNTIME_NAMES) and ".so" in path:
                    return path
    except OSError:
        pass
    return None


def key_inputs(cc: str | None = None) -> dict[str, Any]:
    """Everything that affects the built binary."""
    cc = cc or find_compiler()
    source = KERNEL_SOURCE.read_bytes() + KERNEL_HEADER.read_bytes()
    import cffi

    return {
        "cache_version": CACHE_VERSION,
        "cpu_flags": cpu_flags(),
        "compiler": cc,
        "compiler_version": compiler_version(cc),
        "compile_flags": COMPILE_FLAGS,
        "source_sha256": hashlib.sha256(source).hexdigest(),
        "python_abi": sys.implementation.cache_tag + " " + importlib.machinery.EXTENSION_SUFFIXES[0],
        "cffi_version": cffi.__version__,
        "openmp_runtime": openmp_runtime(),
        "machine": platform.machine(),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def cache_root() -> Path:
    env = os.environ.get("ROUNDPIPE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("roundpipe"))


# ---- compile ---------------------------------------------------------------


def _emit_c(path: Path) -> None:
    """cffi out-of-line API mode: the Python wrapper around adam.c, as C source."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(KERNEL_HEADER.read_text())
    ffi.set_source(MODULE_NAME, '#include "adam.c"')
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "generating ..."
        ffi.emit_c_code(str(path))  # writes a file; unlike ffi.compile, no os.chdir


def _link_args(runtime: str | None) -> list[str]:
    if runtime:  # link by path: DT_NEEDED is the soname torch already loaded
        return [runtime, "-Wl,-rpath," + os.path.dirname(runtime)]
    return ["-fopenmp"]  # no runtime loaded yet: the compiler's own


def compile_kernel(workdir: Path, cc: str, runtime: str | None) -> Path:
    """Compile the extension module into workdir and return its path."""
    c_file = workdir / (MODULE_NAME + ".c")
    obj = workdir / (MODULE_NAME + ".o")
    out = workdir / (MODULE_NAME + importlib.machinery.EXTENSION_SUFFIXES[0])
    _emit_c(c_file)
    includes = ["-I" + str(KERNEL_DIR), "-I" + sysconfig.get_paths()["include"]]
    cmds = [
        [cc, *COMPILE_FLAGS, *includes, "-c", str(c_file), "-o", str(obj)],
        [cc, "-shared", str(obj), "-o", str(out), *_link_args(runtime), "-lm"],
    ]
    for cmd in cmds:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BuildError(f"could not run {cmd[0]}: {exc}; set CC to a working C compiler") from exc
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-12:])
            raise BuildError(
                f"compiling the kernel failed (exit {res.returncode}):\n  {' '.join(cmd)}\n{tail}\n"
                "Install a C compiler with OpenMP (gcc) and the Python headers, or set CC."
            )
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _valid_entry(entry: Path, key: str) -> Path | None:
    """The artefact of a complete, intact cache entry, or None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        artefact = entry / meta["artefact"]
        if meta.get("key") == key and _sha256(artefact) == meta["sha256"]:
            return artefact
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _discard(entry: Path) -> None:
    """Move a broken entry aside (atomically) and delete it; loaded copies stay mapped."""
    if entry.exists():
        trash = entry.with_name(f"{entry.name}.broken-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.replace(entry, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)


class _FileLock:
    """An fcntl lock: released by the kernel when its holder dies, never stale."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout, self.fd = path, timeout, -1

    def __enter__(self) -> "_FileLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise BuildError(
                        f"waited {self.timeout:.0f}s for the build lock {self.path}; a process "
                        "holding it is stuck. Kill it, or set ROUNDPIPE_CACHE_DIR elsewhere."
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _writable_root() -> Path:
    """The cache root, or a private temporary one (with one warning) if it is not writable."""
    root = cache_root()
    if os.environ.get("ROUNDPIPE_NO_CACHE") == "1":
        return Path(tempfile.mkdtemp(prefix="roundpipe-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")
        probe.close()
        return root
    except OSError as exc:
        private = Path(tempfile.mkdtemp(prefix="roundpipe-"))
        warnings.warn(
            f"roundpipe: the kernel cache {root} is not writable ({exc.strerror}); building in "
            f"{private} for this process only. Set ROUNDPIPE_CACHE_DIR to a writable directory.",
            RuntimeWarning,
            stacklevel=4,
        )
        return private


def build_and_load(force: bool = False) -> ModuleType:
    """Load the kernel for this host from the cache, building it first if needed."""
    t0 = time.perf_counter()
    cc = find_compiler()
    inputs = key_inputs(cc)
    key = cache_key(inputs)
    root = _writable_root()
    entry = root / key
    INFO.key, INFO.key_inputs, INFO.cache_root = key, inputs, str(root)
    if force:
        with _FileLock(root / (key + ".lock"), LOCK_TIMEOUT_S):
            _discard(entry)
    for attempt in range(2):
        artefact = _valid_entry(entry, key)
        if artefact is None:
            with _FileLock(root / (key + ".lock"), LOCK_TIMEOUT_S):
                artefact = _valid_entry(entry, key)  # another process may have built it meanwhile
                if artefact is None:
                    _discard(entry)
                    _build_entry(root, entry, key, inputs, cc)
                    artefact = _valid_entry(entry, key)
                    if artefact is None:
                        raise BuildError(f"the freshly built cache entry {entry} does not verify")
                else:
                    INFO.from_cache = True
        else:
            INFO.from_cache = True
            INFO.build_seconds = _recorded_build_seconds(entry)
        try:
            module = _load(artefact)
        except ImportError as exc:  # truncated or foreign binary that still hashed right
            if attempt == 1:
                raise BuildError(f"the kernel {artefact} does not load: {exc}") from exc
            with _FileLock(root / (key + ".lock"), LOCK_TIMEOUT_S):
                _discard(entry)
            continue
        INFO.artefact = str(artefact)
        INFO.load_seconds = time.perf_counter() - t0
        return module
    raise BuildError("unreachable")


def _recorded_build_seconds(entry: Path) -> float | None:
    try:
        return float(json.loads((entry / "meta.json").read_text())["build_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_entry(root: Path, entry: Path, key: str, inputs: dict[str, Any], cc: str) -> None:
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:8]}-", dir=root))
    try:
        artefact = compile_kernel(work, cc, inputs["openmp_runtime"])
        for scratch in work.iterdir():
            if scratch != artefact:
                scratch.unlink()
        seconds = time.perf_counter() - t0
        meta = {
            "key": key,
            "inputs": inputs,
            "artefact": artefact.name,
            "sha256": _sha256(artefact),
            "build_seconds": round(seconds, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(work, entry)  # atomic: the entry appears complete or not at all
        INFO.from_cache = False
        INFO.build_seconds = seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_kernel() -> ModuleType | None:
    """The compiled kernel module, or None (with one RuntimeWarning) if it can't be had.

    With ROUNDPIPE_REQUIRE_NATIVE=1 a failure raises ImportError instead.
    """
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        try:
            _module = build_and_load()
        except (BuildError, OSError) as exc:
            _failed = exc if isinstance(exc, BuildError) else BuildError(str(exc))
            INFO.error = str(_failed)
            if os.environ.get("ROUNDPIPE_REQUIRE_NATIVE") == "1":
                raise ImportError(f"roundpipe: native kernel unavailable (ROUNDPIPE_REQUIRE_NATIVE=1): {_failed}") from exc
            warnings.warn(
                f"roundpipe: the native Adam kernel is unavailable, so roundpipe.optim.Adam runs "
                f"torch's fused CPU Adam instead (same results, less speed).\nReason: {_failed}",
                RuntimeWarning,
                stacklevel=3,
            )
        return _module
