"""Reliability: bad input raises and changes nothing; no asserts; NaN/Inf; fork; threads; resources.

Every check that could hang (fork, DataLoader workers, threads) runs under a timeout: in a
subprocess whose children arm SIGALRM, or on a thread joined with a timeout.
"""

from __future__ import annotations

import ast
import itertools
import os
import pathlib
import threading
import types

import pytest
import torch

from conftest import (Run, assert_bits_equal, assert_same_run, randn_grads, randn_params, run_python, train,
                      train_twins)

import roundpipe
import roundpipe.optim as rpo
from roundpipe import _build


# NaN *signs* that still differ from torch (NaN positions and every other bit match; see the
# helper's report). Strict: a fix turns the marked test into a failure, so the mark goes with it.
NAN_SIGN_ADAMW = (
    "NaN sign, AdamW + maximize: torch's build gives exp_avg_sq's NaN one sign in its unrolled "
    "vector loop and the other in its remainder vector and scalar tail (measured: 16+3 vs 8+5 "
    "elements): no rule by position within torch's 8-wide blocks reproduces it. NaN positions "
    "and every non-NaN bit match (test_nan_inf_positions_and_values_match_torch_fused)")


def known(reason):
    return pytest.mark.xfail(strict=True, reason=reason)



# ---- snapshots: every byte the optimizer could touch -----------------------------------


