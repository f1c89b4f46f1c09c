"""Adamax and RAdam (issue 23) against torch's default CPU implementation (foreach=False).

One spec table (rule -> our class, torch's class, flag grid, state keys), generic tests over it.
The exhaustive bit matrix (every flag, sizes 1..67 and large, NaN/Inf, complex, Tensor lr,
GradScaler, 1 and 2 threads) is scripts/loop_rules_harness.py; this file keeps a slice.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import Run, assert_bits_equal, assert_same_run, randn_grads, randn_params, train_twins
from loop_rules_common import assert_loops_vectorized, run_without_a_compiler
from test_family import assert_16bit_is_the_fp32_step_rounded_once

import roundpipe.optim as rpo
from roundpipe.optim import _engine


@dataclass
class Spec:
    ours: type
    ref: type
    kwargs: dict[str, Any]  # hyperparameters for every test of the rule
    flags: list[dict[str, Any]]  # the grid the bit-identity test crosses
    keys: tuple[str, ...]  # torch's state keys
    steps: int  # enough steps for every branch (RAdam: rectified from step 6 or so)


def _grid(**axes: list[Any]) -> list[dict[str, Any]]:
    return [dict(zip(axes, vals, strict=True)) for vals in itertools.product(*axes.values())]


SPECS = {
    "Adamax": Spec(rpo.Adamax, torch.optim.Adamax, {"lr": 0.01},
                   _grid(weight_decay=[0.0, 0.1], maximize=[False, True], betas=[(0.9, 0.999), (0.3, 0.5)]),
                   ("step", "exp_avg", "exp_inf"), 4),
    "RAdam": Spec(rpo.RAdam, torch.optim.RAdam, {"lr": 0.01},
                  [f for f in _grid(weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True],
                                    maximize=[False, True], betas=[(0.9, 0.999), (0.3, 0.9)])
                   if f["weight_decay"] or not f["decoupled_weight_decay"]],
                  ("step", "exp_avg", "exp_avg_sq"), 8),
}
RULES = list(SPECS)
SIZES = (1, 7, 15, 16, 17, 31, 33, 67, 1003)  # torch's scalar tail: numel % 16 (test_thread_count...: > 32768)
FOR_LOOP = {"foreach": False}  # torch's default on CPU, spelled out


def _flag_cases() -> list[Any]:
    return [pytest.param(name, flags, id=f"{name}-" + ",".join(f"{k}={v}" for k, v in flags.items()))
            for name, spec in SPECS.items() for flags in spec.flags]


@pytest.mark.parametrize(("name", "flags"), _flag_cases())
def test_fp32_bit_identical_to_torch_for_loop(name, flags, threads):
    spec = SPECS[name]
    train_twins(spec.ours, spec.ref, params=randn_params(*SIZES), grads=randn_grads(), steps=spec.steps,
                kwargs={**spec.kwargs, **flags}, ref_kwargs=FOR_LOOP, threads=2, what=name)


def _special_grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Normals with zeros, denormals, huge values, +-Inf and NaN of both signs sprinkled in."""
    gen = torch.Generator().manual_seed(100 + step)
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 3e38, -3e38, math.inf, -math.inf, math.nan, -math.nan])
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        real = torch.view_as_real(g).flatten() if g.is_complex() else g.view(-1)
        idx = torch.rand(real.shape, generator=gen) < 0.05
        real[idx] = specials[torch.randint(len(specials), (int(idx.sum()),), generator=gen)]
        out.append(g)
    return out


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_nan_inf_grads_and_complex_params_bit_identical(name, dtype, threads):
    """NaN payloads and signs included; complex params stepped as torch steps their real view."""
    spec = SPECS[name]
    flags = {"weight_decay": 0.1, "maximize": True}
    train_twins(spec.ours, spec.ref, params=randn_params(*SIZES, dtype=dtype), grads=_special_grads,
                steps=spec.steps, kwargs={**spec.kwargs, **flags}, ref_kwargs=FOR_LOOP, threads=2, what=name)


