"""Bit-identity with torch.optim.Adam(fused=True): every flag combination, 100 steps, tail sizes."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_bits_equal, randn_grads, randn_params, train_twins

import roundpipe.optim as rpo

SIZES = [0, 1, 7, 15, 16, 17, 1000, 2**20 + 3]
STEPS = 100


def twins(ours, ref, sizes, steps, lr_tensor=False, **kw):
    """Train ours and ref (torch's, fused) on the same params and grads; compare every bit."""
    lr = kw.pop("lr", 1e-2)
    return train_twins(ours, ref, params=randn_params(*sizes), grads=randn_grads(), steps=steps,
                       kwargs=dict(lr=torch.tensor(lr) if lr_tensor else lr, **kw), ref_kwargs={"fused": True})


FLAGS = list(itertools.product([False, True], [False, True], [0.0, 0.1], [False, True], [False, True]))


@pytest.mark.parametrize("amsgrad,maximize,weight_decay,decoupled,lr_tensor", FLAGS)
def test_bit_identical_to_torch_fused(amsgrad, maximize, weight_decay, decoupled, lr_tensor):
    twins(rpo.Adam, torch.optim.Adam, SIZES, STEPS, lr_tensor=lr_tensor, amsgrad=amsgrad, maximize=maximize,
          weight_decay=weight_decay, decoupled_weight_decay=decoupled)

# Thread counts: tests/test_reliability.py (test_bit_identical_across_thread_counts_and_runs).
# LR schedulers: tests/test_ecosystem.py (test_lr_scheduler_matches_torch_step_for_step).


def test_adamw_matches_torch_adamw_fused():
    ours, _ = twins(rpo.AdamW, torch.optim.AdamW, SIZES[:-1], 30)
    assert ours.opt.param_groups[0]["weight_decay"] == 1e-2
    assert ours.opt.param_groups[0]["decoupled_weight_decay"] is True


def test_betas_as_tensors_and_unusual_beta1():
    # beta1 = 0.3 takes torch's other lerp branch (weight 1-beta1 >= 0.5)
    for betas in [(torch.tensor(0.3), torch.tensor(0.9)), (0.0, 0.5)]:
        twins(rpo.Adam, torch.optim.Adam, [33, 1000], 20, betas=betas)


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
    def grads(step, params):
        g = torch.randn(1003, generator=torch.Generator().manual_seed(2 + 7919 * step))
        g[::97] = float("nan")
        g[5::101] = float("inf")
        g[7::103] = -float("inf")
        return [g]
    train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(1003, seed=1), grads=grads, steps=5,
                kwargs=dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.1), ref_kwargs={"fused": True})
