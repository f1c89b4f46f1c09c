"""roundpipe.optim.Adam under torch.distributed: DDP, ZeroRedundancyOptimizer and FSDP2.

Each test starts two fresh worker interpreters that run this file as a script
(``python test_distributed.py <scenario> <rank> <world> <port> <outdir>``) on the gloo backend.
They meet through a TCPStore that the test process hosts on 127.0.0.1 at a port the OS picks
(port 0), so no other process can take the port between choosing it and binding it. The workers
torch.save their results under tmp_path; the test compares them, bit for bit, with a reference
computed in the test process. Every launch is bounded by a timeout, after which the workers are
killed.

Why the single-process reference is exact. Rank r computes the gradient g_r of the mean loss over
its half of the global batch; DDP multiplies each by 1/world = 0.5 and all-reduces by sum, so every
rank holds fl(0.5*g_0 + 0.5*g_1): one addition, which is commutative. The reference runs the same
model on the two halves separately (the same matmul shapes as the ranks, so the same float sums)
and back-propagates (l_0 + l_1) / 2: the 0.5 enters every op of the backward as a factor of two,
which floating point multiplies exactly (no values here come near the subnormal range), and
autograd adds the two contributions to each parameter's grad with the same single addition.
Hence the same gradient bits, the same optimizer steps, the same parameters. Everything runs on
one thread, so the float sums inside each matmul are the same in every process.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import roundpipe.optim as rpo

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 150  # seconds, per launch of the workers
WORLD = 2
LOCAL_BATCH = 6  # not a power of two on purpose: the argument above does not need one
STEPS_A, STEPS_B = 5, 5  # ZeRO: checkpoint after A steps, then B more
ADAM_KW = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.01, amsgrad=True)

requires_dist = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


# ---- shared by the workers and the reference -------------------------------------------------


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Odd widths: FSDP2 shards dim 0 unevenly, and the last layer's single row leaves rank 1 an empty shard.
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 7), nn.Tanh(), nn.Linear(7, 1))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(WORLD * LOCAL_BATCH, 12, generator=gen), torch.randn(WORLD * LOCAL_BATCH, 1, generator=gen)


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[sl].contiguous(), y[sl].contiguous()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- workers ------------------------------------------------------------------------------------


def _worker_main(argv: list[str]) -> None:
    scenario, rank, world, port, outdir = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    torch.set_num_threads(1)
    backend = "nccl" if scenario.endswith("_cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = SCENARIOS[scenario](rank, world, outdir)
        torch.save(out, outdir / f"{scenario}.rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_train(model: nn.Module, opt, rank: int, steps: range, set_to_none: bool = True) -> None:
    for step in steps:
        x, y = local_batch(step, rank)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def scenario_ddp_and_zero(rank: int, world: int, outdir: Path) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    # DDP with a plain roundpipe Adam on every rank.
    ddp = DDP(make_model())
    opt = rpo.Adam(ddp.parameters(), **ADAM_KW)
    _ddp_train(ddp, opt, rank, range(STEPS_A + STEPS_B))
    out["ddp"] = params_of(ddp.module)
    # Grads that are views into DDP's communication buckets, the same tensors every step,
    # written in place by the all-reduce: roundpipe must read them afresh each step.
    ddp = DDP(make_model(), gradient_as_bucket_view=True)
    opt = rpo.Adam(ddp.parameters(), **ADAM_KW)
    _ddp_train(ddp, opt, rank, range(STEPS_A + STEPS_B), set_to_none=False)
    out["ddp_grad_bucket_view"] = params_of(ddp.module)

    # ZeRO: each rank holds the optimizer state of its partition only.
    for bucket_view in (False, True):
        tag = f"zero_bucket{int(bucket_view)}"
        ddp = DDP(make_model())
        zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=rpo.Adam,
                                       parameters_as_bucket_view=bucket_view, **ADAM_KW)
        assert isinstance(zero.optim, rpo.Adam)
        _ddp_train(ddp, zero, rank, range(STEPS_A))
        zero.consolidate_state_dict(to=0)
        checkpoint_params = params_of(ddp.module)
        if rank == 0:
            torch.save({"params": checkpoint_params, "optim": zero.state_dict()}, outdir / f"{tag}.ckpt.pt")
        out[f"{tag}_local_params"] = sum(len(g["params"]) for g in zero.optim.param_groups)
        _ddp_train(ddp, zero, rank, range(STEPS_A, STEPS_A + STEPS_B))
        out[tag] = params_of(ddp.module)

        # Rewind the same objects to the checkpoint and train the same steps again: the local
        # roundpipe optimizer has stepped before, and ZeRO writes the reloaded state straight into
        # its .state, so this checks that nothing stale is reused.
        dist.barrier()
        ckpt = torch.load(outdir / f"{tag}.ckpt.pt", weights_only=True)
        with torch.no_grad():
            for p, saved in zip(ddp.module.parameters(), ckpt["params"], strict=True):
                p.copy_(saved)
        zero.load_state_dict(ckpt["optim"])
        _ddp_train(ddp, zero, rank, range(STEPS_A, STEPS_A + STEPS_B))
        out[f"{tag}_rewound"] = params_of(ddp.module)
    return out


def scenario_zero_resume(rank: int, world: int, outdir: Path) -> dict:
    """A fresh run: the checkpoint's params, a new ZeRO(roundpipe Adam), its consolidated state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for bucket_view in (False, True):
        tag = f"zero_bucket{int(bucket_view)}"
        ckpt = torch.load(outdir / f"{tag}.ckpt.pt", weights_only=True)
        model = make_model(seed=123)  # different init: everything must come from the checkpoint
        with torch.no_grad():
            for p, saved in zip(model.parameters(), ckpt["params"], strict=True):
                p.copy_(saved)
        ddp = DDP(model)
        zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=rpo.Adam,
                                       parameters_as_bucket_view=bucket_view, lr=0.5)  # lr comes from ckpt
        zero.load_state_dict(ckpt["optim"])
        out[f"{tag}_lr"] = zero.optim.param_groups[0]["lr"]
        _ddp_train(ddp, zero, rank, range(STEPS_A, STEPS_A + STEPS_B))
        out[tag] = params_of(ddp.module)
    return out