def _freeze(x):
    """A comparable copy of a value: tensors by layout, dtype, shape, strides and raw bytes."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        head = ("tensor", t.layout, t.dtype, tuple(t.shape), t.device.type)
        if t.device.type == "meta":
            return head, None
        if t.layout != torch.strided:
            t = t.coalesce() if t.layout == torch.sparse_coo else t
            return head, (_freeze(t.indices()), _freeze(t.values()))
        raw = t.contiguous().reshape(-1).view(torch.uint8).clone()
        return (*head, t.stride(), t.data_ptr()), raw
    if isinstance(x, (tuple, list)):
        return type(x).__name__, tuple(_freeze(v) for v in x)
    if isinstance(x, float) and x != x:
        return "nan"
    return repr(x)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def snapshot(opt) -> dict:
    """Params, grads, hyperparameters, which params have state, and every state tensor."""
    snap = {}
    for gi, group in enumerate(opt.param_groups):
        for key, value in group.items():
            if key != "params":
                snap[(gi, key)] = _freeze(value)
        snap[(gi, "params")] = tuple(id(p) for p in group["params"])
        for i, p in enumerate(group["params"]):
            snap[(gi, i, "param")] = _freeze(p)
            snap[(gi, i, "grad")] = _freeze(p.grad)
    snap["with_state"] = tuple(sorted(id(p) for p, s in opt.state.items() if s))
    for p, s in opt.state.items():
        for key, value in s.items():
            snap[("state", id(p), key)] = _freeze(value)
    return snap


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), f"keys changed: {set(before) ^ set(after)}"
    changed = [k for k in before if not _same(before[k], after[k])]
    assert not changed, f"changed by a step that raised: {changed}"


# ---- 1. bad input ------------------------------------------------------------------

SIZES0 = [40000, 7, 33]  # group 0; 40000 elements put the group on the threaded path
SIZES1 = [17, (6, 6), 9]  # group 1; the faults are injected into param 1, a square matrix
BAD = 1


class Model:
    """Two param groups, with state from earlier steps, and a deterministic grad schedule."""

    def __init__(self, cls, meta_param=False, **kw):
        gen = torch.Generator().manual_seed(0)
        self.g0 = [torch.randn(s, generator=gen).requires_grad_() for s in SIZES0]
        self.late = torch.randn(5, generator=gen).requires_grad_()  # no grad until step 2
        self.g1 = [torch.randn(s, generator=gen).requires_grad_() for s in SIZES1]
        if meta_param:  # torch fused rejects a meta param at construction, so only ours has it
            self.g1.append(torch.empty(4, device="meta", requires_grad=True))
        self.opt = cls(
            [{"params": self.g0 + [self.late]},
             {"params": self.g1, "lr": 3e-3, "amsgrad": True, "weight_decay": 0.1}],
            lr=1e-2, **kw,
        )

    def set_grads(self, step, in_place=False):
        """New grad tensors, or (in_place) new values in the existing ones, as backward()
        after zero_grad(set_to_none=False) gives: then the optimizer may reuse its plan."""
        gen = torch.Generator().manual_seed(100 + step)
        for p in self.g0 + self.g1 + [self.late]:
            if p.device.type != "cpu":
                continue
            g = torch.randn(p.shape, generator=gen)
            if p is self.late and step < 2:
                p.grad = None
            elif in_place and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g

    def run(self, steps):
        for s in range(steps):
            self.set_grads(s)
            self.opt.step()


def assert_same_training(ours: Model, ref: Model) -> None:
    def run(m: Model) -> Run:  # the meta param (ours only: torch fused refuses it) is never stepped
        return Run([p for g in m.opt.param_groups for p in g["params"] if p.device.type != "meta"], m.opt)
    if len(ours.opt.param_groups) != len(ref.opt.param_groups):
        raise AssertionError("a different number of param groups")
    assert_same_run(run(ours), run(ref))


def _swap_data(p, new):
    old = p.data
    p.data = new
    return lambda: setattr(p, "data", old)


def _swap_grad(p, new):
    old = p.grad
    p.grad = new
    return lambda: setattr(p, "grad", old)


def _set_hyper(key, value):
    def inject(m):
        group = m.opt.param_groups[1]
        old = group[key]
        group[key] = value
        return lambda: group.__setitem__(key, old)
    return inject


def _grad_dtype(m):
    p = m.g1[BAD]
    p.grad_dtype = None  # let torch accept a grad of another dtype
    undo = _swap_grad(p, p.grad.double())
    def restore():
        undo()
        p.grad_dtype = torch.float32
    return restore


def _inplace_grad(method, inverse):
    def inject(m):
        g = m.g1[BAD].grad
        method(g)  # the same grad object, same data pointer, new shape or strides
        return lambda: inverse(g)
    return inject


def _duplicate(into, source):
    def inject(m):
        params = m.opt.param_groups[into]["params"]
        params.append(m.opt.param_groups[source]["params"][0])  # smuggled in after construction
        return params.pop
    return inject


TENSOR = r"param group 1, param 1\b"
HYPER = r"param group 1\b"
FAULTS = {
    # name: (inject(model) -> undo, message pattern)
    "param float64": (lambda m: _multi(_swap_data(m.g1[BAD], m.g1[BAD].data.double()),
                                       _swap_grad(m.g1[BAD], m.g1[BAD].grad.double())), TENSOR),
    "grad float64": (_grad_dtype, TENSOR),
    "param on meta": (lambda m: _swap_grad(m.g1[3], torch.zeros(4, device="meta")), r"param group 1, param 3\b"),
    "sparse grad": (lambda m: _swap_grad(m.g1[BAD], m.g1[BAD].grad.to_sparse()), TENSOR),
    "non-contiguous param, new storage": (
        lambda m: _swap_data(m.g1[BAD], m.g1[BAD].data.t().contiguous().t()), TENSOR),
    "non-contiguous param, same storage": (lambda m: _swap_data(m.g1[BAD], m.g1[BAD].data.t()), TENSOR),
    "non-contiguous param, strided": (
        lambda m: _swap_data(m.g1[BAD], torch.randn(6, 12)[:, ::2]), TENSOR),
    "non-contiguous grad, new tensor": (
        lambda m: _swap_grad(m.g1[BAD], m.g1[BAD].grad.t().contiguous().t()), TENSOR),
    "non-contiguous grad, transposed in place": (_inplace_grad(torch.Tensor.t_, torch.Tensor.t_), TENSOR),
    "grad shape != param shape, param reshaped": (
        lambda m: _swap_data(m.g1[BAD], m.g1[BAD].data.reshape(36).clone()), TENSOR),
    "grad shape != param shape, grad unsqueezed in place": (
        _inplace_grad(lambda g: g.unsqueeze_(0), lambda g: g.squeeze_(0)), TENSOR),
    "grad shape != param shape, grad restrided in place": (
        _inplace_grad(lambda g: g.as_strided_((4, 9), (9, 1)), lambda g: g.as_strided_((6, 6), (6, 1))), TENSOR),
    "same tensor in two groups, 0 into 1": (_duplicate(1, 0), r"param group (0, param 0|1, param 4)\b"),
    "same tensor in two groups, 1 into 0": (_duplicate(0, 1), r"param group (1, param 0|0, param 4)\b"),
    "negative lr": (_set_hyper("lr", -1e-3), HYPER),
    "nan lr": (_set_hyper("lr", float("nan")), HYPER),
    "negative eps": (_set_hyper("eps", -1e-8), HYPER),
    "negative weight_decay": (_set_hyper("weight_decay", -0.1), HYPER),
    "beta1 = 1": (_set_hyper("betas", (1.0, 0.999)), HYPER),
    "beta2 = 1": (_set_hyper("betas", (0.9, 1.0)), HYPER),
    "beta1 < 0": (_set_hyper("betas", (-0.1, 0.999)), HYPER),
    "beta2 > 1": (_set_hyper("betas", (0.9, 1.5)), HYPER),
    "Tensor lr of 2 elements": (_set_hyper("lr", torch.tensor([1e-3, 2e-3])), HYPER),
    "Tensor lr of 0 elements": (_set_hyper("lr", torch.tensor([])), HYPER),
}


def _multi(*undos):
    return lambda: [u() for u in undos]  # data first, then the grad that must match it


MODES = [(0, False, "fresh"), (2, False, "with-state"), (2, True, "with-state-grads-in-place")]
BAD_INPUT_CASES = [
    pytest.param(fault, warm, in_place, id=f"{fault}-{mode}") for fault in FAULTS for warm, in_place, mode in MODES
]


@pytest.mark.parametrize("fault,warm_steps,in_place", BAD_INPUT_CASES)
def test_bad_input_raises_naming_the_param_and_changes_nothing(fault, warm_steps, in_place):
    inject, pattern = FAULTS[fault]
    ours = Model(rpo.Adam, meta_param=True)
    ours.run(warm_steps)
    # group 0 is fine and has grads, incl. one param with no state yet
    ours.set_grads(warm_steps, in_place=in_place)
    undo = inject(ours)
    before = snapshot(ours.opt)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=pattern):
        ours.opt.step()
    assert_unchanged(before, snapshot(ours.opt))
    # The same error again (nothing cached a half-checked plan), then nothing left behind:
    # once the input is repaired, training continues exactly as torch's would have.
    with pytest.raises((TypeError, ValueError, RuntimeError), match=pattern):
        ours.opt.step()
    assert_unchanged(before, snapshot(ours.opt))
    undo()
    ours.opt.step()
    ref = Model(torch.optim.Adam, fused=True)
    ref.run(warm_steps + 1)
    assert_same_training(ours, ref)


def test_closure_that_raises_changes_nothing():
    m = Model(rpo.Adam)
    m.run(2)
    m.set_grads(2)
    before = snapshot(m.opt)

    def closure():
        raise RuntimeError("loss exploded")
    with pytest.raises(RuntimeError, match="loss exploded"):
        m.opt.step(closure)
    assert_unchanged(before, snapshot(m.opt))
    m.opt.step()
    ref = Model(torch.optim.Adam, fused=True)
    ref.run(3)
    assert_same_training(m, ref)


def _params(*sizes):
    return [torch.randn(s).requires_grad_() for s in sizes]


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1e-3), "Invalid learning rate"), (dict(lr=-1.0), "Invalid learning rate"), (dict(lr=float("nan")), None),
    (dict(eps=-1e-8), "Invalid epsilon"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"), (dict(betas=(0.9, 1.0)), None),
    (dict(betas=(-0.5, 0.999)), None), (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"), (dict(lr=torch.zeros(2, 2)), None),
    (dict(betas=(torch.tensor(0.9), 0.999)), "both floats or both Tensors"),
], ids=str)
def test_bad_hyperparameters_at_construction(kw, match):
    """torch refuses each of these too; where torch's message is known, ours is a ValueError that
    says the same."""
    errors = (TypeError, ValueError, RuntimeError) if match is None else ValueError
    with pytest.raises(errors):
        torch.optim.Adam(_params(3), **kw)
    with pytest.raises(errors, match=match):
        rpo.Adam(_params(3), **kw)
    if "betas" in kw and isinstance(kw["betas"][0], torch.Tensor):
        return  # torch checks the float/Tensor mix of the defaults only, not per group; so does roundpipe
    # in the second of two groups: the message says which group
    with pytest.raises((TypeError, ValueError, RuntimeError), match=r"param group 1\b"):
        rpo.Adam([{"params": _params(3)}, {"params": _params(4), **kw}])


def test_bad_add_param_group_names_the_group_and_changes_nothing():
    m = Model(rpo.Adam)
    m.run(2)
    m.set_grads(2)
    before = snapshot(m.opt)
    with pytest.raises(ValueError, match=r"param group 2\b"):
        m.opt.add_param_group({"params": _params(3), "lr": -1.0})
    with pytest.raises(ValueError, match=r"param group 2, param 1\b"):
        m.opt.add_param_group({"params": [torch.randn(3, requires_grad=True), m.g1[0]]})
    assert_unchanged(before, snapshot(m.opt))
    m.opt.step()
    ref = Model(torch.optim.Adam, fused=True)
    ref.run(3)
    assert_same_training(m, ref)


def test_same_tensor_in_two_groups_at_construction():
    a, b = _params(3, 4)
    with pytest.raises(ValueError, match=r"param group 1, param 1\b"):
        rpo.Adam([{"params": [a]}, {"params": [b, a]}])


@pytest.mark.parametrize("in_place", [False, True], ids=["new-grads", "grads-in-place"])
def test_reset_state_tensor_between_steps_is_used(in_place):
    """Replacing a state tensor (a common way to reset moments) takes effect, as in torch,
    also when the grads are the same tensors each step (zero_grad(set_to_none=False))."""
    def grads(step, ps):
        gen = torch.Generator().manual_seed(4 + 7919 * step)
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        if in_place and ps[0].grad is not None:
            for p, g in zip(ps, gs, strict=True):
                p.grad.copy_(g)
            return None
        return gs

    def reset(step, opt, ps):
        if step == 2:
            for p in ps:
                opt.state[p]["exp_avg"] = torch.zeros_like(p)
                opt.state[p]["step"] = torch.tensor(0.0)
    train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(50000, 10, seed=4), grads=grads, steps=6,
                kwargs=dict(lr=1e-2), ref_kwargs={"fused": True}, after_step=reset)


@pytest.mark.parametrize("how", ["grad.data =", "grad.set_"])
def test_grad_storage_swapped_under_the_same_grad_object_is_used(how):
    """`p.grad.data = t` (older DDP/Horovod/apex code does this) or `p.grad.set_(t)` keeps the
    grad object and changes its storage: the step must read the new values, as torch's does."""
    def params():
        ps = randn_params(50000, 10, seed=6)()
        for p in ps:
            p.grad = torch.zeros(p.shape)
        return ps

    def grads(step, ps):
        gen = torch.Generator().manual_seed(6 + 7919 * step)
        for p in ps:
            g = torch.randn(p.shape, generator=gen)
            if how == "grad.data =":
                p.grad.data = g
            else:
                p.grad.set_(g)
    train_twins(rpo.Adam, torch.optim.Adam, params=params, grads=grads, steps=4, kwargs=dict(lr=1e-2),
                ref_kwargs={"fused": True})


