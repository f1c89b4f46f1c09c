"""``roundpipe.optim.Rprop``: torch's Rprop rule on roundpipe's engine; its C loop is ``_kernels/rprop.c``."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.rprop import _single_tensor_rprop

from ._engine import _GroupPlan, _scalar, check_number
from ._for_loop import ForLoopRule, check_float

__all__ = ["Rprop"]


class Rprop(ForLoopRule):
    r"""Resilient backpropagation on the CPU, in one compiled pass per param group; a drop-in for
    ``torch.optim.Rprop``.

    The algorithm is torch's (Riedmiller and Braun 1993), and fp32 results are
    bit-identical to torch 2.13's default CPU implementation (``foreach=False``):

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize})\\
        &\eta_t \leftarrow \eta_+ \text{ if } g_t g_{t-1} > 0,\
            \eta_- \text{ if } g_t g_{t-1} < 0, \text{ else } 1\\
        &s_t \leftarrow \mathrm{clamp}(\eta_t s_{t-1}, \Gamma_{min}, \Gamma_{max})\\
        &\textbf{if } \eta_t = \eta_-:\ g_t \leftarrow 0\\
        &\theta_t \leftarrow \theta_{t-1} - \mathrm{sign}(g_t)\, s_t
        \end{aligned}

    :math:`g_{t-1}` is ``prev``, the grad the previous step kept (0 where its sign
    flipped), and :math:`s` is ``step_size``, which starts at ``lr``: as in torch,
    ``lr`` is read only when a param's state is created, so LR schedulers change
    nothing. One pass reads the param, grad, ``prev`` and ``step_size`` and writes
    param, ``prev`` and ``step_size``: 28 bytes per fp32 element. complex64 params
    are stepped as their real view, as torch does. bfloat16/float16 params are
    computed in fp32 and rounded once; ``master_weights=True`` keeps an fp32 master
    and fp32 state for them.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: the initial step size (default: 1e-2).
        etas: multiplicative decrease and increase factors :math:`(\eta_-, \eta_+)`, with
            :math:`0 < \eta_- < 1 < \eta_+` (default: (0.5, 1.2)).
        step_sizes: the minimal and maximal step sizes :math:`(\Gamma_{min}, \Gamma_{max})`
            (default: (1e-6, 50)).
        capturable, differentiable: must be False.
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        master_weights: fp32 master copies for 16-bit params (default: False).

    State: ``step`` (a 0-dim float32 tensor), ``prev`` (zeros) and ``step_size``
    (filled with ``lr``; ``lr + lr*1j`` for complex params), created on a param's
    first step, as in torch.
    """

    _NAME = "Rprop"
    _C_STEP = "rp_rprop_step"
    _C_HYPER = "rp_rprop_hyper"

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "etas": etas, "step_sizes": step_sizes, "foreach": foreach, "maximize": maximize,
            "differentiable": differentiable, "capturable": capturable, "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _check_more(self, group: dict[str, Any], where: str) -> None:
        for key in ("etas", "step_sizes"):
            pair = group.get(key)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"{key} must be a pair of real numbers{where}, got {pair!r}")
            for i, value in enumerate(pair):
                check_float(check_number({f"{key}[{i}]": value}, f"{key}[{i}]", where), f"{key}[{i}]", where)
        etaminus, etaplus = group["etas"]
        if not 0.0 < etaminus < 1.0 < etaplus:
            raise ValueError(f"Invalid eta values: {etaminus}, {etaplus}{where}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("prev", "step_size")

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        lr = _scalar(group["lr"])
        fill = complex(lr, lr) if p.is_complex() else lr  # both parts of a complex param step, as in torch
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "prev": torch.zeros_like(p, dtype=dtypes["prev"], memory_format=torch.contiguous_format),
            "step_size": torch.full_like(p, fill, dtype=dtypes["step_size"], memory_format=torch.contiguous_format),
        }

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        h.etaminus, h.etaplus = group["etas"]
        h.step_size_min, h.step_size_max = group["step_sizes"]
        h.maximize = bool(group["maximize"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's own for-loop Rprop (``_single_tensor_rprop``) on the fp32 working set."""
        group = plan.group
        (etaminus, etaplus), (step_size_min, step_size_max) = group["etas"], group["step_sizes"]
        self._loop_fallback(plan, grad_scale, ("prev", "step_size"), ("step",), functools.partial(
            _single_tensor_rprop, step_size_min=step_size_min,
            step_size_max=step_size_max, etaminus=etaminus, etaplus=etaplus, maximize=group["maximize"],
            capturable=False, differentiable=False, has_complex=True), complex_ops=True)
