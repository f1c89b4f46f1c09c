"""scripts/bench.py runs end to end (--quick) and its outputs parse. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench.py")


def run_bench(tmp_path, *extra: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--no-deepspeed", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, f"bench.py failed:\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_quick_run_reports_every_workload(tmp_path):
    proc, doc = run_bench(tmp_path, "--workloads", "big,mix,small,tiny,in-backward,master-weights,grad-scaler")
    assert doc["meta"]["torch"]
    results = {r["workload"]: r for r in doc["results"]}
    for name in ("big tensor", "transformer mix", "many small (32 x 1024)", "tiny (1000 elements)"):
        assert name in results, f"missing workload {name!r}; have {sorted(results)}"
        rows = results[name]["rows"]
        assert {"roundpipe", "torch-fused", "torch-foreach", "torch-default", "roofline-probe"} <= set(rows)
        for comp, row in rows.items():
            assert row["median_s"] > 0 and row["gelem_s"] > 0, (name, comp, row)
            assert row["bytes_per_elem"] == 28
            assert row["frac_roofline"] > 0
            assert row["roundpipe_speedup"] > 0
    # the human table carries the same workloads
    for name in ("big tensor", "transformer mix", "tiny (1000 elements)", "in-backward", "GradScaler"):
        assert f"## {name}" in proc.stdout
    scaler = next(r for r in doc["results"] if r["workload"].startswith("GradScaler"))
    assert {"roundpipe via GradScaler", "torch-fused via GradScaler"} <= set(scaler["rows"])
    mw = next(r for r in doc["results"] if "master_weights" in r["workload"])
    assert mw["rows"] or mw["note"].startswith("skipped"), mw


def test_quick_sweeps_and_profile(tmp_path):
    proc, doc = run_bench(tmp_path, "--workloads", "", "--sweep-serial", "--chunk-sweep", "--profile")
    sw = doc["sweep_serial"]
    assert sw["rows"] and all(r["warm_serial_us"] > 0 and r["cold_parallel_us"] > 0 for r in sw["rows"])
    assert set(sw["crossover"]) == {f"{layout}, {mode}" for layout in ("one tensor", "1K-element tensors")
                                    for mode in ("warm", "cold")}
    assert len(doc["chunk_sweep"]) == 2
    for r in doc["chunk_sweep"]:
        assert {"CHUNK_ELEMS=4096", "CHUNK_ELEMS=16384", "roofline-probe"} <= set(r["rows"])
    assert "rp_adam_step" in doc["profile"] and "step()" in doc["profile"]
    assert "crossover" in proc.stdout


def test_bad_arguments_fail_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--no-deepspeed", "--workloads", "", "--threads", "x"],
                          capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "--threads" in proc.stderr


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk; raises if it is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise AssertionError(f"not a PNG: starts {data[:16]!r}")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_draws_a_chart(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "chart.png"
    proc, doc = run_bench(tmp_path, "--workloads", "big,bf16,tiny", "--plot", str(png))
    data = png.read_bytes()
    width, height = png_size(data)
    assert width >= 600 and height >= 300, (width, height)
    assert len(data) > 10_000, len(data)  # bars, ticks and text, not an empty canvas
    assert f"# chart: {png}" in proc.stdout
    import matplotlib.image
    pixels = matplotlib.image.imread(str(png))  # decodes as a whole
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05


def test_plot_without_matplotlib_fails_before_measuring(tmp_path):
    # sys.modules[name] = None makes `import matplotlib` raise ImportError, as if it were not installed
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = [{BENCH!r}, '--quick', '--no-deepspeed', '--workloads', 'big', '--plot', 'x.png']; "
            f"runpy.run_path({BENCH!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "--plot needs matplotlib" in proc.stderr and "Traceback" not in proc.stderr
    assert "## big tensor" not in proc.stdout and not (tmp_path / "x.png").exists()


def test_plot_needs_a_throughput_workload(tmp_path):
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--no-deepspeed", "--workloads", "tiny",
                           "--plot", "x.png"], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 2 and "--plot draws the throughput workloads" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.png").exists()
