"""The family on one engine (issue 11): SGD, Adagrad and Lion against their references, bit for bit.

fp32 results must equal torch.optim.SGD(fused=True), torch.optim.Adagrad(fused=True) and
lion-pytorch's Lion for every flag combination and every SIMD tail length; 16-bit params
are computed in fp32 and rounded once; GradScaler, master weights, checkpoints both ways,
bad input and the torch fallback behave as for Adam.
"""

from __future__ import annotations

import copy
import itertools
import textwrap

import pytest
import torch

from conftest import assert_bits_equal, run_python

import roundpipe.optim as rpo

# every tail length of torch's 16-lane AVX-512 loop and its 8-lane tail, plus a multi-chunk tensor
SIZES = [*range(1, 34), 1003, 40_000]
STEPS = 3


def _train_twins(ref_cls, ref_kw, rp_cls, rp_kw, sizes, *, dtype=torch.float32, steps=STEPS, seed=0,
                 threads=None, grads=None):
    """Train a reference and a roundpipe optimizer on the same params and grads; return both."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    ref_p = [t.clone().requires_grad_() for t in init]
    rp_p = [t.clone().requires_grad_() for t in init]
    ref, opt = ref_cls(ref_p, **ref_kw), rp_cls(rp_p, **rp_kw)
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for s in range(steps):
            for a, b in zip(ref_p, rp_p, strict=True):
                g = grads(a.shape, s) if grads else torch.randn(a.shape, generator=gen).to(dtype)
                a.grad, b.grad = g.clone(), g.clone()
            ref.step()
            opt.step()
    finally:
        torch.set_num_threads(before)
    return ref, opt, ref_p, rp_p


def _assert_same(ref, opt, ref_p, rp_p, keys):
    for i, (a, b) in enumerate(zip(ref_p, rp_p, strict=True)):
        assert_bits_equal(a, b, f"param {i} ({a.numel()} elements)")
        for k in keys:
            assert_bits_equal(ref.state[a][k], opt.state[b][k], f"state[{k!r}] of param {i} ({a.numel()} elements)")


# ---- SGD ---------------------------------------------------------------------------------

SGD_FLAGS = [
    {"momentum": m, "dampening": d, "nesterov": n, "weight_decay": wd, "maximize": mx}
    for m, d, n, wd, mx in itertools.product([0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 0.01], [False, True])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("flags", SGD_FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_sgd_fp32_bit_identical_to_torch_fused(flags, threads):
    ref, opt, a, b = _train_twins(torch.optim.SGD, {"lr": 0.01, "fused": True, **flags},
                                  rpo.SGD, {"lr": 0.01, **flags}, SIZES, threads=2)
    _assert_same(ref, opt, a, b, ["momentum_buffer"] if flags["momentum"] else [])


def test_sgd_state_is_torchs_and_round_trips(threads):
    ref, opt, a, b = _train_twins(torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "fused": True},
                                  rpo.SGD, {"lr": 0.01, "momentum": 0.9}, [100, 7])
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["fused"] is True
    assert set(sd["state"][0]) == {"momentum_buffer"}
    resumed = torch.optim.SGD([p.detach().clone().requires_grad_() for p in b], lr=0.01, momentum=0.9)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["fused"] is True
    back = rpo.SGD([p.detach().clone().requires_grad_() for p in b], lr=0.01, momentum=0.9)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    for p_ref, p_back in zip(ref.param_groups[0]["params"], back.param_groups[0]["params"], strict=True):
        assert_bits_equal(ref.state[p_ref]["momentum_buffer"], back.state[p_back]["momentum_buffer"], "buffer")


# ---- Adagrad -----------------------------------------------------------------------------

ADAGRAD_FLAGS = [
    {"lr_decay": ld, "weight_decay": wd, "initial_accumulator_value": iv, "maximize": mx, "eps": eps}
    for ld, wd, iv, mx, eps in itertools.product([0.0, 0.01], [0.0, 0.1], [0.0, 0.1], [False, True], [1e-10, 1e-3])
]


@pytest.mark.parametrize("flags", ADAGRAD_FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_adagrad_fp32_bit_identical_to_torch_fused(flags, threads):
    ref, opt, a, b = _train_twins(torch.optim.Adagrad, {"lr": 0.05, "fused": True, **flags},
                                  rpo.Adagrad, {"lr": 0.05, **flags}, SIZES, threads=2)
    _assert_same(ref, opt, a, b, ["step", "sum"])


def test_adagrad_creates_torchs_state_at_construction():
    p = torch.randn(10, requires_grad=True)
    ours = rpo.Adagrad([p], initial_accumulator_value=0.25).state_dict()
    theirs = torch.optim.Adagrad([p], initial_accumulator_value=0.25, fused=True).state_dict()
    assert set(ours["state"][0]) == set(theirs["state"][0]) == {"step", "sum"}
    for k in ("step", "sum"):
        assert_bits_equal(ours["state"][0][k], theirs["state"][0][k], k)


# ---- Lion ----------------------------------------------------------------------------------

LION_FLAGS = [
    {"weight_decay": wd, "decoupled_weight_decay": dec, "betas": betas}
    for wd, dec, betas in itertools.product([0.0, 0.1], [False, True], [(0.9, 0.99), (0.95, 0.98)])
]


@pytest.mark.parametrize("flags", LION_FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_lion_fp32_bit_identical_to_lion_pytorch(flags, threads):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    ref, opt, a, b = _train_twins(lion_pytorch.Lion, {"lr": 1e-3, **flags}, rpo.Lion, {"lr": 1e-3, **flags},
                                  SIZES, threads=2)
    _assert_same(ref, opt, a, b, ["exp_avg"])


def test_lion_maximize_is_lion_on_the_negated_grad():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(1003, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = lion_pytorch.Lion([a], lr=1e-3, weight_decay=0.1), rpo.Lion([b], lr=1e-3, weight_decay=0.1, maximize=True)
    for _ in range(3):
        g = torch.randn(1003, generator=gen)
        a.grad, b.grad = torch.neg(g), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(a, b, "param")


# ---- what every rule shares -----------------------------------------------------------------

RULES = [
    pytest.param(torch.optim.SGD, rpo.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}, ["momentum_buffer"], id="SGD"),
    pytest.param(torch.optim.Adagrad, rpo.Adagrad, {"lr": 0.05, "lr_decay": 0.01}, ["step", "sum"], id="Adagrad"),
]


@pytest.mark.parametrize(("ref_cls", "rp_cls", "kw", "keys"), RULES)
def test_grad_scaler_contract_matches_torch_fused(ref_cls, rp_cls, kw, keys):
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(1003, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = ref_cls([a], fused=True, **kw), rp_cls([b], **kw)
    for s, inf in enumerate([0.0, 1.0, 0.0]):
        g = torch.randn(1003, generator=gen) * 1024
        a.grad, b.grad = g.clone(), g.clone()
        for o in (ref, opt):  # as GradScaler.step hands a fused optimizer its scale and inf flag
            o.grad_scale, o.found_inf = torch.tensor(1024.0), torch.tensor(inf)
            o.step()
            del o.grad_scale, o.found_inf
        assert_bits_equal(a.grad, b.grad, f"grad unscaled in place at step {s}")
    _assert_same(ref, opt, [a], [b], keys)


@pytest.mark.parametrize(("ref_cls", "rp_cls", "kw", "keys"), RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_equal_torch_fused_on_the_fp32_master(ref_cls, rp_cls, kw, keys, dtype):
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(1003, generator=gen).to(dtype)
    master = init.float().requires_grad_()
    p = init.clone().requires_grad_()
    ref, opt = ref_cls([master], fused=True, **kw), rp_cls([p], master_weights=True, **kw)
    for _ in range(3):
        g = torch.randn(1003, generator=gen).to(dtype)
        master.grad, p.grad = g.float(), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(opt.state[p]["master_param"], master, "master")
    assert_bits_equal(p, master.detach().to(dtype), "param = master rounded")
    for k in keys:
        assert opt.state[p][k].dtype == torch.float32
        assert_bits_equal(opt.state[p][k], ref.state[master][k], k)


def _lion_reference():
    return pytest.importorskip("lion_pytorch").Lion


REFERENCES = [
    pytest.param(lambda: torch.optim.SGD, rpo.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
                 {"fused": True}, id="SGD"),
    pytest.param(lambda: torch.optim.Adagrad, rpo.Adagrad, {"lr": 0.1, "lr_decay": 0.01}, {"fused": True}, id="Adagrad"),
    pytest.param(_lion_reference, rpo.Lion, {"lr": 1e-2, "weight_decay": 0.1}, {}, id="Lion"),
]


@pytest.mark.parametrize(("ref_cls", "rp_cls", "kw", "ref_kw"), REFERENCES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_are_the_fp32_step_rounded_once(ref_cls, rp_cls, kw, ref_kw, dtype):
    """Each step reads 16-bit params and state, computes in fp32 and rounds once: bit for bit
    the fp32 reference step followed by rounding params and state to the 16-bit dtype."""
    assert_16bit_is_the_fp32_step_rounded_once(ref_cls(), rp_cls, kw, ref_kw, dtype)


def assert_16bit_is_the_fp32_step_rounded_once(ref_cls, rp_cls, kw, ref_kw, dtype, steps=3):
    """rp_cls on a 16-bit param equals ref_cls on its fp32 copy, params and state rounded to
    dtype after each step (also used by test_rulesB.py)."""
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(1003, generator=gen).to(dtype)
    ref_p, p = init.float().requires_grad_(), init.clone().requires_grad_()
    ref, opt = ref_cls([ref_p], **kw, **ref_kw), rp_cls([p], **kw)
    for _ in range(steps):
        g = torch.randn(1003, generator=gen).to(dtype)
        ref_p.grad, p.grad = g.float(), g.clone()
        ref.step()
        opt.step()
        with torch.no_grad():  # round the reference's params and state as 16-bit storage does
            ref_p.copy_(ref_p.to(dtype).float())
            for k, t in ref.state[ref_p].items():
                if k != "step":
                    t.copy_(t.to(dtype).float())
    assert_bits_equal(p, ref_p.detach().to(dtype), "param")
    for k, t in ref.state[ref_p].items():
        assert opt.state[p][k].dtype == (torch.float32 if k == "step" else dtype), k
        assert_bits_equal(opt.state[p][k], t.to(opt.state[p][k].dtype), k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_sgd_is_updated_and_follows_the_fp32_trajectory(dtype):
    """torch 2.13's fused SGD leaves 16-bit params unchanged (pytorch#191763); ours updates them
    and stays within 1% of the fp32 update, as torch's own for-loop does."""
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(4096, generator=gen).to(dtype).float()
    p32, p16 = init.clone().requires_grad_(), init.to(dtype).requires_grad_()
    o32, o16 = rpo.SGD([p32], lr=0.1, momentum=0.9), rpo.SGD([p16], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(4096, generator=gen).to(dtype)
        p32.grad, p16.grad = g.float(), g.clone()
        o32.step()
        o16.step()
    update32, update16 = p32.detach() - init, p16.detach().float() - init
    assert update16.abs().sum() > 0, "16-bit params were not updated"
    rel = (update16 - update32).norm() / update32.norm()
    assert rel < 0.01, f"16-bit update is {float(rel):.3%} off the fp32 update"


@pytest.mark.parametrize(("rp_cls", "kw", "match"), [
    (rpo.SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov momentum requires"),
    (rpo.SGD, {"lr": -1.0}, "Invalid learning rate"),
    (rpo.SGD, {"momentum": -0.5}, "Invalid momentum value"),
    (rpo.SGD, {"maximize": "false"}, "maximize must be a bool"),
    (rpo.Adagrad, {"lr_decay": -1.0}, "Invalid lr_decay value"),
    (rpo.Adagrad, {"eps": -1.0}, "Invalid epsilon value"),
    (rpo.Lion, {"lr": 0.0}, "Lion needs lr > 0"),
    (rpo.Lion, {"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1"),
    (rpo.Lion, {"decoupled_weight_decay": "yes"}, "decoupled_weight_decay must be a bool"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_arguments_raise_at_construction(rp_cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rp_cls([torch.randn(4, requires_grad=True)], **kw)


@pytest.mark.parametrize("rp_cls", [rpo.SGD, rpo.Adagrad, rpo.Lion])
def test_bad_input_raises_naming_the_param_and_changes_nothing(rp_cls):
    good, bad = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    opt = rp_cls([{"params": [good]}, {"params": [bad]}], lr=0.01)
    good.grad, bad.grad = torch.ones(8), torch.ones(16)[::2]  # a strided grad: refused
    before_state = copy.deepcopy(opt.state_dict()["state"])
    before = good.detach().clone()
    with pytest.raises(ValueError, match=rf"roundpipe {rp_cls.__name__}: param group 1, param 0 has a non-contiguous grad"):
        opt.step()
    assert_bits_equal(good, before, "param of the good group")
    after_state = opt.state_dict()["state"]
    assert before_state.keys() == after_state.keys()
    for i in before_state:
        for k in before_state[i]:
            assert_bits_equal(before_state[i][k], after_state[i][k], f"state {i} {k}")


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Lion"])
def test_fallback_without_a_compiler_steps_each_rule(name, tmp_path):
    code = textwrap.dedent(f"""
        import os, warnings
        os.environ["CC"] = "/nonexistent/cc"
        os.environ["ROUNDPIPE_CACHE_DIR"] = {str(tmp_path)!r}
        os.environ.pop("ROUNDPIPE_REQUIRE_NATIVE", None)
        warnings.simplefilter("ignore")
        import torch, roundpipe.optim as rpo
        assert not rpo.native_available()
        for dtype in (torch.float32, torch.bfloat16):
            p = torch.randn(100).to(dtype).requires_grad_()
            before = p.detach().clone()
            opt = rpo.{name}([p], lr=0.01)
            for _ in range(2):
                p.grad = torch.randn(100).to(dtype)
                opt.step()
            assert not torch.equal(p, before), dtype
            assert torch.isfinite(p).all()
        if "{name}" != "Lion":
            torch.manual_seed(0)
            a = torch.randn(37, requires_grad=True); b = a.detach().clone().requires_grad_()
            r, o = getattr(torch.optim, "{name}")([a], lr=0.01, fused=True), rpo.{name}([b], lr=0.01)
            for _ in range(3):
                g = torch.randn(37); a.grad = g.clone(); b.grad = g.clone(); r.step(); o.step()
            assert torch.equal(a, b)
        print("ok")
    """)
    res = run_python(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize(("ref_cls", "rp_cls", "kw", "keys"), RULES)
def test_torch_resumes_a_roundpipe_checkpoint_on_its_fused_kernel(ref_cls, rp_cls, kw, keys):
    """The checkpoint says fused=True, so torch's optimizer, built with its default arguments,
    resumes on its fused kernel: bit for bit an uninterrupted torch fused run."""
    gen = torch.Generator().manual_seed(8)
    init = torch.randn(1003, generator=gen)
    grads = [torch.randn(1003, generator=gen) for _ in range(5)]
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = ref_cls([a], fused=True, **kw), rp_cls([b], **kw)
    for g in grads[:3]:
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    resumed = ref_cls([b], **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.param_groups[0]["fused"] is True
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        resumed.step()
    _assert_same(ref, resumed, [a], [b], keys)
