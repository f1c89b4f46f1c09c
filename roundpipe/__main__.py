"""``python -m roundpipe info|build|clean|bench``: inspect, prebuild or empty the kernel cache; benchmark.

  info [--timing] [--repeat N] [--vec]
      what this host uses: version, cache dir and key, CPU and SIMD features,
      compiler and flags, artefact, whether the cache entry is trusted (and
      why not), OpenMP runtime and threads, with advice when torchrun left
      one thread on a many-core host (builds the kernel if the cache lacks
      it). --timing also measures the cold and warm first step (import,
      then one Adam step) against ``import torch`` alone, each in a fresh process.
      --vec prints the compiler's vectorization report for adam.c (gcc).
  build [--force]
      build ahead of time (container images, CI warm-up); fails if the cache
      directory is not writable, rather than building somewhere temporary.
  clean
      delete every cache entry under the cache directory.
  bench [--quick] [--optimizer NAMES] [--threads N,M] [--workloads ...] [--json FILE] [--plot FILE]
      optimizer step throughput on this machine: roundpipe against torch's
      implementations of each rule and the memory roofline (roundpipe.bench;
      `python -m roundpipe bench --help` lists its flags).

Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, _build, _threads

# The SIMD extensions adam.c's loops can use, as the compiler's -march=native
# macros name them (x86, then arm64), with the /proc/cpuinfo flag names.
SIMD_MACROS = {
    "__SSE4_2__": "sse4_2", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c",
    "__AVX512F__": "avx512f", "__AVX512DQ__": "avx512dq", "__AVX512BW__": "avx512bw",
    "__AVX512VL__": "avx512vl", "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
    "__ARM_NEON": "asimd", "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
    "__ARM_FEATURE_BF16": "bf16", "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2",
}

TIMING_PROBE = """
import json, resource, sys, time
def cpu():  # this process and its finished children (the compiler), user + system
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
t0, c0 = time.perf_counter(), cpu()
import torch
t1, c1 = time.perf_counter(), cpu()
native = from_cache = None
if sys.argv[1] == "roundpipe":  # the first import and the first step of one optimizer
    import roundpipe.optim
    from roundpipe import _build
    p = torch.nn.Parameter(torch.zeros(4096))
    p.grad = torch.ones(4096)
    opt = roundpipe.optim.Adam([p])
    opt.step()
    native, from_cache = opt._kernel is not None, _build.INFO.from_cache
t2, c2 = time.perf_counter(), cpu()
print(json.dumps({"torch": t1 - t0, "roundpipe": t2 - t1, "torch_cpu": c1 - c0, "roundpipe_cpu": c2 - c1,
                  "native": native, "from_cache": from_cache}))
"""


class CommandError(Exception):
    """A failure the user can act on: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"roundpipe: error: {message} (see `python -m roundpipe --help`)\n")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, _build.BuildError):
        return exc.one_line()
    if isinstance(exc.__cause__, _build.BuildError):  # ImportError under ROUNDPIPE_REQUIRE_NATIVE
        return "native kernel required (ROUNDPIPE_REQUIRE_NATIVE=1) but " + exc.__cause__.one_line()
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CommandError) else f"{type(exc).__name__}: {text}"


def _simd_features(inputs: dict[str, Any]) -> str:
    macros = _build.native_macros()
    if macros:
        names = [name for macro, name in SIMD_MACROS.items() if macro in macros]
        return " ".join(names) + "  (enabled by -march=native)"
    flags = set(str(inputs.get("cpu_flags", "")).split())
    names = [name for name in SIMD_MACROS.values() if name in flags]
    return " ".join(names) + "  (CPU flags; no compiler to ask)"


