"""``roundpipe.optim.SGD``: torch's SGD rule on roundpipe's engine; its C loop is ``_kernels/sgd.c``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._engine import (
    _PARAM_DTYPES,
    FusedOptimizer,
    _GroupPlan,
    _scalar,
    check_lr,
    check_number,
    fp32_working_set,
    torch_dispatch_vec,
)

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent (with momentum) on the CPU; a drop-in for ``torch.optim.SGD``.

    The algorithm is torch's, and fp32 results are bit-identical to
    ``torch.optim.SGD(fused=True)``:

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &\textbf{if } \mu \ne 0:\ b_t \leftarrow g_t \text{ on the first step, else }
            \mu b_{t-1} + (1-\tau) g_t;\quad
            g_t \leftarrow g_t + \mu b_t \text{ if nesterov, else } b_t\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma g_t
        \end{aligned}

    bfloat16/float16 params are computed in fp32 and rounded once (torch 2.13's
    fused SGD leaves such params unchanged, pytorch#191763); ``master_weights=True``
    keeps an fp32 master copy and an fp32 momentum buffer for them. complex64
    params are stepped as their real view (``torch.view_as_real``), bit for bit
    torch's fused SGD on that view; torch's fused SGD refuses complex params and
    its default for-loop step on them rounds differently (within 1e-6 relative).

    Where it differs from torch on purpose:

    * A first step that GradScaler skips creates no momentum buffer (torch's
      fused SGD creates an uninitialized one, which a checkpoint then saves and
      later steps read as momentum); the next real step is the first step, as in
      torch's foreach SGD. No state ever holds uninitialized memory.
    * A param whose state has no buffer when momentum is on (momentum turned on
      mid-training, with master weights too) gets one from its next step, which
      copies the grad, as torch's for-loop SGD does per param.
    * A broadcast grad (stride 0, as ``expand`` makes) is stepped as the values
      it holds, through a copy (torch's fused kernel reads it as contiguous
      memory); with GradScaler it keeps its scaled values. Other non-contiguous
      grads are refused.
    * Every hyperparameter of every group is type-checked (``dampening`` too)
      before any group steps.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-3).
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening :math:`\tau` for momentum (default: 0).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        nesterov: Nesterov momentum; needs momentum > 0 and zero dampening (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        foreach, fused: accepted for compatibility and ignored, with a warning.
        differentiable: must be False.
        master_weights: fp32 master copies for 16-bit params (default: False).

    State: ``momentum_buffer`` per param when momentum is non-zero, as in torch,
    created by the param's first step that is not skipped.
    """

    _NAME = "SGD"
    _C_STEP = "rp_sgd_step"
    _C_HYPER = "rp_sgd_hyper"
    _HAS_STEP = False
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": None,
        "master_weights": False,
    }
    _TORCH_VEC = torch_dispatch_vec()  # torch registers this kernel for AVX-512: 16 lanes there
    _BOOL_OPTIONS = ("nesterov", "maximize", "differentiable")
    _PARAM_DTYPES = _PARAM_DTYPES  # complex64 too, stepped as its real view, as torch's default does
    _FIRST_STEP_KEYS = ("momentum_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
            "nesterov": nesterov, "maximize": maximize, "foreach": foreach, "differentiable": differentiable,
            "fused": fused, "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where)
        momentum = check_number(group, "momentum", where)
        dampening = check_number(group, "dampening", where)  # any value, as in torch
        weight_decay = check_number(group, "weight_decay", where)
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}{where}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}{where}")
        if group["nesterov"] is True and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum and zero dampening{where}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _config(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] != 0,)

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        # torch's first step copies the grad into a new buffer: the kernel does that
        # (rp_tensor.fresh, _FIRST_STEP_KEYS). Zeros, not torch.empty: no state ever holds
        # uninitialized memory, even for the instant before the step that writes it.
        return {k: torch.zeros_like(p, dtype=d, memory_format=torch.contiguous_format) for k, d in dtypes.items()}

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        h.lr = _scalar(group["lr"])
        h.momentum = group["momentum"]
        h.dampening = group["dampening"]
        h.weight_decay = group["weight_decay"]
        h.nesterov = bool(group["nesterov"])
        h.maximize = bool(group["maximize"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's fused SGD on fp32 (working copies of 16-bit tensors), fresh buffers apart."""
        group = plan.group
        keys = self._state_keys(group)
        params, grads, states, back = fp32_working_set(plan, keys, grad_scale is not None)
        for first in (True, False):
            idx = [i for i, f in enumerate(plan.fresh) if f == first] if keys else (
                list(range(len(params))) if not first else [])
            if not idx:
                continue
            torch._fused_sgd_(
                [params[i] for i in idx], [grads[i] for i in idx], [states[0][i] for i in idx] if keys else [],
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=_scalar(group["lr"]),
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                is_first_step=first, grad_scale=grad_scale, found_inf=found_inf,
            )
        for dst, src in back:
            dst.copy_(src)
        plan.fresh = [False] * len(plan.params)
