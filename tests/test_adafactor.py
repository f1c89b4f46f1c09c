"""roundpipe.optim.Adafactor against torch.optim.Adafactor (torch 2.13, foreach=False).

Reductions that fit in one reduction chunk (_engine.RCHUNK_ELEMS elements) are summed in
torch's order, so every test shape below gets torch's bits (NaN positions, not payloads);
bigger tensors fold chunk partials in a fixed order: tested with the chunk shrunk, against
the issue's bar (2 ulps, state within 1e-5 relative) and for thread independence. The
exhaustive matrix is scripts/adafactor_harness.py.
"""

from __future__ import annotations

import copy
import itertools
import textwrap
from typing import Any

import pytest
import torch

import roundpipe.optim as rpo
from roundpipe.optim import _engine
from conftest import assert_bits_equal, randn_grads, randn_params, run_python, train_twins

pytestmark = pytest.mark.usefixtures("_require_native_kernel")

# The spec table: rule -> (ours, torch's, flag grid, state keys per kind of param).
SPEC: dict[str, tuple[Any, Any, list[dict[str, Any]], dict[str, tuple[str, ...]]]] = {
    "Adafactor": (
        rpo.Adafactor, torch.optim.Adafactor,
        [dict(zip(("maximize", "weight_decay", "eps", "d", "lr"), v, strict=True)) for v in itertools.product(
            (False, True), (0.0, 0.1), ((None, 1e-3), (1e-30, 0.5)), (1.0, 3.0), (0.05,))]
        + [{"beta2_decay": -0.5, "lr": 2.0}, {"beta2_decay": 0.0}, {"lr": 0.0}],
        {"matrix": ("step", "row_var", "col_var"), "vector": ("step", "variance")},
    ),
}
OURS, TORCH, FLAGS, KEYS = SPEC["Adafactor"]
# 1-D to 4-D, odd sizes, rows and columns of length 1, a 0-dim param, a row longer than torch's 8 lanes
SHAPES = [(7,), (), (1,), (3, 5), (1, 9), (9, 1), (1, 1), (17, 33), (4, 3, 5), (2, 3, 4, 5), (3, 1, 7), (5, 2, 1), (2, 70)]
REF = {"foreach": False}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in ulps between float32 elements (NaN against NaN: 0)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.detach().contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    d = (ordered(a) - ordered(b)).abs()
    both = torch.isnan(a) & torch.isnan(b)
    d[both] = 0
    d[torch.isnan(a) ^ torch.isnan(b)] = 1 << 40
    return int(d.max()) if d.numel() else 0


