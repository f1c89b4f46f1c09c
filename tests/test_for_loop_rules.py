"""The rules whose reference is torch 2.13's default for-loop step (foreach=False): NAdam, ASGD,
RMSprop, Adadelta and Rprop (issue 23), bit for bit.

One spec table (SPECS: rule -> our class, torch's, flags, state keys) drives every generic test,
so that the new rules' test files can be merged into one. The exhaustive bit matrix (every flag
combination, sizes 1..67 and large, NaN/Inf, Tensor lr, GradScaler scales, 1 and 2 threads) is
scripts/loop_rules_harness.py; here is a representative slice of it, and the contracts: torch
checkpoints both ways mid-training, 16-bit = the fp32 step rounded once, master weights,
torch's GradScaler, bad input raising before anything is mutated, the fallback without a
compiler, a skipped first step, and the engine's per-param scalar state (mu_product, eta, mu).
"""

from __future__ import annotations

import copy
import re
from typing import Any, NamedTuple

import pytest
import torch

from conftest import assert_bits_equal, randn_grads, train_twins
from loop_rules_common import assert_loops_vectorized, run_without_a_compiler

import roundpipe.optim as rpo
from roundpipe.optim import _for_loop


class Spec(NamedTuple):
    ours: type
    ref: type
    kw: dict[str, Any]  # hyperparameters for the contract tests
    flags: list[dict[str, Any]]  # the bit-identity slice
    keys: tuple[str, ...]  # torch's state keys
    scalars: tuple[str, ...]  # of them, the per-param scalar state


SPECS = {
    "NAdam": Spec(
        rpo.NAdam, torch.optim.NAdam, {"lr": 2e-2, "weight_decay": 0.05},
        [{}, {"weight_decay": 0.05}, {"weight_decay": 0.05, "decoupled_weight_decay": True},
         {"maximize": True, "betas": (0.3, 0.5), "momentum_decay": 0.3}, {"eps": 0.0, "maximize": True}],
        ("step", "mu_product", "exp_avg", "exp_avg_sq"), ("mu_product",)),
    "ASGD": Spec(
        rpo.ASGD, torch.optim.ASGD, {"lr": 5e-2, "t0": 1.0, "weight_decay": 0.05},
        [{}, {"t0": 0.0, "weight_decay": 0.05}, {"t0": 1.5, "maximize": True, "lambd": 0.5, "alpha": 0.5},
         {"t0": 2.0, "alpha": 2.0, "maximize": True}],
        ("step", "eta", "mu", "ax"), ("eta", "mu")),
    # lrs representable in bf16 and fp16 (Rprop's step_size starts there)
    "RMSprop": Spec(
        rpo.RMSprop, torch.optim.RMSprop,
        {"lr": 2.0 ** -7, "momentum": 0.5, "centered": True, "weight_decay": 0.05, "maximize": True},
        [{}, {"momentum": 0.9}, {"centered": True, "alpha": 0.3}, {"weight_decay": 0.05, "maximize": True},
         {"centered": True, "momentum": 0.5, "weight_decay": 0.05, "maximize": True}],
        ("step", "square_avg", "momentum_buffer", "grad_avg"), ()),
    "Adadelta": Spec(
        rpo.Adadelta, torch.optim.Adadelta, {"lr": 0.5, "rho": 0.5, "weight_decay": 0.05, "maximize": True},
        [{}, {"rho": 0.5, "eps": 1e-3}, {"weight_decay": 0.05, "maximize": True}],
        ("step", "square_avg", "acc_delta"), ()),
    "Rprop": Spec(
        rpo.Rprop, torch.optim.Rprop, {"lr": 2.0 ** -6, "etas": (0.3, 1.7), "step_sizes": (1e-3, 0.05), "maximize": True},
        [{}, {"maximize": True, "etas": (0.3, 1.7)}, {"step_sizes": (3.0, 2.0)}, {"step_sizes": (1e-3, 0.05)}],
        ("step", "prev", "step_size"), ()),
}
RULES = list(SPECS)
SCALAR_RULES = [rule for rule in RULES if SPECS[rule].scalars]
SIZES = [*range(1, 34), 67, 1003, 40_000]
STEPS = 4
SPECIALS = [0.0, -0.0, 1e-40, 3e38, float("inf"), float("-inf"), float("nan"), -float("nan")]


