"""What the rules whose reference is torch's for-loop step (``foreach=False``) share.

torch's fused CPU optimizers (Adam, SGD, Adagrad) take a Tensor ``lr`` as its value and
divide grads by GradScaler's scale inside the kernel. Its for-loop rules (NAdam, ASGD, ...)
do neither: GradScaler unscales their grads first, multiplying by ``1 / scale`` rounded to
float, and a Tensor ``lr`` makes their per-step scalars float32 tensor ops, each rounded.
These helpers carry that over, so both the C rules and their fallbacks match torch.

torch's ``.sqrt()`` of a float tensor is MKL's ``vmsSqrt`` where torch is built with MKL:
not correctly rounded, so a C rule that must match it computes the same bits
(``fill_torch_sqrt``; ``rp_torch_sqrt`` in ``_kernels/rules.h``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._engine import (
    _REAL_DTYPES,
    FusedOptimizer,
    _GroupPlan,
    _scalar,
    check_lr,
    check_number,
    fp32_working_set,
    torch_dispatch_vec,
)


def lr_is_f32_tensor(group: dict[str, Any]) -> bool:
    """True when lr is a float32 Tensor: torch's per-step scalars are then float32 tensor ops.
    (A float64 Tensor lr computes as a Python float does; other dtypes are taken by value.)"""
    lr = group["lr"]
    return isinstance(lr, Tensor) and lr.dtype == torch.float32


def check_betas(group: dict[str, Any], where: str) -> tuple[float, float]:
    """A (beta1, beta2) pair of real numbers, each in [0, 1), with torch's messages."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    pair = (check_number({"betas[0]": betas[0]}, "betas[0]", where),
            check_number({"betas[1]": betas[1]}, "betas[1]", where))
    for i, beta in enumerate(pair):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}{where}")
    return pair


def check_float(value: float, key: str, where: str) -> None:
    """torch converts a hyperparameter to a float32 Scalar in its ops, and raises mid-step
    ("value cannot be converted to type float without overflow") for a finite value beyond
    float32's range: raise that before any group steps."""
    if math.isfinite(value) and abs(value) > _FLT_MAX:
        raise ValueError(f"{key} = {value}{where} cannot be converted to float32 without overflow")


_FLT_MAX = float(torch.finfo(torch.float32).max)


def zero_state(p: Tensor, dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
    """``step`` 0 (a float32 0-dim tensor) and each state key as zeros of its dtype: torch's
    first-step layout, and nothing uninitialized should a skipped step leave it."""
    state = {k: torch.zeros_like(p, dtype=d, memory_format=torch.contiguous_format) for k, d in dtypes.items()}
    return {"step": torch.zeros((), dtype=torch.float32), **state}


def unscale_like_grad_scaler(grads: list[Tensor], grad_scale: Tensor | None) -> None:
    """What GradScaler.unscale_ does to a for-loop optimizer's grads: grad * (1 / scale),
    the reciprocal taken in double and rounded to float (the C rules do the same)."""
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().float()
        for g in grads:
            g.mul_(inv)


# VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE: the mode torch's vml.h passes (rules.h: RP_VML_TORCH_MODE)
_VML_TORCH_MODE = 0x140102
_SQRT_IEEE, _SQRT_MKL_Z0, _SQRT_MKL_L9, _SQRT_MKL_H8, _SQRT_CALL = 0, 1, 2, 3, 4  # rules.h: RP_SQRT_*


def _sqrt_probe() -> Tensor:
    """Values where MKL's sqrt and IEEE sqrt differ, over every exponent, with denormals and specials."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8192, generator=gen) * torch.exp2(torch.randint(-149, 128, (8192,), generator=gen).float())
    specials = [0.0, -0.0, 1e-45, 1e-40, -1e-40, -1.0, float("inf"), float("-inf"), float("nan"), 3e38]
    return torch.cat([torch.linspace(1.0, 4.0, 4099), x, torch.tensor(specials)]).contiguous()


def _vml_sqrt_address() -> int:
    """MKL's vmsSqrt in torch's own library when torch's float sqrt gives its bits on the probe, else 0."""
    if not torch.backends.mkl.is_available():
        return 0
    try:
        fn = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).vmsSqrt
    except (OSError, AttributeError):
        return 0
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
    probe = _sqrt_probe()
    out = torch.zeros_like(probe)
    fn(probe.numel(), probe.data_ptr(), out.data_ptr(), _VML_TORCH_MODE)
    if not torch.equal(out.view(torch.int32), probe.sqrt().view(torch.int32)):
        return 0
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


