"""The bench (roundpipe.bench, `python -m roundpipe bench`) runs end to end on tiny sizes and its outputs parse.

No speed is asserted. The subprocess runs use the hidden --smoke preset (every code path, tiny sizes) from a
temporary working directory, with this checkout's roundpipe first on the path.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import roundpipe
import roundpipe.optim
from roundpipe.__main__ import main as roundpipe_main
from roundpipe.bench import competitors as C
from roundpipe.bench import progress, workloads
from roundpipe.bench.cli import apply_presets, build_parser, select_workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(roundpipe.__file__)))
# the checkout's caller of the package (the package itself may be installed elsewhere, as in CI)
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench.py")


def bench_env(*extra_path: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*extra_path, ROOT, os.environ.get("PYTHONPATH", "")]))


def run_bench(tmp_path, *extra: str, timeout: float = 180, env: dict[str, str] | None = None,
              script: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, BENCH_SCRIPT] if script else [sys.executable, "-m", "roundpipe", "bench"]
    proc = subprocess.run([*cmd, "--smoke", "--no-deepspeed", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path), env=env or bench_env())
    assert proc.returncode == 0, f"bench failed:\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


def test_quick_gives_every_optimizer_a_speedup_row(tmp_path):
    # what a user runs first: `python -m roundpipe bench --quick` (tiny sizes here), outside the checkout
    proc, doc = run_bench(tmp_path, "--quick", "--progress", "lines")
    keys = [r["key"] for r in doc["results"]]
    assert keys == [workloads.workload_key(s, "mix") for s in C.OPTIMIZERS]
    summary = {r["optimizer"]: r for r in doc["summary"]}
    assert list(summary) == [s.name for s in C.OPTIMIZERS]
    table = proc.stdout[proc.stdout.index("## speed-up of roundpipe's step"):]
    for spec in C.OPTIMIZERS:
        row = summary[spec.name]
        line = next(ln for ln in table.splitlines() if ln.startswith(f"{spec.name} "))
        if not C.available(spec):  # a rule other branches are adding: a row that says so, no crash
            assert row["roundpipe_ms"] is None and "not available in this roundpipe" in line, line
            continue
        assert row["roundpipe_ms"] > 0 and row["x_roof"] > 0, row
        # roundpipe against each of torch's implementations of the rule, and nothing torch lacks
        assert set(row["speedup"]) >= {f"torch-{v}" for v in spec.torch_variants}, row
        assert all(s > 0 for s in row["speedup"].values()), row
        assert len(re.findall(r"\d\.\d\dx", line)) >= len(spec.torch_variants), line
        if spec.key == "adam":
            assert row["missing"]["deepspeed"] == "--no-deepspeed" and "deepspeed: --no-deepspeed" in line
    # the machine, for pasting into an issue
    m = doc["meta"]["machine"]
    assert m["cpu"] and m["logical_cpus"] >= 1 and m["threads"] == [torch.get_num_threads()]
    assert m["torch"] == torch.__version__ and m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["kernel"] == "native" and "-march=native" in m["simd"]
    assert f"# CPU: {m['cpu']}" in proc.stdout and f"SIMD: {m['simd']}" in proc.stdout
    assert f"(CPU capability {m['torch_cpu_capability']})" in proc.stdout
    assert doc["meta"]["command"].startswith("python -m roundpipe bench --smoke")
    # progress, one line per workload once the run is past its first seconds; never on stdout
    assert "s left" not in proc.stdout and "s left" in proc.stderr


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
    # through scripts/bench.py, the checkout's caller of the same code
    proc, doc = run_bench(tmp_path, "--workloads", "lora,sgd,adagrad,lion", script=True)
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
        # DeepSpeed, left out: a line in the table, not a row
        if opt in ("Adam", "Adagrad", "Lion"):
            assert res["missing"]["deepspeed"] == "--no-deepspeed", res["missing"]
    # the LoRA mix: a few hundred small tensors in the full size; in --smoke, 2 layers of 22 tensors and the final norm
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
    proc = subprocess.run([sys.executable, "-m", "roundpipe", "bench", "--smoke", "--no-lion-pytorch", "--workloads",
                           "adagrad-lora,lion-lora", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env=bench_env(str(tmp_path / "fake")))
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


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "x"], "--threads"),
    (["--optimizer", "adamx"], "--optimizer: unknown 'adamx'"),
    (["--workloads", "mixx"], "--workloads: unknown 'mixx'"),
    (["--optimizer", "sgd", "--workloads", "big"], "chose no workload"),
    (["--workloads", "tiny", "--plot", "x.png"], "--plot draws the throughput workloads"),
])
def test_bad_arguments_fail_before_measuring(tmp_path, monkeypatch, capsys, argv, needle):
    # argparse's usage error, exit status 2, before anything is measured or written
    if "--plot" in argv:
        pytest.importorskip("matplotlib")  # without it the error is that it is not installed (tested below)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        roundpipe_main(["bench", "--smoke", "--no-deepspeed", *argv])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == "", captured
    assert list(tmp_path.iterdir()) == []


def test_cli_lists_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        roundpipe_main(["--help"])
    assert exc.value.code == 0 and "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        roundpipe_main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--optimizer", "--quick", "--threads", "--workloads", "--json", "--plot", "--no-deepspeed",
                 "--no-lion-pytorch", "--progress"):
        assert flag in out
    assert "--smoke" not in out  # the tests' preset stays out of the help


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
    code = ("import sys; sys.modules['matplotlib'] = None; from roundpipe.__main__ import main; "
            "sys.exit(main(['bench', '--smoke', '--no-deepspeed', '--workloads', 'big', '--plot', 'x.png']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path), env=bench_env())
    assert proc.returncode == 2, proc.stderr
    assert "--plot needs matplotlib, which is not installed" in proc.stderr and "Traceback" not in proc.stderr
    assert "## big tensor" not in proc.stdout and not (tmp_path / "x.png").exists()


# ---- in process: the registry, the selection, the probes, the progress bar ------------------------------


def smoke_args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["--smoke", *argv])
    apply_presets(args)
    args.peer_status = C.PeerStatus()
    return args


@pytest.mark.parametrize("spec", C.OPTIMIZERS, ids=lambda s: s.key)
def test_registry_entry_builds_every_competitor(spec):
    # each entry's kwargs are valid for torch's class in each variant it lists, and for roundpipe's where present
    assert spec.torch_class() is not None or not spec.torch_variants, f"torch {torch.__version__} lacks {spec.name}"
    comps, missing = C.competitors(spec, C.PeerStatus())
    assert ("roundpipe" in comps) == C.available(spec) == (getattr(roundpipe.optim, spec.name, None) is not None)
    assert set(comps) | set(missing) >= {"roundpipe", *(f"torch-{v}" for v in spec.torch_variants)}
    for name, make in comps.items():
        p = torch.nn.Parameter(torch.randn(4, 3))
        p.grad = torch.randn(4, 3)
        make([p]).step()
        assert torch.isfinite(p).all(), name
    assert spec.bytes_per_elem == spec.probe.bytes_per_elem in (16, 20, 24, 28)


def test_an_optimizer_this_roundpipe_lacks_is_a_row_not_a_crash():
    spec = C.OptimizerSpec("nosuch", "NoSuchOptimizer", {"lr": 1e-2}, C.PROBE_20, C.TORCH_FOREACH_DEFAULT,
                           torch_name="SGD")
    args = smoke_args()
    res = workloads.bench_fp32(workloads.Workload("x", [(64,)]), args, 1, warmup=0, reps=1, spec=spec)
    assert res.rows == {} and res.note == "not available in this roundpipe (roundpipe.optim has no NoSuchOptimizer)"
    assert res.missing["roundpipe"] == res.note


def test_workload_selection():
    ap = build_parser()

    def keys(*argv: str) -> list[str]:
        args = ap.parse_args(list(argv))
        apply_presets(args)
        specs = [C.BY_KEY[k] for k in args.optimizer.split(",")] if args.optimizer else list(C.OPTIMIZERS)
        return select_workloads(args, specs, bool(args.optimizer), ap)

    assert keys("--quick") == [workloads.workload_key(s, "mix") for s in C.OPTIMIZERS]
    assert keys("--quick", "--optimizer", "sgd,adam") == ["mix", "sgd-mix"]
    assert keys("--optimizer", "nadam") == ["nadam-mix", "nadam-small", "nadam-lora"]
    assert keys("--optimizer", "adam") == list(workloads.ADAM_WORKLOADS)
    # without --optimizer, mix is Adam's (as scripts/bench.py always had it); with it, each chosen one's
    assert keys("--workloads", "mix,sgd") == ["mix", "sgd-mix", "sgd-small", "sgd-lora"]
    assert keys("--optimizer", "rmsprop,lion", "--workloads", "mix,lora") == ["lion-mix", "lion-lora", "rmsprop-mix",
                                                                              "rmsprop-lora"]
    assert keys("--workloads", "") == []
    assert keys()[: len(workloads.ADAM_WORKLOADS)] == list(workloads.ADAM_WORKLOADS)
    assert len(keys()) == len(workloads.ADAM_WORKLOADS) + 3 * (len(C.OPTIMIZERS) - 1)


@pytest.mark.parametrize("probe", [C.PROBE_28, C.PROBE_20, C.PROBE_16_WRITE, C.PROBE_24_ADAFACTOR],
                         ids=lambda p: f"{p.function}-{p.arrays}")
@pytest.mark.parametrize("threads", [1, 2])
def test_roofline_probes_touch_what_they_say(probe, threads):
    # one call on arrays of 0 with b = 1e-3: every array written holds b's value, those only read are unchanged
    n = 70_001  # several probe chunks and a tail
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rp = C.RooflineProbe(n, probe)
        rp.step()
    finally:
        torch.set_num_threads(before)
    a, b, *rest = rp.arrays
    assert torch.equal(b, torch.full((n,), 1e-3))
    if probe is C.PROBE_24_ADAFACTOR:  # two reading passes (their sums go to the third array), then a += b
        assert torch.equal(a, b)
    else:
        for t in (a, *rest):
            assert torch.equal(t, b)


def test_progress_bar_says_workload_competitor_and_time_left():
    stream = io.StringIO()
    bar = progress.Progress(stream=stream, mode="bar", delay=0.0)
    bar.plan([("Adam: transformer mix", 10.0), ("NAdam: transformer mix", 30.0)])
    bar.start_task()
    bar.begin_rounds()
    time.sleep(0.15)  # the bar redraws at most ten times a second
    bar.rounds(3, 6, "torch-foreach")
    text = stream.getvalue()
    assert "[1/2] Adam: transformer mix | torch-foreach | ~" in text and " left" in text
    bar.finish()
    assert stream.getvalue().endswith("\r")  # cleared: stdout's tables never share its line
    lines = io.StringIO()
    bar = progress.Progress(stream=lines, mode="lines", delay=0.0)
    bar.plan([("a", 1.0), ("b", 1.0)])
    bar.start_task()
    bar.start_task()
    assert lines.getvalue().splitlines()[-1].startswith("[2/2] b | ~")
    assert progress.fmt_seconds(95) == "1 min 35 s" and progress.fmt_seconds(12) == "12 s"