def params_of(sizes=SIZES, dtype=torch.float32, complex_sizes=(1, 5, 17, 33), seed=0):
    def build() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        out = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        out += [torch.randn(n, generator=gen, dtype=torch.complex64) for n in complex_sizes]
        return [t.requires_grad_() for t in out]
    return build


def special_grads(seed=1):
    """randn grads with zeros, denormals, huge values, Inf and NaN of both signs sprinkled in."""
    def grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        out = []
        for p in params:
            g = torch.randn(torch.view_as_real(p).shape if p.is_complex() else p.shape, generator=gen)
            idx = torch.rand(g.shape, generator=gen) < 0.05
            g[idx] = torch.tensor(SPECIALS)[torch.randint(len(SPECIALS), (int(idx.sum()),), generator=gen)]
            out.append(torch.view_as_complex(g) if p.is_complex() else g)
        return out
    return grads


def ids(flags: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items()) or "defaults"


SLICE = [pytest.param(rule, f, id=f"{rule}-{ids(f)}") for rule in RULES for f in SPECS[rule].flags]


# ---- bit identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("threads_n", [1, 2])
@pytest.mark.parametrize(("rule", "flags"), SLICE)
def test_fp32_and_complex_bit_identical_to_torch_for_loop(rule, flags, threads_n, threads):
    spec = SPECS[rule]
    train_twins(spec.ours, spec.ref, params=params_of(), grads=special_grads(), steps=STEPS,
                kwargs={"lr": spec.kw["lr"], **flags}, ref_kwargs={"foreach": False}, threads=threads_n,
                what=f"{rule} {flags}")