@functools.cache
def _torch_sqrt(kernel: Any, rule: str) -> tuple[int, int]:
    """(how, vmsSqrt's address): how torch's float sqrt is computed here (rules.h, rp_torch_sqrt).
    MKL's AVX-512 kernel inline where our copy of it gives torch's bits on the probe; else a call
    of vmsSqrt where torch's sqrt is it; else IEEE sqrtf."""
    address = _vml_sqrt_address()
    if not address:
        return _SQRT_IEEE, 0
    probe = _sqrt_probe()
    ffi = kernel.ffi
    for how in (_SQRT_MKL_Z0, _SQRT_MKL_L9, _SQRT_MKL_H8):  # the first MKL kernel our copy of gives torch's bits
        out = torch.zeros_like(probe)
        getattr(kernel.lib, f"rp_{rule}_torch_sqrt")(how, ffi.cast("void *", address), ffi.cast("float *", probe.data_ptr()),
                                      ffi.cast("float *", out.data_ptr()), probe.numel())
        if torch.equal(out.view(torch.int32), probe.sqrt().view(torch.int32)):
            return how, address
    return _SQRT_CALL, address


def fill_torch_sqrt(h: Any, kernel: Any, rule: str) -> None:
    """Set a rule's C struct's sqrt_how and vml_sqrt (rules.h, rp_torch_sqrt); rule: its C file's name."""
    how, address = _torch_sqrt(kernel, rule)
    h.sqrt_how = how
    h.vml_sqrt = kernel.ffi.cast("void *", address) if address else kernel.ffi.NULL


