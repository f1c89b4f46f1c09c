"""Build, cache and load the C kernels. The only module that knows about cffi.

The kernels (``_kernels/engine.c`` and one ``NAME.c`` per update rule) are compiled
for the exact host CPU the first time they are needed, and the result is cached in a
directory named by a hash of everything that affects the binary (the cache *key*).
An optimizer needs only the engine and its own rule: its first construction builds
that pair as a module of its own (``load_kernel("sgd")``), so a cold first step
compiles two C files, however many rules there are. ``python -m roundpipe build``
(and ``native_available()``) build the module of every rule, which then serves
every optimizer. The key covers:

* the CPU feature flags (``/proc/cpuinfo``; elsewhere the compiler's
  ``-march=native`` macros) and the machine type,
* the compiler command and its ``--version`` banner, the compile and link flags,
* the kernel source and its cdef (every header, and the module's C files),
* the Python ABI tag, the cffi version and the OpenMP runtime linked against,
* ``CACHE_VERSION``, bumped to invalidate every entry at once.

A cache entry is ``<root>/<key>/`` holding the extension module and
``meta.json`` (the key's inputs, the artefact's sha256, the build time), so a
person can diff two entries' inputs to see why a rebuild happened.

Concurrency and recovery:

* Loading an intact entry takes no lock and writes nothing: a prebuilt cache
  (``python -m roundpipe build`` in a container image) works read-only.
* A build holds an ``fcntl`` lock on ``<root>/<key>.lock``. The kernel drops it
  when the holder dies, so a killed build never blocks the next one; the next
  holder sweeps what the dead one left behind.
* A build writes into a private temporary directory under the root and is
  moved into place with ``os.replace``: a reader sees a complete entry or none.
* An entry whose artefact does not match the sha256 in its ``meta.json``, or
  does not load, is moved aside and rebuilt.

Trust (the sha256 guards against corruption, not against a writer: anyone can
compute the key and the hash). Loading a module runs its code, so an entry is
loaded only when its directory, its ``meta.json`` and its artefact are all

* owned by this process's user or by root,
* writable by neither group nor others,
* a real directory and regular files, not symbolic links.

Anything else is skipped without being touched (it may be someone else's),
with one RuntimeWarning saying whose it is and what is wrong, and the kernel is
built in a private temporary directory, as for an unwritable root. A root that
is itself world-writable and sticky (like ``/tmp``) is fine. New entries are
written to pass: directory 0755, ``meta.json`` 0644, artefact 0755, whatever
the umask. See ``_open_entry`` for how the check and the load see the same file.

Environment:
  ``ROUNDPIPE_CACHE_DIR``      the cache root (default: platformdirs' user cache)
  ``CC``                       the compiler, with optional arguments (default: cc, gcc, clang)
  ``ROUNDPIPE_REQUIRE_NATIVE`` 1: fail with ImportError instead of falling back
  ``ROUNDPIPE_NO_CACHE``       1: build into a private temporary directory, deleted after loading
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import stat
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
from typing import Any, cast

try:
    import fcntl
except ImportError:  # Windows: no fcntl; the build fails and Adam falls back to torch's
    fcntl = None  # type: ignore[assignment]

CACHE_VERSION = "2"
MODULE_NAME = "_roundpipe_kernels"
KERNEL_DIR = Path(__file__).resolve().parent / "_kernels"
# The engine's C (engine.c, with runner.h inlined into every rule) and one file per update
# rule, each NAME.c with its interface in NAME.h. A new rule's files are picked up here.
ENGINE_SOURCE = KERNEL_DIR / "engine.c"
ENGINE_HEADER = KERNEL_DIR / "engine.h"
KERNEL_SOURCE = KERNEL_DIR / "adam.c"  # Adam's rule (tests compile it alone)
KERNEL_HEADER = KERNEL_DIR / "adam.h"
COMPILE_TIMEOUT_S = 240.0  # per compiler command; a build takes ~1 s
LOCK_TIMEOUT_S = 600.0  # > compile + link: waiting longer means the holder is stuck
CPUINFO = "/proc/cpuinfo"  # the CPU flag source on Linux (tests point it at fakes)

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
_KEY_RE = re.compile(r"[0-9a-f]{32}")
ROOT_UID = 0
# Opening a cache file or directory: never through a symbolic link (O_NOFOLLOW
# refuses one as the last component), not inherited by exec'd children.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_OPEN = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_TRUE = ("1", "true", "yes", "on")


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded.

    ``reason`` is one line saying what went wrong, ``details`` the last lines of
    the compiler's output (if any), ``fix`` one line saying how to fix it.
    """

    def __init__(self, reason: str, *, details: str = "", fix: str = "") -> None:
        self.reason, self.details, self.fix = reason, details.strip(), fix
        parts = [reason, self.details, f"To fix: {fix}" if fix else ""]
        super().__init__("\n".join(p for p in parts if p))

    def one_line(self) -> str:
        """The reason, the compiler's most telling line and the fix, on one line."""
        lines = [ln.strip() for ln in self.details.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        telling = (errors or lines or [""])[-1]
        text = self.reason + (f": {telling}" if telling else "")
        return text + (f"; to fix: {self.fix}" if self.fix else "")


@dataclass
class KernelInfo:
    """What the last load did: shown by ``python -m roundpipe info``."""

    key: str = ""
    key_inputs: dict[str, Any] = field(default_factory=dict)
    cache_root: str = ""
    private_root: bool = False  # built in a temporary directory, deleted after loading
    artefact: str = ""
    from_cache: bool = False
    build_seconds: float | None = None
    load_seconds: float | None = None
    error: str | None = None
    owner: int | None = None  # the uid owning the artefact loaded (which passed the trust check)
    untrusted: str | None = None  # the entry skipped as untrusted, and why


INFO = KernelInfo()
_lock = threading.Lock()
_module: ModuleType | None = None  # the module of every rule, once loaded
_rule_modules: dict[str, ModuleType] = {}  # modules of one rule each, built on first use
_failed: BuildError | None = None  # the first build that failed: every later load falls back at once
_pinned_fds: list[int] = []  # the loaded artefacts, kept open: see _load


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


# ---- the key ---------------------------------------------------------------


def cpu_flags() -> str:
    """The host CPU's feature flags, as one sorted space-separated string."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, arm64
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    # Elsewhere: what -march=native turns on is exactly what the binary depends on.
    macros = native_macros()
    if macros:
        return " ".join(sorted(macros))
    return platform.machine() + " " + platform.processor()


def native_macros() -> dict[str, str]:
    """The macros the compiler predefines under -march=native ({} without a compiler)."""
    try:
        out = subprocess.run(
            [*compiler_command(), "-march=native", "-dM", "-E", "-x", "c", os.devnull],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError, BuildError):
        return {}
    macros = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] == "#define":
            macros[parts[1]] = parts[2] if len(parts) == 3 else ""
    return macros


def cpu_model() -> str:
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_NO_COMPILER_FIX = "install a C compiler with OpenMP (e.g. `apt-get install gcc`), or set CC to one"


def compiler_command() -> list[str]:
    """The C compiler as an argv prefix: $CC (which may carry arguments) or cc, gcc, clang."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            argv = shlex.split(cc)
        except ValueError as exc:
            raise BuildError(f"CC={cc!r} cannot be parsed ({exc})", fix=_NO_COMPILER_FIX) from None
        path = shutil.which(argv[0])
        if path is None:
            raise BuildError(f"CC={cc!r}: {argv[0]} is not an executable file, nor on PATH",
                             fix=_NO_COMPILER_FIX)
        return [path, *argv[1:]]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise BuildError("no C compiler found (tried cc, gcc and clang on PATH)", fix=_NO_COMPILER_FIX)


def find_compiler() -> str:
    """The compiler command as one string (for display)."""
    return shlex.join(compiler_command())


def compiler_version(cc: list[str]) -> str:
    """The compiler's identity: the first line of ``--version`` and its ``Name: value`` lines.

    gcc: "cc (Debian 12.2.0-14) 12.2.0"; clang adds "Target: ...", "Thread model: ...".
    """
    try:
        res = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"the compiler {shlex.join(cc)} does not run ({exc})", fix=_NO_COMPILER_FIX) from None
    lines = [line.strip() for line in res.stdout.splitlines() if line.strip()]
    banner = lines[:1] + [ln for ln in lines[1:] if ": " in ln and not ln.startswith("Copyright")]
    return "\n".join(banner) or f"unknown (`--version` exited {res.returncode})"


