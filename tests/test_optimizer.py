"""roundpipe.optim.Adam behaves like any torch optimizer: signature, checks, groups, state_dict, caching."""

from __future__ import annotations

import inspect
import pickle
import warnings

import pytest
import torch

from conftest import assert_bits_equal, randn_grads, randn_params, train_twins

import roundpipe.optim as rpo


def test_signature_extends_torch_adam_exactly():
    ours = list(inspect.signature(rpo.Adam.__init__).parameters.values())
    theirs = list(inspect.signature(torch.optim.Adam.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    # the extras are keyword-only, after torch's
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])
    w_ours = inspect.signature(rpo.AdamW.__init__).parameters
    assert w_ours["weight_decay"].default == inspect.signature(torch.optim.AdamW.__init__).parameters["weight_decay"].default


@pytest.mark.parametrize("name", ["foreach", "fused"])
@pytest.mark.parametrize("value", [True, False])
def test_foreach_and_fused_warn_and_are_ignored(name, value):
    p = torch.zeros(3, requires_grad=True)
    with pytest.warns(UserWarning, match=f"ignores {name}"):
        opt = rpo.Adam([p], **{name: value})
    assert opt.param_groups[0][name] is value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rpo.Adam([p])  # None: no warning


@pytest.mark.parametrize("name", ["capturable", "differentiable"])
def test_capturable_and_differentiable_are_refused(name):
    with pytest.raises(ValueError, match=f"{name}=True is not supported"):
        rpo.Adam([torch.zeros(3, requires_grad=True)], **{name: True})


# Hyperparameter checks: tests/test_reliability.py (test_bad_hyperparameters_at_construction).


def test_param_groups_add_group_zero_grad_closure_and_none_grads():
    torch.manual_seed(0)
    a, b, c, empty = (torch.randn(5, requires_grad=True) for _ in range(3)), None, None, None
    a, b, c = list(a)
    empty = torch.zeros(0, requires_grad=True)
    ours = rpo.Adam([{"params": [a, empty]}, {"params": [b], "lr": 0.1, "amsgrad": True}], lr=1e-2)
    ref = torch.optim.Adam([{"params": [x := a.detach().clone().requires_grad_(), e2 := empty.detach().clone().requires_grad_()]},
                            {"params": [y := b.detach().clone().requires_grad_()], "lr": 0.1, "amsgrad": True}],
                           lr=1e-2, fused=True)
    for step in range(6):
        if step == 3:
            ours.add_param_group({"params": [c], "weight_decay": 0.5})
            ref.add_param_group({"params": [z := c.detach().clone().requires_grad_()], "weight_decay": 0.5})
        ours.zero_grad(set_to_none=step % 2 == 0)
        ref.zero_grad(set_to_none=step % 2 == 0)

        def closure(params):
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss

        pa = [a, empty] + ([c] if step >= 3 else [])  # b never gets a grad after step 0
        pr = [x, e2] + ([z] if step >= 3 else [])
        if step == 0:
            pa.append(b)
            pr.append(y)
        la = ours.step(lambda pa=pa: closure(pa))
        lb = ref.step(lambda pr=pr: closure(pr))
        assert la.item() == lb.item()
    for u, v in [(a, x), (b, y), (c, z), (empty, e2)]:
        assert_bits_equal(u, v, "param")
    # b's grad was None only after a set_to_none zero_grad: skipped exactly as torch skips it
    assert ours.state[b]["step"].item() == ref.state[y]["step"].item() < 6
    lonely = torch.zeros(3, requires_grad=True)
    ours.add_param_group({"params": [lonely]})
    ours.step()
    assert lonely not in ours.state  # never had a grad: no state, untouched


# State layout and state_dict both ways (cross-loading): tests/test_ecosystem.py
# (test_state_dict_layout_matches_torch, test_switch_torch_to_roundpipe_and_back,
# test_roundpipe_checkpoint_into_torch_fused).


