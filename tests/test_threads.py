"""torchrun's one thread per rank (issue 14, item 2): warn once, name the fix, never change the count.

The warning depends on the environment torch was imported under, so each case runs in a fresh process
with torchrun's variables (OMP_NUM_THREADS=1, LOCAL_WORLD_SIZE, TORCHELASTIC_RUN_ID).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_python

from roundpipe._threads import SILENCE_ENV, available_cores, thread_advice

CORES = available_cores()
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="the advice needs more cores than local ranks")

TORCHRUN_ENV = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}

# Steps two optimizers several times with every warning recorded ("always": Python's own
# once-per-location filter must not be what keeps it to one), then prints what it saw.
STEPS = """
import json, os, sys, warnings
for name in {drop!r}:
    os.environ.pop(name, None)
import torch
{setup}
import roundpipe.optim
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        p = torch.nn.Parameter(torch.randn(100))
        opt = roundpipe.optim.AdamW([p], lr=1e-3)
        for _ in range(4):
            p.grad = torch.randn(100)
            opt.step()
found = [w for w in caught if "thread" in str(w.message)]
print(json.dumps({{"threads": torch.get_num_threads(),
                  "warnings": [[w.category.__name__, str(w.message), w.filename] for w in found]}}))
"""


def run_steps(env: dict[str, str], drop: tuple[str, ...] = (), setup: str = "") -> dict:
    env = {SILENCE_ENV: "", **env}  # an outer ROUNDPIPE_NO_THREAD_WARNING must not leak in
    res = run_python(STEPS.format(drop=drop, setup=setup), env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@needs_two_cores
def test_torchrun_one_thread_warns_once_and_names_the_fix():
    out = run_steps(TORCHRUN_ENV)
    assert out["threads"] == 1  # warned about, not changed
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message, filename = out["warnings"][0]
    assert category == "RuntimeWarning"
    assert f"torch.set_num_threads({CORES})" in message  # cores // LOCAL_WORLD_SIZE, LOCAL_WORLD_SIZE=1
    assert f"{SILENCE_ENV}=1" in message
    assert filename == "<string>", filename  # points at the user's opt.step(), not at roundpipe or torch


@needs_two_cores
def test_two_local_ranks_share_the_cores():
    if CORES < 4:
        pytest.skip("two ranks need 4 cores to have 2 each")
    out = run_steps({**TORCHRUN_ENV, "LOCAL_WORLD_SIZE": "2"}, drop=("TORCHELASTIC_RUN_ID",))
    (w,) = out["warnings"]
    assert f"torch.set_num_threads({CORES // 2})" in w[1]


def test_no_warning_outside_torchrun():
    out = run_steps({"OMP_NUM_THREADS": "1"}, drop=("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"))
    assert out["threads"] == 1 and out["warnings"] == []


def test_no_warning_when_the_threads_are_set():
    out = run_steps(TORCHRUN_ENV, setup=f"torch.set_num_threads({CORES})")
    assert out["threads"] == CORES and out["warnings"] == []


def test_silenced_by_the_environment():
    out = run_steps({**TORCHRUN_ENV, SILENCE_ENV: "1"})
    assert out["threads"] == 1 and out["warnings"] == []


@pytest.mark.parametrize(("env", "cores", "threads", "fix"), [
    ({"LOCAL_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}, 2, 1, "torch.set_num_threads(2)"),
    ({"LOCAL_WORLD_SIZE": "4"}, 64, 1, "torch.set_num_threads(16)"),  # LOCAL_WORLD_SIZE alone is enough
    ({"LOCAL_WORLD_SIZE": "3"}, 8, 1, "torch.set_num_threads(2)"),  # floor: 8 // 3
    ({"TORCHELASTIC_RUN_ID": "x"}, 8, 1, "torch.set_num_threads(8)"),  # no LOCAL_WORLD_SIZE: one rank
    ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "bad"}, 8, 1, "torch.set_num_threads(8)"),
    ({"LOCAL_WORLD_SIZE": "8"}, 8, 1, None),  # one core per rank: one thread is right
    ({"LOCAL_WORLD_SIZE": "4"}, 7, 1, None),  # 7 // 4 = 1
    ({"LOCAL_WORLD_SIZE": "1"}, 1, 1, None),
    ({"LOCAL_WORLD_SIZE": "1"}, 64, 2, None),  # the user chose more than one thread
    ({}, 64, 1, None),  # not under torchrun
    ({"OMP_NUM_THREADS": "1"}, 64, 1, None),
])
def test_thread_advice(env, cores, threads, fix):
    advice = thread_advice(env, cores, threads)
    if fix is None:
        assert advice is None
    else:
        assert advice is not None and fix in advice and SILENCE_ENV in advice


def roundpipe_info(env: dict[str, str], cwd: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "roundpipe", "info"], check=False, capture_output=True,
                         text=True, timeout=300, env=env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res


@needs_two_cores
def test_info_shows_threads_and_advice(tmp_path):
    res = roundpipe_info({**os.environ, **TORCHRUN_ENV}, str(tmp_path))
    lines = res.stdout.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith("threads")]
    assert lines[i].split()[1] == "1" and f"{CORES} cores available" in lines[i]
    assert lines[i + 1].split()[0] == "ADVICE:" and f"torch.set_num_threads({CORES})" in lines[i + 1]

    outside = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    assert "ADVICE" not in roundpipe_info({**outside, "OMP_NUM_THREADS": "1"}, str(tmp_path)).stdout
