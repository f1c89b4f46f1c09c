"""``roundpipe.optim.Adafactor``: torch's Adafactor on roundpipe's engine and its reduction phase;
its C passes are ``_kernels/adafactor.c``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._engine import (
    FusedOptimizer,
    _GroupPlan,
    _is_dtensor,
    _scalar,
    check_lr,
    check_number,
    fp32_working_set,
)

__all__ = ["Adafactor"]


class Adafactor(FusedOptimizer):
    r"""Adafactor (Shazeer and Stern 2018) on the CPU; a drop-in for ``torch.optim.Adafactor``.

    The algorithm, signature, defaults and state are torch 2.13's: for a param
    :math:`\theta` of :math:`n` elements at step :math:`t`,

    .. math::
        \begin{aligned}
        &G_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize}),\quad
            \widehat{\beta}_{2_t} \leftarrow 1 - t^{\tau},\quad
            \rho_t \leftarrow \min(\gamma, 1/\sqrt{t})\\
        &\alpha_t \leftarrow \max(\epsilon_2, \lVert\theta_{t-1}\rVert_2/\sqrt{n})\,\rho_t,\quad
            \theta \leftarrow \theta_{t-1}(1 - \gamma\lambda)\\
        &\textbf{2+ dims (the last two factored):}\
            R_t \leftarrow \widehat{\beta}_{2_t} R_{t-1} + (1-\widehat{\beta}_{2_t})\,
                \mathrm{mean}_{\text{cols}}(G_t^2),\
            C_t \leftarrow \widehat{\beta}_{2_t} C_{t-1} + (1-\widehat{\beta}_{2_t})\,
                \mathrm{mean}_{\text{rows}}(G_t^2)\\
        &\hspace{5mm}\widehat{V}_t \leftarrow R_t C_t / \max(\mathrm{mean}_{\text{rows}}(R_t), \epsilon_1)\\
        &\textbf{vectors:}\ \widehat{V}_t \leftarrow \widehat{\beta}_{2_t}\widehat{V}_{t-1}
            + (1-\widehat{\beta}_{2_t}) G_t^2\\
        &U_t \leftarrow G_t / \max(\sqrt{\widehat{V}_t}, \epsilon_1),\quad
            \theta_t \leftarrow \theta - \alpha_t\, U_t / \max(1, \mathrm{RMS}(U_t)/d)
        \end{aligned}

    :math:`\epsilon_1` = None is ``torch.finfo(dtype).eps`` of the group's first param
    with a grad, as in torch. The step is three passes over each param, in parallel
    across all the tensors of a group: the norms and row and column sums of squares,
    the norm of the update, then the update (24 bytes per fp32 element; the state is
    O(rows + cols)). Reductions are summed in torch's order within a reduction chunk
    (4 Mi elements, whole rows), so params that fit in one get torch's bits; bigger
    ones fold the chunks' partial sums in a fixed order (norms within about 1e-6 of
    torch's, the same bits on any thread count). bfloat16/float16 params are computed in
    fp32 and rounded once; their state, in the param's dtype as in torch, is rounded when
    the first pass stores it and read back by the update. ``master_weights=True`` keeps an
    fp32 master copy and fp32 state for them. 0-element params are left as they are
    (torch divides by zero on them).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\gamma`, the cap of the relative step size and the
            weight decay's factor (default: 1e-2).
        beta2_decay: :math:`\tau`, the decay rate of :math:`\beta_2`, <= 0 (default: -0.8).
        eps: :math:`(\epsilon_1, \epsilon_2)`; :math:`\epsilon_1` None: the dtype's
            machine epsilon (default: (None, 1e-3)).
        d: the clipping threshold :math:`d` >= 1 (default: 1.0).
        weight_decay: decoupled weight decay :math:`\lambda` (default: 0).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        master_weights: fp32 master copies for 16-bit params (default: False).

    State per param: ``step``; ``row_var`` (shape ``(..., rows, 1)``) and ``col_var``
    (``(..., 1, cols)``) for params of 2+ dims, ``variance`` for vectors, as in torch.
    """

    _NAME = "Adafactor"
    _C_STEP = "rp_adafactor_step"
    _C_HYPER = "rp_adafactor_hyper"
    _TORCH_FUSED = False  # torch's Adafactor has no fused argument
    _REDUCE_SCALARS = 2  # per reduction chunk: its sums of squares of the param and of the update
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {"foreach": None, "maximize": False, "master_weights": False}
    _BOOL_OPTIONS = ("maximize",)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        master_weights: bool = False,
    ) -> None:
        defaults = {
            "lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d, "weight_decay": weight_decay,
            "foreach": foreach, "maximize": maximize, "master_weights": master_weights,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_number(group, "lr", where, tensor_ok=True)
        check_lr(group["lr"], where)
        beta2_decay = check_number(group, "beta2_decay", where)
        d = check_number(group, "d", where)
        weight_decay = check_number(group, "weight_decay", where)
        eps = group.get("eps")
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"eps must be a pair (eps1 or None, eps2){where}, got {eps!r}")
        eps1 = None if eps[0] is None else check_number({"eps[0]": eps[0]}, "eps[0]", where)
        eps2 = check_number({"eps[1]": eps[1]}, "eps[1]", where)
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}{where}")
        if eps1 is not None and not 0.0 <= eps1:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps1}{where}")
        if not 0.0 <= eps2:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps2}{where}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}{where}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}{where}")

    def _check_param(self, p: Tensor, group: dict[str, Any], where: str) -> None:
        if _is_dtensor(p):
            raise TypeError(f"roundpipe Adafactor: {where} is a DTensor; Adafactor's norms span the whole "
                            "tensor, not a shard: use torch.optim.Adafactor for sharded params")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("row_var", "col_var", "variance")

    def _param_state_keys(self, p: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        return ("row_var", "col_var") if p.dim() > 1 else ("variance",)

    def _state_shape(self, p: Tensor, key: str, group: dict[str, Any]) -> tuple[int, ...]:
        shape = tuple(p.shape)
        if key == "row_var":
            return (*shape[:-1], 1)
        if key == "col_var":
            return (*shape[:-2], 1, shape[-1])
        return shape

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        for key, dtype in dtypes.items():
            state[key] = torch.zeros(self._state_shape(p, key, group), dtype=dtype)
        return state

    @staticmethod
    def _eps1(group: dict[str, Any]) -> float:
        """eps[0], or torch's default for None: the machine epsilon of the first param with a grad."""
        eps1 = group["eps"][0]
        if eps1 is not None:
            return float(eps1)
        first = next((p for p in group["params"] if p.grad is not None), None)
        return torch.finfo(first.dtype if first is not None else torch.float32).eps

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        h.lr = _scalar(group["lr"])
        h.beta2_decay = group["beta2_decay"]
        h.eps1 = self._eps1(group)
        h.eps2 = group["eps"][1]
        h.d = group["d"]
        h.weight_decay = group["weight_decay"]
        h.maximize = bool(group["maximize"])
        h.lr_tensor = isinstance(group["lr"], Tensor)  # torch's scalars are then float32 tensor ops

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's _single_tensor_adafactor on fp32 (working copies of 16-bit tensors)."""
        from torch.optim._adafactor import _single_tensor_adafactor

        group = plan.group
        params, grads, _, back = fp32_working_set(plan, (), grad_scale is not None)
        if grad_scale is not None:  # as GradScaler.unscale_ does before torch's step
            inv = float(torch.tensor(1.0 / grad_scale.double().item(), dtype=torch.float32))
            for g in grads:
                g.mul_(inv)
        lists: dict[str, list[Tensor | None]] = {"row_var": [], "col_var": [], "variance": []}
        keep = [i for i, p in enumerate(params) if p.numel() > 0]  # torch divides by zero on empty params
        for i in keep:
            st = plan.states[i]
            for key, lst in lists.items():
                t = st.get(key)
                if t is not None and t.dtype != torch.float32:
                    work = t.float()
                    back.append((t, work))
                    t = work
                lst.append(t)
        for i, st in enumerate(plan.states):
            if i not in keep:
                st["step"] += 1
        eps1 = self._eps1(group)
        _single_tensor_adafactor(
            [params[i] for i in keep], [grads[i] for i in keep], lists["row_var"], lists["col_var"],
            lists["variance"], [plan.states[i]["step"] for i in keep], None, None,
            d=group["d"], lr=group["lr"], beta2_decay=group["beta2_decay"],
            weight_decay=group["weight_decay"], eps1=eps1, eps2=group["eps"][1],
            maximize=group["maximize"], has_complex=False,
        )
        for dst, src in back:
            dst.copy_(src)
