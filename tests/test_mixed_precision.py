"""bf16/fp16 params, master weights, bf16 moments and the fused GradScaler path."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from conftest import Run, assert_bits_equal, assert_same_run, randn_grads, randn_params, train_twins

import roundpipe.optim as rpo

SIZES = [0, 1, 15, 16, 17, 31, 33, 1003, 2**18 + 5]
LOW = [torch.bfloat16, torch.float16]


def make(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in sizes], gen


@pytest.mark.parametrize("dtype,amsgrad,decay", list(itertools.product(LOW, [False, True], ["none", "adam", "adamw"])))
def test_low_precision_params_bit_identical_to_torch_fused(dtype, amsgrad, decay):
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.0 if decay == "none" else 0.1,
              decoupled_weight_decay=decay == "adamw")
    train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(*SIZES, dtype=dtype), grads=randn_grads(),
                steps=30, kwargs=kw, ref_kwargs={"fused": True})


def reference_master_run(init, grads_per_step, **kw):
    """torch's fused Adam on fp32 masters with grad.float(), then param.copy_(master)."""
    lows = [p.clone() for p in init]
    masters = [p.float().requires_grad_() for p in init]
    opt = torch.optim.Adam(masters, fused=True, **kw)
    for grads in grads_per_step:
        for m, g in zip(masters, grads, strict=True):
            m.grad = g.float()
        opt.step()
        for low, m in zip(lows, masters, strict=True):
            low.copy_(m.detach())
    return lows, masters, opt


@pytest.mark.parametrize("dtype,amsgrad", list(itertools.product(LOW, [False, True])))
def test_master_weights_bit_identical_to_reference_sequence(dtype, amsgrad):
    init, gen = make(SIZES, dtype)
    steps = [[torch.randn(p.shape, generator=gen).to(dtype) for p in init] for _ in range(25)]
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.1)
    ours = [p.clone().requires_grad_() for p in init]
    opt = rpo.Adam(ours, master_weights=True, **kw)
    for grads in steps:
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    lows, masters, ref = reference_master_run(init, steps, **kw)
    for i, (p, low, m) in enumerate(zip(ours, lows, masters, strict=True)):
        st = opt.state[p]
        assert st["master_param"].dtype == torch.float32
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert_bits_equal(p, low, f"low-precision param {i}")
        assert_bits_equal(st["master_param"], m, f"master {i}")
        for k in ref.state[m]:
            assert_bits_equal(st[k], ref.state[m][k], f"state {k} of param {i}")


def test_master_weights_ignored_for_fp32_params():
    ours, _ = train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(1003), grads=randn_grads(), steps=5,
                          ours_kwargs={"master_weights": True}, ref_kwargs={"fused": True})
    assert "master_param" not in ours.opt.state[ours.params[0]]