@pytest.mark.parametrize("name", RULES)
def test_tensor_lr_and_scheduler(name):
    spec = SPECS[name]

    def schedule(step: int, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        if step == 0:
            opt.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # type: ignore[attr-defined]
        else:
            opt.sched.step()  # type: ignore[attr-defined]

    kw = {**spec.kwargs, "lr": torch.tensor(0.01), "weight_decay": 0.1}
    if name == "RAdam":
        kw["decoupled_weight_decay"] = True  # 1 - lr*wd in float32 tensor arithmetic
    train_twins(spec.ours, spec.ref, params=randn_params(*SIZES), grads=randn_grads(), steps=spec.steps,
                kwargs=kw, ref_kwargs=FOR_LOOP, before_step=schedule, what=name)


@pytest.mark.parametrize("name", RULES)
def test_lr_zero_steps_like_torch(name):
    spec = SPECS[name]
    train_twins(spec.ours, spec.ref, params=randn_params(100), grads=randn_grads(), steps=spec.steps,
                kwargs={**spec.kwargs, "lr": 0.0}, ref_kwargs=FOR_LOOP, what=name)


@pytest.mark.parametrize("name", RULES)
def test_thread_count_does_not_change_bits(name, threads, monkeypatch):
    spec = SPECS[name]
    one = train_twins(spec.ours, spec.ref, params=randn_params(100_003, 77), grads=randn_grads(),
                      steps=spec.steps, kwargs=spec.kwargs, ref_kwargs=FOR_LOOP, threads=1)[0]
    monkeypatch.setattr(_engine, "CHUNK_ELEMS", 64)  # many chunks, on both threads
    monkeypatch.setattr(_engine, "SERIAL_BELOW", 0)
    two = train_twins(spec.ours, spec.ref, params=randn_params(100_003, 77), grads=randn_grads(),
                      steps=spec.steps, kwargs=spec.kwargs, ref_kwargs=FOR_LOOP, threads=2)[0]
    assert_same_run(one, two, f"{name}: 1 thread vs 2")


def test_radam_rectifies_each_param_by_its_own_step():
    """A param that joins late is un-rectified while the others are rectified, as in torch."""
    def late(step: int, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        if step < 5:
            params[1].grad = None

    train_twins(rpo.RAdam, torch.optim.RAdam, params=randn_params(50, 50), grads=randn_grads(), steps=10,
                kwargs={"lr": 0.01}, ref_kwargs=FOR_LOOP, before_step=late)


@pytest.mark.parametrize("name", RULES)
def test_checkpoints_resume_both_ways_mid_training(name):
    spec = SPECS[name]
    kw = {**spec.kwargs, "weight_decay": 0.1}
    grads = [torch.randn(1003, generator=torch.Generator().manual_seed(s)) for s in range(2 * spec.steps)]
    half = spec.steps

    def run(first: type, second: type, **first_kw: Any) -> torch.Tensor:
        p = torch.randn(1003, generator=torch.Generator().manual_seed(9)).requires_grad_()
        opt = first([p], **kw, **first_kw)
        for g in grads[:half]:
            p.grad = g.clone()
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
        assert "fused" not in sd["param_groups"][0]
        assert set(sd["state"][0]) == set(spec.keys)
        resumed = second([p], **kw)
        resumed.load_state_dict(sd)
        for g in grads[half:]:
            p.grad = g.clone()
            resumed.step()
        return torch.cat([p.detach(), *(resumed.state[p][k].reshape(-1).float() for k in spec.keys)])

    reference = run(spec.ref, spec.ref, foreach=False)
    with pytest.warns(UserWarning, match="ignores foreach"):
        ours_first = run(spec.ours, spec.ref, foreach=False)
    assert_bits_equal(ours_first, reference, f"{name} checkpoint resumed by torch")
    assert_bits_equal(run(spec.ref, spec.ours, foreach=False), reference, f"torch checkpoint resumed by {name}")


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_are_the_fp32_step_rounded_once(name, dtype):
    spec = SPECS[name]
    assert_16bit_is_the_fp32_step_rounded_once(spec.ref, spec.ours, spec.kwargs, FOR_LOOP, dtype, spec.steps)


@pytest.mark.parametrize("name", RULES)
def test_master_weights_are_torchs_fp32_step(name):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(1003, generator=gen).to(torch.bfloat16)
    master, p = init.float().requires_grad_(), init.clone().requires_grad_()
    ref, opt = spec.ref([master], **spec.kwargs, foreach=False), spec.ours([p], **spec.kwargs, master_weights=True)
    for _ in range(spec.steps):
        g = torch.randn(1003, generator=gen).to(torch.bfloat16)
        master.grad, p.grad = g.float(), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(opt.state[p]["master_param"], master, "master")
    assert_bits_equal(p, master.detach().to(torch.bfloat16), "param = master rounded")
    for k in spec.keys:
        assert_bits_equal(opt.state[p][k], ref.state[master][k], k)


def _scaler_run(factory: Any, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0 * 2.0**10, growth_interval=2)  # not a power of 2
    opt = factory(model.parameters())
    for s in range(steps):
        model.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if s == 2:
            next(model.parameters()).grad.view(-1)[0] = float("inf")  # this step is skipped
        scaler.step(opt)
        scaler.update()
    return model, opt


@pytest.mark.parametrize("name", RULES)
def test_grad_scaler_matches_torchs_class_under_grad_scaler(name):
    spec = SPECS[name]
    m1, o1 = _scaler_run(lambda ps: spec.ours(ps, **spec.kwargs), spec.steps + 1)
    m2, o2 = _scaler_run(lambda ps: spec.ref(ps, **spec.kwargs, foreach=False), spec.steps + 1)
    assert_same_run(Run(list(m1.parameters()), o1), Run(list(m2.parameters()), o2), f"{name} GradScaler")
    assert all(st["step"].item() == spec.steps for st in o1.state.values())  # the skipped step counted nothing


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("kw", "match"), [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"eps": -1.0}, "Invalid epsilon value"),
    ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
    ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
    ({"maximize": "false"}, "maximize must be a bool"),
    ({"capturable": True}, "capturable=True is not supported"),
    ({"differentiable": True}, "differentiable=True is not supported"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_constructor_checks_as_torchs(name, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SPECS[name].ours([torch.randn(4, requires_grad=True)], **kw)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("key", "value", "error"), [
    ("lr", None, TypeError), ("eps", "1e-8", TypeError), ("weight_decay", None, TypeError),
    ("betas", (0.9, None), TypeError), ("betas", 0.9, TypeError), ("betas", (0.9, 1.0), ValueError),
    ("lr", -0.5, ValueError),
])
def test_bad_hyperparameter_in_group_1_raises_before_group_0_steps(name, key, value, error):
    spec = SPECS[name]
    good, bad = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    opt = spec.ours([{"params": [good]}, {"params": [bad]}], **spec.kwargs)
    good.grad, bad.grad = torch.ones(8), torch.ones(8)
    opt.step()
    before = good.detach().clone()
    state = copy.deepcopy(opt.state[good])
    opt.param_groups[1][key] = value
    with pytest.raises(error, match=r"param group 1"):
        opt.step()
    assert_bits_equal(good, before, "param of group 0")
    for k, t in state.items():
        assert_bits_equal(opt.state[good][k], t, k)


@pytest.mark.parametrize("name", RULES)
def test_refuses_what_torch_refuses_naming_the_param(name):
    spec = SPECS[name]
    p = torch.randn(8, dtype=torch.float64, requires_grad=True)
    p.grad = torch.ones(8, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"roundpipe {name}: param group 0, param 0 has dtype torch.float64"):
        spec.ours([p], **spec.kwargs).step()
    q = torch.randn(8, requires_grad=True)
    q.grad = torch.ones(8).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        spec.ours([q], **spec.kwargs).step()


@pytest.mark.native_optional
@pytest.mark.parametrize("name", RULES)
def test_fallback_without_a_compiler_is_torchs_for_loop(name, tmp_path):
    run_without_a_compiler(tmp_path, f"""
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.complex64):
            a = torch.randn(37, generator=gen, dtype=dtype).requires_grad_()
            b = a.detach().clone().requires_grad_()
            r = torch.optim.{name}([a], lr=0.01, weight_decay=0.1, maximize=True, foreach=False)
            o = rpo.{name}([b], lr=0.01, weight_decay=0.1, maximize=True)
            for _ in range(8):
                g = torch.randn(37, generator=gen, dtype=dtype); a.grad = g.clone(); b.grad = g.clone()
                r.step(); o.step()
            assert torch.equal(torch.view_as_real(a) if dtype.is_complex else a,
                               torch.view_as_real(b) if dtype.is_complex else b), dtype
        p = torch.randn(100).to(torch.bfloat16).requires_grad_()
        opt = rpo.{name}([p], lr=0.01, master_weights=True)
        p.grad = torch.randn(100).to(torch.bfloat16); opt.step()
        assert torch.equal(p, opt.state[p]["master_param"].to(torch.bfloat16))
        print("ok")
    """)


def test_element_loops_are_vectorized(tmp_path):
    assert_loops_vectorized(tmp_path, {"adamax": "void adamax_elements(", "radam": "void radam_elements("})