def _fsdp_models(device: torch.device, mesh, offload: bool):
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    models = []
    for _ in range(2):
        model = make_model().to(device)
        kw = dict(mesh=mesh)
        if offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, **kw)
        fully_shard(model, **kw)
        models.append(model)
    return models


def _fsdp_compare(rank: int, world: int, device: torch.device, offload: bool) -> dict:
    """Two identical FSDP2 models, one stepped by roundpipe Adam, one by torch.optim.Adam(fused=True)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device.type, (world,))
    ours_m, ref_m = _fsdp_models(device, mesh, offload)
    p0 = next(ours_m.parameters())
    assert isinstance(p0, DTensor)
    assert p0.device.type == "cpu"  # sharded params live on the CPU: with offload, even on a GPU run
    ours = rpo.Adam(ours_m.parameters(), **ADAM_KW)
    ref = torch.optim.Adam(ref_m.parameters(), fused=True, **ADAM_KW)
    for step in range(STEPS_A + STEPS_B):
        x, y = local_batch(step, rank)
        x, y = x.to(device), y.to(device)
        for model, opt in ((ours_m, ours), (ref_m, ref)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    out = {"ours_local": [p.to_local().detach().cpu().clone() for p in ours_m.parameters()],
           "ref_local": [p.to_local().detach().cpu().clone() for p in ref_m.parameters()],
           # The whole params, gathered: on a CPU mesh only, since with CPU offload on a GPU mesh
           # the shards are CPU tensors that NCCL cannot gather (the local shards cover them anyway).
           "ours_full": [p.full_tensor().detach().clone() for p in ours_m.parameters()] if not offload else None,
           "ref_full": [p.full_tensor().detach().clone() for p in ref_m.parameters()] if not offload else None,
           "state_types": sorted({type(v).__name__ for st in ours.state.values() for v in st.values()}),
           "ref_state_types": sorted({type(v).__name__ for st in ref.state.values() for v in st.values()})}
    out["ours_state"] = [{k: (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().clone()
                          for k, v in ours.state[p].items()} for p in ours_m.parameters()]
    out["ref_state"] = [{k: (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().clone()
                         for k, v in ref.state[p].items()} for p in ref_m.parameters()]
    return out


def scenario_fsdp2_cpu(rank: int, world: int, outdir: Path) -> dict:
    return _fsdp_compare(rank, world, torch.device("cpu"), offload=False)


def scenario_fsdp2_offload_cuda(rank: int, world: int, outdir: Path) -> dict:
    torch.use_deterministic_algorithms(True, warn_only=True)
    return _fsdp_compare(rank, world, torch.device("cuda", rank), offload=True)


SCENARIOS = {
    "ddp_and_zero": scenario_ddp_and_zero,
    "zero_resume": scenario_zero_resume,
    "fsdp2_cpu": scenario_fsdp2_cpu,
    "fsdp2_offload_cuda": scenario_fsdp2_offload_cuda,
}


# ---- the launcher -----------------------------------------------------------------------------


def launch(scenario: str, outdir: Path, world: int = WORLD) -> list[dict]:
    """Run `scenario` on `world` fresh worker processes; return each rank's results.

    torch's gloo process group can abort a worker in its own teardown, after the scenario
    finished and the barrier passed ("terminate called without an active exception", in a rank
    whose peer exited 0: seen once in each of two full-suite runs this session, in one of its five
    launches, never in nine runs of this file alone). Such a launch is run once more, from
    scratch; a second failure, or any failure before the results were written, fails.
    """
    for attempt in range(2):
        try:
            return _launch_once(scenario, outdir, world)
        except _TeardownAbort as abort:
            if attempt == 1:
                pytest.fail(str(abort))
            warnings.warn(f"{scenario}: a worker aborted in torch's teardown; running it again\n{abort}",
                          stacklevel=2)
    raise AssertionError("not reached")


class _TeardownAbort(Exception):
    """Every rank wrote its results, then one died from a signal while shutting down."""


def _launch_once(scenario: str, outdir: Path, world: int) -> list[dict]:
    for stale in outdir.glob(f"{scenario}.rank*.pt"):
        stale.unlink()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONFAULTHANDLER": "1"}
    if any(name == "lo" for _, name in __import__("socket").if_nameindex()):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on the loopback device
    procs = [
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), scenario, str(rank), str(world),
                          str(store.port), str(outdir)],
                         cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for rank in range(world)
    ]
    outputs, failed = [], False
    try:
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT)[0])
            except subprocess.TimeoutExpired:
                failed = True
                outputs.append(f"(timed out after {LAUNCH_TIMEOUT} s)")
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    codes = [proc.returncode for proc in procs]
    if failed or any(codes):
        logs = "\n".join(f"--- rank {r} (exit {c}) ---\n{o[-4000:]}" for r, (c, o) in enumerate(zip(codes, outputs, strict=True)))
        wrote_all = all((outdir / f"{scenario}.rank{r}.pt").exists() for r in range(world))
        if not failed and wrote_all and all(c <= 0 for c in codes):
            raise _TeardownAbort(f"{scenario}: workers failed\n{logs}")
        pytest.fail(f"{scenario}: workers failed\n{logs}")
    return [torch.load(outdir / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(world)]


# ---- references -------------------------------------------------------------------------------


def reference(steps: int, make_opt=lambda ps: rpo.Adam(ps, **ADAM_KW)) -> tuple[list[torch.Tensor], dict]:
    """Single-process training on the same global batches (see the module docstring)."""
    model = make_model()
    opt = make_opt(model.parameters())
    for step in range(steps):
        halves = [local_batch(step, r) for r in range(WORLD)]
        opt.zero_grad()
        losses = [nn.functional.mse_loss(model(x), y) for x, y in halves]
        (sum(losses[1:], losses[0]) / WORLD).backward()
        opt.step()
    return params_of(model), opt.state_dict()


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    from conftest import assert_bits_equal

    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_bits_equal(x, y, f"{what}, param {i}")


# ---- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_zero_runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    first = launch("ddp_and_zero", outdir)
    resumed = launch("zero_resume", outdir)  # fresh processes, from the files the first launch wrote
    return outdir, first, resumed


@pytest.fixture
def one_thread(threads):
    torch.set_num_threads(1)


@requires_dist
def test_ddp_params_identical_across_ranks_and_to_single_process(ddp_zero_runs, one_thread):
    _, (r0, r1), _ = ddp_zero_runs
    assert_same(r0["ddp"], r1["ddp"], "DDP rank 0 vs rank 1")
    ref_params, _ = reference(STEPS_A + STEPS_B)
    assert_same(r0["ddp"], ref_params, "DDP vs single process on the global batch")
    assert_same(r0["ddp_grad_bucket_view"], r1["ddp_grad_bucket_view"], "DDP grads as bucket views, rank 0 vs 1")
    assert_same(r0["ddp_grad_bucket_view"], ref_params, "DDP grads as bucket views vs single process")
    # The reference itself is torch's fused Adam, bit for bit, so DDP + roundpipe is too.
    torch_params, _ = reference(STEPS_A + STEPS_B, lambda ps: torch.optim.Adam(ps, fused=True, **ADAM_KW))
    assert_same(ref_params, torch_params, "single-process roundpipe vs torch fused")


@requires_dist
@pytest.mark.parametrize("bucket_view", [False, True], ids=["params", "bucket_view"])
def test_zero_redundancy_optimizer_matches_single_process(ddp_zero_runs, one_thread, bucket_view):
    outdir, (r0, r1), _ = ddp_zero_runs
    tag = f"zero_bucket{int(bucket_view)}"
    assert r0[f"{tag}_local_params"] > 0 and r1[f"{tag}_local_params"] > 0  # the state really is split
    n_params = len(list(make_model().parameters()))
    assert r0[f"{tag}_local_params"] + r1[f"{tag}_local_params"] == n_params
    assert_same(r0[tag], r1[tag], f"{tag}: rank 0 vs rank 1")
    ref_params, _ = reference(STEPS_A + STEPS_B)
    assert_same(r0[tag], ref_params, f"{tag} vs single-process roundpipe Adam")
    assert_same(r0[f"{tag}_rewound"], ref_params, f"{tag}: rewound to the checkpoint and retrained")
    assert_same(r1[f"{tag}_rewound"], ref_params, f"{tag}: rewound, rank 1")


@requires_dist
@pytest.mark.parametrize("bucket_view", [False, True], ids=["params", "bucket_view"])
def test_zero_consolidated_state_dict_resumes_identically(ddp_zero_runs, one_thread, bucket_view):
    from conftest import assert_bits_equal

    outdir, _, (n0, n1) = ddp_zero_runs
    tag = f"zero_bucket{int(bucket_view)}"
    # The consolidated state is the whole optimizer state, equal to single-process training's.
    ckpt = torch.load(outdir / f"{tag}.ckpt.pt", weights_only=True)
    ref_at_ckpt, ref_sd = reference(STEPS_A)
    assert_same(ckpt["params"], ref_at_ckpt, f"{tag}: params at the checkpoint")
    assert ckpt["optim"]["state"].keys() == ref_sd["state"].keys()
    for k, st in ref_sd["state"].items():
        assert ckpt["optim"]["state"][k].keys() == st.keys()
        for name, v in st.items():
            assert_bits_equal(ckpt["optim"]["state"][k][name], v, f"{tag}: consolidated state[{k}][{name!r}]")
    # A fresh run from it continues exactly as the uninterrupted single-process run.
    assert n0[f"{tag}_lr"] == ADAM_KW["lr"]
    ref_params, _ = reference(STEPS_A + STEPS_B)
    assert_same(n0[tag], n1[tag], f"{tag} resumed: rank 0 vs rank 1")
    assert_same(n0[tag], ref_params, f"{tag} resumed vs uninterrupted single process")


def _assert_fsdp_runs(results: list[dict]) -> None:
    from conftest import assert_bits_equal

    for rank, out in enumerate(results):
        # DTensor state, as torch keeps it (exp_avg etc. sharded like the param; step a plain tensor).
        assert out["state_types"] == out["ref_state_types"], (out["state_types"], out["ref_state_types"])
        assert_same(out["ours_local"], out["ref_local"], f"FSDP2 rank {rank}: local shards, roundpipe vs torch fused")
        if out["ours_full"] is not None:
            assert_same(out["ours_full"], out["ref_full"], f"FSDP2 rank {rank}: full params, roundpipe vs torch fused")
        for i, (sa, sb) in enumerate(zip(out["ours_state"], out["ref_state"], strict=True)):
            assert sa.keys() == sb.keys()
            for k in sb:
                assert_bits_equal(sa[k], sb[k], f"FSDP2 rank {rank}: state[{k!r}] of param {i}")
    for out in results[1:]:
        if out["ours_full"] is not None:
            assert_same(out["ours_full"], results[0]["ours_full"], "FSDP2: full params, rank 0 vs others")


@requires_dist
def test_fsdp2_cpu_dtensor_params_match_torch_fused(tmp_path):
    """FSDP2 on a CPU mesh: params, grads and state are DTensors whose local shards must be stepped."""
    _assert_fsdp_runs(launch("fsdp2_cpu", tmp_path))


@requires_dist
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 CPUOffloadPolicy needs CUDA")
def test_fsdp2_cpu_offload_matches_torch_fused(tmp_path):
    """fully_shard(..., offload_policy=CPUOffloadPolicy()): compute on the GPU, sharded params,
    grads and the optimizer step on the CPU, which is where roundpipe Adam runs. One rank per GPU,
    up to two; with a single GPU the mesh has one rank (each param is one whole shard)."""
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    world = min(WORLD, torch.cuda.device_count())
    _assert_fsdp_runs(launch("fsdp2_offload_cuda", tmp_path, world=world))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