def test_master_state_dict_round_trip_is_exact(tmp_path):
    init, gen = make([1003, 64], torch.bfloat16)
    grads = [[torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in init] for _ in range(20)]

    def run(split):
        ps = [p.clone().requires_grad_() for p in init]
        opt = rpo.Adam(ps, lr=1e-2, master_weights=True)
        for s, gs in enumerate(grads):
            if s == split:
                torch.save({"p": [p.detach() for p in ps], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
                ck = torch.load(tmp_path / "ckpt.pt")
                ps = [p.clone().requires_grad_() for p in ck["p"]]
                opt = rpo.Adam(ps, lr=1e-2, master_weights=True)
                opt.load_state_dict(ck["opt"])
                for p in ps:
                    assert opt.state[p]["master_param"].dtype == torch.float32
                    assert opt.state[p]["exp_avg"].dtype == torch.float32
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    assert_same_run(Run(*run(split=-1)), Run(*run(split=10)), "after reload")


def test_bf16_moments_drift_is_bounded():
    """bf16 moments round every step; the loss must stay close to the fp32-moment run."""
    def train(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        x = torch.randn(512, 32)
        y = torch.sin(x.sum(1, keepdim=True))
        opt = rpo.Adam(model.parameters(), lr=3e-3, **kw)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        return loss.item(), opt

    initial = torch.nn.functional.mse_loss(
        torch.zeros(512, 1), torch.sin(torch.randn(512, 32, generator=torch.Generator().manual_seed(0)).sum(1, keepdim=True))
    ).item()
    ref, _ = train()
    low, opt = train(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    # Both runs must have learned (loss well under the trivial predictor's), and
    # the bf16 run's final loss within 10% of the fp32 run's. bf16 keeps 8
    # mantissa bits (relative rounding 2^-9 = 0.2% per store); the step size
    # depends on m/sqrt(v), so per-step update errors are of that order and do
    # not compound into the loss beyond a few percent over 300 steps. 10% leaves
    # room for the moments' stagnation when (1-beta2)*g^2 falls below v's ulp.
    assert ref < 0.5 * initial
    assert abs(low - ref) <= 0.10 * ref, (low, ref)


def scaler_run(opt_factory, master, inf_at=(3,), steps=8, dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dtype)
    x, y = torch.randn(64, 16).to(dtype), torch.randn(64, 4).to(dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    opt = opt_factory(model)
    scales = []
    for s in range(steps):
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        scaler.scale(loss).backward()
        if s in inf_at:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        if master is not None:
            master.pull_grads(model)
            scaler.step(opt)
            master.push_params(model)
        else:
            scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


def test_grad_scaler_fused_matches_torch_fused():
    m1, o1, s1 = scaler_run(lambda m: rpo.Adam(m.parameters(), lr=1e-2), None)
    m2, o2, s2 = scaler_run(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True), None)
    assert s1 == s2 and s1[3] < s1[2]  # the inf step halved the scale
    assert_same_run(Run(list(m1.parameters()), o1), Run(list(m2.parameters()), o2), "GradScaler")
    # the skipped step left the counters at steps - skipped
    assert all(st["step"].item() == 7 for st in o1.state.values())


class _Masters:
    """The reference for master weights: fp32 copies stepped by torch fused."""

    def __init__(self, model):
        self.params = [p.detach().float().requires_grad_() for p in model.parameters()]

    def pull_grads(self, model):
        for m, p in zip(self.params, model.parameters(), strict=True):
            m.grad = p.grad.float()

    def push_params(self, model):
        with torch.no_grad():
            for m, p in zip(self.params, model.parameters(), strict=True):
                p.copy_(m)


@pytest.mark.parametrize("dtype", LOW)
def test_grad_scaler_with_master_weights_matches_reference(dtype):
    m1, o1, s1 = scaler_run(lambda m: rpo.Adam(m.parameters(), lr=1e-2, master_weights=True), None, dtype=dtype)
    holder = {}

    def ref_factory(model):
        holder["m"] = _Masters(model)
        return torch.optim.Adam(holder["m"].params, lr=1e-2, fused=True)

    class Lazy:
        def pull_grads(self, model):
            holder["m"].pull_grads(model)

        def push_params(self, model):
            holder["m"].push_params(model)

    m2, o2, s2 = scaler_run(ref_factory, Lazy(), dtype=dtype)
    assert s1 == s2
    for (n, a), b, mref in zip(m1.named_parameters(), m2.parameters(), holder["m"].params, strict=True):
        assert_bits_equal(a, b, n)
        assert_bits_equal(o1.state[a]["master_param"], mref, f"{n} master")


def test_found_inf_skips_everything():
    p = torch.randn(100, requires_grad=True)
    opt = rpo.Adam([p])
    p.grad = torch.randn(100)
    opt.step()
    before = copy.deepcopy((p.detach().clone(), opt.state_dict()))
    p.grad = torch.randn(100) * 1024
    opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    assert_bits_equal(p, before[0], "param")
    for k, v in opt.state[p].items():
        assert_bits_equal(v, before[1]["state"][0][k], k)


def test_mismatched_grad_dtype_raises_before_anything_changes():
    a = torch.randn(10).to(torch.bfloat16).requires_grad_()
    b = torch.randn(10).to(torch.bfloat16).requires_grad_()
    opt = rpo.Adam([{"params": [a]}, {"params": [b]}], master_weights=True)
    a.grad = torch.randn(10).to(torch.bfloat16)
    if hasattr(b, "grad_dtype"):
        b.grad_dtype = None  # torch >= 2.9 refuses a mismatched grad unless told to allow it
    b.grad = torch.randn(10).to(torch.float16)
    with pytest.raises(TypeError, match=r"param group 1, param 0.*grad dtype torch.float16"):
        opt.step()
    assert len(opt.state) == 0  # group 0's state was not created either
    with pytest.raises(TypeError, match="exp_avg_dtype"):
        rpo.Adam([a], exp_avg_dtype=torch.float16)


# ---- the direct bf16 loops (no staging) ---------------------------------------------------------
# bf16 params are stepped in place by their own vectorized loops (adam.c, adam_bf16_direct) for
# the layouts below; torch's tail elements and every other layout go through fp32 staging blocks.
# These tests cover what the tests above leave out: maximize, GradScaler's in-place unscale,
# NaN/Inf (torch writes a bf16 NaN as 0xFFFF in its vector loop and 0x7FC0 in its tail), and
# bf16 moments with a master copy or on fp32 params.


def grads_with_specials(shape, gen, dtype, step):
    """Random grads; at steps 4 and 9, NaN and +-Inf where each of torch's loops reads them.

    torch's fp32 kernel runs 8 lanes and its bf16/fp16 kernels 16, each followed by a scalar
    tail loop (which writes a bf16 NaN as 0x7FC0 where the vector loop writes 0xFFFF). So a NaN
    goes into the vector loop (positions 3, 17, 37), into the last element (every tail), and at
    n - n % 16 when n % 16 >= 8: in [n - n % 16, n - n % 8), which is the tail for 16-bit
    dtypes but the vector loop for fp32. A kernel that took 8-lane tails for 16-bit dtypes
    writes the wrong NaN bits there."""
    g = torch.randn(shape, generator=gen)
    n = g.numel()
    if step in (4, 9) and n > 40:
        flat = g.view(-1)
        flat[[3, 17, 37, -1]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
        if n % 16 >= 8:
            flat[n - n % 16] = float("nan")
    return g.to(dtype)


@pytest.mark.parametrize("dtype,amsgrad,maximize,decay,scaled", list(itertools.product(
    LOW, [False, True], [False, True], ["none", "adam", "adamw"], [False, True])))
def test_low_precision_flags_and_nans_match_torch_fused(dtype, amsgrad, maximize, decay, scaled):
    """bf16 runs the direct loops, fp16 the staging blocks."""
    kw = dict(lr=1e-2, amsgrad=amsgrad, maximize=maximize, weight_decay=0.0 if decay == "none" else 0.1,
              decoupled_weight_decay=decay == "adamw")

    def grads(step, params):
        gen = torch.Generator().manual_seed(3 + 7919 * step)
        gs = [grads_with_specials(p.shape, gen, dtype, step) for p in params]
        return [g * 64 for g in gs] if scaled else gs  # * 64: exact in bf16, a power of two

    def scale(step, opt, params):  # the attributes GradScaler sets; both optimizers read them in step()
        if scaled:
            opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(0.0)
    ours, ref = train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(*SIZES, seed=3, dtype=dtype),
                            grads=grads, steps=12, kwargs=kw, ref_kwargs={"fused": True}, before_step=scale)
    if scaled:
        for i, (x, y) in enumerate(zip(ours.params, ref.params, strict=True)):
            assert_bits_equal(x.grad, y.grad, f"unscaled grad {i}")


@pytest.mark.parametrize("param_dtype,amsgrad,decay", list(itertools.product(
    [torch.bfloat16, torch.float32], [False, True], ["none", "adam", "adamw"])))
def test_bf16_moments_match_fp32_reference(param_dtype, amsgrad, decay):
    """bf16 moments on bf16 params with master weights, and on fp32 params: each step computes
    in fp32 from the stored bf16 moments and rounds them to nearest-even when it stores them.
    Reference: torch's fused fp32 step on fp32 copies of the moments and of the master (or the
    fp32 param), rounded back to bf16 with .to() after every step. (bf16 moments on bf16 params
    without a master are torch's own bf16 layout, compared with torch fused above.)"""
    low_dtype = torch.bfloat16
    init, gen = make(SIZES, param_dtype, seed=5)
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.0 if decay == "none" else 0.1,
              decoupled_weight_decay=decay == "adamw")
    ours = [p.clone().requires_grad_() for p in init]
    opt = rpo.Adam(ours, master_weights=True, exp_avg_dtype=low_dtype, exp_avg_sq_dtype=low_dtype, **kw)
    ref_params = [p.float().requires_grad_() for p in init]  # the master, or the fp32 param
    ref = torch.optim.Adam(ref_params, fused=True, **kw)
    for s in range(12):
        grads = [grads_with_specials(p.shape, gen, param_dtype, s) for p in init]
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for r, g in zip(ref_params, grads, strict=True):
            r.grad = g.float()
        ref.step()
        with torch.no_grad():
            for r in ref_params:
                for k, t in ref.state[r].items():
                    if k != "step":
                        t.copy_(t.to(low_dtype).float())  # what bf16 storage keeps of the moments
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for i, (p, r) in enumerate(zip(ours, ref_params, strict=True)):
        st = opt.state[p]
        assert_bits_equal(p, r.to(param_dtype), f"param {i}")
        if param_dtype != torch.float32:
            assert_bits_equal(st["master_param"], r, f"master {i}")
        for k in names:
            assert st[k].dtype == low_dtype
            assert_bits_equal(st[k], ref.state[r][k].to(low_dtype), f"state {k} of param {i}")


def test_fp16_conversions_match_torch_on_every_half_and_many_floats():
    """The kernel's own fp16 conversions (adam.c, load_block / store_block: F16C, or _Float16
    without it). A step that leaves values unchanged (lr=0, zero grads) must write back every one
    of the 65536 fp16 bit patterns as torch's fused step does, and with master weights must round
    fp32 masters to fp16 as torch's .to(float16) does: all exponents, subnormal and overflow
    edges, ties, NaN payloads."""
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = torch.cat([halves, halves[:5]])  # 5 more: elements in torch's scalar tail loop too
    a, b = halves.clone().requires_grad_(), halves.clone().requires_grad_()
    oa, ob = rpo.Adam([a], lr=0.0), torch.optim.Adam([b], lr=0.0, fused=True)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    oa.step()
    ob.step()
    assert_bits_equal(a, b, "every fp16 bit pattern after a no-op step")

    gen = torch.Generator().manual_seed(7)
    edges = [0x387FF000, 0x38800000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x477FEFFF, 0x477FF000,
             0x47800000, 0x7F800000, 0x7F800001, 0x7FC12345, 0x00000001, 0x3F801000, 0x3F803000]
    ints = torch.cat([torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64),
                      torch.tensor(edges), -torch.tensor(edges) - 1]).to(torch.int32)
    # many values near fp16's range as well: random mantissas over its exponents
    near = (torch.randint(0x33000000, 0x47800000, (1 << 18,), generator=gen, dtype=torch.int64)).to(torch.int32)
    floats = torch.cat([ints, near, near | -(2**31)]).view(torch.float32)
    p = torch.zeros(floats.numel(), dtype=torch.float16, requires_grad=True)
    opt = rpo.Adam([p], lr=0.0, master_weights=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.state[p]["master_param"].copy_(floats)
    opt.step()
    master = opt.state[p]["master_param"]
    keep = ~floats.isnan()  # x + (-0) is x, except that it quiets a signaling NaN
    assert_bits_equal(master[keep], floats[keep], "master after a no-op step")
    assert bool(master[~keep].isnan().all())
    assert_bits_equal(p, master.to(torch.float16), "fp16 param rounded from its master")


@pytest.mark.parametrize("layout,amsgrad,decay", list(itertools.product(
    ["fp32", "bf16-master"], [False, True], ["none", "adam"])))
def test_scaled_maximize_nan_signs_match_torch_fused(layout, amsgrad, decay):
    """With a grad scale, torch's fp32 vector loop negates the grad for maximize (a NaN keeps
    its sign flipped) even with coupled decay, where it otherwise folds the -1 into the decay.
    fp32 params and master weights follow torch's fp32 rules. (AdamW + maximize has a known NaN
    sign difference in exp_avg_sq: tests/test_reliability.py.)"""
    master = layout == "bf16-master"
    dtype = torch.bfloat16 if master else torch.float32
    init, gen = make(SIZES, dtype, seed=11)
    kw = dict(lr=1e-2, amsgrad=amsgrad, maximize=True, weight_decay=0.0 if decay == "none" else 0.1)
    ours = [p.clone().requires_grad_() for p in init]
    opt = rpo.Adam(ours, master_weights=master, **kw)
    refs = [p.float().requires_grad_() for p in init]  # the fp32 param, or the master
    ref = torch.optim.Adam(refs, fused=True, **kw)
    for s in range(12):
        grads = [grads_with_specials(p.shape, gen, dtype, s) * 64 for p in init]
        for p, r, g in zip(ours, refs, grads, strict=True):
            p.grad, r.grad = g.clone(), g.float()
        for o in (opt, ref):
            o.grad_scale, o.found_inf = torch.tensor(64.0), torch.tensor(0.0)
        opt.step()
        ref.step()
    for i, (p, r) in enumerate(zip(ours, refs, strict=True)):
        assert_bits_equal(opt.state[p]["master_param"] if master else p, r, f"param or master {i}")
        assert_bits_equal(p, r.to(dtype), f"param {i}")
        for k in ref.state[r]:
            assert_bits_equal(opt.state[p][k], ref.state[r][k], f"state {k} of param {i}")


@pytest.mark.parametrize("layout,maximize,decay", list(itertools.product(
    ["bf16 params, fp32 moments", "fp16 params, fp32 moments", "fp32 params, bf16 moments",
     "bf16 master, bf16 moments"], [False, True], ["adam", "adamw"])))
def test_roundpipe_only_layouts_match_the_torch_fallback(layout, maximize, decay):
    """Layouts torch's fused kernel does not take are a fp32 step on fp32 copies: the native
    kernel must give the bits of roundpipe's own torch fallback (_torch_fused_step), which runs
    exactly that through torch's fused fp32 kernel."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[layout[:4]]
    moments = torch.bfloat16 if "bf16 moments" in layout else torch.float32
    master = "master" in layout
    kw = dict(lr=1e-2, maximize=maximize, weight_decay=0.1, decoupled_weight_decay=decay == "adamw",
              master_weights=master, exp_avg_dtype=moments, exp_avg_sq_dtype=moments)

    def fallback(params, **kw):
        opt = rpo.Adam(params, **kw)
        opt._kernel = None  # what a host without a compiler runs
        return opt
    # NaN/Inf grads except where torch's own bits are not a fixed rule: its .float() of an fp16
    # NaN depends on where the element falls, and so does the NaN sign of AdamW + maximize in its
    # fp32 kernel (the known difference in tests/test_reliability.py)
    specials = dtype != torch.float16 and not (maximize and decay == "adamw")

    def grads(step, params):
        gen = torch.Generator().manual_seed(13 + 7919 * step)
        return [grads_with_specials(p.shape, gen, dtype, step if specials else 0) for p in params]
    train_twins(rpo.Adam, fallback, params=randn_params(*SIZES, seed=13, dtype=dtype), grads=grads, steps=10,
                kwargs=kw)