@pytest.mark.parametrize("rule", RULES)
def test_tensor_lr_and_a_scheduler_bit_identical(rule):
    """A float32 Tensor lr makes torch's per-step scalars float32 tensor ops; a scheduler edits it in place."""
    spec = SPECS[rule]

    def schedule(step: int, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        for group in opt.param_groups:
            group["lr"].fill_(spec.kw["lr"] * 0.7 ** step)

    train_twins(spec.ours, spec.ref, params=params_of(sizes=[1, 33, 1003]), grads=randn_grads(), steps=STEPS,
                kwargs={**spec.kw, "lr": torch.tensor(spec.kw["lr"])}, ref_kwargs={"foreach": False},
                before_step=schedule, what=rule)


def test_adadelta_nan_delta_meeting_a_nan_grad_takes_torchs_nan(threads):
    """delta.mul_(grad) of two NaNs: grad's, but delta's at a few elements of torch's tail
    (rules.h, rp_mul_self_nan). A NaN acc_delta and NaN grads of another sign put two NaNs in
    every element's mul_, at every tail length, in a tensor of several blocks (ours at 2 threads,
    torch at 1) and in complex params' real views."""
    nan_a = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)  # acc_delta's
    nan_b = torch.tensor([0xFFC00002]).to(torch.int32).view(torch.float32)  # the grads'

    def grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        if step == 0:
            return randn_grads()(step, params)
        return [torch.view_as_complex(nan_b.expand(p.numel(), 2).clone()) if p.is_complex()
                else nan_b.expand(p.shape).clone() for p in params]

    def nan_acc_delta(step: int, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        for p in params if step == 1 else ():
            acc = opt.state[p]["acc_delta"]
            acc = torch.view_as_real(acc) if acc.is_complex() else acc
            acc.copy_(nan_a.expand_as(acc))

    torch.set_num_threads(1)
    train_twins(rpo.Adadelta, torch.optim.Adadelta, params=params_of(sizes=[*range(1, 33), 40_007], complex_sizes=(7, 11)),
                grads=grads, steps=2, kwargs={"lr": 0.5}, ref_kwargs={"foreach": False}, before_step=nan_acc_delta,
                threads=2)


@pytest.mark.parametrize(("rule", "kw"), [("RMSprop", {"lr": 1e-2}), ("Adadelta", {"lr": 1.0}), ("Adadelta", {"lr": 0.0})])
def test_complex_add_takes_torchs_nans_in_every_region(rule, kw, threads):
    """torch's complex grad.add(param, alpha=wd) and Adadelta's param.add_(delta, alpha=-lr) pick
    NaNs by region, GCC's 4-complex vectors between its vector body and scalar tail included
    (rules.h, rp_complex_axpy): params and grads whose parts are NaNs of distinct payloads, +-inf
    and finite, at every complex size up to 20 (lr = 0: alpha = -0, times inf)."""
    pool = torch.tensor([0x3F800000, 0xBFC00000, 0x7F800000, 0xFF800000, 0x7FC00011, 0xFFC00022, 0x7FC00033, 0,
                         0xFFC00044]).to(torch.int32).view(torch.float32)  # 1, -1.5, +-inf, NaNs, 0

    def parts(n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.view_as_complex(pool[torch.randint(len(pool), (n, 2), generator=gen)])

    def params() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return [parts(n, gen).requires_grad_() for n in range(1, 21) for _ in range(3)]

    def grads(step: int, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(step + 1)
        return [parts(p.numel(), gen) for p in ps]

    torch.set_num_threads(1)
    train_twins(getattr(rpo, rule), getattr(torch.optim, rule), params=params, grads=grads, steps=1,
                kwargs={**kw, "weight_decay": 0.05, "maximize": True}, ref_kwargs={"foreach": False}, what=rule)


@pytest.mark.parametrize("rule", RULES)
def test_lr_zero_steps_as_torch(rule):
    spec = SPECS[rule]
    train_twins(spec.ours, spec.ref, params=params_of(sizes=[7, 40]), grads=randn_grads(), steps=2,
                kwargs={**spec.kw, "lr": 0.0}, ref_kwargs={"foreach": False})


# ---- checkpoints -------------------------------------------------------------------------------


def _steps(opt, params, grads):
    for g in grads:
        for p, x in zip(params, g, strict=True):
            p.grad = x.clone()
        opt.step()


@pytest.mark.parametrize("direction", ["torch->roundpipe", "roundpipe->torch"])
@pytest.mark.parametrize("rule", RULES)
def test_checkpoints_resume_both_ways_bit_identically(rule, direction):
    spec = SPECS[rule]
    build = params_of(sizes=[3, 1003], complex_sizes=(5,))
    grads = [randn_grads()(s, build()) for s in range(6)]
    ref_p = build()
    ref = spec.ref(ref_p, **spec.kw)
    _steps(ref, ref_p, grads)  # uninterrupted torch run
    first, second = (spec.ref, spec.ours) if direction == "torch->roundpipe" else (spec.ours, spec.ref)
    p = build()
    opt = first(p, **spec.kw)
    _steps(opt, p, grads[:3])
    resumed = second(p, **spec.kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps(resumed, p, grads[3:])
    for i, (a, b) in enumerate(zip(ref_p, p, strict=True)):
        assert_bits_equal(a, b, f"param {i}")
        assert ref.state[a].keys() == resumed.state[b].keys()
        for k in spec.keys:
            assert resumed.state[b][k].dtype == ref.state[a][k].dtype, k
            assert_bits_equal(ref.state[a][k], resumed.state[b][k], f"param {i} state[{k!r}]")
    assert "fused" not in resumed.state_dict()["param_groups"][0]


@pytest.mark.parametrize("rule", SCALAR_RULES)
def test_scalar_state_stays_float32_when_loaded_on_16bit_params(rule):
    """torch casts every floating state tensor but step to the param's dtype on load: the
    engine keeps the per-param scalars in their declared float32, from the saved values."""
    spec = SPECS[rule]
    p = torch.randn(8).bfloat16().requires_grad_()
    opt = spec.ours([p], **spec.kw)
    p.grad = torch.randn(8).bfloat16()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = torch.tensor(3.0)
    for k in spec.scalars:
        saved["state"][0][k] = torch.tensor(0.123456789, dtype=torch.float32)
    fresh = spec.ours([p], **spec.kw)
    fresh.load_state_dict(saved)
    for k in spec.scalars:
        assert fresh.state[p][k].dtype == torch.float32 and fresh.state[p][k].dim() == 0, k
        assert_bits_equal(fresh.state[p][k], saved["state"][0][k], k)
    p.grad = torch.randn(8).bfloat16()
    fresh.step()


@pytest.mark.parametrize("rule", SCALAR_RULES)
def test_scalar_state_of_the_wrong_kind_is_refused_by_name(rule):
    spec = SPECS[rule]
    p = torch.randn(8, requires_grad=True)
    opt = spec.ours([p], **spec.kw)
    p.grad = torch.randn(8)
    opt.step()
    before = p.detach().clone()
    key = spec.scalars[0]
    good = opt.state[p][key]
    for bad in (good.double(), torch.zeros(2), None):
        if bad is None:
            del opt.state[p][key]
        else:
            opt.state[p][key] = bad
        with pytest.raises(RuntimeError, match=rf"roundpipe {rule}: param group 0, param 0 has (no )?state\['{key}'\]"):
            opt.step()
        assert_bits_equal(p, before, "param after a refused step")
    opt.state[p][key] = good
    opt.step()


@pytest.mark.parametrize("rule", RULES)
def test_a_skipped_first_step_leaves_no_uninitialized_state(rule):
    """GradScaler's found_inf skips the whole step; the state it creates is torch's first-step
    state (zeros, step 0, Rprop's step_size = lr), so the next step is torch's first step, after
    a checkpoint too."""
    spec = SPECS[rule]
    p = torch.randn(1000).requires_grad_()
    opt = spec.ours([p], **spec.kw)
    p.grad = torch.full((1000,), float("inf"))
    opt.step(found_inf=torch.tensor(1.0), grad_scale=torch.tensor(1.0))
    before = p.detach().clone()
    for key, t in opt.state[p].items():
        if key == "step":
            assert t.item() == 0.0
        elif key == "step_size":
            assert torch.equal(t, torch.full_like(t, spec.kw["lr"]))
        elif key not in spec.scalars:
            assert torch.equal(t, torch.zeros_like(t)), key
    assert_bits_equal(p, before, "param after a skipped step")
    resumed = spec.ours([p], **spec.kw)
    resumed.load_state_dict(opt.state_dict())
    q = before.clone().requires_grad_()
    ref = spec.ref([q], **spec.kw)
    g = torch.randn(1000)
    p.grad, q.grad = g.clone(), g.clone()
    resumed.step()
    ref.step()
    assert_bits_equal(p, q, "first real step")
    for k in spec.keys:
        assert_bits_equal(resumed.state[p][k], ref.state[q][k], k)


# ---- 16-bit, master weights, GradScaler ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULES)
def test_16bit_params_are_the_fp32_step_rounded_once(rule, dtype):
    spec = SPECS[rule]
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(1003, generator=gen).to(dtype)
    ref_p, p = init.float().requires_grad_(), init.clone().requires_grad_()
    ref, opt = spec.ref([ref_p], **spec.kw), spec.ours([p], **spec.kw)
    for _ in range(3):
        g = torch.randn(1003, generator=gen).to(dtype)
        ref_p.grad, p.grad = g.float(), g.clone()
        ref.step()
        opt.step()
        with torch.no_grad():  # round the reference's param and param-shaped state as 16-bit storage does
            ref_p.copy_(ref_p.to(dtype).float())
            for t in ref.state[ref_p].values():
                if t.dim():
                    t.copy_(t.to(dtype).float())
    assert_bits_equal(p, ref_p.detach().to(dtype), "param")
    for k, t in ref.state[ref_p].items():
        assert opt.state[p][k].dtype == (dtype if t.dim() else torch.float32), k
        assert_bits_equal(opt.state[p][k], t.to(opt.state[p][k].dtype), k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULES)
def test_master_weights_equal_torch_on_the_fp32_master(rule, dtype):
    spec = SPECS[rule]
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(1003, generator=gen).to(dtype)
    master, p = init.float().requires_grad_(), init.clone().requires_grad_()
    ref, opt = spec.ref([master], **spec.kw), spec.ours([p], master_weights=True, **spec.kw)
    for _ in range(3):
        g = torch.randn(1003, generator=gen).to(dtype)
        master.grad, p.grad = g.float(), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(opt.state[p]["master_param"], master, "master")
    assert_bits_equal(p, master.detach().to(dtype), "param = master rounded")
    for k in spec.keys:
        assert opt.state[p][k].dtype == torch.float32
        assert_bits_equal(opt.state[p][k], ref.state[master][k], k)


@pytest.mark.parametrize("rule", RULES)
def test_grad_scaler_matches_torchs_class_under_torchs_grad_scaler(rule):
    """torch's GradScaler unscales a for-loop optimizer's grads itself (grad * (1/scale) in float);
    ours gets the scale and does the same in its step. A scale that is not a power of two, and a
    step with an Inf grad (skipped by both, step counters included; ours leaves such a step's grads
    scaled, as torch's fused optimizers do)."""
    spec = SPECS[rule]
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(1003, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = spec.ref([a], **spec.kw), spec.ours([b], **spec.kw)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2) for _ in range(2)]
    for s in range(5):
        g = torch.randn(1003, generator=gen) * 1000.0
        if s == 1:
            g[7] = float("inf")
        for p, o, scaler in ((a, ref, scalers[0]), (b, opt, scalers[1])):
            scaler.scale(torch.ones(()))  # GradScaler makes its scale lazily, in scale()
            p.grad = g.clone()
            scaler.step(o)
            scaler.update()
        if s != 1:  # on a skipped step torch's grads were unscaled, ours left as they were (as fused optimizers)
            assert_bits_equal(a.grad, b.grad, f"grad unscaled at step {s}")
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_bits_equal(a, b, "param")
    for k in spec.keys:
        assert_bits_equal(ref.state[a][k], opt.state[b][k], k)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "kw", "match"), [
    ("NAdam", {"lr": -1.0}, "Invalid learning rate"),
    ("NAdam", {"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ("NAdam", {"eps": -1.0}, "Invalid epsilon value"),
    ("NAdam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ("NAdam", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ("NAdam", {"weight_decay": -1.0}, "Invalid weight_decay value"),
    ("NAdam", {"momentum_decay": -1.0}, "Invalid momentum_decay value"),
    ("NAdam", {"decoupled_weight_decay": "yes"}, "decoupled_weight_decay must be a bool"),
    ("NAdam", {"capturable": True}, "capturable=True is not supported"),
    ("ASGD", {"lr": -1.0}, "Invalid learning rate"),
    ("ASGD", {"weight_decay": -1.0}, "Invalid weight_decay value"),
    ("ASGD", {"t0": None}, "t0 must be a real number"),
    ("ASGD", {"differentiable": True}, "differentiable=True is not supported"),
    ("RMSprop", {"alpha": -0.1}, "Invalid alpha value"),
    ("RMSprop", {"eps": -1.0}, "Invalid epsilon value"),
    ("RMSprop", {"momentum": -0.5}, "Invalid momentum value"),
    ("RMSprop", {"lr": -1.0}, "Invalid learning rate"),
    ("RMSprop", {"centered": "yes"}, "centered must be a bool"),
    ("RMSprop", {"lr": 1e50}, "cannot be converted to float32"),
    ("Adadelta", {"rho": 1.5}, "Invalid rho value"),
    ("Adadelta", {"weight_decay": -1.0}, "Invalid weight_decay value"),
    ("Adadelta", {"capturable": True}, "capturable=True is not supported"),
    ("Rprop", {"etas": (1.5, 2.0)}, "Invalid eta values"),
    ("Rprop", {"etas": (0.5, 0.9)}, "Invalid eta values"),
    ("Rprop", {"step_sizes": (1e-6,)}, "step_sizes must be a pair"),
    ("Rprop", {"step_sizes": (0.0, 1e50)}, "cannot be converted to float32"),
    ("Rprop", {"differentiable": True}, "differentiable=True is not supported"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_arguments_raise_at_construction(rule, kw, match):
    with pytest.raises((ValueError, TypeError), match=re.escape(match)):
        SPECS[rule].ours([torch.randn(4, requires_grad=True)], **kw)
    if match.startswith(("Invalid", "Tensor lr")):  # torch's own checks: torch refuses the same
        with pytest.raises(ValueError, match=re.escape(match)):
            SPECS[rule].ref([torch.randn(4, requires_grad=True)], **kw)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad", [None, "0.1"])
def test_a_bad_hyperparameter_in_group_1_leaves_group_0_untouched(rule, bad):
    spec = SPECS[rule]
    good, other = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    opt = spec.ours([{"params": [good]}, {"params": [other]}], **spec.kw)
    key = next(k for k in spec.kw if k != "lr")
    opt.param_groups[1][key] = bad
    good.grad, other.grad = torch.ones(8), torch.ones(8)
    before = good.detach().clone()
    with pytest.raises(TypeError, match=rf"{key} must be a (real number|pair of real numbers) \(param group 1\)"):
        opt.step()
    assert_bits_equal(good, before, "param of group 0")
    assert not opt.state, "state created before the check failed"


@pytest.mark.parametrize("rule", RULES)
def test_sparse_grads_and_float64_params_are_refused_by_name(rule):
    spec = SPECS[rule]
    p = torch.randn(8, requires_grad=True)
    opt = spec.ours([p], **spec.kw)
    p.grad = torch.randn(8).to_sparse()
    with pytest.raises(RuntimeError, match=rf"roundpipe {rule}: param group 0, param 0 has a sparse gradient"):
        opt.step()
    q = torch.randn(8, dtype=torch.float64, requires_grad=True)
    opt = spec.ours([q], **spec.kw)
    q.grad = torch.randn(8, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"roundpipe {rule}: param group 0, param 0 has dtype torch.float64"):
        opt.step()


@pytest.mark.parametrize("rule", RULES)
def test_foreach_is_ignored_with_a_warning(rule):
    with pytest.warns(UserWarning, match="ignores foreach=True"):
        SPECS[rule].ours([torch.randn(4, requires_grad=True)], foreach=True)


# ---- the fallback, MKL's sqrt, vectorization ---------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_fallback_without_a_compiler_is_torchs_step(rule, tmp_path):
    spec = SPECS[rule]
    run_without_a_compiler(tmp_path, f"""
        kw = {spec.kw!r}
        torch.manual_seed(0)
        init = [torch.randn(37), torch.randn(5, dtype=torch.complex64), torch.randn(40).bfloat16()]
        a = [t.clone().requires_grad_() for t in init]
        b = [t.clone().requires_grad_() for t in init]
        r, o = torch.optim.{rule}(a[:2], **kw), rpo.{rule}(b, **kw)
        for _ in range(3):
            gs = [torch.randn_like(t) for t in init]
            for x, y, g in zip(a, b, gs):
                x.grad, y.grad = g.clone(), g.clone()
            r.step(); o.step()
        for x, y in zip(a[:2], b[:2]):
            assert torch.equal(torch.view_as_real(x) if x.is_complex() else x,
                               torch.view_as_real(y) if y.is_complex() else y)
            for k in r.state[x]:
                assert torch.equal(r.state[x][k], o.state[y][k]), k
        assert not torch.equal(b[2], init[2]) and torch.isfinite(b[2]).all()
        print("ok")
    """)


@pytest.mark.parametrize("name", ["nadam", "rmsprop", "adadelta"])
def test_the_rules_sqrt_is_torchs(name):
    """torch's float sqrt is MKL's (not correctly rounded) where torch has MKL: the rules compute
    the same bits (rules.h, rp_torch_sqrt), at every length and start, specials included."""
    from roundpipe import _build
    kernel = _build.load_kernel(name)
    how, _ = _for_loop._torch_sqrt(kernel, name)
    x = torch.cat([_for_loop._sqrt_probe(), torch.rand(50_000) * 1e3, torch.rand(1000) * 1e-38])
    if not torch.equal(x.sqrt().view(torch.int32), torch.sqrt(x.double()).float().view(torch.int32)):
        assert how != _for_loop._SQRT_IEEE, "torch's sqrt is not IEEE here, and the rules did not find MKL's"
    ffi = kernel.ffi
    ref = x.sqrt()
    for start, n in [(0, x.numel()), (3, 1), (5, 17), (100, 1000), (7, 15)]:
        out = torch.zeros(n)
        h = ffi.new(f"rp_{name}_hyper *")
        _for_loop.fill_torch_sqrt(h, kernel, name)
        getattr(kernel.lib, f"rp_{name}_torch_sqrt")(h.sqrt_how, h.vml_sqrt, ffi.cast("float *", x[start:].data_ptr()),
                                      ffi.cast("float *", out.data_ptr()), n)
        assert_bits_equal(out, ref[start:start + n], f"sqrt of [{start}, {start + n})")


# each rule's element loops: the functions every flag variant is inlined into
LOOPS = {"nadam": ("nadam_block(",), "asgd": ("asgd_elements(",), "rmsprop": ("rmsprop_pre(", "rmsprop_post("),
         "adadelta": ("adadelta_pre(", "adadelta_post("), "rprop": ("rprop_elements(",)}


def test_element_loops_are_vectorized(tmp_path):
    """GCC's report with the builder's own flags: every loop of each rule's element functions."""
    for name, functions in LOOPS.items():
        for fn in functions:
            assert_loops_vectorized(tmp_path, {name: f"void {fn}"})
