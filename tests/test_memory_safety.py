"""Memory safety under mutation, aliasing and concurrency, and checkpoints that keep their settings.

Each reproducer of issue 16 is a test. The ones that crashed the process (heap corruption,
SIGSEGV) run in a subprocess, so that a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import copy
import itertools
import textwrap

import pytest
import torch
from torch import nn

from conftest import assert_bits_equal, run_python

import roundpipe.optim as rpo


def _subprocess_ok(code: str, timeout: float = 240) -> str:
    res = run_python(textwrap.dedent(code), timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}")
    return res.stdout


def _twins(n: int = 100, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    init = torch.randn(n).to(dtype)
    a = init.clone().requires_grad_()
    b = init.clone().requires_grad_()
    return a, b, torch.optim.Adam([a], fused=True, **kw), rpo.Adam([b], **kw)


def _same_state(ref: torch.optim.Optimizer, opt: torch.optim.Optimizer, pr, po) -> None:
    assert_bits_equal(pr, po, "param")
    sr, so = ref.state[pr], opt.state[po]
    if set(sr) != set(so):
        raise AssertionError(f"state keys differ: {sorted(sr)} vs {sorted(so)}")
    for k in sr:
        assert_bits_equal(sr[k], so[k], f"state[{k!r}]")


# ---- 1. state storage replaced under the same tensor object ------------------------------------

@pytest.mark.parametrize("how", ["data", "set_", "resize"])
def test_state_storage_swapped_under_the_same_object_is_followed(how):
    code = f"""
        import torch, roundpipe.optim as rpo
        torch.manual_seed(0)
        for n in (10, 100_000):
            init = torch.randn(n)
            a = init.clone().requires_grad_(); b = init.clone().requires_grad_()
            ref = torch.optim.Adam([a], fused=True); opt = rpo.Adam([b])
            grads = [torch.randn(n) for _ in range(4)]
            for i, g in enumerate(grads):
                a.grad = g.clone(); b.grad = g.clone()
                ref.step(); opt.step()
                if i == 0:
                    for o, p in ((ref, a), (opt, b)):
                        st = o.state[p]["exp_avg"]
                        if "{how}" == "data":
                            st.data = st.data.clone()
                        elif "{how}" == "set_":
                            st.set_(st.clone())
                        else:
                            keep = st.clone()
                            st.untyped_storage().resize_(0)
                            st.untyped_storage().resize_(keep.numel() * 4)
                            st.copy_(keep)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "params differ"
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ref.state[a][k], opt.state[b][k]), k
        print("ok")
    """
    assert "ok" in _subprocess_ok(code)


def test_state_storage_freed_between_steps_raises_naming_it():
    a, b, ref, opt = _twins()
    b.grad = torch.ones_like(b)
    opt.step()
    opt.state[b]["exp_avg_sq"].untyped_storage().resize_(0)
    before = b.detach().clone()
    with pytest.raises(RuntimeError, match=r"param group 0, param 0.*exp_avg_sq.*not allocated"):
        opt.step()
    assert_bits_equal(b, before, "param after the refused step")


# ---- 2. a grad whose storage was freed ---------------------------------------------------------

def test_grad_with_freed_storage_raises_instead_of_crashing():
    out = _subprocess_ok("""
        import torch, roundpipe.optim as rpo
        p = torch.zeros(1000, requires_grad=True); opt = rpo.Adam([p]); p.grad = torch.ones(1000); opt.step()
        for first in (False, True):
            if first:
                p = torch.zeros(1000, requires_grad=True); opt = rpo.Adam([p])
            p.grad = torch.ones(1000); p.grad.untyped_storage().resize_(0)
            try:
                opt.step()
            except RuntimeError as e:
                assert "not allocated" in str(e) and "param group 0, param 0" in str(e), e
                assert "subclass" not in str(e), e
                print("raised", first)
        print("ok")
    """)
    assert "raised False" in out and "raised True" in out


def test_param_with_freed_storage_raises():
    p = torch.zeros(100, requires_grad=True)
    opt = rpo.Adam([p])
    p.grad = torch.ones(100)
    opt.step()
    p.untyped_storage().resize_(0)
    p.grad = torch.ones(100)
    with pytest.raises(RuntimeError, match="param group 0, param 0: the param's data is not allocated"):
        opt.step()


# ---- 3. step() entered from a second thread ------------------------------------------------------

def test_concurrent_steps_on_one_optimizer_are_serialized():
    out = _subprocess_ok("""
        import threading, torch, roundpipe.optim as rpo
        torch.set_num_threads(1)
        for trial in range(3):
            p = torch.zeros(16 << 20, requires_grad=True)   # 64 MiB
            opt = rpo.Adam([p])
            p.grad = torch.ones_like(p)
            t = threading.Thread(target=opt.step)
            t.start()
            new = torch.full_like(p, 2.0)
            p.grad = new
            del new
            opt.step()
            t.join()
            assert opt.state[p]["step"].item() == 2.0
            assert torch.isfinite(p).all()
        print("ok")
    """)
    assert "ok" in out


# ---- 4. two params over the same memory -----------------------------------------------------------

def test_params_sharing_memory_are_refused_naming_both():
    base = torch.randn(16384)
    ps = [nn.Parameter(torch.randn(16)), nn.Parameter(base), nn.Parameter(base)]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt = rpo.Adam(ps)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"param group 0, param 2 and param group 0, param 1 share memory"):
        opt.step()
    for p, b in zip(ps, before, strict=True):
        assert_bits_equal(p, b, "param after the refused step")
    assert not opt.state


def test_overlapping_views_across_groups_are_refused():
    flat = torch.zeros(100)
    a, b = nn.Parameter(flat[:60]), nn.Parameter(flat[50:])
    a.grad, b.grad = torch.ones(60), torch.ones(50)
    opt = rpo.Adam([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match=r"param group 1, param 0 and param group 0, param 0 share memory"):
        opt.step()


def test_state_tensor_over_a_param_is_refused():
    p = nn.Parameter(torch.randn(64))
    q = nn.Parameter(torch.randn(64))
    p.grad, q.grad = torch.ones(64), torch.ones(64)
    opt = rpo.Adam([p, q])
    opt.step()
    opt.state[q]["exp_avg"] = p.data  # the moment now aliases another param
    with pytest.raises(ValueError, match=r"share memory"):
        opt.step()


def test_one_step_tensor_shared_by_two_params_is_refused():
    p, q = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
    p.grad, q.grad = torch.ones(8), torch.ones(8)
    opt = rpo.Adam([p, q])
    opt.step()
    opt.state[q]["step"] = opt.state[p]["step"]
    with pytest.raises(ValueError, match=r"state\['step'\] of param group 0, param 1 and state\['step'\] of param group 0, param 0"):
        opt.step()


def test_non_overlapping_views_of_one_flat_buffer_still_step_like_torch(threads):
    torch.set_num_threads(2)
    torch.manual_seed(1)
    flat_ref, flat_rp = torch.randn(20000), None
    flat_rp = flat_ref.clone()
    cuts = [0, 7, 4103, 12000, 20000]
    pr = [nn.Parameter(flat_ref[a:b]) for a, b in itertools.pairwise(cuts)]
    po = [nn.Parameter(flat_rp[a:b]) for a, b in itertools.pairwise(cuts)]
    ref, opt = torch.optim.Adam(pr, fused=True), rpo.Adam(po)
    for _ in range(3):
        for a, b in zip(pr, po, strict=True):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert_bits_equal(flat_ref, flat_rp, "flat buffer")


# ---- 5. opt.state[p].clear() -------------------------------------------------------------------------

def test_cleared_state_is_reinitialized_like_torch():
    a, b, ref, opt = _twins()
    for i in range(4):
        g = torch.randn(100)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        if i == 1:
            ref.state[a].clear()
            opt.state[b].clear()
    _same_state(ref, opt, a, b)


# ---- 6. state_dict across dtypes ---------------------------------------------------------------------

@pytest.mark.parametrize(("saved", "resumed"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float16)])
def test_checkpoint_resumed_in_another_dtype_steps_like_torch(saved, resumed):
    torch.manual_seed(2)
    src = torch.randn(100).to(saved).requires_grad_()
    src_opt = torch.optim.Adam([src], fused=True)
    for _ in range(2):
        src.grad = torch.randn(100).to(saved)
        src_opt.step()
    sd = src_opt.state_dict()
    a = src.detach().to(resumed).requires_grad_()
    b = a.detach().clone().requires_grad_()
    ref, opt = torch.optim.Adam([a], fused=True), rpo.Adam([b])
    # torch's loader keeps a float32 `step` tensor as it is: each optimizer gets its own copy
    ref.load_state_dict(copy.deepcopy(sd))
    opt.load_state_dict(copy.deepcopy(sd))
    for _ in range(2):
        g = torch.randn(100).to(resumed)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    _same_state(ref, opt, a, b)


def test_fp32_master_and_fp32_moments_keep_their_dtype_on_load():
    p = torch.randn(64).bfloat16().requires_grad_()
    opt = rpo.Adam([p], master_weights=True)
    p.grad = torch.randn(64).bfloat16()
    opt.step()
    sd = opt.state_dict()
    q = p.detach().clone().requires_grad_()
    opt2 = rpo.Adam([q], master_weights=True)
    opt2.load_state_dict(sd)
    for k in ("exp_avg", "exp_avg_sq", "master_param"):
        assert opt2.state[q][k].dtype == torch.float32, k
        assert_bits_equal(opt2.state[q][k], opt.state[p][k], k)


# ---- 7. roundpipe options survive loading a torch checkpoint -----------------------------------------

def test_loading_a_torch_checkpoint_keeps_the_constructor_options():
    p = torch.randn(64).bfloat16().requires_grad_()
    tref = torch.optim.Adam([p], fused=True)
    p.grad = torch.randn(64).bfloat16()
    tref.step()
    q = p.detach().clone().requires_grad_()
    opt = rpo.Adam([q], master_weights=True, exp_avg_sq_dtype=torch.bfloat16)
    opt.load_state_dict(tref.state_dict())
    group = opt.param_groups[0]
    assert group["master_weights"] is True
    assert group["exp_avg_sq_dtype"] is torch.bfloat16
    q.grad = torch.randn(64).bfloat16()
    opt.step()
    st = opt.state[q]
    assert st["master_param"].dtype == torch.float32
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.bfloat16


# ---- 8. string booleans -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["maximize", "amsgrad", "decoupled_weight_decay", "capturable", "differentiable"])
def test_string_booleans_raise_type_error(name):
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match=name):
        rpo.Adam([p], **{name: "false"})
    opt = rpo.Adam([p])
    with pytest.raises(TypeError, match=rf"{name}.*param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4))], name: "false"})
    p.grad = torch.ones(4)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[0][name] = "false"
    with pytest.raises(TypeError, match=rf"{name}.*param group 0"):
        opt.step()
    assert_bits_equal(p, before, "param after the refused step")


# ---- 9. a first step skipped by GradScaler -------------------------------------------------------------

def test_skipped_first_step_creates_state_like_torch():
    a, b, ref, opt = _twins()
    g = torch.randn(100)
    a.grad, b.grad = g.clone(), g.clone()
    for o in (ref, opt):  # as GradScaler.step hands a fused optimizer its inf flag
        o.found_inf = torch.ones(())
        o.step()
        del o.found_inf
    _same_state(ref, opt, a, b)
    assert opt.state[b]["step"].item() == 0.0
    a.grad, b.grad = g.clone(), g.clone()
    ref.step()
    opt.step()
    _same_state(ref, opt, a, b)


# ---- 10. an error raised after mutation ------------------------------------------------------------------

def test_bad_step_tensor_in_a_later_group_changes_nothing():
    pa, pb = nn.Parameter(torch.randn(32)), nn.Parameter(torch.randn(32))
    opt = rpo.Adam([{"params": [pa]}, {"params": [pb]}])
    pa.grad, pb.grad = torch.ones(32), torch.ones(32)
    opt.step()
    opt.state[pb]["step"] = torch.zeros(2)
    before = [pa.detach().clone(), opt.state[pa]["step"].clone(), opt.state[pa]["exp_avg"].clone()]
    with pytest.raises(RuntimeError, match=r"param group 1, param 0 has state\['step'\] of shape \(2,\)"):
        opt.step()
    after = [pa, opt.state[pa]["step"], opt.state[pa]["exp_avg"]]
    for x, y in zip(before, after, strict=True):
        assert_bits_equal(x, y, "group 0 after the refused step")


# ---- lower severity ---------------------------------------------------------------------------------------

def test_param_dtype_changed_through_data_view_is_refused_like_torch():
    p = nn.Parameter(torch.randn(16).bfloat16())
    opt = rpo.Adam([p])
    p.grad = torch.randn(16).bfloat16()
    opt.step()
    p.grad = torch.randn(16).bfloat16()
    p.data = p.data.view(torch.float16)  # the bf16 grad stays
    with pytest.raises(TypeError, match="param group 0, param 0 has grad dtype torch.bfloat16 but param dtype torch.float16"):
        opt.step()


def test_fallback_does_not_rewrite_grads_without_a_grad_scale(tmp_path):
    out = _subprocess_ok(f"""
        import os, warnings
        os.environ["CC"] = "/nonexistent/cc"
        os.environ["ROUNDPIPE_CACHE_DIR"] = {str(tmp_path)!r}
        os.environ.pop("ROUNDPIPE_REQUIRE_NATIVE", None)
        warnings.simplefilter("ignore")
        import torch, roundpipe.optim as rpo
        assert not rpo.native_available()
        p = torch.randn(64).half().requires_grad_()
        opt = rpo.Adam([p], master_weights=True)
        p.grad = torch.randn(64).half()
        v = p.grad._version
        opt.step()
        assert p.grad._version == v, (p.grad._version, v)
        print("ok")
    """)
    assert "ok" in out


NAN_BITS_SCRIPT = """
import torch, roundpipe.optim as rpo
torch.manual_seed(0)
out = []
for kw in ({"master_weights": True}, {"exp_avg_dtype": torch.float32, "exp_avg_sq_dtype": torch.float32},
           {"master_weights": True, "weight_decay": 0.1, "maximize": True}):
    for scale in (None, torch.tensor(2.0)):
        p = torch.randn(40).half()
        p[1] = float("nan"); p.view(torch.int16)[2] = 0x7c01; p[6] = float("inf")
        p.requires_grad_()
        opt = rpo.Adam([p], **kw)
        g = torch.randn(40).half()
        g[3] = g[37] = float("nan"); g[5] = g[6] = float("inf"); g[7] = -float("inf"); g.view(torch.int16)[8] = 0x7c01
        for _ in range(2):
            p.grad = g.clone()
            opt.step(grad_scale=scale)
        out.append(p.detach().view(torch.int16).tolist() + p.grad.view(torch.int16).tolist()
                   + [t.view(torch.int32).tolist() for t in opt.state[p].values() if t.dtype == torch.float32])
