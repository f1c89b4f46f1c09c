"""Low-memory state (issue 12): bf16 moments on fp32 params, bf16 params with stochastic rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_bits_equal, run_python

import roundpipe.optim as rpo


def _regression(kind: str, *, threads: int = 2, steps: int = 300, seed: int = 0):
    """A linear teacher-student regression; returns (final loss, weights)."""
    torch.manual_seed(seed)
    x = torch.randn(512, 64)
    y = x @ torch.randn(64, 8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if kind == "fp32":
            w = torch.zeros(64, 8, requires_grad=True)
            opt = rpo.AdamW([w], lr=1e-2)
        else:
            w = torch.zeros(64, 8, dtype=torch.bfloat16, requires_grad=True)
            opt = rpo.AdamW([w], lr=1e-2, master_weights=kind == "master", bf16_stochastic_round=kind == "sr")
        for _ in range(steps):
            loss = ((x @ w.float() - y) ** 2).mean()
            w.grad = None
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(before)
    return loss.item(), w.detach(), opt


def test_stochastic_rounding_trains_where_round_to_nearest_stalls():
    fp32, _, _ = _regression("fp32")
    master, _, _ = _regression("master")
    nearest, _, _ = _regression("rne")
    stochastic, _, _ = _regression("sr")
    assert nearest > 2 * master, (nearest, master)  # the stall this option exists for
    assert stochastic <= 1.05 * master, (stochastic, master, fp32)  # within 5% (lower is fine)


def test_stochastic_rounding_is_thread_independent_and_reproducible():
    _, a, _ = _regression("sr", threads=1, steps=20)
    _, b, _ = _regression("sr", threads=2, steps=20)
    _, c, _ = _regression("sr", threads=2, steps=20)
    assert_bits_equal(a, b, "1 vs 2 threads")
    assert_bits_equal(b, c, "same seed, same bits")
    _, d, _ = _regression("sr", threads=2, steps=20, seed=1)
    assert not torch.equal(c, d)


def test_stochastic_rounding_resumes_bit_identically_from_a_state_dict():
    torch.manual_seed(3)
    init = torch.randn(40_003).bfloat16()
    grads = [torch.randn(40_003).bfloat16() for _ in range(6)]
    p = init.clone().requires_grad_()
    opt = rpo.Adam([p], lr=1e-3, bf16_stochastic_round=True)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    sd, resumed_from = copy.deepcopy(opt.state_dict()), p.detach().clone()
    assert sd["state"][0]["sr_seed"].dtype == torch.int64
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    q = resumed_from.clone().requires_grad_()
    opt2 = rpo.Adam([q], lr=1e-3, bf16_stochastic_round=True)
    opt2.load_state_dict(sd)
    for g in grads[3:]:
        q.grad = g.clone()
        opt2.step()
    assert_bits_equal(p, q, "resumed param")


def test_stochastic_rounding_is_unbiased():
    """Many roundings of one fp32 value average to it (the rounding, not the optimizer)."""
    from roundpipe.optim.adam import _bf16_stochastic_bits
    x = torch.full((1 << 16,), 1.0 + 3 * 2**-10)  # between two bf16 values: 1 + 2^-8 * 0.375 of an ulp
    mean = _bf16_stochastic_bits(x, 7, 1).view(torch.bfloat16).float().mean().item()
    assert abs(mean - x[0].item()) < 2**-7 * 0.01


@pytest.mark.parametrize(("kw", "match", "error"), [
    ({"bf16_stochastic_round": True, "master_weights": True}, "replaces master weights", ValueError),
    ({"bf16_stochastic_round": "yes"}, "bf16_stochastic_round must be a bool", TypeError),
])
def test_stochastic_rounding_bad_options(kw, match, error):
    with pytest.raises(error, match=match):
        rpo.Adam([torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)], **kw)


def test_stochastic_rounding_refuses_other_dtypes_before_anything_changes():
    p = torch.randn(8, requires_grad=True)
    opt = rpo.Adam([p], bf16_stochastic_round=True)
    p.grad = torch.ones(8)
    with pytest.raises(TypeError, match="param group 0, param 0 has dtype torch.float32; bf16_stochastic_round"):
        opt.step()
    assert not opt.state


def test_fallback_draws_the_kernels_bits(tmp_path):
    code = """
import os, warnings, torch
torch.manual_seed(0)
p = torch.randn(1003).bfloat16().requires_grad_()
g = [torch.randn(1003).bfloat16() for _ in range(3)]
import roundpipe.optim as rpo
opt = rpo.Adam([p], lr=1e-3, bf16_stochastic_round=True)
torch.manual_seed(1)  # the seed drawn for the state
for x in g:
    p.grad = x.clone(); opt.step()
print("BITS", ",".join(map(str, p.detach().view(torch.int16).tolist())))
"""
    native = run_python(code)
    fallback = run_python(code, env={"CC": "/nonexistent/cc", "ROUNDPIPE_CACHE_DIR": str(tmp_path),
                                     "ROUNDPIPE_REQUIRE_NATIVE": "0", "PYTHONWARNINGS": "ignore"})
    assert native.returncode == 0, native.stderr[-2000:]
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    line = [ln for ln in native.stdout.splitlines() if ln.startswith("BITS")]
    assert line and line == [ln for ln in fallback.stdout.splitlines() if ln.startswith("BITS")]


@pytest.mark.parametrize("grad_scale", [False, True])
def test_bf16_moments_on_fp32_params_are_the_fp32_step_with_rounded_moments(grad_scale):
    torch.manual_seed(4)
    n = 40_003
    p = torch.randn(n, requires_grad=True)
    q = p.detach().clone()
    opt = rpo.Adam([p], weight_decay=0.1, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    m, v, step = torch.zeros(n), torch.zeros(n), torch.zeros(())
    for _ in range(3):
        g = torch.randn(n) * (1024 if grad_scale else 1)
        p.grad, qg = g.clone(), g.clone()
        scale = torch.tensor(1024.0) if grad_scale else None
        opt.step(grad_scale=scale)
        step += 1
        torch._fused_adam_([q], [qg], [m], [v], [], [step], amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999,
                           weight_decay=0.1, eps=1e-8, maximize=False, grad_scale=scale, found_inf=None)
        m.copy_(m.bfloat16().float())
        v.copy_(v.bfloat16().float())
    assert_bits_equal(p, q, "param")
    assert_bits_equal(opt.state[p]["exp_avg"], m.bfloat16(), "exp_avg")
    assert_bits_equal(opt.state[p]["exp_avg_sq"], v.bfloat16(), "exp_avg_sq")