def _row(name: str, value: object) -> None:
    print(f"{name:<14}{value}")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _build.load_kernel()  # ImportError under ROUNDPIPE_REQUIRE_NATIVE=1
    info = _build.INFO
    inputs = info.key_inputs
    env_dir = os.environ.get("ROUNDPIPE_CACHE_DIR")
    import cffi

    _row("roundpipe", f"{__version__}  (torch {torch.__version__}, cffi {cffi.__version__}, "
                      f"python {sys.version.split()[0]} {sys.implementation.cache_tag})")
    configured = str(_build.cache_root()) + ("  (ROUNDPIPE_CACHE_DIR)" if env_dir else "")
    _row("cache dir", configured)
    if info.private_root:
        _row("", f"not used: built in {info.cache_root}, deleted after loading")
    _row("cache key", info.key or "(none: the key could not be computed)")
    _row("cpu", f"{_build.cpu_model()}  ({inputs.get('machine') or os.uname().machine})")
    _row("simd", _simd_features(inputs))
    try:
        compiler = _build.find_compiler()
    except _build.BuildError as exc:
        compiler = f"none ({exc.reason})"
    _row("compiler", compiler + (f"  ({inputs['compiler_version'].splitlines()[0]})"
                                 if inputs.get("compiler_version") else ""))
    _row("compile flags", " ".join(_build.COMPILE_FLAGS))
    if inputs.get("link_flags"):
        _row("link flags", " ".join(inputs["link_flags"]))
    if module is not None:
        _row("kernel", "native (roundpipe's compiled kernel)")
        _row("artefact", info.artefact + ("  (deleted after loading)" if info.private_root else ""))
        _row("from cache", "yes" if info.from_cache else "no (built by this command)")
        build = f"{info.build_seconds:.2f} s" if info.build_seconds is not None else "unknown"
        _row("build time", build + (f"; this import's load {info.load_seconds * 1e3:.0f} ms" if info.load_seconds else ""))
    else:
        reason = info.error or "unknown"
        failed = _build._failed
        _row("kernel", "FALLBACK: torch's fused CPU Adam (same results, less speed)")
        _row("reason", failed.one_line() if failed else " ".join(reason.split()))
    if info.untrusted:
        _row("trusted", f"NO: the cache entry {info.untrusted}. It was not loaded"
                        + ("; the kernel was built privately instead" if module is not None else ""))
    elif module is not None:
        where = "a private directory of this process" if info.private_root else "the cache entry"
        owner = _build._uid_name(info.owner) if info.owner is not None else "you"
        _row("trusted", f"yes: {where}, owned by {owner}, writable by no one else, no symlinks")
    runtimes = _build.openmp_runtimes_mapped()
    _row("openmp", ", ".join(runtimes) if runtimes else "none mapped")
    if len(runtimes) > 1:
        _row("", f"WARNING: {len(runtimes)} OpenMP runtimes are mapped; they will fight over the cores")
    omp_env = os.environ.get("OMP_NUM_THREADS")
    cores = _threads.available_cores()
    _row("threads", f"{torch.get_num_threads()}  (torch.get_num_threads(); "
                    f"OMP_NUM_THREADS={omp_env if omp_env is not None else 'unset'}; {cores} cores available)")
    advice = _threads.thread_advice(os.environ, cores, torch.get_num_threads())
    if advice is not None:  # shown even under ROUNDPIPE_NO_THREAD_WARNING: info was asked for
        _row("", "ADVICE: " + advice.removeprefix("roundpipe: "))
    settings = [f"{k}={os.environ[k]}" for k in ("CC", "ROUNDPIPE_CACHE_DIR", "ROUNDPIPE_NO_CACHE",
                                                   "ROUNDPIPE_REQUIRE_NATIVE", _threads.SILENCE_ENV)
                if k in os.environ]
    _row("environment", " ".join(settings) or "no CC or ROUNDPIPE_* variables set")
    for w in caught:  # the fallback's warning is the "reason" row already, an untrusted entry's the "trusted" row
        text = " ".join(str(w.message).split()).removeprefix("roundpipe: ")
        if text.startswith("not loading the kernel cache entry") and info.untrusted:
            continue
        if module is not None or not text.startswith("the native kernels are unavailable"):
            print(f"roundpipe: warning: {text}", file=sys.stderr)
    if args.vec:
        _vectorization_report()
    if args.timing:
        _timing_report(max(1, args.repeat))
    return 0


def _vectorization_report() -> None:
    cc = _build.compiler_command()
    flags = [f for f in _build.COMPILE_FLAGS if f != "-w"]
    for source in _build.kernel_sources():
        cmd = [*cc, *flags, "-I" + str(_build.KERNEL_DIR), "-fopt-info-vec-optimized", "-c", str(source),
               "-o", os.devnull]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_build.COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            raise CommandError(f"the vectorization report needs gcc: {shlex.join(cmd)} exited {res.returncode}")
        # runner.h's loops are reported where they are inlined, under runner.h's name
        lines = sorted({ln for ln in res.stderr.splitlines() if source.name in ln or "runner.h" in ln})
        print(f"\nvectorized loops in {source.name} ({len(lines)}):")
        for line in lines:
            print("  " + line.replace(str(_build.KERNEL_DIR) + os.sep, ""))