print("BITS", out)
"""


def test_fallback_nan_bits_equal_the_kernels_for_fp16_with_fp32_state(tmp_path):
    """fp16 params with fp32 masters or moments, NaN/Inf in params and grads: the torch fallback
    writes the kernel's bits (params, unscaled grads, state)."""
    native = run_python(NAN_BITS_SCRIPT)
    fallback = run_python(NAN_BITS_SCRIPT, env={"CC": "/nonexistent/cc", "ROUNDPIPE_CACHE_DIR": str(tmp_path),
                                                "ROUNDPIPE_REQUIRE_NATIVE": "0", "PYTHONWARNINGS": "ignore"})
    assert native.returncode == 0, native.stderr[-2000:]
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    bits = [[ln for ln in r.stdout.splitlines() if ln.startswith("BITS")] for r in (native, fallback)]
    assert bits[0] and bits[0] == bits[1]


# ---- 11. dtypes and memory rechecked after a plan is cached (issue 21 item 4, issue 22) ---------------
# A step checks the cached tensors in one C pass over torch's structs where the probe in
# roundpipe/optim/_plan.py understood them, else in Python (the torch fallback, DTensors):
# each case runs both ways.

CHECKS = ["C", "Python"]
# Same-size dtypes a tensor can be viewed as in place (t.data = t.data.view(other)).
_RETYPE = {torch.float32: torch.int32, torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}


