"""torch.compile around roundpipe's step, and torch resuming roundpipe's checkpoints (issue 14)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_bits_equal

import roundpipe.optim as rpo


def _model_and_opt(cls, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, cls(model.parameters(), lr=1e-2, **kw)


X, Y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)


def _train_compiled_whole_step(cls, **kw):
    model, opt = _model_and_opt(cls, **kw)

    @torch.compile
    def train_step():
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    losses = [train_step().item() for _ in range(3)]
    return losses, [p.detach().clone() for p in model.parameters()], opt


def _train_compiled_opt_step(cls, **kw):
    model, opt = _model_and_opt(cls, **kw)
    compiled_step = torch.compile(opt.step)
    for _ in range(3):
        torch.nn.functional.mse_loss(model(X), Y).backward()
        compiled_step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def test_compiled_training_step_matches_torch_fused_compiled_the_same_way():
    torch._dynamo.reset()
    ref_losses, ref_params, _ = _train_compiled_whole_step(torch.optim.Adam, fused=True)
    losses, params, opt = _train_compiled_whole_step(rpo.Adam)
    assert losses == ref_losses
    for a, b in zip(ref_params, params, strict=True):
        assert_bits_equal(a, b, "param")
    assert all(st["step"].item() == 3 for st in opt.state.values())


def test_compiled_optimizer_step_matches_torch_fused():
    torch._dynamo.reset()
    ref_params, _ = _train_compiled_opt_step(torch.optim.Adam, fused=True)
    params, opt = _train_compiled_opt_step(rpo.Adam)
    for a, b in zip(ref_params, params, strict=True):
        assert_bits_equal(a, b, "param")


def test_fullgraph_compile_fails_with_a_clear_message():
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.ones(10)
    opt = rpo.Adam([p])

    @torch.compile(fullgraph=True)
    def step_only():
        opt.step()

    with pytest.raises(Exception, match="roundpipe's optimizer step is one compiled C call already") as info:
        step_only()
    assert "InternalTorchDynamoError" not in type(info.value).__name__
    assert not opt.state  # nothing was stepped


def test_step_under_is_compiling_raises_clearly(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="compile without fullgraph=True"):
        rpo.Adam([p]).step()


# ---- torch resumes a roundpipe checkpoint with its fused kernel ---------------------------------------

@pytest.mark.parametrize("torch_kwargs", [{}, {"fused": True}])
@pytest.mark.parametrize("cls", [rpo.Adam, rpo.AdamW])
def test_torch_resumes_a_roundpipe_checkpoint_bit_identically(cls, torch_kwargs):
    torch_cls = torch.optim.AdamW if cls is rpo.AdamW else torch.optim.Adam
    torch.manual_seed(3)
    init = torch.randn(1003)
    grads = [torch.randn(1003) for _ in range(5)]
    ref_p = init.clone().requires_grad_()
    ref = torch_cls([ref_p], fused=True)
    p = init.clone().requires_grad_()
    opt = cls([p])
    for g in grads[:3]:
        ref_p.grad, p.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["fused"] is True
    q = p.detach().clone().requires_grad_()
    resumed = torch_cls([q], **torch_kwargs)  # a torch user's own constructor arguments
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["fused"] is True
    for g in grads[3:]:
        ref_p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        resumed.step()
    assert_bits_equal(ref_p, q, "param resumed by torch")
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert_bits_equal(ref.state[ref_p][k], resumed.state[q][k], k)


def test_roundpipe_loads_torch_and_its_own_checkpoints():
    p = torch.randn(64).requires_grad_()
    t = torch.optim.Adam([p])
    p.grad = torch.randn(64)
    t.step()
    q = p.detach().clone().requires_grad_()
    opt = rpo.Adam([q])
    opt.load_state_dict(t.state_dict())
    q.grad = torch.randn(64)
    opt.step()
    r = q.detach().clone().requires_grad_()
    opt2 = rpo.Adam([r])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert_bits_equal(opt.state[q][k], opt2.state[r][k], k)


def test_checkpoint_of_complex_or_foreach_groups_keeps_fused_unset():
    c = torch.randn(8, dtype=torch.complex64, requires_grad=True)
    assert rpo.Adam([c]).state_dict()["param_groups"][0]["fused"] is None
    with pytest.warns(UserWarning, match="ignores foreach"):
        opt = rpo.Adam([torch.randn(8, requires_grad=True)], foreach=True)
    assert opt.state_dict()["param_groups"][0]["fused"] is None
