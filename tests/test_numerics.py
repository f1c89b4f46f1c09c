"""Bit-identity with torch.optim.Adam(fused=True): every flag combination, 100 steps, tail and thread sizes."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_bits_equal

import roundpipe.optim as rpo

SIZES = [0, 1, 7, 15, 16, 17, 1000, 2**20 + 3]
STEPS = 100


def train(opt_cls, sizes, steps, seed=0, lr_tensor=False, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    lr = kw.pop("lr", 1e-2)
    opt = opt_cls(params, lr=torch.tensor(lr) if lr_tensor else lr, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def assert_same_run(ours, ref):
    (pa, oa), (pb, ob) = ours, ref
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_bits_equal(a, b, f"param {i} (numel {a.numel()})")
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sb:
            assert_bits_equal(sa[k], sb[k], f"state[{k!r}] of param {i}")


FLAGS = list(itertools.product([False, True], [False, True], [0.0, 0.1], [False, True], [False, True]))


@pytest.mark.parametrize("amsgrad,maximize,weight_decay,decoupled,lr_tensor", FLAGS)
def test_bit_identical_to_torch_fused(amsgrad, maximize, weight_decay, decoupled, lr_tensor):
    kw = dict(amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    ours = train(rpo.Adam, SIZES, STEPS, lr_tensor=lr_tensor, **kw)
    ref = train(torch.optim.Adam, SIZES, STEPS, lr_tensor=lr_tensor, fused=True, **kw)
    assert_same_run(ours, ref)


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_bit_identical_at_any_thread_count(nthreads, threads):
    torch.set_num_threads(nthreads)
    ours = train(rpo.Adam, SIZES, 10, amsgrad=True, weight_decay=0.1)
    torch.set_num_threads(1)
    ref = train(torch.optim.Adam, SIZES, 10, amsgrad=True, weight_decay=0.1, fused=True)
    assert_same_run(ours, ref)


def test_adamw_matches_torch_adamw_fused():
    ours = train(rpo.AdamW, SIZES[:-1], 30)
    ref = train(torch.optim.AdamW, SIZES[:-1], 30, fused=True)
    assert_same_run(ours, ref)
    assert ours[1].param_groups[0]["weight_decay"] == 1e-2
    assert ours[1].param_groups[0]["decoupled_weight_decay"] is True


def test_betas_as_tensors_and_unusual_beta1():
    # beta1 = 0.3 takes torch's other lerp branch (weight 1-beta1 >= 0.5)
    for betas in [(torch.tensor(0.3), torch.tensor(0.9)), (0.0, 0.5)]:
        ours = train(rpo.Adam, [33, 1000], 20, betas=betas)
        ref = train(torch.optim.Adam, [33, 1000], 20, betas=betas, fused=True)
        assert_same_run(ours, ref)


def test_lr_scheduler_edits_take_effect():
    def run(cls, **kw):
        torch.manual_seed(0)
        p = torch.randn(100, requires_grad=True)
        opt = cls([p], lr=torch.tensor(0.1), **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
        out = []
        for _ in range(10):
            p.grad = torch.ones(100)
            opt.step()
            sched.step()
            out.append(p.detach().clone())
        return out
    a, b = run(rpo.Adam), run(torch.optim.Adam, fused=True)
    for x, y in zip(a, b):
        assert_bits_equal(x, y, "scheduled lr")
    # and it did change the update size: the lr dropped 10x after step 3
    d_early = (a[1] - a[0]).abs().max()
    d_late = (a[5] - a[4]).abs().max()
    assert d_late < d_early / 5


def test_complex64_matches_real_view_in_torch():
    gen = torch.Generator().manual_seed(3)
    zc = torch.randn(37, dtype=torch.complex64, generator=gen).requires_grad_()
    zr = torch.view_as_real(zc.detach().clone()).requires_grad_()
    a = rpo.Adam([zc], lr=1e-2, weight_decay=0.1)
    b = torch.optim.Adam([zr], lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(20):
        g = torch.randn(37, dtype=torch.complex64, generator=gen)
        zc.grad = g.clone()
        zr.grad = torch.view_as_real(g).clone()
        a.step()
        b.step()
    assert_bits_equal(torch.view_as_real(zc.detach()), zr, "complex param")
    assert a.state[zc]["exp_avg"].dtype == torch.complex64  # state stays complex, as in torch


@pytest.mark.parametrize("after_steps", [0, 2])
def test_lazy_conjugate_grad_raises_and_changes_nothing(after_steps):
    """z.conj() is a lazy view over the unconjugated values: the kernel reads memory, so a
    conjugate (or negative) view must be refused, not stepped as if it were plain."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(37, dtype=torch.complex64, generator=gen).requires_grad_()
    opt = rpo.Adam([z], lr=1e-2)
    for _ in range(after_steps):  # fresh plain grads each step, then the lazy one
        z.grad = torch.randn(37, dtype=torch.complex64, generator=gen)
        opt.step()
    before = (z.detach().clone(), {k: v.clone() for k, v in opt.state[z].items()})
    z.grad = torch.randn(37, dtype=torch.complex64, generator=gen).conj()
    with pytest.raises(ValueError, match=r"param group 0, param 0.*lazy conjugate"):
        opt.step()
    assert_bits_equal(z, before[0], "param")
    assert opt.state[z].keys() == before[1].keys()
    for k, v in before[1].items():
        assert_bits_equal(opt.state[z][k], v, k)
    z.grad = z.grad.resolve_conj()
    opt.step()  # materialized, it is stepped


def test_nan_and_inf_propagate_like_torch():
    gen = torch.Generator().manual_seed(5)
    def run(cls, **kw):
        p = torch.randn(1003, generator=torch.Generator().manual_seed(1)).requires_grad_()
        opt = cls([p], lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.1, **kw)
        g0 = torch.Generator().manual_seed(2)
        for s in range(5):
            g = torch.randn(1003, generator=g0)
            g[::97] = float("nan")
            g[5::101] = float("inf")
            g[7::103] = -float("inf")
            p.grad = g
            opt.step()
        return [p], opt
    assert_same_run(run(rpo.Adam), run(torch.optim.Adam, fused=True))
