"""``roundpipe.optim.Adam8bit`` and ``AdamW8bit``: Adam with block-wise 8-bit moments.

The C loop is ``roundpipe/_kernels/adam8bit.c`` with the codec in ``quant8.h``; this file
holds the signature, the state layout, checkpoints and the torch fallback, which
computes the same codes bit for bit (``encode``/``decode`` below follow quant8.h's rule).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._engine import (
    _LOW_PRECISION,
    CHUNK_ELEMS,
    FusedOptimizer,
    _GroupPlan,
    _is_dtensor,
    _scalar,
)
from .adam import _check_hyperparameters

__all__ = ["Adam8bit", "AdamW8bit", "decode", "encode"]

# State keys of a param with 8-bit moments (rp_tensor.state order, adam8bit.c's enum) ...
CODE_KEYS = ("exp_avg_code", "exp_avg_absmax", "exp_avg_sq_code", "exp_avg_sq_absmax")
# ... and of one under min_8bit_size elements: torch's names, in fp32.
FP32_KEYS = ("exp_avg", "exp_avg_sq")

# quant8.h's constants: K (what the absmax maps to), the tiny-block threshold and scaling.
_K_SQ = 2.0 ** 15
_TINY_BITS = 0x0F800000  # the bits of 2**-96
_PRE = 2.0 ** 64


def _absmax_bits(blocks: Tensor) -> Tensor:
    """Per row of an fp32 (blocks, block_size) tensor: max of |x|'s bit patterns, as int32."""
    return (blocks.view(torch.int32) & 0x7FFFFFFF).amax(dim=1)


