"""Issue 21: defects found from outside, each against its reference (item 4, dtypes rechecked
after a plan is cached, is tested with the hot path in tests/test_memory_safety.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from conftest import assert_bits_equal

import roundpipe.optim as rpo


def _lion_reference():
    return pytest.importorskip("lion_pytorch").Lion


def _on_the_fallback(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Step opt through its torch fallback from now on, in this process (as without a compiler)."""
    opt._kernel = None  # type: ignore[attr-defined]
    opt._plans.clear()  # type: ignore[attr-defined]
    return opt


def _assert_same_state(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.is_floating_point():
        assert_bits_equal(a, b, what)
    elif not torch.equal(a, b):
        raise AssertionError(f"{what}: {a} vs {b}")


# ---- 1. Lion steps at lr = 0 -------------------------------------------------------------------

def test_lion_steps_at_lr_zero_as_lion_pytorch_does():
    """A warmup from 0 or a schedule that reaches 0: lion-pytorch checks lr > 0 only in its constructor."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(1003, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref = _lion_reference()([a], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    opt = rpo.Lion([b], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    for lr in (0.0, 1e-3, 0.0):
        for o in (ref, opt):
            o.param_groups[0]["lr"] = lr
        g = torch.randn(1003, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        assert_bits_equal(a, b, f"param after a step at lr={lr}")
        assert_bits_equal(ref.state[a]["exp_avg"], opt.state[b]["exp_avg"], "exp_avg")
    with pytest.raises(ValueError, match="Lion needs lr > 0"):  # the constructor keeps lion-pytorch's check
        rpo.Lion([b], lr=0.0)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1.0 \(param group 0\)"):
        opt.param_groups[0]["lr"] = -1.0
        opt.step()


# ---- 2. stochastic rounding switched on over existing Adam state ---------------------------------

@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_stochastic_rounding_switched_on_over_existing_state_seeds_it_from_torch(fallback):
    torch.manual_seed(0)
    p = torch.randn(1003).bfloat16().requires_grad_()
    q = torch.randn(64).bfloat16().requires_grad_()
    opt = rpo.Adam([p], lr=1e-3)
    if fallback:
        _on_the_fallback(opt)
    p.grad = torch.randn(1003).bfloat16()
    opt.step()  # round to nearest: Adam state without a seed
    opt.param_groups[0]["bf16_stochastic_round"] = True
    # a bad second group: refused before anything (the first group's seed included) is created
    opt.add_param_group({"params": [q]})
    opt.param_groups[1]["eps"] = None
    q.grad = torch.randn(64).bfloat16()
    with pytest.raises(TypeError, match=r"eps.*param group 1"):
        opt.step()
    assert "sr_seed" not in opt.state[p]
    opt.param_groups[1]["eps"] = 1e-8
    torch.manual_seed(5)
    expected_seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # what a new state draws
    torch.manual_seed(5)
    for _ in range(2):  # the second step must not draw again
        p.grad = torch.randn(1003).bfloat16() if _ else p.grad
        opt.step()
    assert opt.state[p]["sr_seed"].dtype == torch.int64
    assert opt.state[p]["sr_seed"].item() == expected_seed.item()


# ---- 3. no uninitialized momentum buffer after a skipped first step ------------------------------

@pytest.mark.parametrize("rebuild", ["state_dict", "add_param_group"])
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_sgd_skipped_first_step_then_rebuild_is_torchs_first_step(rebuild, fallback):
    """GradScaler skips the first step; a checkpoint round trip or a plan rebuild follows. The next
    real step must be torch's first step (the buffer takes the grad), not read garbage as momentum."""
    kw = {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(1003, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = torch.optim.SGD([a], fused=True, **kw), rpo.SGD([b], **kw)
    if fallback:
        _on_the_fallback(opt)
    b.grad = torch.full((1003,), float("inf"))
    opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.ones(()))  # skipped
    assert_bits_equal(b, init, "param after the skipped step")
    assert "momentum_buffer" not in opt.state.get(b, {}), "a skipped step created a buffer no step has written"
    if rebuild == "state_dict":
        sd = copy.deepcopy(opt.state_dict())
        opt = rpo.SGD([b], **kw)
        opt.load_state_dict(sd)
        if fallback:
            _on_the_fallback(opt)
    else:
        opt.add_param_group({"params": [nn.Parameter(torch.randn(8))]})  # plans are rebuilt
    for _ in range(3):
        g = torch.randn(1003, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(a, b, "param")
    assert_bits_equal(ref.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"], "momentum_buffer")


@pytest.mark.parametrize(("rp_cls", "kw"), [
    (rpo.SGD, {"momentum": 0.9}), (rpo.Adam, {}), (rpo.AdamW, {"amsgrad": True}), (rpo.Adagrad, {}),
    (rpo.Lion, {}), (rpo.Adam, {"master_weights": True}), (rpo.SGD, {"momentum": 0.9, "master_weights": True}),
    (rpo.Adam, {"bf16_stochastic_round": True}),
], ids=lambda x: x.__name__ if isinstance(x, type) else "-".join(x) or "default")
def test_no_state_left_uninitialized_by_a_skipped_step(rp_cls, kw):
    """Whatever a skipped first step creates holds defined values: what a fresh optimizer's
    skipped step creates from memory filled with NaN bits equals what it creates from zeros."""
    def skipped_state(fill: float) -> dict:
        junk = [torch.full((4096,), fill) for _ in range(64)]  # leave freed heap memory holding `fill`
        del junk
        p = torch.randn(4096, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_()
        opt = rp_cls([p], **kw)
        p.grad = torch.ones(4096).bfloat16()
        torch.manual_seed(0)
        opt.step(found_inf=torch.ones(()))
        return {k: v.clone() for k, v in opt.state.get(p, {}).items()}

    a, b = skipped_state(float("nan")), skipped_state(0.0)
    assert a.keys() == b.keys()
    for k in a:
        _assert_same_state(a[k], b[k], f"state[{k!r}] after a skipped first step")


# ---- 5. every hyperparameter's type checked before any group steps ---------------------------------

HYPER = [
    (rpo.SGD, {"momentum": 0.9}, ["lr", "momentum", "dampening", "weight_decay"]),
    (rpo.Adam, {}, ["lr", "eps", "weight_decay", "betas.0", "betas.1"]),
    (rpo.AdamW, {}, ["lr", "eps", "weight_decay", "betas.0"]),
    (rpo.Adagrad, {}, ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"]),
    (rpo.Lion, {}, ["lr", "weight_decay", "betas.0", "betas.1"]),
]


@pytest.mark.parametrize(("rp_cls", "kw", "key"), [(c, kw, k) for c, kw, keys in HYPER for k in keys],
                         ids=lambda x: x.__name__ if isinstance(x, type) else (x if isinstance(x, str) else ""))
@pytest.mark.parametrize("bad", [None, "0.1", True], ids=["None", "str", "bool"])
def test_every_hyperparameter_type_is_checked_before_any_group_steps(rp_cls, kw, key, bad):
    p0, p1 = nn.Parameter(torch.randn(64)), nn.Parameter(torch.randn(64))
    opt = rp_cls([{"params": [p0]}, {"params": [p1]}], lr=1e-3, **kw)
    for p in (p0, p1):
        p.grad = torch.randn(64)
    opt.step()
    before = [p0.detach().clone(), *(t.clone() for t in opt.state[p0].values())]
    name, _, index = key.partition(".")
    group = opt.param_groups[1]
    if index:
        betas = list(group[name])
        betas[int(index)] = bad
        group[name] = tuple(betas)
    else:
        group[name] = bad
    with pytest.raises(TypeError, match=rf"{name}.*param group 1"):
        opt.step()
    for x, y in zip(before, [p0, *opt.state[p0].values()], strict=True):
        assert_bits_equal(x, y, "group 0 after the refused step")


@pytest.mark.parametrize(("rp_cls", "kw"), [
    (rpo.SGD, {"dampening": None}), (rpo.SGD, {"momentum": "0.9"}), (rpo.Adagrad, {"lr_decay": None}),
    (rpo.Lion, {"weight_decay": None}), (rpo.Adam, {"eps": None}),
], ids=lambda x: x.__name__ if isinstance(x, type) else "")
def test_bad_hyperparameter_types_raise_at_construction_and_in_add_param_group(rp_cls, kw):
    key = next(iter(kw))
    with pytest.raises(TypeError, match=rf"{key} must be a real number"):
        rp_cls([nn.Parameter(torch.randn(4))], **kw)
    opt = rp_cls([nn.Parameter(torch.randn(4))])
    with pytest.raises(TypeError, match=rf"{key} must be a real number.*param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4))], **kw})


# ---- 6. broadcast grads ---------------------------------------------------------------------------

RULES = [
    pytest.param(rpo.SGD, {"lr": 0.1, "momentum": 0.9}, id="SGD"),
    pytest.param(rpo.Adam, {"lr": 0.1}, id="Adam"),
    pytest.param(rpo.Adagrad, {"lr": 0.1}, id="Adagrad"),
    pytest.param(rpo.Lion, {"lr": 0.1}, id="Lion"),
]
SHAPE = (37, 29)


def _broadcast(gen: torch.Generator, scale: float = 1.0, *, dim: int | None = None) -> torch.Tensor:
    """A grad with stride 0 (one value, or one row, in memory), as expand makes it."""
    if dim is None:
        return (torch.randn(1, generator=gen) * scale).expand(SHAPE)
    return (torch.randn(SHAPE[1], generator=gen) * scale).expand(SHAPE)


@pytest.mark.parametrize(("rp_cls", "kw"), RULES)
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_broadcast_grads_step_as_their_values(rp_cls, kw, fallback):
    """torch's for-loop step takes a broadcast grad (stride 0) as the values it holds (its fused
    kernels read it as contiguous memory, past its end). Ours equals the step with a contiguous
    copy of the grad, and leaves the grad as it was."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(SHAPE, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = rp_cls([a], **kw), rp_cls([b], **kw)
    if fallback:
        _on_the_fallback(ref)
        _on_the_fallback(opt)
    for step in range(4):
        g = _broadcast(gen, dim=None if step % 2 else 0)
        kept = g.clone()
        a.grad, b.grad = g.contiguous(), g
        ref.step()
        opt.step()
        assert b.grad is g and b.grad.stride() == g.stride()
        assert_bits_equal(b.grad, kept, f"the grad at step {step}")
        assert_bits_equal(a, b, f"param at step {step}")
    for k, t in ref.state[a].items():
        assert_bits_equal(t, opt.state[b][k], k)
    a.grad, b.grad = torch.randn(SHAPE, generator=gen), None  # then a plain grad again, on a cached plan
    b.grad = a.grad.clone()
    ref.step()
    opt.step()
    assert_bits_equal(a, b, "param after a contiguous grad")


@pytest.mark.parametrize(("rp_cls", "kw"), RULES)
def test_broadcast_grad_with_a_grad_scale_is_left_scaled(rp_cls, kw):
    """With GradScaler's scale, contiguous grads are unscaled in place (as by torch's fused kernels).
    A broadcast grad's elements share one memory location, which has no place for each unscaled
    value: it keeps its scaled values, and the step equals the step on a contiguous copy."""
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(SHAPE, generator=gen)
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = rp_cls([a], **kw), rp_cls([b], **kw)
    g = _broadcast(gen, 1024.0)
    kept = g.clone()
    a.grad, b.grad = g.contiguous(), g
    for o in (ref, opt):
        o.step(grad_scale=torch.tensor(1024.0), found_inf=torch.zeros(()))
    assert_bits_equal(a, b, "param")
    assert_bits_equal(b.grad, kept, "the broadcast grad after the step")
    assert_bits_equal(a.grad, kept / 1024.0, "the contiguous grad, unscaled in place")


def test_non_contiguous_grads_other_than_broadcast_are_still_refused_by_their_reason():
    p = nn.Parameter(torch.randn(SHAPE))
    opt = rpo.SGD([p])
    p.grad = torch.randn(SHAPE[1], SHAPE[0]).t()
    with pytest.raises(ValueError, match="param group 0, param 0 has a non-contiguous grad"):
        opt.step()


def test_freed_grad_still_named_as_freed():
    p = nn.Parameter(torch.randn(64))
    opt = rpo.SGD([p])
    p.grad = torch.randn(64)
    p.grad.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="param group 0, param 0: the grad's data is not allocated"):
        opt.step()


# ---- 7. Adagrad's accumulator starts at the constructor's value, as torch's ---------------------

def test_adagrad_per_group_initial_accumulator_value_is_torchs():
    gen = torch.Generator().manual_seed(5)
    inits = [torch.randn(1003, generator=gen) for _ in range(3)]
    ps = [[t.clone().requires_grad_() for t in inits] for _ in range(2)]
    opts = []
    for cls, extra, params in ((torch.optim.Adagrad, {"fused": True}, ps[0]), (rpo.Adagrad, {}, ps[1])):
        o = cls([{"params": [params[0]], "initial_accumulator_value": 0.5}, {"params": [params[1]]}],
                lr=0.1, initial_accumulator_value=0.25, **extra)
        o.add_param_group({"params": [params[2]], "initial_accumulator_value": 2.0})
        opts.append(o)
    for _ in range(3):
        for a, b in zip(*ps, strict=True):
            g = torch.randn(1003, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    for i, (a, b) in enumerate(zip(*ps, strict=True)):
        assert_bits_equal(a, b, f"param {i}")
        assert_bits_equal(opts[0].state[a]["sum"], opts[1].state[b]["sum"], f"sum {i}")


# ---- 8. stochastic rounding past 2^24 steps ----------------------------------------------------

@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_stochastic_rounding_draws_new_bits_past_2_24_steps(fallback):
    """The float32 `step` stops counting at 2^24. Two steps on identical inputs there (the same param,
    moments and grad; `step` reads 2^24 before and after each) must still round with new bits."""
    torch.manual_seed(6)
    n = 40_003
    p = torch.randn(n).bfloat16().requires_grad_()
    opt = rpo.Adam([p], lr=1e-3, bf16_stochastic_round=True)
    if fallback:
        _on_the_fallback(opt)
    g = torch.randn(n).bfloat16()
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    st["step"].fill_(2.0**24)
    for key in [k for k in st if k.startswith("sr_") and k != "sr_seed"]:
        st[key].fill_(2**24)  # the counter, whatever its name, at the same count
    before = {k: v.clone() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
    start = p.detach().clone()
    results = []
    for _ in range(3):
        with torch.no_grad():
            p.copy_(start)
            for k, v in before.items():
                st[k].copy_(v)
        p.grad = g.clone()
        opt.step()
        assert st["step"].item() == 2.0**24
        results.append(p.detach().clone())
    for i in (1, 2):
        changed = (results[i].view(torch.int16) != results[0].view(torch.int16)).sum().item()
        assert changed > n // 100, f"step {i} past 2^24 rounded {changed} of {n} elements differently"


def test_stochastic_rounding_past_2_24_steps_fallback_draws_the_kernels_bits():
    torch.manual_seed(7)
    n = 10_007
    init = torch.randn(n).bfloat16()
    grads = [torch.randn(n).bfloat16() for _ in range(3)]
    out = []
    for fallback in (False, True):
        torch.manual_seed(70)  # the seed each run draws for its state
        p = init.clone().requires_grad_()
        opt = rpo.Adam([p], lr=1e-3, bf16_stochastic_round=True)
        if fallback:
            _on_the_fallback(opt)
        for i, g in enumerate(grads):
            p.grad = g.clone()
            opt.step()
            if i == 0:
                opt.state[p]["step"].fill_(2.0**24 - 1)
                opt.state[p].pop("sr_step", None)  # as an old checkpoint: the counter starts from step
        out.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    assert_bits_equal(out[0][0], out[1][0], "param")
    assert out[0][1].keys() == out[1][1].keys()
    for k in out[0][1]:
        _assert_same_state(out[0][1][k], out[1][1][k], k)


def test_stochastic_rounding_resumes_from_a_checkpoint_without_the_counter():
    """A checkpoint written before the counter existed resumes with the bits it would have drawn."""
    torch.manual_seed(8)
    n = 10_007
    p = torch.randn(n).bfloat16().requires_grad_()
    grads = [torch.randn(n).bfloat16() for _ in range(6)]
    opt = rpo.Adam([p], lr=1e-3, bf16_stochastic_round=True)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    sd, resumed_from = copy.deepcopy(opt.state_dict()), p.detach().clone()
    old = copy.deepcopy(sd)
    for st in old["state"].values():
        st.pop("sr_step", None)
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    for checkpoint in (sd, old):
        q = resumed_from.clone().requires_grad_()
        opt2 = rpo.Adam([q], lr=1e-3, bf16_stochastic_round=True)
        opt2.load_state_dict(checkpoint)
        for g in grads[3:]:
            q.grad = g.clone()
            opt2.step()
        assert_bits_equal(p, q, "resumed param")


# ---- 9. complex params in SGD and Adagrad ------------------------------------------------------

COMPLEX_RULES = [
    pytest.param(torch.optim.SGD, rpo.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "dampening": 0.1},
                 ["momentum_buffer"], id="SGD"),
    pytest.param(torch.optim.SGD, rpo.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True},
                 ["momentum_buffer"], id="SGD-nesterov"),
    pytest.param(torch.optim.SGD, rpo.SGD, {"lr": 0.1}, [], id="SGD-plain"),
    pytest.param(torch.optim.Adagrad, rpo.Adagrad,
                 {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.5},
                 ["sum", "step"], id="Adagrad"),
]


@pytest.mark.parametrize(("ref_cls", "rp_cls", "kw", "keys"), COMPLEX_RULES)
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_complex_params_step_as_their_real_view(ref_cls, rp_cls, kw, keys, fallback):
    """A complex64 param steps as torch.view_as_real(param), bit for bit torch's fused step on that
    view, next to real params in the same group (as torch's own CPU default steps them)."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(5, 7), (1003,), (17,)]
    dtypes = [torch.complex64, torch.float32, torch.complex64]
    inits = [torch.randn(s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
    ours = [t.clone().requires_grad_() for t in inits]
    views = [(torch.view_as_real(t) if t.is_complex() else t).clone().requires_grad_() for t in inits]
    ref, opt = ref_cls(views, fused=True, **kw), rp_cls(ours, **kw)
    if fallback:
        _on_the_fallback(opt)
    for _ in range(3):
        for a, b in zip(views, ours, strict=True):
            g = torch.randn(b.shape, generator=gen, dtype=b.dtype)
            a.grad, b.grad = (torch.view_as_real(g) if g.is_complex() else g).clone(), g
        ref.step()
        opt.step()
    for i, (a, b) in enumerate(zip(views, ours, strict=True)):
        real = lambda t: torch.view_as_real(t) if t.is_complex() else t  # noqa: E731
        assert b.dtype == inits[i].dtype
        assert_bits_equal(a, real(b), f"param {i}")
        for k in keys:
            assert opt.state[b][k].dtype == (torch.float32 if k == "step" else b.dtype)
            assert_bits_equal(ref.state[a][k], real(opt.state[b][k]), f"state[{k!r}] of param {i}")


def test_complex_adagrad_accumulator_starts_like_torchs():
    """torch fills a complex param's sum with complex(v, v): v in both halves of the real view."""
    p = torch.randn(8, dtype=torch.complex64, requires_grad=True)
    ref = torch.optim.Adagrad([p.detach().clone()], initial_accumulator_value=0.5)
    opt = rpo.Adagrad([p], initial_accumulator_value=0.5)
    assert_bits_equal(next(iter(ref.state.values()))["sum"], opt.state[p]["sum"], "sum")


# ---- lower severity ------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_lion_steps_like_the_original(how):
    gen = torch.Generator().manual_seed(10)
    p = torch.randn(1003, generator=gen).requires_grad_()
    opt = rpo.Lion([p], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    p.grad = torch.randn(1003, generator=gen)
    opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = twin.param_groups[0]["params"][0]
    for o in (opt, twin):
        o.param_groups[0]["lr"] = 5e-4  # the decoupled decay still divides by the constructor's lr
    g = torch.randn(1003, generator=gen)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert_bits_equal(p, q, "param")
    assert_bits_equal(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"], "exp_avg")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_sgd_momentum_turned_on_mid_training_with_master_weights(dtype, fallback):
    """As with fp32 params and in torch: the buffer is created by the first step with momentum,
    which copies the grad (torch's fused SGD on the fp32 master is the reference)."""
    gen = torch.Generator().manual_seed(11)
    init = torch.randn(1003, generator=gen).to(dtype)
    master = init.float().requires_grad_()
    p = init.clone().requires_grad_()
    ref, opt = torch.optim.SGD([master], lr=0.1, fused=True), rpo.SGD([p], lr=0.1, master_weights=True)
    if fallback:
        _on_the_fallback(opt)
    for step in range(4):
        if step == 2:
            for o in (ref, opt):
                o.param_groups[0]["momentum"] = 0.9
        g = torch.randn(1003, generator=gen).to(dtype)
        master.grad, p.grad = g.float(), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(opt.state[p]["master_param"], master, "master")
    assert_bits_equal(p, master.detach().to(dtype), "param = master rounded")
    assert_bits_equal(opt.state[p]["momentum_buffer"], ref.state[master]["momentum_buffer"], "momentum_buffer")
