"""``roundpipe.optim.ASGD``: torch's ASGD rule on roundpipe's engine; its C loop is ``_kernels/asgd.c``."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.asgd import _single_tensor_asgd
from torch.optim.optimizer import ParamsT

from ._engine import _GroupPlan, _scalar, check_lr, check_number
from ._for_loop import ForLoopRule

__all__ = ["ASGD"]


class ASGD(ForLoopRule):
    r"""Averaged stochastic gradient descent on the CPU, in one compiled pass per param group;
    a drop-in for ``torch.optim.ASGD``.

    The algorithm is torch's, and fp32 results are bit-identical to its default
    (``foreach=False``) implementation:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1,\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &\theta_t \leftarrow \theta_{t-1}(1 - \lambda_d\,\eta_{t-1}) - \eta_{t-1} g_t\\
        &\bar\theta_t \leftarrow \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1})
            \text{ if } \mu_{t-1} \ne 1, \text{ else } \theta_t\\
        &\eta_t \leftarrow \gamma / (1 + \lambda_d\gamma t)^{\alpha},\quad
            \mu_t \leftarrow 1 / \max(1, t - t_0)
        \end{aligned}

    :math:`\bar\theta` is the running average ``ax``; :math:`\eta_0 = \gamma`, :math:`\mu_0 = 1`.
    One pass reads the param and grad and writes the param and ``ax``: 16 bytes per
    fp32 element before averaging starts (:math:`t > t_0 + 1`), 20 after (``ax`` is read
    too). bfloat16/float16 params are computed in fp32 and rounded once;
    ``master_weights=True`` keeps an fp32 master and an fp32 ``ax`` for them. Complex
    params are stepped as their real view, as torch does.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`, a float or a 1-element Tensor (default: 1e-2).
        lambd: decay term :math:`\lambda_d` (default: 1e-4).
        alpha: power :math:`\alpha` for the eta update (default: 0.75).
        t0: step :math:`t_0` at which averaging starts (default: 1e6).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        differentiable, capturable: must be False.
        master_weights: fp32 master copies for 16-bit params (default: False).

    State per param, as in torch: ``step``, ``eta`` and ``mu``, 0-dim float32 tensors,
    and ``ax``.
    """

    _NAME = "ASGD"
    _C_STEP = "rp_asgd_step"
    _C_HYPER = "rp_asgd_hyper"
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "foreach": None, "maximize": False, "differentiable": False, "capturable": False, "master_weights": False,
    }
    _BOOL_OPTIONS = ("maximize", "differentiable", "capturable")
    _EXTRA_STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {"eta": torch.float32, "mu": torch.float32}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "lambd": lambd, "alpha": alpha, "t0": t0, "weight_decay": weight_decay, "foreach": foreach,
            "maximize": maximize, "differentiable": differentiable, "capturable": capturable,
            "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where)
        for key in ("lambd", "alpha", "t0"):  # torch checks none of these three's values
            check_number(group, key, where)
        if not 0.0 <= check_number(group, "weight_decay", where):
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}{where}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("ax",)

    def _extra_state(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("eta", "mu")

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        # float32 whatever the default dtype: the C code reads them as floats; eta starts at lr
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "eta": torch.as_tensor(_scalar(group["lr"]), dtype=torch.float32).clone(),
            "mu": torch.ones((), dtype=torch.float32),
            "ax": torch.zeros_like(p, dtype=dtypes["ax"], memory_format=torch.contiguous_format),
        }

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        self._fill_loop_hyper(h, group)
        h.lambd = group["lambd"]
        h.alpha = group["alpha"]
        h.t0 = group["t0"]
        h.weight_decay = group["weight_decay"]

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's own for-loop ASGD (``_single_tensor_asgd``) on the fp32 working set."""
        group = plan.group
        self._loop_fallback(plan, grad_scale, ("ax",), ("mu", "eta", "step"), functools.partial(
            _single_tensor_asgd, lambd=group["lambd"], lr=group["lr"], t0=group["t0"], alpha=group["alpha"],
            weight_decay=group["weight_decay"], maximize=group["maximize"], differentiable=False,
            capturable=False, has_complex=False))
