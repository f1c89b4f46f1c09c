"""``roundpipe.optim.RMSprop``: torch's RMSprop rule on roundpipe's engine; its C loop is ``_kernels/rmsprop.c``."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.rmsprop import _single_tensor_rmsprop

from ._engine import _GroupPlan, _scalar
from ._for_loop import ForLoopRule

__all__ = ["RMSprop"]


class RMSprop(ForLoopRule):
    r"""RMSprop on the CPU, in one compiled pass per param group; a drop-in for ``torch.optim.RMSprop``.

    The algorithm is torch's, and fp32 results are bit-identical to torch 2.13's
    default CPU implementation (``foreach=False``):

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &v_t \leftarrow \alpha v_{t-1} + (1-\alpha) g_t^2\\
        &\textbf{if centered:}\ \bar g_t \leftarrow \bar g_{t-1} + (1-\alpha)(g_t - \bar g_{t-1}),
            \quad \tilde v_t \leftarrow v_t - \bar g_t^2
            \quad\textbf{else}\ \tilde v_t \leftarrow v_t\\
        &\textbf{if } \mu > 0:\ b_t \leftarrow \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon),
            \quad \theta_t \leftarrow \theta_{t-1} - \gamma b_t\\
        &\textbf{else}\ \theta_t \leftarrow \theta_{t-1} - \gamma g_t / (\sqrt{\tilde v_t} + \epsilon)
        \end{aligned}

    One pass reads the param, grad and square average (and the momentum buffer
    and grad average when they are on) and writes them back: 20 bytes per fp32
    element without momentum or centering, 28 with one, 36 with both. Each
    intermediate is rounded where torch's op rounds it. complex64 params are
    stepped as their real view, as torch does. bfloat16/float16 params are
    computed in fp32 and rounded once; ``master_weights=True`` keeps an fp32
    master and fp32 state for them.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-2).
        alpha: smoothing constant :math:`\alpha` (default: 0.99).
        eps: term added to the denominator :math:`\epsilon` (default: 1e-8).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        momentum: momentum factor :math:`\mu` (default: 0).
        centered: normalize by an estimate of the gradient's variance (default: False).
        capturable, differentiable: must be False.
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        master_weights: fp32 master copies for 16-bit params (default: False).

    State: ``step`` (a 0-dim float32 tensor), ``square_avg``, ``momentum_buffer``
    when momentum > 0 and ``grad_avg`` when centered, all created as zeros on a
    param's first step, as in torch.
    """

    _NAME = "RMSprop"
    _C_STEP = "rp_rmsprop_step"
    _C_HYPER = "rp_rmsprop_hyper"
    _RANGES: ClassVar[dict[str, tuple[str, float, float | None]]] = {
        "eps": ("epsilon", 0.0, None), "momentum": ("momentum", 0.0, None),
        "weight_decay": ("weight_decay", 0.0, None), "alpha": ("alpha", 0.0, None),
    }
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {**ForLoopRule._GROUP_DEFAULTS, "momentum": 0, "centered": False}
    _BOOL_OPTIONS = ("centered", *ForLoopRule._BOOL_OPTIONS)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps, "centered": centered,
            "weight_decay": weight_decay, "capturable": capturable, "foreach": foreach, "maximize": maximize,
            "differentiable": differentiable, "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("square_avg", *(("momentum_buffer",) if group["momentum"] > 0 else ()),
                *(("grad_avg",) if group["centered"] else ()))

    def _config(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] > 0, bool(group["centered"]))

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        self._fill_loop_hyper(h, group)
        h.alpha = group["alpha"]
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]
        h.momentum = group["momentum"]
        h.centered = bool(group["centered"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's own for-loop RMSprop (``_single_tensor_rmsprop``) on the fp32 working set."""
        group, keys = plan.group, self._state_keys(plan.group)

        def step(params: list[Tensor], grads: list[Tensor], *cols: list[Tensor]) -> None:
            state, steps = dict(zip(keys, cols[:-1], strict=True)), cols[-1]
            _single_tensor_rmsprop(
                params, grads, state["square_avg"], state.get("grad_avg", []), state.get("momentum_buffer", []), steps,
                lr=_scalar(group["lr"]), alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"],
                differentiable=False, capturable=False, has_complex=any(p.is_complex() for p in params),
            )

        self._loop_fallback(plan, grad_scale, keys, ("step",), step, complex_ops=True)
