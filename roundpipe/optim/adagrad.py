"""``roundpipe.optim.Adagrad``: torch's Adagrad rule on roundpipe's engine; its C loop is ``_kernels/adagrad.c``."""

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

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizer):
    r"""Adagrad on the CPU, in one compiled pass per param group; a drop-in for ``torch.optim.Adagrad``.

    The algorithm is torch's, and fp32 results are bit-identical to
    ``torch.optim.Adagrad(fused=True)``:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1,\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \ (\text{negated if maximize})\\
        &\tilde\gamma \leftarrow \gamma / (1 + (t-1)\eta)\\
        &\textbf{if } \lambda \ne 0:\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &s_t \leftarrow s_{t-1} + g_t^2\\
        &\theta_t \leftarrow \theta_{t-1} - \tilde\gamma\, g_t / (\sqrt{s_t} + \epsilon)
        \end{aligned}

    The decayed rate is computed in double once per tensor per step, then
    rounded to float, as torch does. bfloat16/float16 params are computed in
    fp32 and rounded once; ``master_weights=True`` keeps an fp32 master and
    an fp32 ``sum`` for them. complex64 params are stepped as their real view
    (``torch.view_as_real``), as torch's for-loop Adagrad steps them, bit for
    bit torch's fused Adagrad on that view (torch's fused Adagrad refuses
    complex params; its for-loop rounds differently, within 1e-6 relative).

    As in torch, the accumulator ``sum`` starts at the constructor's
    ``initial_accumulator_value`` (``defaults``), for every group, groups added
    later with ``add_param_group`` included: a group's own
    ``initial_accumulator_value`` is checked but not used. A complex param's
    starts at ``complex(v, v)``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma` (default: 1e-2).
        lr_decay: learning rate decay :math:`\eta` (default: 0).
        weight_decay: L2 penalty :math:`\lambda` (default: 0).
        initial_accumulator_value: initial value of the sum of squares, for
            every group (a group's own value is not used, as in torch) (default: 0).
        eps: term added to the denominator (default: 1e-10).
        foreach, fused: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        differentiable: must be False.
        master_weights: fp32 master copies for 16-bit params (default: False).

    A broadcast grad (stride 0, as ``expand`` makes) is stepped as the values it
    holds, through a copy (torch's fused kernel reads it as contiguous memory);
    with GradScaler it keeps its scaled values. Other non-contiguous grads are
    refused. Every hyperparameter of every group is type-checked before any
    group steps.

    State: ``step`` (a 0-dim float32 tensor) and ``sum``, created at construction, as in torch.
    """

    _NAME = "Adagrad"
    _C_STEP = "rp_adagrad_step"
    _C_HYPER = "rp_adagrad_hyper"
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "foreach": None, "maximize": False, "differentiable": False, "fused": None, "master_weights": False,
    }
    _TORCH_VEC = torch_dispatch_vec()  # torch registers this kernel for AVX-512: 16 lanes there
    _BOOL_OPTIONS = ("maximize", "differentiable")
    _PARAM_DTYPES = _PARAM_DTYPES  # complex64 too, stepped as its real view, as torch's default does

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value, "foreach": foreach, "maximize": maximize,
            "differentiable": differentiable, "fused": fused, "master_weights": master_weights,
        }
        super().__init__(params, defaults)
        # torch creates Adagrad's state up front: step 0 and the accumulator
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype in self._PARAM_DTYPES and not self.state[p]:
                    self.state[p].update(self._new_state(p, p, group, self._layout(group, p)[1]))

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_lr(group["lr"], where)
        for name, what in (("lr_decay", "lr_decay value"), ("weight_decay", "weight_decay value"),
                           ("initial_accumulator_value", "initial_accumulator_value value"), ("eps", "epsilon value")):
            value = check_number(group, name, where)
            if not 0.0 <= value:
                raise ValueError(f"Invalid {what}: {value}{where}")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        # torch fills the sum with the constructor's value (defaults), not the group's, and a
        # complex param's with complex(value, value)
        value = self.defaults["initial_accumulator_value"]
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "sum": torch.full_like(p, complex(value, value) if p.is_complex() else value, dtype=dtypes["sum"],
                                   memory_format=torch.contiguous_format),
        }

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        h.lr = _scalar(group["lr"])
        h.lr_decay = group["lr_decay"]
        h.weight_decay = group["weight_decay"]
        h.eps = group["eps"]
        h.maximize = bool(group["maximize"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's fused Adagrad on fp32 (working copies of 16-bit tensors)."""
        group = plan.group
        params, grads, (sums,), back = fp32_working_set(plan, ("sum",), grad_scale is not None)
        steps = [st["step"] for st in plan.states]
        torch._foreach_add_(steps, 1)
        torch._fused_adagrad_(
            params, grads, sums, steps, lr=_scalar(group["lr"]), lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf,
        )
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf] * len(steps))
        for dst, src in back:
            dst.copy_(src)
