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


FAMILY_PEERS = {  # what each optimizer is measured against here (DeepSpeed off; lion-pytorch when installed)
    "SGD momentum": {"roundpipe", "torch-fused", "torch-default"},
    "Adagrad": {"roundpipe", "torch-fused", "torch-default"},
    "Lion": {"roundpipe"},
}


def test_quick_run_reports_every_optimizer(tmp_path):
    proc, doc = run_bench(tmp_path, "--workloads", "lora,sgd,adagrad,lion")
    results = {r["key"]: r for r in doc["results"]}
    expected = {"lora"} | {f"{o}-{lay}" for o in ("sgd", "adagrad", "lion") for lay in ("mix", "small", "lora")}
    assert set(results) == expected, sorted(results)
    lion_pytorch = doc["meta"]["peers"]["lion-pytorch"] == "available"
    for key, res in results.items():
        opt = res["optimizer"]
        rows = res["rows"]
        want = {"roundpipe", "torch-fused", "torch-foreach", "torch-default"} if key == "lora" else FAMILY_PEERS[opt]
        if opt == "Lion" and lion_pytorch:
            want = want | {"lion-pytorch"}
        assert set(rows) == want | {"roofline-probe"}, (key, sorted(rows))
        # Adam moves 28 bytes per element; SGD with momentum, Adagrad and Lion 20, against a probe of the same
        nbytes = 28 if opt == "Adam" else 20
        for comp, row in rows.items():
            assert row["bytes_per_elem"] == nbytes, (key, comp, row)
            assert row["median_s"] > 0 and row["gelem_s"] > 0 and row["frac_roofline"] > 0, (key, comp, row)
            assert row["roundpipe_speedup"] > 0
        assert f"## {res['workload']}:" in proc.stdout
    # the LoRA mix: a few hundred small tensors in the full size; in --quick, 2 layers of 22 tensors and the final norm
    assert results["sgd-lora"]["n_tensors"] == 2 * 22 + 2 and results["sgd-lora"]["numel"] == results["lora"]["numel"]
    # a targets row (PASS or SHORT) for every optimizer's workloads
    targets = {(t["workload"], t["what"]) for t in doc["targets"]}
    for key in expected - {"lora"}:
        assert any(w == results[key]["workload"] for w, _ in targets), key
    assert ("Lion: transformer mix", "speedup vs lion-pytorch") in targets or not lion_pytorch
    assert ("Adagrad: transformer mix", "speedup vs torch-fused") in targets
    table = proc.stdout[proc.stdout.index("## targets"):]
    assert table.count("PASS") + table.count("SHORT") == len(doc["targets"])


def test_deepspeed_peers_join_when_importable(tmp_path):
    # A stand-in deepspeed package (torch's own optimizers under DeepSpeed's names and signatures) checks that
    # the bench finds, builds and times DeepSpeed's CPU Adagrad and Lion where deepspeed imports.
    ops = tmp_path / "fake" / "deepspeed" / "ops"
    ops.mkdir(parents=True)
    (ops.parent / "__init__.py").write_text("")
    (ops / "__init__.py").write_text("")
    (ops / "adam.py").write_text(
        "import torch\n"
        "class DeepSpeedCPUAdam(torch.optim.Adam):\n"
        "    def __init__(self, params, lr=1e-3, adamw_mode=True, **kw):\n"
        "        super().__init__(params, lr=lr)\n")
    (ops / "adagrad.py").write_text(
        "import torch\n"
        "class DeepSpeedCPUAdagrad(torch.optim.Adagrad):\n"
        "    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,\n"
        "                 fp32_optimizer_states=True):\n"
        "        print('Loading extension module cpu_adagrad...')  # the bench keeps this off its stdout\n"
        "        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay)\n")
    (ops / "lion.py").write_text(
        "import roundpipe.optim\n"
        "class DeepSpeedCPULion(roundpipe.optim.Lion):\n"
        "    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0, fp32_optimizer_states=True):\n"
        "        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)\n")
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "fake"), os.path.dirname(os.path.dirname(BENCH)), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--no-lion-pytorch", "--workloads",
                           "adagrad-lora,lion-lora", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["peers"] == {"DeepSpeedCPUAdagrad": "available", "DeepSpeedCPULion": "available",
                                    "lion-pytorch": "--no-lion-pytorch"}
    rows = {r["key"]: set(r["rows"]) for r in doc["results"]}
    assert rows == {"adagrad-lora": {"roundpipe", "torch-fused", "torch-default", "deepspeed", "roofline-probe"},
                    "lion-lora": {"roundpipe", "deepspeed", "roofline-probe"}}
    assert "Loading extension" not in proc.stdout


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
    proc, doc = run_bench(tmp_path, "--workloads", "big,bf16,tiny,sgd-lora,lion-small", "--plot", str(png))
    data = png.read_bytes()
    width, height = png_size(data)
    assert width >= 600 and height >= 300, (width, height)
    assert len(data) > 10_000, len(data)  # bars, ticks and text, not an empty canvas
    assert f"# chart: {png}" in proc.stdout
    assert {"SGD momentum", "Lion"} <= {r["optimizer"] for r in doc["results"]}
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