@pytest.fixture(params=CHECKS)
def check(request, monkeypatch):
    from roundpipe.optim import _plan
    monkeypatch.setattr(_plan, "META_CHECK", request.param == "C")
    return request.param


def _stepped(rule, dtype, **kw):
    """Two params, stepped twice with fresh grads (the plan is cached), and their grads for step 3."""
    torch.manual_seed(3)
    ps = [nn.Parameter(torch.randn(40).to(dtype)) for _ in range(2)]
    opt = rule(ps, **kw)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(40).to(dtype)
        if _ < 2:
            opt.step()
    return ps, opt


def _snapshot(opt, ps):
    return [x.detach().clone() for p in ps for x in (p, *[t for t in opt.state[p].values() if isinstance(t, torch.Tensor)])]


def _unchanged(before, opt, ps):
    for x, y in zip(before, _snapshot(opt, ps), strict=True):
        assert_bits_equal(x, y, "after the refused step")


def test_the_c_check_is_used_on_this_torch():
    """The probe must understand the torch the suite runs on: otherwise every step takes the
    Python checks, slower on many tensors (issue 22), and the C check goes untested."""
    from roundpipe import _build
    from roundpipe.optim import _plan
    assert _plan.meta_layout(_build.load_kernel("adam")) is not None
    ps, opt = _stepped(rpo.Adam, torch.float32)
    assert opt._plans[0].meta is not None