def _probe(mode: str, cache_dir: str) -> dict[str, Any]:
    env = {**os.environ, "ROUNDPIPE_CACHE_DIR": cache_dir}
    env.pop("ROUNDPIPE_NO_CACHE", None)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", TIMING_PROBE, mode], capture_output=True, text=True,
                         env=env, timeout=600, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommandError(f"the timing probe ({mode}) failed: {last}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    result["process"] = wall
    return result


def _timing_report(repeat: int) -> None:
    med = statistics.median
    torch_alone, cold, warm = [], [], []
    warm_dir = tempfile.mkdtemp(prefix="roundpipe-timing-")
    try:
        for _ in range(repeat):
            torch_alone.append(_probe("torch", warm_dir))
            cold_dir = tempfile.mkdtemp(prefix="roundpipe-timing-")  # fresh and empty every time
            try:
                cold.append(_probe("roundpipe", cold_dir))
            finally:
                shutil.rmtree(cold_dir, ignore_errors=True)
        _probe("roundpipe", warm_dir)  # fill the warm cache
        warm = [_probe("roundpipe", warm_dir) for _ in range(repeat)]
    finally:
        shutil.rmtree(warm_dir, ignore_errors=True)
    if not all(r["native"] for r in cold + warm):
        raise CommandError("the timing probes fell back to torch's Adam: run `python -m roundpipe build`")
    if any(r["from_cache"] for r in cold) or not all(r["from_cache"] for r in warm):
        raise CommandError("the timing probes did not build/reuse the cache as expected")

    def m(rows: list[dict[str, Any]], k: str) -> float:
        return med(r[k] for r in rows)

    t_torch = m(torch_alone, "torch")
    cold_total = m(cold, "torch") + m(cold, "roundpipe")
    warm_add = m(warm, "roundpipe")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntiming: fresh processes, median of {repeat}; {os.cpu_count()} CPUs, load average {load}\n"
          "  roundpipe.optim: its import, then building one Adam and its first step (the cold first step)\n"
          "  in-process wall time (CPU time, compiler included) [whole process, startup and exit included]")
    print(f"  import torch alone                   {t_torch:6.3f} s (cpu {m(torch_alone, 'torch_cpu'):.3f} s)"
          f"  [{m(torch_alone, 'process'):.2f} s]")
    print(f"  cold: import torch, roundpipe.optim  {cold_total:6.3f} s = torch {m(cold, 'torch'):.3f} s"
          f" + roundpipe.optim {m(cold, 'roundpipe'):.3f} s (cpu {m(cold, 'roundpipe_cpu'):.3f} s; build "
          f"included)  [{m(cold, 'process'):.2f} s]")
    print(f"  warm: import torch, roundpipe.optim  {m(warm, 'torch') + warm_add:6.3f} s = torch "
          f"{m(warm, 'torch'):.3f} s + roundpipe.optim {warm_add:.3f} s (cpu {m(warm, 'roundpipe_cpu'):.3f} s)"
          f"  [{m(warm, 'process'):.2f} s]")
    print(f"  cold first import {cold_total:.2f} s (and first Adam step; target <= 3 s): {'ok' if cold_total <= 3 else 'MISSED'}")
    print(f"  warm import adds {warm_add * 1e3:.1f} ms over import torch (target <= 50 ms): "
          f"{'ok' if warm_add <= 0.05 else 'MISSED'}")


def cmd_build(args: argparse.Namespace) -> int:
    if _build._env_flag("ROUNDPIPE_NO_CACHE"):
        raise CommandError("ROUNDPIPE_NO_CACHE=1 is set, so a build would not be kept; unset it to build ahead")
    _build.build_and_load(force=args.force, allow_private=False)
    info = _build.INFO
    if info.from_cache:
        print(f"up to date: {info.artefact}  (key {info.key}, built in {info.build_seconds or 0:.2f} s)")
    else:
        print(f"built {info.artefact} in {info.build_seconds or 0:.2f} s  (key {info.key})")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    root = _build.cache_root()
    removed = _build.clean_cache(root)
    entries = [p for p in removed if not p.name.endswith(".lock")]
    if removed:
        print(f"removed {len(entries)} cache entr{'y' if len(entries) == 1 else 'ies'} "
              f"({len(removed)} paths) from {root}")
    else:
        print(f"nothing to clean in {root}")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """The bench has its own parser (roundpipe.bench.cli): everything after `bench` is its."""
    from .bench.cli import main as bench_main

    return bench_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    parser = _Parser(prog="python -m roundpipe",
                     description="Inspect, prebuild or empty roundpipe's kernel cache; benchmark its optimizers.",
                     epilog="Environment: ROUNDPIPE_CACHE_DIR, CC, ROUNDPIPE_REQUIRE_NATIVE, ROUNDPIPE_NO_CACHE, "
                            "ROUNDPIPE_NO_THREAD_WARNING.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{info,build,clean,bench}", parser_class=_Parser)
    p_info = sub.add_parser("info", help="show what this host uses (builds the kernel if needed)")
    p_info.add_argument("--timing", action="store_true", help="measure the cold and warm first step (import + one Adam step)")
    p_info.add_argument("--repeat", type=int, default=3, help="timing runs per measurement (default 3)")
    p_info.add_argument("--vec", action="store_true", help="print gcc's vectorization report for adam.c")
    p_build = sub.add_parser("build", help="build the kernel into the cache ahead of time")
    p_build.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    sub.add_parser("clean", help="delete every cache entry")
    # listed for --help only: main() hands `bench ...` to roundpipe.bench before this parser runs
    sub.add_parser("bench", help="optimizer step throughput against torch on this machine (bench --help)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: info, build, clean or bench")
    handler = {"info": cmd_info, "build": cmd_build, "clean": cmd_clean}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("roundpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one readable line, no traceback
        print(f"roundpipe: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
