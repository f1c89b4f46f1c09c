"""``roundpipe.optim.Adadelta``: torch's Adadelta rule on roundpipe's engine; its C loop is ``_kernels/adadelta.c``."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from torch import Tensor
from torch.optim.adadelta import _single_tensor_adadelta
from torch.optim.optimizer import ParamsT

from ._engine import _GroupPlan, _scalar
from ._for_loop import ForLoopRule

__all__ = ["Adadelta"]


class Adadelta(ForLoopRule):
    r"""Adadelta on the CPU, in one compiled pass per param group; a drop-in for ``torch.optim.Adadelta``.

    The algorithm is torch's (Zeiler 2012, "ADADELTA: An Adaptive Learning Rate
    Method"), and fp32 results are bit-identical to torch 2.13's default CPU
    implementation (``foreach=False``):

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &v_t \leftarrow \rho v_{t-1} + (1-\rho) g_t^2\\
        &\Delta x_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t\\
        &u_t \leftarrow \rho u_{t-1} + (1-\rho) \Delta x_t^2\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma \Delta x_t
        \end{aligned}

    One pass reads the param, grad, square average :math:`v` and accumulated
    update :math:`u` and writes param, :math:`v` and :math:`u`: 28 bytes per
    fp32 element. Each intermediate is rounded where torch's op rounds it.
    complex64 params are stepped as their real view, as torch does.
    bfloat16/float16 params are computed in fp32 and rounded once;
    ``master_weights=True`` keeps an fp32 master and fp32 state for them.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: coefficient :math:`\gamma` that scales delta before it is applied (default: 1.0).
        rho: coefficient :math:`\rho` of the running averages, in [0, 1] (default: 0.9).
        eps: term added to the denominator :math:`\epsilon` (default: 1e-6).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        foreach: accepted for compatibility and ignored, with a warning.
        capturable, differentiable: must be False.
        maximize: maximize the objective instead of minimizing (default: False).
        master_weights: fp32 master copies for 16-bit params (default: False).

    State: ``step`` (a 0-dim float32 tensor), ``square_avg`` and ``acc_delta``,
    created as zeros on a param's first step, as in torch.
    """

    _NAME = "Adadelta"
    _C_STEP = "rp_adadelta_step"
    _C_HYPER = "rp_adadelta_hyper"
    _RANGES: ClassVar[dict[str, tuple[str, float, float | None]]] = {
        "rho": ("rho", 0.0, 1.0), "eps": ("epsilon", 0.0, None), "weight_decay": ("weight_decay", 0.0, None),
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay, "maximize": maximize,
            "capturable": capturable, "foreach": foreach, "differentiable": differentiable,
            "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        self._fill_loop_hyper(h, group)
        h.rho = group["rho"]
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's own for-loop Adadelta (``_single_tensor_adadelta``) on the fp32 working set."""
        group = plan.group
        self._loop_fallback(plan, grad_scale, ("square_avg", "acc_delta"), ("step",), functools.partial(
            _single_tensor_adadelta, lr=_scalar(group["lr"]),
            rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"],
            differentiable=False, capturable=False, has_complex=True), complex_ops=True)