def test_the_probe_leaves_torch_rng_alone(monkeypatch):
    """The probe runs at a first step: it must not draw from torch's global generator, or the
    caller's next torch.randn (and bf16_stochastic_round's seeds) would depend on whether the
    kernel loaded (the torch fallback has no probe)."""
    from roundpipe.optim import _plan
    monkeypatch.setattr(_plan, "_layouts", {})
    p = nn.Parameter(torch.randn(40))
    p.grad = torch.randn(40)
    opt = rpo.Adam([p])
    before = torch.get_rng_state()
    opt.step()
    print("DBG", _plan.META_CHECK, opt._kernel, _plan._layouts, opt._plans[0].kernel)
    assert opt._plans[0].meta is not None  # the probe ran
    assert torch.equal(torch.get_rng_state(), before)


RETYPED_STATE = [(rpo.Adam, {}, "exp_avg"), (rpo.Adam, {"amsgrad": True}, "max_exp_avg_sq"),
                 (rpo.SGD, {"momentum": 0.9}, "momentum_buffer"), (rpo.Adagrad, {}, "sum"), (rpo.Lion, {}, "exp_avg"),
                 (rpo.Adam, {"master_weights": True}, "master_param")]


@pytest.mark.parametrize("rule,kw,key,dtype", [
    pytest.param(rule, kw, key, dtype, id=f"{rule.__name__}-{key}-{dtype}") for rule, kw, key in RETYPED_STATE
    for dtype in (torch.float32, torch.bfloat16) if not (key == "master_param" and dtype == torch.float32)])  # fp32: no master