def openmp_runtime() -> str | None:
    """The OpenMP runtime already mapped into this process (torch's), if any.

    Linking the kernel against that exact file makes the dynamic loader reuse
    it, so the process has one thread pool and one OMP_NUM_THREADS, not two
    runtimes fighting over the cores.
    """
    import torch  # noqa: F401  (loads torch's runtime)

    found = openmp_runtimes_mapped()
    return found[0] if found else None


def openmp_runtimes_mapped() -> list[str]:
    """Every OpenMP runtime file mapped into this process, in /proc/self/maps order."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) < 6:
                    continue
                path = fields[5].strip()
                if os.path.basename(path).startswith(OPENMP_RUNTIME_NAMES) and ".so" in path:
                    if path not in found:
                        found.append(path)
    except OSError:
        pass
    return found


def _link_args(runtime: str | None) -> list[str]:
    # macOS: Python's symbols resolve when the module is loaded, not at link time.
    darwin = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    if runtime:  # link by path: DT_NEEDED is the soname torch already loaded
        return [runtime, "-Wl,-rpath," + os.path.dirname(runtime), "-lm", *darwin]
    return ["-fopenmp", "-lm", *darwin]  # no runtime loaded yet: the compiler's own


def rules() -> list[str]:
    """The update rules under _kernels, by file name (adam, sgd, ...): one NAME.c and NAME.h each."""
    return sorted(p.stem for p in KERNEL_DIR.glob("*.c") if p != ENGINE_SOURCE)


def _check_rule(rule: str | None) -> None:
    if rule is not None and rule not in rules():
        raise ValueError(f"roundpipe has no kernel rule {rule!r}; the rules are {', '.join(rules())}")


def kernel_sources(rule: str | None = None) -> list[Path]:
    """The C files of a module: the engine's first, then every rule's in name order, or one rule's."""
    _check_rule(rule)
    return [ENGINE_SOURCE, *(KERNEL_DIR / f"{r}.c" for r in ([rule] if rule else rules()))]


