"""``roundpipe.optim.Adam`` and ``AdamW``: torch's Adam rule on roundpipe's engine (``_engine.py``).

The C loop is ``roundpipe/_kernels/adam.c``; this file holds the signature, the state
layout, the scalars per step and the torch fallback.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._engine import (  # noqa: F401  (CHUNK_ELEMS, SERIAL_BELOW, _TORCH_VEC: read by tests and scripts/bench.py)
    _LOW_PRECISION,
    _PARAM_DTYPES,
    CHUNK_ELEMS,
    SERIAL_BELOW,
    _GroupPlan,
    _scalar,
    _TORCH_VEC,
    FusedOptimizer,
    check_lr,
    check_number,
    native_available,
)

__all__ = ["Adam", "AdamW", "native_available"]


def _check_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """torch.optim.Adam's value checks, each after its type check; `where` names the group at step time."""
    check_lr(group["lr"], where)
    eps = check_number(group, "eps", where)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element{where}")
        if not 0.0 <= check_number({f"betas[{i}]": beta}, f"betas[{i}]", where, tensor_ok=True) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}{where}")
    weight_decay = check_number(group, "weight_decay", where)
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}{where}")


class Adam(FusedOptimizer):
    r"""Adam on the CPU, in one compiled pass per param group; a drop-in for ``torch.optim.Adam``.

    The algorithm is torch's, and fp32 results are bit-identical to
    ``torch.optim.Adam(fused=True)``:

    .. math::
        \begin{aligned}
        &t \leftarrow t + 1,\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \ (\text{negated if maximize})\\
        &\textbf{if } \lambda \ne 0:\ \textbf{if } \text{decoupled\_weight\_decay}:
            \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
            \ \textbf{else}\ g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &m_t \leftarrow \text{lerp}(m_{t-1}, g_t, 1-\beta_1)\\
        &v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        &\hat v_t \leftarrow \max(\hat v_{t-1}, v_t)\ \text{if amsgrad, else}\ v_t\\
        &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \end{aligned}

    Bias corrections are computed in double once per tensor per step, then
    rounded to float, as torch does. All tensors of a param group are updated
    by one C call that releases the GIL and splits the work into chunks across
    ``torch.get_num_threads()`` OpenMP threads.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate, a float or a 1-element Tensor (default: 1e-3).
        betas: coefficients for the running averages of the gradient and its
            square, floats or 1-element Tensors (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty, or decoupled decay with
            ``decoupled_weight_decay`` (default: 0).
        amsgrad: use the AMSGrad variant (default: False).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        capturable: must be False; CUDA graph capture does not apply on CPU.
        differentiable: must be False; the step is not differentiable.
        fused: accepted for compatibility and ignored, with a warning: the
            step is always fused.
        decoupled_weight_decay: the AdamW rule (default: False).
        master_weights: for bfloat16/float16 params, keep an fp32 master copy
            in ``state["master_param"]`` and fp32 moments; each step reads the
            low-precision grad, updates master and moments in fp32 and writes
            the param back rounded to nearest-even, in one pass. Bit-identical
            to torch's fused step on the master with ``grad.float()`` followed
            by ``param.copy_(master)``. float32 params ignore it (default: False).
        exp_avg_dtype, exp_avg_sq_dtype: ``torch.float32`` or ``torch.bfloat16``
            storage for the moments. bfloat16 halves state memory and traffic
            but rounds the moments every step (see the docs' "Mixed precision
            and memory" page). None: torch's layout, the param's dtype, or
            float32 with master weights.
        bf16_stochastic_round: for bfloat16 params only: compute the update in
            fp32 and round the param to bf16 stochastically (moments to
            nearest), with no master copy; reproducible under
            ``torch.manual_seed``, seed kept in ``state["sr_seed"]``. The
            random bits are keyed on ``state["sr_step"]``, an int64 count of
            the steps taken (``step``, a float32, stops counting at 2^24), so
            a resumed run draws the same bits. Turned on over existing state
            (a round-to-nearest run, or its checkpoint), the next step creates
            both: the seed from torch's generator, the count from ``step``.
            Replaces ``master_weights`` (default: False).

    Limits: parameters must be contiguous CPU tensors of dtype float32,
    bfloat16 or float16 (or complex64, stepped as its real view) with dense
    gradients of the same shape and dtype. Anything else raises before any
    tensor is touched. Low-precision params without master weights compute in
    fp32 and store in their dtype, bit-identical to torch's fused Adam.
    A broadcast gradient (stride 0, as ``expand`` makes) is stepped as the
    values it holds, through a copy, as torch's for-loop Adam steps it
    (torch's fused kernel reads it as contiguous memory); with GradScaler it
    keeps its scaled values, having no memory for each unscaled one. Other
    non-contiguous gradients are refused. Every hyperparameter of every group
    is checked (type and range) before any group steps.
    """

    _NAME = "Adam"
    _C_STEP = "rp_adam_step"
    _C_HYPER = "rp_adam_hyper"
    _PARAM_DTYPES = _PARAM_DTYPES  # complex64 too, stepped as its real view, as in torch
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "fused": None, "decoupled_weight_decay": False, "master_weights": False, "exp_avg_dtype": None,
        "exp_avg_sq_dtype": None, "bf16_stochastic_round": False,
    }
    _BOOL_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay",
                     "bf16_stochastic_round")
    _STATE_DTYPE_OPTIONS: ClassVar[dict[str, str]] = {
        "exp_avg": "exp_avg_dtype", "exp_avg_sq": "exp_avg_sq_dtype", "max_exp_avg_sq": "exp_avg_sq_dtype",
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        exp_avg_dtype: torch.dtype | None = None,
        exp_avg_sq_dtype: torch.dtype | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        if bf16_stochastic_round is True and master_weights is True:
            raise ValueError("bf16_stochastic_round=True replaces master weights: use one or the other")
        if isinstance(betas, (tuple, list)) and len(betas) == 2 and \
                isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        defaults = {
            "lr": lr,
            "betas": tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() else b for b in betas)
            if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": master_weights,
            "exp_avg_dtype": exp_avg_dtype,
            "exp_avg_sq_dtype": exp_avg_sq_dtype,
            "bf16_stochastic_round": bf16_stochastic_round,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        _check_hyperparameters(group, where)
        if group.get("bf16_stochastic_round") is True and group.get("master_weights") is True:
            raise ValueError(f"bf16_stochastic_round=True replaces master weights: use one or the other{where}")

    def _check_param(self, p: Tensor, group: dict[str, Any], where: str) -> None:
        if group.get("bf16_stochastic_round") and p.dtype != torch.bfloat16:
            raise TypeError(f"roundpipe Adam: {where} has dtype {p.dtype}; bf16_stochastic_round=True "
                            "rounds bfloat16 params only")

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _config(self, group: dict[str, Any]) -> tuple:
        return (bool(group["amsgrad"]), bool(group.get("bf16_stochastic_round")))

    _EXTRA_STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {"sr_seed": torch.int64, "sr_step": torch.int64}

    def _extra_state(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sr_seed", "sr_step") if group.get("bf16_stochastic_round") else ()

    def _new_extra_state(self, key: str, p: Tensor, state: dict[str, Any]) -> Tensor:
        if key == "sr_seed":
            return _new_seed()
        # sr_step: the steps taken with stochastic rounding, which key its random bits. It starts
        # at `step`, so state from round-to-nearest or from a checkpoint written before this
        # counter existed (keyed on `step` then) draws the bits it always drew.
        return torch.tensor(int(state["step"].item()), dtype=torch.int64)

    def _fill_tensor(self, t: Any, ffi: Any, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        if group.get("bf16_stochastic_round"):
            t.seed = ffi.cast("int64_t *", st["sr_seed"].data_ptr())
            t.sr_step = ffi.cast("int64_t *", st["sr_step"].data_ptr())

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        for key, dtype in dtypes.items():
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        return state  # sr_seed and sr_step: _new_extra_state

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        h.lr = _scalar(group["lr"])
        h.beta1 = _scalar(beta1)
        h.beta2 = _scalar(beta2)
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]
        h.amsgrad = bool(group["amsgrad"])
        h.maximize = bool(group["maximize"])
        h.decoupled_weight_decay = bool(group["decoupled_weight_decay"])

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        _torch_fused_step(plan, grad_scale, found_inf)


class AdamW(Adam):
    """Adam with the decoupled (AdamW) weight decay rule; weight_decay defaults to 1e-2, as torch."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        exp_avg_dtype: torch.dtype | None = None,
        exp_avg_sq_dtype: torch.dtype | None = None,
        bf16_stochastic_round: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype,
            bf16_stochastic_round=bf16_stochastic_round,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


def _new_seed() -> Tensor:
    """A param's seed for stochastic rounding, from torch's generator: reproducible under
    torch.manual_seed, saved in the state so that a resumed run draws the same bits."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


# ---- fallback --------------------------------------------------------------------


def _torch_fused_step(plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The same step through torch's own fused CPU kernel, for hosts without a compiler.

    Tensors whose state torch's kernel can take directly (everything in the
    param's dtype) go straight in; master-weight and mixed-dtype tensors are
    stepped through fp32 copies (the master, ``grad.float()``) and written back.
    """
    group = plan.group
    real = lambda t: torch.view_as_real(t) if t.is_complex() else t  # noqa: E731
    lists: list[list[Tensor]] = [[], [], [], [], [], []]
    write_back: list[tuple[Tensor, Tensor]] = []
    rounded: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (param, fp32 result, seed, sr_step): stochastic
    sr = bool(group.get("bf16_stochastic_round"))
    amsgrad, use_master = bool(group["amsgrad"]), bool(group.get("master_weights"))
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for p, g, st in zip(plan.params, plan.grads, plan.states, strict=True):
        master = st.get("master_param") if use_master and p.dtype in _LOW_PRECISION else None
        if master is None and not sr and all(st[n].dtype == p.dtype for n in names):
            tensors = [real(p), real(g)] + [real(st[n]) for n in names]
        else:
            work = master if master is not None else p.float()
            tensors = [work, g.float()] + [st[n].float() for n in names]
            write_back += [(st[n], t) for n, t in zip(names, tensors[2:], strict=True)]
            if sr:
                rounded.append((p, work, st["sr_seed"], st["sr_step"]))
            else:
                write_back.append((p, work))
            if grad_scale is not None:  # the fused kernel unscaled the fp32 copy of the grad in place
                write_back.append((g, tensors[1]))
        for lst, t in zip(lists, tensors, strict=False):  # param, grad, moments (max with amsgrad); steps below
            lst.append(t)
        lists[5].append(st["step"])
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = lists
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    fn = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    fn(
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
        amsgrad=amsgrad, lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2),
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        grad_scale=grad_scale, found_inf=found_inf,
    )
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    for dst, src in write_back:
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    if found_inf is None or found_inf.item() == 0.0:
        for p, work, seed, count in rounded:
            count.add_(1)  # as rp_adam_step counts sr_step
            p.view(torch.int16).copy_(_bf16_stochastic_bits(work, int(seed), int(count.item())))


_M64 = (1 << 64) - 1


def _bf16_stochastic_bits(x: Tensor, seed: int, step: int) -> Tensor:
    """stochastic_round.h in torch ops: x (fp32) rounded to bf16 bits with the kernel's random bits."""
    z = (seed + 0x9E3779B97F4A7C15 * (step + 1)) & _M64  # rp_sr_key: splitmix64 of (seed, sr_step)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    key = z ^ (z >> 31)
    idx = torch.arange(x.numel(), dtype=torch.int64).view(x.shape)
    key32 = (key & 0xFFFFFFFF) ^ (((idx >> 32) * 0x9E3779B1) & 0xFFFFFFFF)
    r = ((((idx & 0xFFFFFFFF) ^ key32) * 0x9E3779B1) & 0xFFFFFFFF) >> 16  # int64 wraps: the low 32 bits hold
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, (u + (r & 0xFFFF)) >> 16)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
