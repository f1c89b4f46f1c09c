"""``roundpipe.optim.Lion``: lion-pytorch's rule on roundpipe's engine; its C loop is ``_kernels/lion.c``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._engine import FusedOptimizer, _GroupPlan, _scalar, check_lr, check_number, fp32_working_set

__all__ = ["Lion"]


class Lion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") on the CPU.

    The signature and fp32 results (bit for bit) are those of the reference
    implementation, lion-pytorch's ``Lion``, plus ``maximize``:

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize})\\
        &\theta \leftarrow \theta (1 - \gamma\lambda)
            \quad (\lambda / \gamma_0 \text{ with decoupled\_weight\_decay})\\
        &\theta_t \leftarrow \theta - \gamma\,\mathrm{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t)\\
        &m_t \leftarrow \beta_2 m_{t-1} + (1-\beta_2) g_t
        \end{aligned}

    :math:`\gamma_0` is the learning rate given to the constructor, as in
    lion-pytorch (kept in ``defaults``, so copies and unpickled optimizers
    step as the original; lion-pytorch's lose it). As in lion-pytorch, the
    constructor needs ``lr > 0`` and a step takes any ``lr >= 0`` (a warmup
    from 0, a schedule that reaches 0). One pass reads the param, grad and moment and writes the
    param and moment: 20 bytes per fp32 element against Adam's 28.
    bfloat16/float16 params are computed in fp32 and rounded once;
    ``master_weights=True`` keeps an fp32 master and an fp32 moment for them.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-4).
        betas: :math:`(\beta_1, \beta_2)` (default: (0.9, 0.99)).
        weight_decay: decoupled weight decay :math:`\lambda` (default: 0).
        decoupled_weight_decay: divide the decay by the initial learning rate (default: False).
        maximize: maximize the objective instead of minimizing (default: False).
        master_weights: fp32 master copies for 16-bit params (default: False).

    A broadcast grad (stride 0, as ``expand`` makes) is stepped as the values it
    holds, through a copy; with GradScaler it keeps its scaled values. Other
    non-contiguous grads are refused. Every hyperparameter of every group is
    type-checked before any group steps.

    State: ``exp_avg`` per param, as in lion-pytorch.
    """

    _NAME = "Lion"
    _C_STEP = "rp_lion_step"
    _C_HYPER = "rp_lion_hyper"
    _HAS_STEP = False
    _TORCH_FUSED = False  # torch has no Lion; lion-pytorch's groups have no `fused`
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "decoupled_weight_decay": False, "maximize": False, "master_weights": False,
    }
    _BOOL_OPTIONS = ("decoupled_weight_decay", "maximize")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize,
            "master_weights": master_weights,
        }
        check_lr(lr, "")
        if not 0.0 < _scalar(lr):  # lion-pytorch's constructor check; a step takes lr = 0
            raise ValueError(f"Invalid learning rate: {lr}; Lion needs lr > 0")
        super().__init__(params, defaults)

    @property
    def _init_lr(self) -> float:
        """The constructor's lr, by which lion-pytorch divides a decoupled decay. Read from
        ``defaults``, which copies and pickles keep (torch's __getstate__ keeps nothing else)."""
        return _scalar(self.defaults["lr"])

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where)  # lr = 0 steps (a warmup from 0), as in lion-pytorch
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= check_number({f"betas[{i}]": beta}, f"betas[{i}]", where) <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}{where}")
        weight_decay = check_number(group, "weight_decay", where)
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}{where}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        return {"exp_avg": torch.zeros_like(p, dtype=dtypes["exp_avg"], memory_format=torch.contiguous_format)}

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        h.lr = _scalar(group["lr"])
        h.beta1 = beta1
        h.beta2 = beta2
        h.weight_decay = group["weight_decay"]
        h.init_lr = self._init_lr
        h.decoupled_weight_decay = bool(group["decoupled_weight_decay"])
        h.maximize = bool(group["maximize"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """lion-pytorch's four torch ops per tensor, on fp32 (working copies of 16-bit tensors)."""
        group = plan.group
        params, grads, (avgs,), back = fp32_working_set(plan, ("exp_avg",), grad_scale is not None)
        lr, (beta1, beta2) = _scalar(group["lr"]), group["betas"]
        wd = group["weight_decay"] / self._init_lr if group["decoupled_weight_decay"] else group["weight_decay"]
        for p, g, m in zip(params, grads, avgs, strict=True):
            if grad_scale is not None:
                g.div_(grad_scale)
            if group["maximize"]:
                g = torch.neg(g)
            p.mul_(1.0 - lr * wd)
            p.add_(m.clone().mul_(beta1).add(g, alpha=1.0 - beta1).sign_(), alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        for dst, src in back:
            dst.copy_(src)