def cdef_headers(rule: str | None = None) -> list[Path]:
    """The headers cffi's cdef reads: the engine's, then each rule's NAME.h beside its NAME.c."""
    return [ENGINE_HEADER, *(p.with_suffix(".h") for p in kernel_sources(rule)[1:])]


def cffi_source(rule: str | None = None) -> str:
    """What cffi's generated wrapper compiles: the declarations only; the code is linked in."""
    return "".join(f'#include "{h.name}"\n' for h in cdef_headers(rule))


def module_name(rule: str | None = None) -> str:
    """The extension module's name: every rule in one, or the engine and one rule (``_rule``)."""
    return MODULE_NAME if rule is None else f"{MODULE_NAME}_{rule}"


def key_inputs(cc: list[str] | None = None, rule: str | None = None) -> dict[str, Any]:
    """Everything that affects the built binary: of the module with every rule, or of one rule's."""
    cc = cc or compiler_command()
    import _cffi_backend  # the extension cffi's modules load; cffi checks its version equals cffi's

    source = hashlib.sha256()
    # every header (any may be included) and the module's C files: all of them, or engine.c and the rule's
    files = sorted(p for p in KERNEL_DIR.iterdir() if p.suffix == ".h" or (p.suffix == ".c" and (
        rule is None or p in kernel_sources(rule))))
    for part in (*(f.name.encode() + b"\0" + f.read_bytes() for f in files), cffi_source(rule).encode()):
        source.update(hashlib.sha256(part).digest())
    runtime = openmp_runtime()
    one_rule = {} if rule is None else {"rule": rule}  # the module of every rule keeps its key's inputs
    return {
        **one_rule,
        "cache_version": CACHE_VERSION,
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "compiler": shlex.join(cc),
        "compiler_version": compiler_version(cc),
        "compile_flags": COMPILE_FLAGS,
        "link_flags": _link_args(runtime),
        "source_sha256": source.hexdigest(),  # every .c and .h under _kernels, cffi's wrapper source
        "python_abi": sys.implementation.cache_tag + " " + importlib.machinery.EXTENSION_SUFFIXES[0],
        "cffi_version": _cffi_backend.__version__,
        "openmp_runtime": runtime,
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def cache_root() -> Path:
    env = os.environ.get("ROUNDPIPE_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("linux"):  # platformdirs' answer, without its import on the warm path
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        return Path(xdg or os.path.expanduser("~/.cache")) / "roundpipe"
    import platformdirs

    return Path(platformdirs.user_cache_dir("roundpipe"))


# ---- compile ---------------------------------------------------------------


def _emit_c(path: Path, rule: str | None = None) -> None:
    """cffi out-of-line API mode: the Python wrapper around the kernels' declarations, as C source."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef("\n".join(h.read_text() for h in cdef_headers(rule)))
    ffi.set_source(module_name(rule), cffi_source(rule))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "generating ..."
        ffi.emit_c_code(str(path))  # writes a file; unlike ffi.compile, no os.chdir


def _compiler_failed(cmd: list[str], res: subprocess.CompletedProcess | None, exc: BaseException | None) -> BuildError:
    if isinstance(exc, subprocess.TimeoutExpired):
        return BuildError(f"the compiler ran over {COMPILE_TIMEOUT_S:.0f} s: {shlex.join(cmd)}",
                          fix="check that CC is a working C compiler")
    if exc is not None or res is None:
        return BuildError(f"could not run {cmd[0]} ({exc})", fix=_NO_COMPILER_FIX)
    output = (res.stderr.strip() + "\n" + res.stdout.strip()).strip()
    return BuildError(
        f"compiling the kernel failed ({cmd[0]} exited {res.returncode})",
        details="\n".join(output.splitlines()[-12:]) or "(the compiler printed nothing)",
        fix="install gcc with OpenMP and the Python headers (e.g. `apt-get install gcc "
        "python3-dev`), or set CC to a working C compiler",
    )


def _run_all(cmds: list[list[str]], workdir: Path) -> None:
    """Run compiler commands side by side (one per core at most); raise the first failure."""
    def run(cmd: list[str]) -> BuildError | None:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            return _compiler_failed(cmd, None, exc)
        return None if res.returncode == 0 else _compiler_failed(cmd, res, None)

    workers = max(1, min(len(cmds), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # threads wait on processes: no GIL work
        errors = [e for e in pool.map(run, cmds) if e is not None]
    if errors:
        raise errors[0]


def compile_kernel(workdir: Path, cc: list[str], link_flags: list[str], rule: str | None = None) -> Path:
    """Compile the extension module (every rule, or the engine and one rule) into workdir; return its path.

    Each C file is its own translation unit, compiled in parallel (the build is most of a
    cold first step); cffi's wrapper holds only the declarations, and the link joins them.
    """
    name = module_name(rule)
    c_file = workdir / (name + ".c")
    out = workdir / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    _emit_c(c_file, rule)
    includes = ["-I" + str(KERNEL_DIR), "-I" + sysconfig.get_paths()["include"]]
    sources = [c_file, *kernel_sources(rule)]
    objects = [workdir / f"{i}-{src.stem}.o" for i, src in enumerate(sources)]
    _run_all([[*cc, *COMPILE_FLAGS, *includes, "-c", str(src), "-o", str(obj)]
              for src, obj in zip(sources, objects, strict=True)], workdir)
    _run_all([[*cc, "-shared", *map(str, objects), "-o", str(out), *link_flags]], workdir)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- trust -----------------------------------------------------------------
#
# Why check through file descriptors: a check by path followed by a load by
# path leaves a window in which whoever can write the cache root (anyone, for a
# shared one) could rename our checked entry away and put theirs in its place.
# So the entry directory is opened (O_NOFOLLOW), fstat'ed and checked first.
# Once that directory is known to be writable only by us or root, nobody else
# can add, replace or rename anything inside it, so opening meta.json and the
# artefact relative to that directory's fd (O_NOFOLLOW again) gets the files
# that are really in it. The artefact is fstat'ed, checked and hashed from its
# fd, and dlopen'ed through /proc/self/fd/N: the kernel resolves that to the
# very file the fd holds, whatever has happened to the names since. The file is
# owned by us or root and not writable by others, so its bytes cannot change
# either. Where /proc is missing (macOS, some sandboxes) the load is by path,
# after the same checks: sound where others cannot rename our entry or the
# directories above it (a sticky root like /tmp, in a parent that only its
# owner can write), not in a world-writable root without the sticky bit.


class _Untrusted(Exception):
    """A cache entry that someone other than us or root could have written."""

    def __init__(self, problems: list[str], entry: Path | None = None) -> None:
        self.problems, self.entry = problems, entry
        super().__init__("; ".join(problems))

    def describe(self) -> str:
        return f"{self.entry}: {'; '.join(self.problems)}"


def _trusted_uids() -> frozenset[int]:
    """Whose files the cache may load: this process's effective user and root.

    Tests replace this to make their own files look like someone else's (or root's).
    """
    return frozenset((os.geteuid(), ROOT_UID))


def _uid_name(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _problems(st: os.stat_result, what: str, owners: frozenset[int], directory: bool) -> list[str]:
    """What makes this file or directory untrustworthy ([] if nothing)."""
    problems = []
    if stat.S_ISLNK(st.st_mode):
        problems.append(f"{what} is a symbolic link")
    elif not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        problems.append(f"{what} is a file, not a directory" if directory else f"{what} is not a regular file")
    if st.st_uid not in owners:
        problems.append(f"{what} is owned by {_uid_name(st.st_uid)}")
    writers = [who for bit, who in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writers:
        problems.append(f"{what} is writable by {' and '.join(writers)}")
    return problems


def _open_checked(name: str, what: str, owners: frozenset[int], directory: bool,
                  dir_fd: int | None = None) -> int | None:
    """Open name (relative to dir_fd) without following a symlink, and check it.

    Returns the fd; None if it is missing or cannot be opened but has nothing
    wrong with it (then it is ours and may be rebuilt). Raises _Untrusted.
    """
    # O_NONBLOCK: a FIFO planted as a file must not hang the open (no effect on regular files).
    flags = _O_OPEN | (os.O_DIRECTORY if directory else os.O_NONBLOCK)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: a symlink; ENOTDIR: not a directory; EACCES: not ours to read
        try:
            problems = _problems(os.lstat(name, dir_fd=dir_fd), what, owners, directory)
        except OSError:
            return None
        if problems:
            raise _Untrusted(problems) from None
        return None
    problems = _problems(os.fstat(fd), what, owners, directory)
    if problems:
        os.close(fd)
        raise _Untrusted(problems)
    return fd


@dataclass
class _Found:
    """A complete, intact, trusted cache entry."""

    artefact: Path
    meta: dict[str, Any]
    fd: int  # the artefact that was checked and hashed, still open: load this one


def _open_entry(entry: Path, key: str, owners: frozenset[int]) -> _Found | None:
    """The entry's artefact (open) and meta if it is complete, intact and trusted.

    None if it is missing or corrupt (and ours: it may be rebuilt in place).
    Raises _Untrusted, having touched nothing, if any part of it is a symlink,
    owned by someone not in owners, or writable by group or others.
    """
    try:
        dir_fd = _open_checked(str(entry), "the directory", owners, directory=True)
        if dir_fd is None:
            return None
        try:
            meta_fd = _open_checked("meta.json", "meta.json", owners, False, dir_fd)
            if meta_fd is None:
                return None
            try:
                with open(meta_fd, "rb") as f:  # closes meta_fd
                    meta = json.loads(f.read())
                name, sha256 = meta["artefact"], meta["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            if meta.get("key") != key or not isinstance(name, str) or name in ("", ".", "..") or "/" in name:
                return None  # the artefact must be a plain name inside this directory
            fd = _open_checked(name, name, owners, False, dir_fd)
            if fd is None:
                return None
            try:
                with open(fd, "rb", closefd=False) as f:
                    intact = hashlib.sha256(f.read()).hexdigest() == sha256
            except OSError:
                intact = False
            if not intact:
                os.close(fd)
                return None
            return _Found(entry / name, meta, fd)
        finally:
            os.close(dir_fd)
    except _Untrusted as exc:
        exc.entry = entry
        raise


def _load(found: _Found, name: str = MODULE_NAME) -> ModuleType:
    """Load the module from the checked file itself (see the trust notes above).

    The fd stays open afterwards: Python caches single-phase extension modules
    by path, so a /proc/self/fd/N name must never come to mean another file.
    """
    path = f"/proc/self/fd/{found.fd}"
    try:
        if not os.path.exists(path):  # no /proc: by name, checked just before
            path = str(found.artefact)
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        if spec is None:
            raise ImportError(f"cannot load {found.artefact}")
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except BaseException:
        os.close(found.fd)
        raise
    module.__file__ = str(found.artefact)  # for people; the loader used the fd
    _pinned_fds.append(found.fd)
    return module


def _discard(entry: Path) -> None:
    """Move an entry aside (atomically) and delete it; copies already loaded stay mapped.

    Called only under the key's lock.
    """
    if os.path.lexists(entry):
        trash = entry.with_name(f"{entry.name}.broken-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _sweep(root: Path, key: str) -> None:
    """Delete what builders of this key killed mid-way left behind (under the key's lock).

    Only what we or root own: in a shared root, other users' leftovers are theirs.
    """
    owners = _trusted_uids()
    for stale in [*root.glob(f".build-{key}-*"), *root.glob(f"{key}.broken-*")]:
        with contextlib.suppress(OSError):
            if os.lstat(stale).st_uid in owners:
                shutil.rmtree(stale, ignore_errors=True)


def _no_fcntl() -> BuildError:
    return BuildError("building the kernel needs fcntl file locks, which this platform lacks",
                      fix="use Linux or macOS; roundpipe.optim.Adam works here as torch's fused Adam")


class _FileLock:
    """An fcntl lock: released by the kernel when its holder dies, never stale."""

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_S) -> None:
        self.path, self.timeout, self.fd = path, timeout, -1

    def __enter__(self) -> _FileLock:
        if fcntl is None:
            raise _no_fcntl()
        deadline = time.monotonic() + self.timeout
        while True:
            try:  # O_NOFOLLOW: in a shared root, a lock "file" may be someone's symlink
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise BuildError(f"cannot open the build lock {self.path} ({exc.strerror or exc})",
                                 fix="remove it, or set ROUNDPIPE_CACHE_DIR to a directory of your own") from None
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise BuildError(
                                f"waited {self.timeout:.0f} s for the build lock {self.path}, held by "
                                f"{self._holder(fd)}",
                                fix="kill that process if it is stuck, or set ROUNDPIPE_CACHE_DIR elsewhere",
                            ) from None
                        time.sleep(0.05)
                # `clean` deletes lock files while holding them: if ours was deleted,
                # lock the one now at the path instead.
                try:
                    st, cur = os.fstat(fd), os.lstat(self.path)
                    same = (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)
                except FileNotFoundError:
                    same = False
                if same:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
                    self.fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _unwritable(root: Path) -> OSError | None:
    """None if builds can be written under root, else the error that says why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as exc:
        return exc
    return None


def build_and_load(force: bool = False, allow_private: bool = True, rule: str | None = None,
                   cached_only: bool = False) -> ModuleType | None:
    """Load the kernel for this host from the cache, building it first if needed.

    force: rebuild even if the cache holds an intact entry.
    allow_private: if the cache root is not writable, or its entry for this
    host is not trusted, build in a temporary directory (with one
    RuntimeWarning) instead of raising BuildError.
    rule: the module of the engine and that one rule (``adam``, ``sgd``, ...);
    None: the module of every rule.
    cached_only: load an intact, trusted entry if there is one, else return None
    (build nothing, warn nothing, touch nothing); _Untrusted if it is not trusted.
    """
    t0 = time.perf_counter()
    cc = compiler_command()
    inputs = key_inputs(cc, rule)
    key = cache_key(inputs)
    root = cache_root()
    INFO.key, INFO.key_inputs, INFO.cache_root, INFO.private_root = key, inputs, str(root), False
    INFO.untrusted = None
    if fcntl is None:  # Windows: no locks, and no uids for the trust check either
        raise _no_fcntl()
    private: Path | None = None
    try:
        if _env_flag("ROUNDPIPE_NO_CACHE"):
            private = root = Path(tempfile.mkdtemp(prefix="roundpipe-"))
        else:
            owners = _trusted_uids()
            try:
                if cached_only:  # (an untrusted entry raises _Untrusted, having touched nothing)
                    found = _open_entry(root / key, key, owners)
                    if found is None:
                        return None
                    try:
                        module = _load(found, module_name(rule))
                    except ImportError:
                        return None
                    _loaded(found, True, t0)
                    return module
                if not force:
                    # The warm path: an intact, trusted entry loads without a lock or a write.
                    found = _open_entry(root / key, key, owners)
                    if found is not None:
                        try:
                            module = _load(found, module_name(rule))
                        except ImportError:  # hashed right, does not load: rebuild it below
                            force = True
                        else:
                            _loaded(found, True, t0)
                            return module
                error = _unwritable(root)
                if error is None:
                    return _build_or_reuse(root, key, inputs, cc, force, t0, owners, rule)
                why = error.strerror or str(error)
                if not allow_private:
                    raise BuildError(f"the cache directory {root} is not writable ({why})",
                                     fix="set ROUNDPIPE_CACHE_DIR to a writable directory")
                problem = f"the kernel cache {root} is not writable ({why})"
                fix = "Set ROUNDPIPE_CACHE_DIR to a writable directory."
            except _Untrusted as exc:  # raised before anything of that entry was touched
                INFO.untrusted = exc.describe()
                remedy = ("have that entry removed (by its owner or root), or set ROUNDPIPE_CACHE_DIR "
                          "to a directory of your own")
                if not allow_private:
                    raise BuildError(f"the kernel cache entry {exc.describe()}, so it is not trusted",
                                     fix=remedy) from None
                fix = f"To use the cache, {remedy}."
                problem = (f"not loading the kernel cache entry {exc.describe()}: only entries owned by "
                           "you or root and writable by no one else are loaded. It was left as is")
            private = root = Path(tempfile.mkdtemp(prefix="roundpipe-"))
            warnings.warn(
                f"roundpipe: {problem}; building the kernel in {private} for this process only. {fix}",
                RuntimeWarning,
                stacklevel=4,
            )
        INFO.cache_root, INFO.private_root = str(root), True
        # A private directory is ours alone (mkdtemp: mode 0700): trust only this process's user there.
        return _build_or_reuse(root, key, inputs, cc, force, t0, frozenset((os.geteuid(),)), rule)
    finally:
        if private is not None:  # the loaded module stays mapped; nothing leaks
            shutil.rmtree(private, ignore_errors=True)


def _build_or_reuse(root: Path, key: str, inputs: dict[str, Any], cc: list[str], force: bool,
                    t0: float, owners: frozenset[int], rule: str | None = None) -> ModuleType:
    entry, rebuild = root / key, force
    for attempt in range(2):
        with _FileLock(root / f"{key}.lock"):
            _sweep(root, key)
            # Maybe another process built it meanwhile. Checked even when rebuilding:
            # an entry that is not ours (_Untrusted) must not be discarded either.
            found = _open_entry(entry, key, owners)
            if found is not None and rebuild:
                os.close(found.fd)
                found = None
            from_cache = found is not None
            if found is None:
                _discard(entry)
                _build_entry(root, entry, key, inputs, cc, rule)
                # Checked like any entry: in a shared root, the moment between
                # os.replace and the load is one where others could swap it.
                found = _open_entry(entry, key, owners)
                if found is None:
                    raise BuildError(f"the freshly built kernel {entry} vanished or changed before it was loaded",
                                     fix="check that nothing else deletes files under ROUNDPIPE_CACHE_DIR")
        try:
            module = _load(found, module_name(rule))
        except ImportError as exc:  # a corrupt or foreign binary that still hashed right
            if attempt == 1:
                raise BuildError(f"the freshly built kernel {found.artefact} does not load ({exc})",
                                 fix="check that CC builds for this Python") from None
            rebuild = True
            continue
        _loaded(found, from_cache, t0)
        return module
    raise BuildError(f"the kernel {entry} does not load")  # not reached: attempt 1 returns or raises


def _loaded(found: _Found, from_cache: bool, t0: float) -> None:
    build_seconds = found.meta.get("build_seconds")
    INFO.artefact, INFO.from_cache = str(found.artefact), from_cache
    INFO.build_seconds = float(build_seconds) if isinstance(build_seconds, (int, float)) else None
    INFO.load_seconds = time.perf_counter() - t0
    try:
        INFO.owner = os.fstat(found.fd).st_uid  # no name lookup here: NSS can be slow; `info` does it
    except OSError:
        INFO.owner = None


def _build_entry(root: Path, entry: Path, key: str, inputs: dict[str, Any],
                 cc: list[str], rule: str | None = None) -> tuple[Path, float]:
    """Compile into a private directory under root, then move it into place.

    Modes are set explicitly, whatever the umask, so that the entry passes the
    trust check (no group or other write bit) and is readable by all.
    """
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        artefact = compile_kernel(work, cc, inputs["link_flags"], rule)
        for scratch in work.iterdir():
            if scratch != artefact:
                scratch.unlink()
        os.chmod(artefact, 0o755, follow_symlinks=False)  # the linker's mode follows the umask
        seconds = round(time.perf_counter() - t0, 3)  # as meta.json and `info` show it
        meta = {
            "key": key,
            "inputs": inputs,
            "artefact": artefact.name,
            "sha256": _sha256(artefact),
            "build_seconds": seconds,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "built_by": f"pid {os.getpid()} on {platform.node()}",
        }
        # O_EXCL | O_NOFOLLOW: a new file, never one that a symlink points to.
        fd = os.open(work / "meta.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, 0o644)  # open's mode was masked by the umask; make it exactly 0644
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(work, 0o755)  # mkdtemp makes it 0700; a shared cache is readable by all
        os.replace(work, entry)  # atomic: the entry appears complete or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry / artefact.name, seconds


def clean_cache(root: Path | None = None) -> list[Path]:
    """Delete every cache entry (and lock, and leftover) under root; return what was removed.

    Touches only names the builder creates, so a cache root set by mistake to a
    directory with other files in it loses none of them. Each key's entry is
    removed under that key's lock, so a build in progress finishes first.
    """
    root = root or cache_root()
    if not root.is_dir():
        return []
    removed: list[Path] = []
    keys = {p.name[:32] for p in root.iterdir() if _KEY_RE.match(p.name)}
    keys |= {p.name[7:39] for p in root.glob(".build-*") if _KEY_RE.fullmatch(p.name[7:39])}
    for key in sorted(keys):
        lock = root / f"{key}.lock"
        with _FileLock(lock):
            _sweep(root, key)
            entry = root / key
            if entry.is_dir():
                shutil.rmtree(entry)
                removed.append(entry)
            lock.unlink()  # while held: _FileLock's waiters notice and retry
        removed.append(lock)
    for probe in root.glob(".probe-*"):
        with contextlib.suppress(OSError):
            probe.unlink()
    return removed


def load_kernel(rule: str | None = None) -> ModuleType | None:
    """The compiled kernel module, or None (with one RuntimeWarning) if it can't be had.

    rule: the optimizer's rule (``adam``, ``sgd``, ...). The module of every rule serves
    it when that is loaded or in the cache (``python -m roundpipe build`` makes it);
    else the engine and that one rule are built on first use, so a cold first step
    compiles one rule, not all of them. None: the module of every rule.

    The first failed build is kept: every later call, for any rule, falls back at once
    without another warning. With ROUNDPIPE_REQUIRE_NATIVE=1 a failure raises
    ImportError instead, on every call.
    """
    global _module, _failed
    _check_rule(rule)  # a rule that does not exist is a bug to raise, not a reason to fall back
    with _lock:
        if _module is None and _failed is None:
            try:
                if rule is None:
                    _module = build_and_load()
                elif rule not in _rule_modules:
                    try:
                        whole = build_and_load(cached_only=True)
                    except _Untrusted:  # someone else's entry: warn and build privately, as ever
                        whole = build_and_load()
                    if whole is not None:
                        _module = whole
                    else:
                        _rule_modules[rule] = cast(ModuleType, build_and_load(rule=rule))
            except Exception as exc:  # never break a training job: fall back, say why
                if isinstance(exc, BuildError):
                    _failed = exc
                else:
                    _failed = BuildError(f"{type(exc).__name__}: {exc}",
                                         fix="run `python -m roundpipe build` to see the error")
                INFO.error = str(_failed)
                if not _env_flag("ROUNDPIPE_REQUIRE_NATIVE"):
                    warnings.warn(
                        "roundpipe: the native kernels are unavailable, so roundpipe.optim's optimizers run "
                        "torch's own implementations instead (same results, less speed; roundpipe.optim.Adam "
                        "runs torch's fused CPU Adam).\n"
                        f"Reason: {_failed}\n"
                        "Set ROUNDPIPE_REQUIRE_NATIVE=1 to make this an error; "
                        "`python -m roundpipe info` shows the setup.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        if _failed is not None and _env_flag("ROUNDPIPE_REQUIRE_NATIVE"):
            raise ImportError(
                f"roundpipe: the native kernel is unavailable and ROUNDPIPE_REQUIRE_NATIVE=1: {_failed}"
            ) from _failed
        if _module is not None or rule is None:
            return _module
        return _rule_modules.get(rule)
