"""``roundpipe.optim.NAdam``: torch's NAdam rule on roundpipe's engine; its C loop is ``_kernels/nadam.c``."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.nadam import _single_tensor_nadam
from torch.optim.optimizer import ParamsT

from ._engine import _GroupPlan, check_lr, check_number
from ._for_loop import ForLoopRule, check_betas

__all__ = ["NAdam"]


class NAdam(ForLoopRule):
    r"""NAdam (Adam with Nesterov momentum) on the CPU, in one compiled pass per param group;
    a drop-in for ``torch.optim.NAdam``.

    The algorithm is torch's, and fp32 results are bit-identical to its default
    (``foreach=False``) implementation:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1,\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
            \text{ if decoupled, else } g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &\mu_t \leftarrow \beta_1\big(1 - \tfrac12\, 0.96^{t\psi}\big),\quad
            \mu_{t+1} \leftarrow \beta_1\big(1 - \tfrac12\, 0.96^{(t+1)\psi}\big),\quad
            \Pi_t \leftarrow \Pi_{t-1}\,\mu_t\\
        &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
            v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        &d_t \leftarrow \sqrt{v_t / (1-\beta_2^t)} + \epsilon\\
        &\theta_t \leftarrow \theta_{t-1}
            - \gamma\frac{1-\mu_t}{1-\Pi_t}\frac{g_t}{d_t}
            - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{d_t}
        \end{aligned}

    One pass reads the param, grad and both moments and writes the param and moments:
    28 bytes per fp32 element, where torch's for-loop makes about ten passes.
    bfloat16/float16 params are computed in fp32 and rounded once;
    ``master_weights=True`` keeps an fp32 master and fp32 moments for them. Complex
    params are stepped as their real view, as torch does.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`, a float or a 1-element Tensor (default: 2e-3).
        betas: :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: weight decay :math:`\lambda` (default: 0).
        momentum_decay: momentum decay :math:`\psi` (default: 4e-3).
        decoupled_weight_decay: decay the params as AdamW does (NAdamW) instead of adding
            :math:`\lambda\theta` to the grad (default: False).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        capturable, differentiable: must be False.
        master_weights: fp32 master copies for 16-bit params (default: False).

    State per param, as in torch: ``step`` and ``mu_product`` (:math:`\Pi_t`), 0-dim
    float32 tensors, and ``exp_avg``, ``exp_avg_sq``.
    """

    _NAME = "NAdam"
    _C_STEP = "rp_nadam_step"
    _C_HYPER = "rp_nadam_hyper"
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "decoupled_weight_decay": False, "master_weights": False,
    }
    _BOOL_OPTIONS = ("decoupled_weight_decay", "maximize", "capturable", "differentiable")
    _EXTRA_STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {"mu_product": torch.float32}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize, "foreach": foreach,
            "capturable": capturable, "differentiable": differentiable, "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where)
        for key, what in (("eps", "epsilon value"), ("weight_decay", "weight_decay value"),
                          ("momentum_decay", "momentum_decay value")):
            if not 0.0 <= check_number(group, key, where):
                raise ValueError(f"Invalid {what}: {group[key]}{where}")
        check_betas(group, where)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _extra_state(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("mu_product",)

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        # float32 whatever the default dtype: the C code reads both as floats
        state: dict[str, Any] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 "mu_product": torch.tensor(1.0, dtype=torch.float32)}
        for key, dtype in dtypes.items():
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        return state

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        self._fill_loop_hyper(h, group)
        h.beta1 = beta1
        h.beta2 = beta2
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]
        h.momentum_decay = group["momentum_decay"]
        h.decoupled_weight_decay = bool(group["decoupled_weight_decay"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's own for-loop NAdam (``_single_tensor_nadam``) on the fp32 working set."""
        group = plan.group
        beta1, beta2 = group["betas"]
        self._loop_fallback(plan, grad_scale, ("exp_avg", "exp_avg_sq"), ("mu_product", "step"), functools.partial(
            _single_tensor_nadam, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"], eps=group["eps"],
            decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"],
            capturable=False, differentiable=False, has_complex=False))