class ForLoopRule(FusedOptimizer):
    """What a rule whose reference is torch's for-loop step adds to the engine: complex params
    stepped as their real view (with torch's -grad of a complex tensor: rules.h, rp_torch_neg,
    told by rp_tensor.scalar[3]), no ``fused`` argument, the group's lr, maximize and torch's
    sqrt in its C struct, and a fallback through torch's own single-tensor function.

    By default a group is checked as ``_RANGES`` says (key -> (torch's name for it, lower
    bound, upper bound or None), each a real number within float32's range) plus
    ``_check_more``, and state starts as zeros (``zero_state``)."""

    _PARAM_DTYPES = (*_REAL_DTYPES, torch.complex64)
    _TORCH_VEC = torch_dispatch_vec()  # where a complex tensor's vector body ends (rules.h, rp_torch_neg)
    _TORCH_FUSED = False  # these torch classes have no fused argument
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "foreach": None, "maximize": False, "differentiable": False, "capturable": False, "master_weights": False,
    }
    _BOOL_OPTIONS: ClassVar[tuple[str, ...]] = ("capturable", "maximize", "differentiable")
    _RANGES: ClassVar[dict[str, tuple[str, float, float | None]]] = {}

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_float(check_number(group, "lr", where, tensor_ok=True), "lr", where)
        check_lr(group["lr"], where)
        for key, (what, lo, hi) in self._RANGES.items():
            value = check_number(group, key, where)
            if not (lo <= value and (hi is None or value <= hi)):
                raise ValueError(f"Invalid {what} value: {group[key]}{where}")
            check_float(value, key, where)
        self._check_more(group, where)

    def _check_more(self, group: dict[str, Any], where: str) -> None:
        """Checks beyond _RANGES (Rprop's pairs)."""

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        return zero_state(p, dtypes)

    def _fill_tensor(self, t: Any, ffi: Any, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        t.scalar[3] = 1.0 if p.is_complex() else 0.0  # the rule's entry point leaves scalar[3] alone

    def _fill_loop_hyper(self, h: Any, group: dict[str, Any]) -> None:
        """The fields every for-loop rule's C struct has: lr, lr_f32, maximize, vml_sqrt."""
        h.lr = _scalar(group["lr"])
        h.lr_f32 = lr_is_f32_tensor(group)
        h.maximize = bool(group["maximize"])
        fill_torch_sqrt(h, self._kernel, self._kernel_rule())

    def _loop_fallback(self, plan: _GroupPlan, grad_scale: Tensor | None, keys: tuple[str, ...],
                       scalar_keys: tuple[str, ...], step: Callable[..., None], complex_ops: bool = False) -> None:
        """step(params, grads, *states, *scalars): torch's single-tensor function on fp32 (real views
        of complex, working copies of 16-bit tensors, masters), after GradScaler's unscale.
        complex_ops: hand complex params (and their grads and state) to torch as complex tensors,
        for rules whose torch step runs some ops on the complex tensors (RMSprop's weight decay)."""
        params, grads, states, back = fp32_working_set(plan, keys, grad_scale is not None)
        unscale_like_grad_scaler(grads, grad_scale)
        if complex_ops:
            cplx = [p.is_complex() for p in plan.params]

            def as_complex(ts: list[Tensor]) -> list[Tensor]:
                return [torch.view_as_complex(t) if c else t for t, c in zip(ts, cplx, strict=True)]

            params, grads, states = as_complex(params), as_complex(grads), [as_complex(col) for col in states]
        scalars = [[st[k] for st in plan.states] for k in scalar_keys]
        step(params, grads, *states, *scalars)
        for dst, src in back:
            dst.copy_(src)


# ---- Adamax, RAdam: the rules with Adam's hyperparameters and two moments -----------------


def check_adam_family(group: dict[str, Any], where: str) -> None:
    """The checks torch's Adamax and RAdam constructors make (lr >= 0, betas in [0, 1),
    eps and weight_decay >= 0), each hyperparameter's type first (TypeError naming it and the group)."""
    check_number(group, "lr", where, tensor_ok=True)
    check_lr(group["lr"], where)
    for key, what in (("eps", "epsilon value"), ("weight_decay", "weight_decay value")):
        if not 0.0 <= check_number(group, key, where):
            raise ValueError(f"Invalid {what}: {group[key]}{where}")
    check_betas(group, where)


class AdamFamily(ForLoopRule):
    """What Adamax and RAdam add to ForLoopRule: Adam's hyperparameters (lr, betas, eps,
    weight_decay, maximize) and checks, torch's state layout (a 0-dim float32 ``step`` and two
    moments, zeros of the param's shape), and the fallback through torch's for-loop function,
    which takes a complex param as complex (it negates and decays the grad before view_as_real).
    A subclass names its moments, its torch function and the extra group options it takes."""

    _MOMENTS: ClassVar[tuple[str, str]]  # the state keys besides step, in rp_tensor.state order
    _TORCH_OPTIONS: ClassVar[tuple[str, ...]] = ()  # group options its torch function takes besides Adam's
    _torch_step: ClassVar[Callable[..., None]]  # torch's _single_tensor_<rule>

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_adam_family(group, where)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._MOMENTS

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        zeros = {k: torch.zeros_like(p, dtype=dtypes[k], memory_format=torch.contiguous_format) for k in self._MOMENTS}
        return {"step": torch.tensor(0.0, dtype=torch.float32), **zeros}

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        self._fill_loop_hyper(h, group)
        h.beta1, h.beta2 = group["betas"]
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """torch's own for-loop step on the fp32 working set, complex params as complex."""
        group = plan.group
        cplx = [p.is_complex() for p in plan.params]
        beta1, beta2 = group["betas"]

        def step(params: list[Tensor], grads: list[Tensor], *rest: list[Tensor]) -> None:
            *moments, steps = rest
            params, grads, *moments = [[torch.view_as_complex(t) if c else t for t, c in zip(ts, cplx, strict=True)]
                                       for ts in (params, grads, *moments)]
            type(self)._torch_step(
                params, grads, *moments, steps, beta1=beta1, beta2=beta2, lr=group["lr"], eps=group["eps"],
                weight_decay=group["weight_decay"], maximize=group["maximize"], differentiable=False,
                capturable=False, has_complex=plan.has_complex, **{k: group[k] for k in self._TORCH_OPTIONS})

        self._loop_fallback(plan, grad_scale, self._MOMENTS, ("step",), step)