def _ulps16(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in ulps between two 16-bit tensors of finite values."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.detach().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return int((ordered(a) - ordered(b)).abs().max())


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_fp32_is_torchs_bits(flags):
    train_twins(OURS, TORCH, params=randn_params(*SHAPES), grads=randn_grads(), steps=3, kwargs=flags,
                ref_kwargs=REF, nan_payloads=False)


def test_state_layout_is_torchs():
    a, b = train_twins(OURS, TORCH, params=randn_params((3, 4, 5), (6,)), grads=randn_grads(), steps=1,
                       ref_kwargs=REF)
    assert tuple(a.opt.state[a.params[0]]) == KEYS["matrix"]
    assert tuple(a.opt.state[a.params[1]]) == KEYS["vector"]
    assert a.opt.state[a.params[0]]["row_var"].shape == (3, 4, 1)
    assert a.opt.state[a.params[0]]["col_var"].shape == (3, 1, 5)


def _nan_inf_zero_grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    out = []
    for k, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        if k % 3 == 0 and g.numel() > 2:
            g.view(-1)[1] = float("nan")
            g.view(-1)[-1] = float("-inf")
        elif k % 3 == 1:
            g.zero_()
        out.append(g)
    return out


@pytest.mark.parametrize("maximize", [False, True])
def test_nan_inf_and_zero_grads_where_torch_has_them(maximize):
    train_twins(OURS, TORCH, params=randn_params(*SHAPES), grads=_nan_inf_zero_grads, steps=2,
                kwargs={"maximize": maximize}, ref_kwargs=REF, nan_payloads=False)


def test_zero_params_and_zero_element_params():
    """Zero params (alpha from eps2); a 0-element param is left as it is (torch divides by zero)."""
    zeros = lambda: [torch.zeros(5, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]  # noqa: E731
    train_twins(OURS, TORCH, params=zeros, grads=randn_grads(), steps=2, ref_kwargs=REF)
    empty = torch.zeros(0, 3, requires_grad=True)
    p = torch.randn(4, requires_grad=True)
    opt = OURS([empty, p])
    empty.grad, p.grad = torch.zeros(0, 3), torch.randn(4)
    opt.step()
    assert empty.shape == (0, 3) and opt.state[empty]["row_var"].shape == (0, 1)


# ---- reductions over more than one chunk -------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """Reduction chunks of 64 elements: params split over many, as big ones are at the default."""
    monkeypatch.setattr(_engine, "RCHUNK_ELEMS", 64)


BIG = [(40, 33), (3, 200), (300,), (301, 1), (6, 5, 7), (1, 150)]


def test_chunked_reductions_within_the_bar(small_chunks):
    """One step from the same state: state within 1e-5 of torch's, params within 2 ulps, or
    for elements whose step cancels most of the param, within 1e-6 of the step (the norms,
    summed in another order, differ by an ulp or two)."""
    params = randn_params(*BIG, seed=3)
    ours, ref = params(), params()
    oa, ob = OURS(ours), TORCH(ref, **REF)
    for step in range(3):
        grads = randn_grads(5)(step, ours)
        for x, y, g in zip(ours, ref, grads, strict=True):
            x.grad, y.grad = g.clone(), g.clone()
        before = [y.detach().clone() for y in ref]
        oa.step()
        ob.step()
        for x, y, y0 in zip(ours, ref, before, strict=True):
            x, y = x.detach(), y.detach()
            ulp = (torch.nextafter(y.abs(), torch.tensor(float("inf"))) - y.abs())
            assert ((x - y).abs() <= 2 * ulp + 1e-6 * (y - y0).abs()).all(), tuple(x.shape)
            for key in ob.state[y]:
                s, t = oa.state[x][key], ob.state[y][key]
                assert torch.allclose(s, t, rtol=1e-5, atol=0), (tuple(x.shape), key)
                s.copy_(t)  # the next step starts from the same state
            x.data.copy_(y)


def _train(threads: int, steps: int = 3, resume_at: int | None = None) -> list[torch.Tensor]:
    torch.set_num_threads(threads)
    params = randn_params(*BIG, seed=4)()
    opt = OURS(params, weight_decay=0.01)
    for step in range(steps):
        if step == resume_at:  # a state_dict round trip through a fresh optimizer
            sd = copy.deepcopy(opt.state_dict())
            opt = OURS(params, weight_decay=0.01)
            opt.load_state_dict(sd)
        for p, g in zip(params, randn_grads(6)(step, params), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params] + [t for p in params for t in opt.state[p].values()]


def test_chunked_reductions_are_the_same_bits_on_any_thread_count_and_after_a_round_trip(small_chunks, threads):
    one = _train(1)
    for other in (_train(2), _train(2, resume_at=2)):
        for a, b in zip(one, other, strict=True):
            assert_bits_equal(a, b, "1 vs 2 threads")


# ---- checkpoints, mixed precision, GradScaler ------------------------------------------------


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_checkpoint_both_ways_mid_training(direction):
    params = randn_params(*SHAPES[:8], seed=7)
    first, second = (TORCH, OURS) if direction == "torch->ours" else (OURS, TORCH)
    a, ref = params(), params()
    oa = first(a, **(REF if first is TORCH else {}))
    oref = TORCH(ref, **REF)
    grads = randn_grads(8)
    for step in range(5):
        if step == 3:
            sd = copy.deepcopy(oa.state_dict())
            oa = second(a, **(REF if second is TORCH else {}))
            oa.load_state_dict(sd)
        for x, y, g in zip(a, ref, grads(step, a), strict=True):
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        oref.step()
    for x, y in zip(a, ref, strict=True):
        assert_bits_equal(x, y, direction)
        for key in oref.state[y]:
            assert_bits_equal(oa.state[x][key], oref.state[y][key], f"{direction} state[{key!r}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [False, True])
def test_16bit_params_are_the_fp32_step_rounded_once(dtype, master):
    """Each step is torch's fp32 step on fp32 copies of the param (or master) and state, rounded
    once; eps1 None is the 16-bit dtype's epsilon, as torch takes it from the param. 16-bit state
    (no master) is rounded when stored in the first pass and read back by the update, as torch's
    16-bit state would be: the state is the reference's bits, the param within one 16-bit ulp."""
    shapes = [(5, 7), (9,), (2, 3, 4)]
    gen = torch.Generator().manual_seed(9)
    ours = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    opt = OURS(ours, weight_decay=0.1, master_weights=master)
    eps = (torch.finfo(dtype).eps, 1e-3)
    for step in range(3):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        ref = [(opt.state[p]["master_param"] if master and step else p.detach().float()).clone().requires_grad_()
               for p in ours]
        oref = TORCH(ref, weight_decay=0.1, eps=eps, **REF)
        for p, r in zip(ours, ref, strict=True):
            if opt.state[p]:
                oref.state[r] = {k: v.float().clone() for k, v in opt.state[p].items() if k != "master_param"}
        for p, r, g in zip(ours, ref, grads, strict=True):
            p.grad, r.grad = g.clone(), g.float()
        opt.step()
        oref.step()
        state_dtype = torch.float32 if master else dtype
        for p, r in zip(ours, ref, strict=True):
            if master:
                assert_bits_equal(p, r.detach().to(dtype), f"{dtype} param, step {step}")
            else:
                assert _ulps16(p, r.detach().to(dtype)) <= 1, f"{dtype} param, step {step}"
            if master:
                assert_bits_equal(opt.state[p]["master_param"], r, "master")
            for key, v in oref.state[r].items():
                if key != "step":
                    assert opt.state[p][key].dtype == state_dtype
                    assert_bits_equal(opt.state[p][key], v.to(state_dtype), f"state[{key!r}]")


def test_grad_scaler_matches_torchs():
    params = randn_params((6, 5), (7,), (3, 2, 2), seed=10)
    runs = []
    for cls, kw in ((OURS, {}), (TORCH, REF)):
        ps = params()
        opt = cls(ps, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
        for step in range(4):
            loss = sum((p * torch.randn(p.shape, generator=torch.Generator().manual_seed(step))).sum() for p in ps)
            if step == 2:
                loss = loss * float("inf")  # a skipped step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append((ps, opt))
    (a, oa), (b, ob) = runs
    for x, y in zip(a, b, strict=True):
        assert_bits_equal(x, y, "GradScaler param")
        for key in ob.state[y]:
            assert_bits_equal(oa.state[x][key], ob.state[y][key], f"GradScaler state[{key!r}]")


# ---- training -------------------------------------------------------------------------------


def test_loss_curve_follows_torch_for_300_steps(threads):
    torch.set_num_threads(1)  # tiny ops: torch's thread team costs more than they do on a busy host
    def run(cls, kw):
        torch.manual_seed(11)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        data = torch.randn(64, 16, generator=torch.Generator().manual_seed(12))
        target = torch.randn(64, 4, generator=torch.Generator().manual_seed(13))
        opt = cls(model.parameters(), lr=0.01, weight_decay=0.01, **kw)
        losses = []
        for _ in range(300):
            loss = torch.nn.functional.mse_loss(model(data), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)
    ours, ref = run(OURS, {}), run(TORCH, REF)
    assert ref[-1] < 0.5 * ref[0]  # it trains
    assert torch.allclose(ours, ref, rtol=1e-4, atol=0)


# ---- bad input ----------------------------------------------------------------------------------

BAD = [
    ({"beta2_decay": 0.5}, ValueError, "beta2_decay"),
    ({"d": 0.5}, ValueError, "Clipping threshold"),
    ({"eps": (-1.0, 1e-3)}, ValueError, "epsilon1"),
    ({"eps": (None, -1.0)}, ValueError, "epsilon2"),
    ({"lr": -0.1}, ValueError, "learning rate"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"lr": None}, TypeError, "lr"),
    ({"d": "1"}, TypeError, "d"),
    ({"eps": (None, None)}, TypeError, "eps"),
    ({"eps": 1e-3}, TypeError, "eps"),
]


@pytest.mark.parametrize(("bad", "exc", "match"), BAD)
def test_bad_hyperparameters_raise_before_anything_steps(bad, exc, match):
    with pytest.raises(exc, match=match):
        OURS([torch.randn(3, requires_grad=True)], **bad)
    a, b = torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = OURS([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1].update(bad)
    a.grad, b.grad = torch.randn(3, 2), torch.randn(4)
    before = a.detach().clone()
    with pytest.raises(exc, match=r"(?s)(?=.*param group 1)(?=.*" + match + ")"):
        opt.step()
    assert torch.equal(a, before) and not opt.state[a]


@pytest.mark.parametrize("case", ["complex", "sparse"])
def test_bad_params_raise_naming_group_and_param(case):
    a = torch.randn(3, requires_grad=True)
    a.grad = torch.randn(3)
    if case == "complex":
        b = torch.randn(4, dtype=torch.complex64, requires_grad=True)
        b.grad = torch.randn(4, dtype=torch.complex64)
        exc: type[Exception] = TypeError
    else:
        b = torch.randn(4, 2, requires_grad=True)
        b.grad = torch.randn(4, 2).to_sparse()
        exc = RuntimeError
    opt = OURS([a, b])
    before = a.detach().clone()
    with pytest.raises(exc, match="param group 0, param 1"):
        opt.step()
    assert torch.equal(a, before) and not opt.state[a]


def test_foreach_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="foreach"):
        opt = OURS([torch.randn(2, requires_grad=True)], foreach=True)
    assert opt.param_groups[0]["foreach"] is True


def test_fallback_without_a_compiler_is_torchs_step(tmp_path):
    code = textwrap.dedent(f"""
        import os, warnings
        os.environ["CC"] = "/nonexistent/cc"
        os.environ["ROUNDPIPE_CACHE_DIR"] = {str(tmp_path)!r}
        os.environ.pop("ROUNDPIPE_REQUIRE_NATIVE", None)
        warnings.simplefilter("ignore")
        import torch, roundpipe.optim as rpo
        assert not rpo.native_available()
        torch.manual_seed(0)
        shapes = [(5, 7), (9,), (2, 3, 4), (0, 3)]
        a = [torch.randn(s, requires_grad=True) for s in shapes]
        b = [p.detach().clone().requires_grad_() for p in a]
        r, o = torch.optim.Adafactor(a[:3], foreach=False, weight_decay=0.1), rpo.Adafactor(b, weight_decay=0.1)
        for _ in range(3):
            for x, y in zip(a, b):
                g = torch.randn(x.shape); x.grad = g.clone(); y.grad = g.clone()
            r.step(); o.step()
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        p = torch.randn(6, 4).bfloat16().requires_grad_()
        o = rpo.Adafactor([p], master_weights=True)
        for _ in range(2):
            p.grad = torch.randn(6, 4).bfloat16(); o.step()
        assert torch.equal(p, o.state[p]["master_param"].bfloat16())
        print("ok")
    """)
    res = run_python(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_tensor_lr_and_a_scheduler_as_torch():
    def schedule(step, opt, params):
        if step == 0:
            opt._sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # type: ignore[attr-defined]
        else:
            opt._sched.step()  # type: ignore[attr-defined]
    train_twins(OURS, TORCH, params=randn_params((5, 7), (9,)), grads=randn_grads(), steps=4,
                kwargs={"lr": torch.tensor(0.2)}, ref_kwargs=REF, before_step=schedule)