def test_old_pickles_and_python_number_steps_load():
    p = torch.randn(4, requires_grad=True)
    opt = rpo.Adam([p])
    p.grad = torch.ones(4)
    opt.step()
    state = opt.__getstate__()
    for g in state["param_groups"]:
        for key in ("master_weights", "exp_avg_dtype", "exp_avg_sq_dtype", "decoupled_weight_decay"):
            g.pop(key)
    state["state"][p]["step"] = 1.0  # very old torch pickles kept a Python number
    opt2 = rpo.Adam.__new__(rpo.Adam)
    opt2.__setstate__(state)
    assert opt2.param_groups[0]["master_weights"] is False
    assert torch.is_tensor(opt2.state[p]["step"])
    opt2.step()
    assert opt2.state[p]["step"].item() == 2
    pickle.loads(pickle.dumps(opt2))  # no cffi objects in the pickle


CHANGES = {
    # the plan cache must notice each of these between steps
    "param storage swapped": lambda s, ps, o: s == 4 and setattr(ps[0], "data", ps[0].data.clone()),
    "grad reused in place": lambda s, ps, o: s >= 4 and setattr(ps[1], "grad", ps[1].grad) ,
    "state tensor replaced": lambda s, ps, o: s == 4 and o.state[ps[0]].__setitem__("exp_avg", o.state[ps[0]]["exp_avg"].clone()),
    "step tensor replaced": lambda s, ps, o: s == 4 and o.state[ps[0]].__setitem__("step", o.state[ps[0]]["step"].clone()),
    "grad set to None": lambda s, ps, o: s == 5 and setattr(ps[1], "grad", None),
    "state cleared": lambda s, ps, o: s == 5 and o.state.clear(),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_plan_cache_follows_changes_between_steps(name):
    train_twins(rpo.Adam, torch.optim.Adam, params=randn_params(40, 9), grads=randn_grads(), steps=8,
                kwargs=dict(lr=1e-2), ref_kwargs={"fused": True},
                before_step=lambda step, opt, ps: CHANGES[name](step, ps, opt), what=name)


def test_same_grads_reused_across_steps_match_torch():
    def params():
        p = torch.randn(100, generator=torch.Generator().manual_seed(0)).requires_grad_()
        p.grad = torch.ones(100)
        return [p]

    def grads(step, ps):
        ps[0].grad.mul_(1.5)  # same grad object, new values
    train_twins(rpo.Adam, torch.optim.Adam, params=params, grads=grads, steps=5, ref_kwargs={"fused": True},
                what="reused grad")


def test_dtensor_params_step_their_local_shards():
    """FSDP2/TP hand the optimizer DTensors, whose data_ptr() is 0: the kernel must use local shards."""
    import socket

    from conftest import run_python

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"""
import os, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1")
import torch.distributed as dist
dist.init_process_group("gloo")
from torch.distributed.tensor import distribute_tensor, Shard, DTensor
from torch.distributed.device_mesh import init_device_mesh
import roundpipe.optim as rpo
from conftest import assert_bits_equal
mesh = init_device_mesh("cpu", (1,))
gen = torch.Generator().manual_seed(0)
init = [torch.randn(37, 5, generator=gen), torch.randn(3, generator=gen)]
dt = lambda t: distribute_tensor(t.clone(), mesh, [Shard(0)])
a = [torch.nn.Parameter(dt(t)) for t in init]
b = [torch.nn.Parameter(dt(t)) for t in init]
oa = rpo.Adam(a, lr=1e-2, weight_decay=0.1, amsgrad=True)
ob = torch.optim.Adam(b, lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True)
for _ in range(5):
    for x, y, t in zip(a, b, init):
        g = torch.randn(t.shape, generator=gen)
        x.grad, y.grad = dt(g), dt(g)
    oa.step()
    ob.step()
for x, y in zip(a, b):
    assert_bits_equal(x.to_local(), y.to_local(), "DTensor param")
    if not isinstance(oa.state[x]["exp_avg"], DTensor):
        raise SystemExit("state should be DTensors, as torch keeps it")
dist.destroy_process_group()
print("ok")
"""
    res = run_python(code, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
