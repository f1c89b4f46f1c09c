"""The kernel's element loops must stay vectorized: a scalar loop is ~4x slower and no test of
results would notice. Compiles adam.c (and adam8bit.c, which shares Adam's arithmetic through
adam_math.h) with the builder's own flags and reads GCC's report."""

from __future__ import annotations

import re
import subprocess
import sysconfig

import pytest

from roundpipe import _build


def loop_lines(source: str, marker: str) -> list[int]:
    """1-based line numbers of the `for` loops in the function whose definition contains marker."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("}"))
    return [i + 1 for i in range(start, end) if re.search(r"\bfor \(", lines[i])]


def _report(cc: str, source, tmp_path) -> str:
    res = subprocess.run(
        [cc, *_build.COMPILE_FLAGS, "-fopt-info-vec-optimized", "-I" + str(_build.KERNEL_DIR),
         "-I" + sysconfig.get_paths()["include"], "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def _vectorized(report: str, file: str) -> set[int]:
    return {int(m) for m in re.findall(rf"{re.escape(file)}:(\d+):\d+: optimized: loop vectorized", report)}


def test_element_loops_are_vectorized(tmp_path):
    cc = _build.find_compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    if "gcc" not in version.lower() and "Free Software Foundation" not in version:
        pytest.skip(f"the vectorization report format checked here is GCC's; compiler is {version.splitlines()[0]}")
    report = _report(cc, _build.KERNEL_SOURCE, tmp_path)
    engine_report = _report(cc, _build.ENGINE_SOURCE, tmp_path)
    q8_report = _report(cc, _build.KERNEL_DIR / "adam8bit.c", tmp_path)
    source = _build.KERNEL_SOURCE.read_text()
    math = (_build.KERNEL_DIR / "adam_math.h").read_text()  # adam_elements, inlined into adam.c and adam8bit.c
    quant8 = (_build.KERNEL_DIR / "quant8.h").read_text()
    runner = (_build.KERNEL_DIR / "runner.h").read_text()
    engine = _build.ENGINE_SOURCE.read_text()
    vectorized = _vectorized(report, "adam_math.h")
    # runner.h's conversions are inlined into adam.c's staging path and reported under runner.h
    in_runner = _vectorized(report, "runner.h")
    wanted = {
        "adam_elements": (loop_lines(math, "void adam_elements("), vectorized),
        "adam_elements (adam8bit.c)": (loop_lines(math, "void adam_elements("), _vectorized(q8_report, "adam_math.h")),
        "rp_q8_absmax_bits": (loop_lines(quant8, "uint32_t rp_q8_absmax_bits("), _vectorized(q8_report, "quant8.h")),
        "load_block (bf16)": (loop_lines(runner, "void load_block(")[:1], in_runner),
        "store_block (bf16)": (loop_lines(runner, "void store_block(")[:1], in_runner),
        "probe4": (loop_lines(engine, "static void probe4("), _vectorized(engine_report, "engine.c")),
        "probe3": (loop_lines(engine, "static void probe3("), _vectorized(engine_report, "engine.c")),
        "probe_copy": (loop_lines(engine, "static void probe_copy("), _vectorized(engine_report, "engine.c")),
    }
    # adam_elements is inlined into one loop per variant (dtypes x amsgrad x unscale): every
    # variant must be vectorized, not just one. GCC reports each vectorized copy on the loop's line.
    loop = loop_lines(math, "void adam_elements(")[0]
    # the fp32 and bf16 loops: one call each
    variants = len(re.findall(r"\badam_elements\(n, ", source)) + len(re.findall(r"\badam_elements\(n, ", math))
    macros = subprocess.run([cc, *_build.COMPILE_FLAGS, "-dM", "-E", "-x", "c", "/dev/null"],
                            capture_output=True, text=True, timeout=60).stdout
    if "__F16C__" in macros:  # fp16 blocks: one variant per F16_BLOCKS / F16_MASTER_BLOCKS use
        variants += len(re.findall(r"\bF16_(?:MASTER_)?BLOCKS\(\d\)", source))
    sizes = re.findall(rf"adam_math\.h:{loop}:\d+: optimized: loop vectorized using (\d+) byte", report)
    # one message per copy for the main loop's vector size (and maybe more for its epilogue)
    copies = max((sizes.count(s) for s in set(sizes)), default=0)
    assert copies >= variants, f"{copies} vectorized copies of the adam_elements loop, want {variants}"
    for name, (lines, done) in wanted.items():
        assert lines, f"no loop found in {name}"
        missing = [n for n in lines if n not in done]
        assert not missing, f"{name}: loop at line(s) {missing} not vectorized\n{report[-3000:]}"