@pytest.mark.parametrize("in_place", [False, True], ids=["new-grads", "grads-in-place"])
def test_param_replaced_in_its_group_is_the_one_stepped(in_place):
    """Model surgery: a new weight takes an old one's place in param_groups between steps.
    torch steps the new tensor (with fresh state) and leaves the old one alone."""
    def replace_then_grads(step, opt, ps):
        if step == 2:
            new = torch.randn(100, generator=torch.Generator().manual_seed(80)).requires_grad_()
            opt.param_groups[0]["params"][1] = new
            ps.append(new)  # the old one stays in the comparison: it keeps its state, untouched
        gen = torch.Generator().manual_seed(8 + 7919 * step)
        for p in opt.param_groups[0]["params"]:
            g = torch.randn(p.shape, generator=gen)
            if in_place and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g
    ours, ref = train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(40000, 100, 7, seed=8),
                            grads=lambda step, ps: None, steps=4, kwargs=dict(lr=1e-2), ref_kwargs={"fused": True},
                            before_step=replace_then_grads)
    n_ours, n_ref = len(ours.opt.state), len(ref.opt.state)
    assert n_ours == n_ref == 4, f"params with state: {n_ours}, torch: {n_ref} (4 expected)"


# ---- 2. no assert in library code; the checks hold under python -O ------------------