def test_state_tensor_retyped_in_place_is_refused_like_a_fresh_optimizer(rule, kw, key, dtype, check):
    ps, opt = _stepped(rule, dtype, **kw)
    t = opt.state[ps[1]][key]
    t.data = t.data.view(_RETYPE[t.dtype])
    before = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=rf"param group 0, param 1 has state\['{key}'\] of dtype {t.dtype}"):
        opt.step()
    _unchanged(before, opt, ps)
    fresh = rule(ps, **kw)  # what the recheck must agree with: a fresh optimizer given this state
    for p in ps:
        fresh.state[p].update(opt.state[p])
    with pytest.raises(RuntimeError, match=rf"param group 0, param 1 has state\['{key}'\]"):
        fresh.step()


@pytest.mark.parametrize("rule,kw", [(rpo.Adam, {}), (rpo.SGD, {"momentum": 0.9}), (rpo.Adagrad, {}), (rpo.Lion, {})],
                         ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_retyped_in_place_is_refused_naming_the_param(rule, kw, dtype, check):
    """``g.data = g.data.view(torch.float16)`` on a bf16 grad: same size, same address, the
    grad object stepped before; a fresh optimizer and torch's fused kernels refuse it."""
    ps, opt = _stepped(rule, dtype, **kw)
    for in_place in (False, True):  # a new grad object, or the one the last step read
        g = ps[1].grad if not in_place else opt._plans[0].grads[1]
        ps[1].grad = g
        g.data = g.data.view(_RETYPE[dtype])
        before = _snapshot(opt, ps)
        with pytest.raises(TypeError, match=rf"param group 0, param 1 has grad dtype {g.dtype} but param dtype {dtype}"):
            opt.step()
        _unchanged(before, opt, ps)
        g.data = g.data.view(dtype)
    opt.step()  # repaired: steps again


@pytest.mark.parametrize("how", ["data", "set_", "resize", "freed", "replaced", "cleared"])
def test_state_churn_is_followed_or_refused_both_ways(how, check):
    """The storage-churn cases of section 1, in process, through both checks: the state tensor's
    memory moved under the same object is followed; a freed one is refused naming it."""
    a, b, ref, opt = _twins(1000)
    for i in range(4):
        g = torch.randn(1000)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        if i == 2 and how == "freed":
            opt.state[b]["exp_avg"].untyped_storage().resize_(0)
            with pytest.raises(RuntimeError, match=r"param group 0, param 0.*exp_avg.*not allocated"):
                opt.step()
            return
        opt.step()
        if i == 1 and how != "freed":
            for o, p in ((ref, a), (opt, b)):
                st = o.state[p]["exp_avg"]
                if how == "data":
                    st.data = st.data.clone()
                elif how == "set_":
                    st.set_(st.clone())
                elif how == "resize":
                    keep = st.clone()
                    st.untyped_storage().resize_(0)
                    st.untyped_storage().resize_(keep.numel() * 4)
                    st.copy_(keep)
                elif how == "replaced":
                    o.state[p]["exp_avg"] = st.clone()
                else:
                    o.state[p].clear()
    _same_state(ref, opt, a, b)


def test_grad_and_param_churn_both_ways(check):
    """Grads moved, freed, transposed or reshaped in place, and a param moved, after a cached step."""
    p = nn.Parameter(torch.randn(6, 4))
    opt = rpo.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(6, 4)
    opt.step()
    opt.step()
    p.grad.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="param group 0, param 0: the grad's data is not allocated"):
        opt.step()
    p.grad = torch.randn(6, 4)
    opt.step()
    p.grad.t_()
    with pytest.raises(ValueError, match="param group 0, param 0 has grad shape"):
        opt.step()
    p.grad.t_()
    p.grad.as_strided_((6, 4), (1, 6))
    with pytest.raises(ValueError, match="param group 0, param 0 has a non-contiguous grad"):
        opt.step()
    p.grad = torch.ones(6, 4)
    p.data = p.data.clone()  # moved: the step must write the new memory
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)
    p.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="param group 0, param 0: the param's data is not allocated"):
        opt.step()