def _block_scalars(absmax_bits: Tensor, sq: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """quant8.h's rp_q8_block_of: (pre, r, s, post) per block, in fp32."""
    absmax = absmax_bits.view(torch.float32)
    tiny = absmax_bits < _TINY_BITS
    one = torch.ones_like(absmax)
    pre = torch.where(tiny, torch.full_like(absmax, _PRE), one)
    post = torch.where(tiny, torch.full_like(absmax, 1.0 / _PRE), one)
    scaled = absmax * pre
    k = _K_SQ if sq else 1.0
    r = torch.where(absmax_bits != 0, torch.full_like(absmax, k) / scaled, torch.zeros_like(absmax))
    s = scaled * (1.0 / k)  # 2**-15 or 1: exact
    return pre, r, s, post


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """x flattened and zero-padded to whole blocks, as (blocks, block_size)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def encode(x: Tensor, block_size: int, sq: bool) -> tuple[Tensor, Tensor]:
    """Codes (uint8, x's shape) and absmax (fp32, one per block) of an fp32 tensor, by
    quant8.h's rule, with torch ops: bit-identical to the kernel for finite x (a block
    holding Inf or NaN decodes to non-finite values either way; its codes may differ).

    sq: exp_avg_sq's unsigned code, else exp_avg's signed one. The steps: absmax by the
    bit patterns; pre = 2**64 for a block whose absmax is below 2**-96, else 1;
    R = K / (absmax * pre) (K = 1, or 2**15 for exp_avg_sq; 0 for an all-zero block);
    q = (x * pre) * R in fp32; h = q to fp16, nearest even; its mantissa rounded to 3
    bits, nearest even, on the integer bits; exp_avg keeps h's sign in bit 7;
    exp_avg_sq's code is at least 1 where x > 0.
    """
    xb = _blocks(x.detach().to(torch.float32), block_size)
    bits = _absmax_bits(xb)
    pre, r, _, _ = _block_scalars(bits, sq)
    q = (xb * pre[:, None]) * r[:, None]
    h = q.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    a = h & 0x7FFF
    a = (a + 0x3F + ((a >> 7) & 1)) >> 7
    if sq:
        c = a & 0xFF
        c = torch.where((xb > 0) & (c == 0), torch.ones_like(c), c)
    else:
        c = (a | ((h >> 8) & 0x80)) & 0xFF
    codes = c.to(torch.uint8).reshape(-1)[: x.numel()].reshape(x.shape)
    return codes, bits.view(torch.float32).clone()


def decode(codes: Tensor, absmax: Tensor, block_size: int, sq: bool) -> Tensor:
    """The fp32 values of codes (uint8) with their per-block absmax: quant8.h's decoding,
    fp16(h) * (absmax * pre / K), times 2**-64 for a tiny block."""
    c = _blocks(codes.to(torch.int32), block_size)
    h = c << 7 if sq else ((c & 0x80) << 8) | ((c & 0x7F) << 7)
    half = torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16).view(torch.float16).to(torch.float32)
    bits = absmax.detach().to(torch.float32).contiguous().view(torch.int32) & 0x7FFFFFFF
    _, _, s, post = _block_scalars(bits, sq)
    x = (half * s[:, None]) * post[:, None]
    return x.reshape(-1)[: codes.numel()].reshape(codes.shape)


def _check_block_size(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"block_size must be an int{where}, got {value!r}")
    if value < 16 or value % 16 or CHUNK_ELEMS % value:
        raise ValueError(
            f"block_size must be a positive multiple of 16 that divides {CHUNK_ELEMS}{where}, got {value}: "
            f"the codec's vector loop takes 16 elements at a time, and the engine's chunks of "
            f"{CHUNK_ELEMS} elements must hold whole blocks so that no two threads share a block's absmax")


class Adam8bit(FusedOptimizer):
    r"""Adam with block-wise 8-bit moments on the CPU, in one compiled pass per param group.

    The update is Adam's (``torch.optim.Adam``, coupled weight decay), computed in fp32
    on this step's moments; only what is kept between steps is 8-bit:

    .. math::
        \begin{aligned}
        &m_{t-1} \leftarrow \mathrm{dec}(c^m, a^m),\quad v_{t-1} \leftarrow \mathrm{dec}(c^v, a^v)\\
        &g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})\ (\text{negated if maximize}),
            \quad g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        &m_t \leftarrow \text{lerp}(m_{t-1}, g_t, 1-\beta_1),
            \quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}\\
        &(c^m, a^m) \leftarrow \mathrm{enc}(m_t),\quad (c^v, a^v) \leftarrow \mathrm{enc}(v_t)
        \end{aligned}

    Each moment is stored as one byte per element and one fp32 absmax per block of
    ``block_size`` elements, 2 + 8 / block_size bytes per element for both (2.03 at
    256, against 8 for fp32 moments). A code is the top bits of an fp16 number:
    ``exp_avg`` keeps a sign, 4 exponent and 3 mantissa bits (2^-17 to 1 of the
    block's absmax), ``exp_avg_sq`` 5 exponent and 3 mantissa bits (2^-32 to 1), and
    a non-zero ``exp_avg_sq`` never encodes to 0. Each step is, bit for bit, torch's
    fused fp32 step on the decoded moments followed by encoding (roundpipe/_kernels/
    quant8.h states the rounding rule; :func:`encode` and :func:`decode` implement it
    with torch ops).

    Params under ``min_8bit_size`` elements keep fp32 ``exp_avg`` and ``exp_avg_sq``,
    as in bitsandbytes, and step bit-identically to ``torch.optim.Adam(fused=True)``.

    State per param: ``step``, and either ``exp_avg_code``, ``exp_avg_sq_code``
    (uint8, the param's shape) with ``exp_avg_absmax``, ``exp_avg_sq_absmax``
    (float32, one per block), or ``exp_avg``, ``exp_avg_sq`` (float32); plus
    ``master_param`` with master weights. The codes are not under torch's keys on
    purpose: torch's Adam would load uint8 codes as floats without a word.
    :meth:`to_fp32_state_dict` gives a checkpoint ``torch.optim.Adam`` resumes, and
    ``load_state_dict`` takes torch's fp32 checkpoints, quantizing the moments.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate, a float or a 1-element Tensor (default: 1e-3).
        betas: coefficients for the running averages of the gradient and its square
            (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: L2 penalty (default: 0).
        amsgrad: must be False: no 8-bit AMSGrad (a ValueError otherwise).
        foreach: accepted for compatibility and ignored, with a warning.
        maximize: maximize the objective instead of minimizing (default: False).
        capturable: must be False.
        differentiable: must be False.
        fused: accepted for compatibility and ignored, with a warning.
        decoupled_weight_decay: the AdamW rule (default: False).
        master_weights: for bfloat16/float16 params, keep an fp32 master copy in
            ``state["master_param"]``; the step updates it and writes the param back
            rounded to nearest even. float32 params ignore it (default: False).
        block_size: elements per absmax, a multiple of 16 that divides 16384 (the
            engine's chunk, so that threads never share a block) (default: 256).
        min_8bit_size: params with fewer elements keep fp32 moments (default: 4096).

    Params must be contiguous CPU tensors of dtype float32, bfloat16 or float16 with
    dense grads of the same shape and dtype (not DTensors). Anything else raises
    before any tensor is touched.
    """

    _NAME = "Adam8bit"
    _C_STEP = "rp_adam8bit_step"
    _C_HYPER = "rp_adam8bit_hyper"
    _TORCH_FUSED = False  # torch has no class of this name
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "fused": None, "decoupled_weight_decay": False, "master_weights": False, "block_size": 256,
        "min_8bit_size": 4096,
    }
    _BOOL_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")
    _FIXED_STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "exp_avg": torch.float32, "exp_avg_sq": torch.float32,
        "exp_avg_code": torch.uint8, "exp_avg_absmax": torch.float32,
        "exp_avg_sq_code": torch.uint8, "exp_avg_sq_absmax": torch.float32,
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
        block_size: int = 256,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
            "maximize": maximize, "foreach": foreach, "capturable": capturable,
            "differentiable": differentiable, "fused": fused, "decoupled_weight_decay": decoupled_weight_decay,
            "master_weights": master_weights, "block_size": block_size, "min_8bit_size": min_8bit_size,
        }
        super().__init__(params, defaults)

    # ---- the rule's hooks ----------------------------------------------------------

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        _check_hyperparameters(group, where)  # Adam's: lr, betas, eps, weight_decay, type then range
        if group.get("amsgrad") is not False:
            raise ValueError(f"roundpipe {self._NAME} has no amsgrad variant{where}: amsgrad must be False, "
                             f"got {group.get('amsgrad')!r}; use roundpipe.optim.Adam(amsgrad=True)")
        _check_block_size(group.get("block_size"), where)
        size = group.get("min_8bit_size")
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"min_8bit_size must be an int{where}, got {size!r}")
        if size < 0:
            raise ValueError(f"min_8bit_size must be >= 0{where}, got {size}")

    def _check_param(self, p: Tensor, group: dict[str, Any], where: str) -> None:
        if _is_dtensor(p):
            raise TypeError(f"roundpipe {self._NAME}: {where} is a DTensor; 8-bit state is kept for plain "
                            "tensors only (its blocks would not follow a resharding)")

    def _eight_bit(self, p: Tensor, group: dict[str, Any]) -> bool:
        return p.numel() >= group["min_8bit_size"]

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return (*FP32_KEYS, *CODE_KEYS)

    def _param_state_keys(self, p: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        return CODE_KEYS if self._eight_bit(p, group) else FP32_KEYS

    def _state_shape(self, p: Tensor, key: str, group: dict[str, Any]) -> tuple[int, ...]:
        if key.endswith("_absmax"):  # one scale per block
            return (math.ceil(p.numel() / group["block_size"]),)
        return tuple(p.shape)

    def _config(self, group: dict[str, Any]) -> tuple:
        return (group["block_size"], group["min_8bit_size"])

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        for key, dtype in dtypes.items():
            state[key] = torch.zeros(self._state_shape(p, key, group), dtype=dtype)
        return state

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        h.lr = _scalar(group["lr"])
        h.beta1 = _scalar(beta1)
        h.beta2 = _scalar(beta2)
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]
        h.block_size = group["block_size"]
        h.maximize = bool(group["maximize"])
        h.decoupled_weight_decay = bool(group["decoupled_weight_decay"])

    # ---- checkpoints --------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this class, or torch's fp32 ``Adam``/``AdamW`` one.

        torch's ``exp_avg``/``exp_avg_sq`` of a param stepped in 8 bits are quantized
        (from the saved values, before torch's cast to the param's dtype); codes of a
        param now under ``min_8bit_size`` are decoded to fp32.
        """
        with self._step_lock:
            super().load_state_dict(state_dict)
            for group, p, saved, st in self._loaded_states(state_dict):
                block = group["block_size"]
                eight = self._eight_bit(p, group)
                if eight and all(k in saved for k in FP32_KEYS) and not any(k in saved for k in CODE_KEYS):
                    for name, sq in (("exp_avg", False), ("exp_avg_sq", True)):
                        codes, absmax = encode(saved[name].to(torch.float32), block, sq)
                        st[f"{name}_code"], st[f"{name}_absmax"] = codes, absmax
                        del st[name]
                elif not eight and all(k in saved for k in CODE_KEYS) and not any(k in saved for k in FP32_KEYS):
                    for name, sq in (("exp_avg", False), ("exp_avg_sq", True)):
                        st[name] = decode(saved[f"{name}_code"], saved[f"{name}_absmax"], block, sq)
                        del st[f"{name}_code"], st[f"{name}_absmax"]
            self._plans.clear()

    def to_fp32_state_dict(self) -> dict[str, Any]:
        """This optimizer's ``state_dict`` with fp32 ``exp_avg`` and ``exp_avg_sq`` in place of
        the codes (decoded, as the next step would see them) and without this class's own
        group options: a checkpoint that ``torch.optim.Adam`` (``AdamW`` for
        :class:`AdamW8bit`) resumes, with ``fused=True`` where the group left it unset:
        torch's fused step on those moments is exactly the step this optimizer would take
        next. Master copies stay under ``master_param``, which torch ignores."""
        sd = self.state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        block_of = {i: g["block_size"] for g in sd["param_groups"] for i in g["params"]}
        state: dict[Any, Any] = {}
        for pid, p in zip(ids, params, strict=True):
            st = sd["state"].get(pid)
            if st is None:
                continue
            st = dict(st)
            if "exp_avg_code" in st:
                for name, sq in (("exp_avg", False), ("exp_avg_sq", True)):
                    st[name] = decode(st.pop(f"{name}_code"), st.pop(f"{name}_absmax"), block_of[pid], sq).view(p.shape)
            state[pid] = st
        groups = [{k: v for k, v in g.items() if k not in ("block_size", "min_8bit_size")} for g in sd["param_groups"]]
        for g in groups:  # torch's fused kernel: the step ours reproduces bit for bit on fp32 moments
            if g.get("fused") is None and not g.get("foreach"):
                g["fused"] = True
        return {"state": state, "param_groups": groups}

    # ---- the torch fallback -----------------------------------------------------------

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Decode, torch's fused fp32 step, encode: the kernel's step with torch ops."""
        group = plan.group
        block = group["block_size"]
        use_master = bool(group.get("master_weights"))
        params: list[Tensor] = []
        grads: list[Tensor] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        steps: list[Tensor] = []
        back: list[tuple[Tensor, Tensor]] = []
        coded: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        for p, g, st in zip(plan.params, plan.grads, plan.states, strict=True):
            master = st.get("master_param") if use_master and p.dtype in _LOW_PRECISION else None
            if master is not None:
                params.append(master)
                back.append((p, master))
            elif p.dtype == torch.float32:
                params.append(p)
            else:
                params.append(p.float())
                back.append((p, params[-1]))
            grads.append(g if g.dtype == torch.float32 else g.float())
            if grad_scale is not None and g.dtype != torch.float32:
                back.append((g, grads[-1]))
            if "exp_avg_code" in st:
                m = decode(st["exp_avg_code"], st["exp_avg_absmax"], block, False)
                v = decode(st["exp_avg_sq_code"], st["exp_avg_sq_absmax"], block, True)
                coded.append((st, m, v))
            else:
                m, v = st["exp_avg"], st["exp_avg_sq"]
            ms.append(m)
            vs.append(v)
            steps.append(st["step"])
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        fn = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        fn(params, grads, ms, vs, [], steps, amsgrad=False, lr=_scalar(group["lr"]), beta1=_scalar(beta1),
           beta2=_scalar(beta2), weight_decay=group["weight_decay"], eps=group["eps"],
           maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf)
        for dst, src in back:
            dst.copy_(src)
        for st, m, v in coded:
            for name, x, sq in (("exp_avg", m, False), ("exp_avg_sq", v, True)):
                codes, absmax = encode(x, block, sq)
                st[f"{name}_code"].copy_(codes)
                st[f"{name}_absmax"].copy_(absmax)


class AdamW8bit(Adam8bit):
    """:class:`Adam8bit` with the decoupled (AdamW) weight decay rule; weight_decay defaults
    to 1e-2, as torch's AdamW. :meth:`~Adam8bit.to_fp32_state_dict` gives a checkpoint
    ``torch.optim.AdamW`` resumes."""

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
        block_size: int = 256,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, block_size=block_size, min_8bit_size=min_8bit_size,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