def test_no_assert_statements_in_library_code():
    root = pathlib.Path(roundpipe.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            # assert vanishes under python -O, and __debug__ is False there: either would make
            # the library behave differently under -O (.ci/run relies on neither existing)
            if isinstance(node, ast.Assert) or (isinstance(node, ast.Name) and node.id == "__debug__"):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert len(list(root.rglob("*.py"))) >= 3, "did not find the package sources"
    assert not found, f"assert or __debug__ in library code (both change under python -O): {found}"


OPTIMIZED_SCRIPT = r"""
import sys, torch
import roundpipe.optim as rpo
if __debug__:
    raise SystemExit("not running under -O")

def fail(msg):
    print("FAIL:", msg)
    raise SystemExit(1)

def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.int32)

gen = torch.Generator().manual_seed(0)
good = [torch.randn(n, generator=gen).requires_grad_() for n in (40000, 17)]
bad = [torch.randn(9, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
opt = rpo.Adam([{"params": good}, {"params": bad}], lr=1e-2)
for p in good + bad:
    p.grad = torch.randn(p.shape, generator=gen)
opt.step()
bad[1].data = bad[1].data.double(); bad[1].grad = None; bad[1].grad_dtype = None
bad[1].grad = torch.randn(5, dtype=torch.float64)
def take():
    global copies, states
    copies = {id(p): p.detach().clone() for p in good + bad}
    states = {(id(p), k): v.clone() for p in good + bad for k, v in opt.state[p].items()}
take()

def unchanged():
    for p in good + bad:
        if not torch.equal(bits(p), bits(copies[id(p)])):
            fail("a param changed")
        for k, v in opt.state[p].items():
            if not torch.equal(bits(v), bits(states[(id(p), k)])):
                fail(f"state {k} changed")

try:
    opt.step()
except (TypeError, ValueError, RuntimeError) as e:
    if "param group 1, param 1" not in str(e):
        fail(f"float64 param: message does not name the param: {e}")
else:
    fail("float64 param: no error under -O")
unchanged()
bad[1].data = bad[1].data.float(); bad[1].grad = bad[1].grad.float()
bad[1].grad = torch.randn(5, 2)[:, 0]      # non-contiguous grad
take()
try:
    opt.step()
except (TypeError, ValueError, RuntimeError) as e:
    if "param group 1, param 1" not in str(e):
        fail(f"non-contiguous grad: message does not name the param: {e}")
else:
    fail("non-contiguous grad: no error under -O")
unchanged()
bad[1].grad = torch.randn(5)
opt.param_groups[1]["lr"] = -1.0
take()
try:
    opt.step()
except ValueError as e:
    if "param group 1" not in str(e):
        fail(f"lr: message does not name the group: {e}")
else:
    fail("negative lr: no error under -O")
unchanged()
for bad_kw in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"eps": -1.0}, {"lr": torch.ones(2)}):
    try:
        rpo.Adam([torch.zeros(2, requires_grad=True)], **bad_kw)
    except ValueError:
        pass
    else:
        fail(f"{bad_kw}: no error under -O")

# bit-identity with torch fused under -O, threaded path included
def train(cls, **kw):
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(n, generator=g).requires_grad_() for n in (70001, 13, 0)]
    o = cls(ps, lr=1e-2, amsgrad=True, weight_decay=0.1, **kw)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        o.step()
    return ps
for a, b in zip(train(rpo.Adam), train(torch.optim.Adam, fused=True)):
    if not torch.equal(bits(a), bits(b)):
        fail("not bit-identical to torch fused under -O")
print("OK", rpo.native_available())
"""


def test_validation_and_bit_identity_under_python_O():
    res = run_python(OPTIMIZED_SCRIPT, args=["-O"], timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    assert res.stdout.split()[-1] == str(rpo.native_available())


# ---- 3. NaN and Inf --------------------------------------------------------------------

NAN_FLAGS = list(itertools.product([False, True], [False, True], [0.0, 0.1], [False, True]))


def _poisoned_grads(shape_numel, step, gen):
    g = torch.randn(shape_numel, generator=gen)
    n = g.numel()
    g[step % 5::97] = float("nan")
    g[(5 + step) % 7::101] = float("inf")
    g[7::103] = -float("inf")
    g[11::89] = -0.0
    g[13::83] = 3e38  # squares overflow to inf in exp_avg_sq
    g[17::79] = 1e-41  # subnormal: no flush-to-zero anywhere
    g[19::73] = -1e-45
    if step == 3:
        g[: n // 3] = float("nan")  # a whole stretch, incl. whole chunks and the tail region
    if step == 4:
        g[-3:] = float("inf")  # the scalar tail of torch's loop
    return g


def _nan_params():
    params = randn_params(40003, 1003, 13, seed=9)()
    with torch.no_grad():
        params[1][::211] = float("nan")  # NaN and Inf already in the weights
        params[1][3::223] = float("inf")
        params[2][0] = -float("inf")
    return params


def _nan_compare(flags, strict):
    """strict: every bit, NaN signs and payloads included; else NaN in the same places and
    every other value bit-identical."""
    def grads(step, ps):
        gen = torch.Generator().manual_seed(9 + 7919 * step)
        return [_poisoned_grads(p.numel(), step, gen) for p in ps]
    lr = 1e-2 if not flags["amsgrad"] else torch.tensor(1e-2)
    _, ref = train_twins(rpo.Adam, torch.optim.Adam, params=_nan_params, grads=grads, steps=6,
                         kwargs=dict(lr=lr, amsgrad=flags["amsgrad"], maximize=flags["maximize"],
                                     weight_decay=flags["weight_decay"], decoupled_weight_decay=flags["decoupled"]),
                         ref_kwargs={"fused": True}, nan_payloads=strict)
    assert torch.isnan(ref.params[1]).any()  # the run did exercise NaN


@pytest.mark.parametrize("amsgrad,maximize,weight_decay,decoupled", NAN_FLAGS)
def test_nan_inf_positions_and_values_match_torch_fused(amsgrad, maximize, weight_decay, decoupled):
    _nan_compare(dict(amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay, decoupled=decoupled), False)


@pytest.mark.parametrize("amsgrad,maximize,weight_decay,decoupled", [
    pytest.param(*f, marks=[known(NAN_SIGN_ADAMW)] if f[1] and f[3] else []) for f in NAN_FLAGS])
def test_nan_inf_bit_identical_to_torch_fused(amsgrad, maximize, weight_decay, decoupled):
    _nan_compare(dict(amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay, decoupled=decoupled), True)


def _one_step(cls, grads, **kw):
    p = torch.ones(grads[0].shape).requires_grad_()
    opt = cls([p], lr=1e-2, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt.state[p]


# 19 elements: 16 in torch's vector loop, the last 3 in its scalar tail loop
@pytest.mark.parametrize("kw", [
    pytest.param(dict(), id="no-decay"),
    pytest.param(dict(weight_decay=0.1), id="coupled-decay"),
    pytest.param(dict(weight_decay=0.1, decoupled_weight_decay=True), id="decoupled-decay",
                 marks=known(NAN_SIGN_ADAMW)),
])
def test_maximize_nan_grad_sign_matches_torch(kw):
    """maximize with a NaN grad: torch's build negates (flips the NaN's sign) in some paths."""
    g = torch.ones(19)
    g[0] = g[17] = float("nan")
    pa, sa = _one_step(rpo.Adam, [g], maximize=True, **kw)
    pb, sb = _one_step(torch.optim.Adam, [g], maximize=True, fused=True, **kw)
    for k in sb:
        assert_bits_equal(sa[k], sb[k], f"state[{k!r}]")
    assert_bits_equal(pa, pb, "param")


def test_amsgrad_max_with_nan_in_torch_tail_matches_torch():
    """max(max_exp_avg_sq, exp_avg_sq) when exp_avg_sq turns NaN, in the vector body and the tail."""
    g1 = torch.ones(19)
    g1[16:] = float("inf")
    g2 = torch.ones(19)
    g2[:2] = g2[16:] = float("nan")
    pa, sa = _one_step(rpo.Adam, [g1, g2], amsgrad=True)
    pb, sb = _one_step(torch.optim.Adam, [g1, g2], amsgrad=True, fused=True)
    for k in sb:
        assert_bits_equal(sa[k], sb[k], f"state[{k!r}]")
    assert_bits_equal(pa, pb, "param")


def test_nan_hyperparameters_edge_values_match_torch():
    """eps = 0 with zero grads gives 0/0; betas of 0; lr of 0: all as torch."""
    def grads(step, ps):
        gen = torch.Generator().manual_seed(2 + 7919 * step)
        return [torch.zeros(p.shape) if step == 0 else torch.randn(p.shape, generator=gen) for p in ps]
    for kw in [dict(eps=0.0), dict(betas=(0.0, 0.0)), dict(lr=0.0), dict(eps=0.0, amsgrad=True)]:
        train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(40001, 9, seed=2), grads=grads, steps=3,
                    kwargs={"lr": 1e-2, **kw}, ref_kwargs={"fused": True}, what=str(kw))


UNSAFE_MATH_FLAGS = ("-ffast-math", "-Ofast", "-ffinite-math-only", "-fno-signed-zeros", "-freciprocal-math",
                     "-funsafe-math-optimizations", "-fassociative-math", "-fno-trapping-math", "-ffp-contract=fast")


def test_kernel_is_compiled_without_finite_math_assumptions():
    """NaN/Inf must propagate: no flag that lets the compiler assume finite or reassociable math,
    and no implicit FMA contraction (every FMA is written as fmaf)."""
    flags = list(_build.COMPILE_FLAGS)
    bad = [f for f in flags if f in UNSAFE_MATH_FLAGS]
    assert not bad, f"unsafe math flags in the kernel build: {bad}"
    assert "-ffp-contract=off" in flags
    info = _build.INFO
    used = (getattr(info, "key_inputs", None) or {}).get("compile_flags")
    if used is not None:  # the flags the loaded kernel was built with
        assert not [f for f in used if f in UNSAFE_MATH_FLAGS], used
        assert "-ffp-contract=off" in used


# ---- 4. fork safety -----------------------------------------------------------------------

FORK_SCRIPT = r"""
import os, pickle, signal, sys, threading, torch
import roundpipe.optim as rpo
torch.set_num_threads(2)
N = (1 << 21) + 5   # > 1M elements: many chunks, the threaded path

def fail(msg):
    print("FAIL:", msg, flush=True)
    os._exit(1)

def make(cls, **kw):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(N, generator=g).requires_grad_()
    return p, cls([p], lr=1e-2, amsgrad=True, **kw), g

def raw(t):
    # numpy's copy, not torch's: in a forked child torch's own parallel ops (clone, copy_,
    # fill of > 32K elements) hang in libgomp unless the child calls set_num_threads(1)
    return t.detach().numpy().tobytes()

p, opt, g = make(rpo.Adam)
for _ in range(3):
    p.grad = torch.randn(N, generator=g)
    opt.step()
threads_after_step = len(os.listdir("/proc/self/task"))
if threads_after_step < 2:
    fail(f"the parent step ran on one thread ({threads_after_step} threads)")
next_grad = torch.randn(N, generator=g)

def child_main(out_fd, depth):
    signal.alarm(60)                     # a hung child dies instead of lingering
    # a grandchild, forked from this child before its own step, takes the same step
    sub = fork_and_collect(depth - 1) if depth > 0 else None
    opt.step()                           # a step in the forked child: p.grad is next_grad
    mine = raw(p)
    if sub is not None and sub != mine:
        os.write(out_fd, b"diff")
        os._exit(1)
    with os.fdopen(out_fd, "wb") as f:
        f.write(b"ok  ")
        pickle.dump(mine, f)
    os._exit(0)

def fork_and_collect(depth):
    p.grad = next_grad
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child_main(w, depth)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        status = f.read(4)
        data = pickle.load(f) if status == b"ok  " else None
    _, code = os.waitpid(pid, 0)
    if code != 0 or data is None:
        fail(f"child (depth {depth}) exited with {code}, status {status!r}")
    return data

# 1: a plain child and a child with a grandchild, after the parent's threaded steps
child_bits = fork_and_collect(0)
grandchild_bits = fork_and_collect(1)

# 2: a child forked while another thread of the parent is inside a threaded step
big = torch.zeros(1 << 24).requires_grad_()
big.grad = torch.ones(1 << 24)
big_opt = rpo.Adam([big])
stop = threading.Event()
def spin():
    while not stop.is_set():
        big_opt.step()
t = threading.Thread(target=spin)
t.start()
mid_step_bits = [fork_and_collect(0) for _ in range(3)]
stop.set()
t.join(60)
if t.is_alive():
    fail("the stepping thread hung")

# 3: the parent itself, still threaded after forking, takes the same step
p.grad = next_grad.clone()
opt.step()
parent_bits = raw(p)
for name, b in [("child", child_bits), ("grandchild", grandchild_bits)] + [("mid-step child", b) for b in mid_step_bits]:
    if b != parent_bits:
        fail(f"{name} step differs from the parent's")

# 4: and that step is torch's
q, ref, g = make(torch.optim.Adam, fused=True)
for _ in range(3):
    q.grad = torch.randn(N, generator=g)
    ref.step()
q.grad = next_grad.clone()
ref.step()
if raw(q) != parent_bits:
    fail("parent step differs from torch fused")
print("OK", threads_after_step, rpo.native_available(), flush=True)
"""


def test_fork_after_threaded_step_children_step_correctly():
    res = run_python(FORK_SCRIPT, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


DATALOADER_SCRIPT = r"""
import os, sys, torch
import roundpipe.optim as rpo
from torch.utils.data import DataLoader, Dataset
torch.set_num_threads(2)
N = (1 << 20) + 7

def one_step(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(N, generator=g).requires_grad_()
    opt = rpo.Adam([p], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        p.grad = torch.randn(N, generator=g)
        opt.step()
    return p.detach()

class Steps(Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        return one_step(i)                # each worker steps roundpipe itself

warm = one_step(100)                      # a threaded step in the parent before the workers fork
if len(os.listdir("/proc/self/task")) < 2:
    print("FAIL: parent step ran on one thread"); sys.exit(1)
loader = DataLoader(Steps(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                    timeout=60)           # a hung worker raises instead of blocking
for epoch in range(2):                    # workers forked twice, parent stepping in between
    for i, got in enumerate(loader):
        want = one_step(i)
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            print("FAIL: worker", i, "epoch", epoch); sys.exit(1)
    one_step(200)
print("OK")
"""


def test_dataloader_fork_workers_after_step():
    res = run_python(DATALOADER_SCRIPT, timeout=180)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# ---- 5. threads ---------------------------------------------------------------------------


def _train(cls, seed, sizes=(300001, 4099, 16), steps=8, **kw):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(steps)]
    opt = cls(ps, lr=1e-2, **kw)
    return ps, opt, grads


def _go(ps, opt, grads):
    for gs in grads:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g
        opt.step()
    return ps


def _join_all(ts, timeout=120):
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a stepping thread hung"


@pytest.mark.parametrize("nthreads", [1, 2])
def test_two_python_threads_step_two_optimizers_at_once(nthreads, threads):
    torch.set_num_threads(nthreads)
    kws = [dict(amsgrad=True, weight_decay=0.1), dict(maximize=True, decoupled_weight_decay=True, weight_decay=0.1)]
    runs = [_train(rpo.Adam, seed, **kw) for seed, kw in enumerate(kws)]
    errors = []
    barrier = threading.Barrier(2)

    def work(run):
        try:
            barrier.wait(30)
            for _ in range(5):  # many steps so that the two overlap
                _go(*run)
        except BaseException as e:  # reported below; a thread's exception would be lost
            errors.append(e)
    ts = [threading.Thread(target=work, args=(r,)) for r in runs]
    for t in ts:
        t.start()
    _join_all(ts)
    assert not errors, errors
    for seed, (kw, (pa, oa, _)) in enumerate(zip(kws, runs, strict=True)):
        pb, ob, gb = _train(torch.optim.Adam, seed, fused=True, **kw)
        for _ in range(5):
            _go(pb, ob, gb)
        assert_same_run(Run(pa, oa), Run(pb, ob), f"optimizer {seed}")


def test_bit_identical_across_thread_counts_and_runs(threads):
    """Any thread count, any run: the same bits as torch fused (which runs on one thread here)."""
    counts = sorted({1, 2, 3, os.cpu_count() or 1, 8})
    kw = dict(params=randn_params(0, 1, 5, 7, 15, 16, 17, 1000, 70001, 2**20 + 3, seed=3),
              grads=randn_grads(3), steps=10, kwargs=dict(lr=1e-2, amsgrad=True, weight_decay=0.1))
    torch.set_num_threads(1)
    ref = train(torch.optim.Adam, **{**kw, "kwargs": dict(kw["kwargs"], fused=True)})
    for n in counts:
        for rep in range(2):
            assert_same_run(train(rpo.Adam, threads=n, **kw), ref, f"{n} threads, run {rep}")


class _CountingKernel:
    """The kernel module, with rp_adam_step wrapped to read a counter before and after the C call."""

    def __init__(self, kernel, counter):
        self.ffi = kernel.ffi
        self.lib = types.SimpleNamespace(
            **{name: getattr(kernel.lib, name) for name in dir(kernel.lib) if name.startswith("rp_")})
        self.during = []
        real = kernel.lib.rp_adam_step

        def step(*args):
            before = counter[0]  # we hold the GIL here
            out = real(*args)
            self.during.append(counter[0] - before)  # and again here
            return out
        self.lib.rp_adam_step = step


def test_step_releases_the_gil(threads):
    torch.set_num_threads(1)  # the slowest step: the C call lasts longest
    n = 32 * 2**20
    p = torch.zeros(n).requires_grad_()
    p.grad = torch.ones(n)
    opt = rpo.Adam([p], amsgrad=True)
    counter = [0]
    opt._kernel = _CountingKernel(_build.load_kernel(), counter)
    stop = threading.Event()
    started = threading.Event()

    def spin():
        started.set()
        while not stop.is_set():
            counter[0] += 1
    t = threading.Thread(target=spin)
    t.start()
    try:
        assert started.wait(30)
        for _ in range(3):
            opt.step()
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert len(opt._kernel.during) == 3
    # With the GIL held through the C call the counter could not move while it ran.
    assert all(d > 0 for d in opt._kernel.during), opt._kernel.during


# ---- 6. resources ------------------------------------------------------------------------

RESOURCE_SCRIPT = r"""
import ctypes, gc, os, sys, threading, tracemalloc, torch
import roundpipe.optim as rpo
torch.set_num_threads(2)
PAGE = os.sysconf("SC_PAGE_SIZE")

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("FAIL: no mallinfo2 (glibc >= 2.33): the heap check needs it"); sys.exit(1)
libc.mallinfo2.restype = MallInfo2

def heap():
    # bytes malloc has handed out and not had back, over all arenas and mmapped blocks: exact,
    # unlike RSS, so a leak of a few bytes per step shows
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def fds():
    return len(os.listdir("/proc/self/fd"))

def tasks():
    return len(os.listdir("/proc/self/task"))

gen = torch.Generator().manual_seed(0)
# ~250K params over 20 tensors, in two groups: one on the threaded path, one serial
shapes = [(256, 512), (512,), (256, 256), (256,), (128, 128), (128,), (1000,), (3, 3, 3, 17), (7,), (1,),
          (64, 64), (64,), (32, 128), (32,), (100, 10), (10,), (999,), (5, 5), (3,), (1,)]
params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
opt = rpo.Adam([{"params": params[:10]}, {"params": params[10:], "amsgrad": True, "weight_decay": 0.1}], lr=1e-3)
for p, g in zip(params, grads):
    p.grad = g

for _ in range(100):   # warm-up: state, plans, the OpenMP pool, allocator pools
    opt.step()
gc.collect()
rss0, heap0, fd0, task0 = rss(), heap(), fds(), tasks()
for _ in range(1000):
    opt.step()
gc.collect()
rss1, heap1, fd1, task1 = rss(), heap(), fds(), tasks()

# Per-step Python allocations on the path that rebuilds the plan (new grad objects each
# step, as after zero_grad(set_to_none=True)): two pools of grads, swapped every step.
# Tracing starts before a warm-up so that objects alive at both snapshots were all
# allocated under tracing. torch's own step wrapper (profiler.record_function) keeps a few
# objects now and then, so torch.optim.Adam(fused=True) is measured the same way beside it.
pools = [grads, [g.clone() for g in grads]]
def traced_growth(o, ps):
    def step(i):
        for p, g in zip(ps, pools[i % 2]):
            p.grad = g
        o.step()
    tracemalloc.start()
    for i in range(100):
        step(i)
    gc.collect()
    snap0 = tracemalloc.take_snapshot()
    for i in range(500):
        step(i)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diff = snap1.compare_to(snap0, "filename")
    ours = sum(d.size_diff for d in diff if "roundpipe" in d.traceback[0].filename)
    return sum(d.size_diff for d in diff), ours, [str(d) for d in diff[:4]]
t_total, t_ours, top = traced_growth(opt, params)
ref_params = [p.detach().clone().requires_grad_() for p in params]
ref = torch.optim.Adam([{"params": ref_params[:10]}, {"params": ref_params[10:], "amsgrad": True,
                        "weight_decay": 0.1}], lr=1e-3, fused=True)
r_total, _, rtop = traced_growth(ref, ref_params)

# Optimizers built and dropped: no fd, thread or memory left behind each time.
for _ in range(300):
    o = rpo.Adam(params[:3])
    o.step()
    del o
gc.collect()
fd2, task2 = fds(), tasks()
print("RESULT", rss0, rss1, heap0, heap1, fd0, fd1, fd2, task0, task1, task2, t_total, t_ours, r_total)
print("TOP", top, rtop)
"""


def test_resources_do_not_grow_over_1000_steps():
    res = run_python(RESOURCE_SCRIPT, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    (rss0, rss1, heap0, heap1, fd0, fd1, fd2, task0, task1, task2, t_total, t_ours,
     r_total) = map(int, line.split()[1:])
    # The C heap, exactly (glibc's mallinfo2): the model and its state were allocated during the
    # warm-up, and a step allocates nothing that outlives it (measured: 0 bytes over 1,000 steps).
    # A leak of 8 bytes per step would show as 8,000 bytes; 4 KiB allows for one allocator
    # bookkeeping block. (This replaced 10,000 steps measured by RSS, which cannot see a leak
    # below about 100 bytes per step.)
    assert heap1 - heap0 <= 4096, f"the C heap grew by {heap1 - heap0} bytes over 1,000 steps"
    # Resident memory as well, for memory that does not come from malloc (mmap by a library):
    # 1 MiB allows for allocator and interpreter noise (a few pages).
    assert rss1 - rss0 <= 1 << 20, f"RSS grew by {(rss1 - rss0) / 2**20:.2f} MiB over 1,000 steps"
    # Python-level allocations over 500 steps: none by roundpipe's own code (512 bytes of
    # slack), and in total no more than torch's fused Adam shows (+4 KiB for interpreter
    # caches). A leak of one 16-byte object per step would show as 8,000 bytes.
    assert t_ours <= 512, f"roundpipe's allocations grew by {t_ours} bytes over 500 steps\n" + res.stdout
    assert t_total <= max(r_total, 0) + 4096, (
        f"traced memory grew by {t_total} bytes over 500 steps, torch fused's by {r_total}\n" + res.stdout)
    assert fd1 == fd0 and fd2 == fd0, f"file descriptors: {fd0} -> {fd1} -> {fd2}"
    assert task1 == task0 and task2 == task0, f"threads: {task0} -> {task1} -> {task2}"