def test_broadcast_grad_kept_across_cached_steps_both_ways(check):
    """A broadcast grad (stride 0) is stepped through a contiguous copy made each step: the copy is
    what the C arrays point at and what the check records, so the same grad object, its values
    changed in place between steps, is checked and copied again every step (issue 21 with 22)."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(37, 29, generator=gen) for _ in range(2)]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    ref, opt = rpo.Adam(a, lr=0.1), rpo.Adam(b, lr=0.1)
    row = torch.randn(29, generator=gen)
    b[1].grad = row.expand(37, 29)  # the same object every step
    for step in range(4):
        row.copy_(torch.randn(29, generator=gen))
        plain = torch.randn(37, 29, generator=gen)
        a[0].grad, b[0].grad = plain, plain.clone()
        a[1].grad = b[1].grad.contiguous()
        ref.step()
        opt.step()
        assert b[1].grad.stride() == (0, 1)
        for x, y in zip(a, b, strict=True):
            assert_bits_equal(x, y, f"param at step {step}")
    for x, y in zip(a, b, strict=True):
        for k in ref.state[x]:
            assert_bits_equal(ref.state[x][k], opt.state[y][k], k)


def test_adafactor_state_not_param_shaped_rechecked_both_ways(check):
    """Adafactor's per-param state keys (row_var/col_var for a matrix, variance for a vector: a
    group whose params differ in keys) are rechecked on a cached plan like every rule's: one moved
    under the same object is followed, one retyped in place is refused naming the param."""
    torch.manual_seed(6)
    init = [torch.randn(12, 7), torch.randn(9), torch.randn(3, 4, 5)]
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]
    ref, opt = torch.optim.Adafactor(a, foreach=False), rpo.Adafactor(b)
    for step in range(4):
        for x, y in zip(a, b, strict=True):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        ref.step()
        opt.step()
        if step == 1:
            for o, ps in ((ref, a), (opt, b)):
                o.state[ps[0]]["col_var"].data = o.state[ps[0]]["col_var"].data.clone()
                o.state[ps[1]]["variance"].set_(o.state[ps[1]]["variance"].clone())
        for x, y in zip(a, b, strict=True):
            assert_bits_equal(x, y, f"param at step {step}")
    assert opt._plans[0].meta is not None or check == "Python"
    t = opt.state[b[2]]["row_var"]
    t.data = t.data.view(torch.int32)
    for y in b:
        y.grad = torch.randn_like(y)
    before = _snapshot(opt, b)
    with pytest.raises(RuntimeError, match=r"param group 0, param 2 has state\['row_var'\] of dtype torch.int32"):
        opt.step()
    _unchanged(before, opt, b)
