"""``roundpipe.optim.Adam``: torch.optim.Adam's interface over one C call per param group."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from .. import _build

__all__ = ["Adam", "AdamW", "native_available"]

# Elements per chunk: 16 Ki fp32 = 64 KiB per array, 320 KiB for the five
# arrays an amsgrad step touches, which fits in L2 with room to spare; big
# enough that taking a chunk from the shared counter costs nothing.
CHUNK_ELEMS = 16384
# Param groups with fewer elements run on the calling thread: waking the
# OpenMP team costs more than it saves. Measured by scripts/bench.py --sweep-serial.
SERIAL_BELOW = 32768

# torch's fused Adam runs Vectorized<float> of 8 lanes: its kernel is built for
# AVX2 and not registered for AVX-512 (REGISTER_DISPATCH), and the NEON, SVE256
# and scalar builds are 8 wide too. The last numel % 8 elements of a tensor go
# through torch's scalar tail loop, which fuses a different multiply-add; the
# kernel reproduces that (tests/test_numerics.py checks it against torch).
_TORCH_VEC = 8

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SUPPORTED_DTYPES = (torch.float32, torch.complex64)


def native_available() -> bool:
    """True when steps run in roundpipe's compiled kernel, False on the torch fallback."""
    return _build.load_kernel() is not None


def _scalar(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def _check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any, where: str = "") -> None:
    """torch.optim.Adam's value checks, one line each; `where` names the group at step time."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element{where}, got {lr.numel()} elements")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element{where}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}{where}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}{where}")


class _GroupPlan:
    """One param group's tensors as the kernel sees them, reused while nothing changes.

    Built by ``Adam._plan``: the C arrays of tensor pointers and the chunk list
    live here between steps, so a step whose grads are the same tensors as
    last time does no per-tensor work in Python beyond an identity check.
    """

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group
        self.params: list[Tensor] = []  # those with a grad, in group order
        self.grads: list[Tensor] = []
        self.states: list[dict[str, Any]] = []
        self.param_ptrs: list[int] = []
        self.tensors: Any = None  # rp_tensor[] (native path)
        self.chunks: Any = None  # rp_chunk[]
        self.n_chunks = 0
        self.hyper: Any = None  # rp_hyper *
        self.keepalive: list[Tensor] = []
        self.amsgrad = False
        self.pending_init: list[Tensor] = []  # params whose state is created on the first run
        self.built = False

    def matches(self, params_with_grad: list[Tensor], grads: list[Tensor], state: dict) -> bool:
        if len(grads) != len(self.grads):
            return False
        for p, g, g0, s0, ptr in zip(params_with_grad, grads, self.grads, self.states, self.param_ptrs):
            if g is not g0 or state.get(p) is not s0 or p.data_ptr() != ptr:
                return False
        return True


class Adam(Optimizer):
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

    Limits: parameters must be contiguous CPU tensors of dtype float32 (or
    complex64, stepped as their real view) with dense gradients of the same
    shape and dtype. Anything else raises before any tensor is touched.
    """

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
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        if capturable:
            raise ValueError(
                "capturable=True is not supported: roundpipe steps CPU tensors, where there is "
                "no CUDA graph to capture. Use torch.optim.Adam(capturable=True) on GPU."
            )
        if differentiable:
            raise ValueError(
                "differentiable=True is not supported: the compiled step is not differentiable. "
                "Use torch.optim.Adam(differentiable=True) to differentiate through the step."
            )
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value is not None:
                warnings.warn(
                    f"roundpipe.optim.Adam ignores {name}={value!r}: its step is always one fused "
                    "C call per param group. The value is kept in param_groups so that state_dict "
                    "round-trips with torch.optim.Adam.",
                    UserWarning,
                    stacklevel=2,
                )
        defaults = {
            "lr": lr,
            "betas": tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() else b for b in betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)
        # GradScaler hands us grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        self._kernel = _build.load_kernel()
        self._plans: dict[int, _GroupPlan] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)
        self._kernel = _build.load_kernel()
        self._plans = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = {k: v for k, v in state.items() if k not in ("_kernel", "_plans")}
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group(param_group)
        if hasattr(self, "_plans"):  # not yet during __init__
            self._plans.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()

    # ---- step ------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> float | None:
        """Perform a single optimization step.

        Args:
            closure: reevaluates the model and returns the loss (optional).
            grad_scale: GradScaler's scale; grads are unscaled inside the step.
                Defaults to the ``grad_scale`` attribute GradScaler sets.
            found_inf: GradScaler's inf flag; when non-zero the whole step is
                skipped (params, moments and step counters stay as they are).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        grad_scale = _amp_scalar(grad_scale, "grad_scale")
        found_inf = _amp_scalar(found_inf, "found_inf")

        # Check everything before touching anything: an error leaves params,
        # state and step counters exactly as they were.
        plans = [self._plan(gi, group) for gi, group in enumerate(self.param_groups)]
        if found_inf is not None and found_inf.item() != 0.0:
            return loss
        for plan in plans:
            if plan.params:
                self._run(plan, grad_scale, found_inf)
        return loss

    def _plan(self, gi: int, group: dict[str, Any]) -> _GroupPlan:
        """Validate group `gi` and return its kernel plan (cached while its tensors are unchanged)."""
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], f" (param group {gi})")
        params_with_grad = []
        grads = []
        for p in group["params"]:
            g = p.grad
            if g is not None:
                params_with_grad.append(p)
                grads.append(g)
        plan = self._plans.get(gi)
        amsgrad = bool(group["amsgrad"])
        if plan is not None and plan.group is group and plan.amsgrad == amsgrad and plan.matches(params_with_grad, grads, self.state):
            return plan
        # Full check of every tensor, then state for new params, then the C arrays.
        index = {id(p): i for i, p in enumerate(group["params"])}
        for p, g in zip(params_with_grad, grads):
            _check_tensor(p, g, f"param group {gi}, param {index[id(p)]}")
        for p in params_with_grad:
            st = self.state.get(p)
            if st:
                _check_state(p, st, amsgrad, f"param group {gi}, param {index[id(p)]}")
        plan = _GroupPlan(group)
        plan.amsgrad = amsgrad
        plan.params, plan.grads = params_with_grad, grads
        plan.pending_init = [p for p in params_with_grad if not self.state.get(p)]
        self._plans[gi] = plan
        return plan

    def _init_state(self, plan: _GroupPlan) -> None:
        for p in plan.pending_init:
            state = self.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if plan.amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        plan.pending_init = []
        for p in plan.params:
            st = self.state[p]
            step = st["step"]
            if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0 and step.device.type == "cpu"):
                st["step"] = torch.tensor(_scalar(step), dtype=torch.float32)
        plan.states = [self.state[p] for p in plan.params]
        plan.param_ptrs = [p.data_ptr() for p in plan.params]

    def _build_native(self, plan: _GroupPlan) -> None:
        ffi, lib = self._kernel.ffi, self._kernel.lib
        n = len(plan.params)
        tensors = ffi.new("rp_tensor[]", max(n, 1))
        keep: list[Tensor] = []
        for i, (p, g, st) in enumerate(zip(plan.params, plan.grads, plan.states)):
            views = [p, g, st["exp_avg"], st["exp_avg_sq"]]
            if plan.amsgrad:
                views.append(st["max_exp_avg_sq"])
            views = [torch.view_as_real(t) if t.is_complex() else t for t in views]
            keep.extend(views)
            keep.append(st["step"])
            t = tensors[i]
            t.param = ffi.cast("void *", views[0].data_ptr())
            t.grad = ffi.cast("void *", views[1].data_ptr())
            t.exp_avg = ffi.cast("void *", views[2].data_ptr())
            t.exp_avg_sq = ffi.cast("void *", views[3].data_ptr())
            t.max_exp_avg_sq = ffi.cast("void *", views[4].data_ptr()) if plan.amsgrad else ffi.NULL
            t.master = ffi.NULL
            t.step = ffi.cast("float *", st["step"].data_ptr())
            t.numel = views[0].numel()
            t.param_dtype = _DTYPE_CODES[views[0].dtype]
            t.exp_avg_dtype = _DTYPE_CODES[views[2].dtype]
            t.exp_avg_sq_dtype = _DTYPE_CODES[views[3].dtype]
        n_chunks = lib.rp_plan_chunks(tensors, n, CHUNK_ELEMS, ffi.NULL, 0)
        chunks = ffi.new("rp_chunk[]", max(n_chunks, 1))
        lib.rp_plan_chunks(tensors, n, CHUNK_ELEMS, chunks, n_chunks)
        plan.tensors, plan.chunks, plan.n_chunks = tensors, chunks, n_chunks
        plan.hyper = ffi.new("rp_hyper *")
        plan.keepalive = keep

    def _run(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        group = plan.group
        if not plan.built:
            self._init_state(plan)
            if self._kernel is not None:
                self._build_native(plan)
            plan.built = True
        if self._kernel is None:
            _torch_fused_step(plan, grad_scale, found_inf)
            return
        ffi = self._kernel.ffi
        beta1, beta2 = group["betas"]
        h = plan.hyper
        h.lr = _scalar(group["lr"])
        h.beta1 = _scalar(beta1)
        h.beta2 = _scalar(beta2)
        h.eps = group["eps"]
        h.weight_decay = group["weight_decay"]
        h.amsgrad = plan.amsgrad
        h.maximize = bool(group["maximize"])
        h.decoupled_weight_decay = bool(group["decoupled_weight_decay"])
        h.num_threads = torch.get_num_threads()
        h.serial_below = SERIAL_BELOW
        h.torch_vec = _TORCH_VEC
        h.grad_scale = ffi.cast("float *", grad_scale.data_ptr()) if grad_scale is not None else ffi.NULL
        h.found_inf = ffi.cast("float *", found_inf.data_ptr()) if found_inf is not None else ffi.NULL
        self._kernel.lib.rp_adam_step(h, plan.tensors, len(plan.params), plan.chunks, plan.n_chunks)


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
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


# ---- checks ------------------------------------------------------------------


def _check_tensor(p: Tensor, g: Tensor, where: str) -> None:
    """The one place that decides which params and grads the kernel accepts."""
    if p.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"roundpipe Adam: {where} has dtype {p.dtype}; supported: float32 (and complex64)")
    if p.device.type != "cpu":
        raise RuntimeError(f"roundpipe Adam: {where} is on {p.device}; it steps CPU tensors only")
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"roundpipe Adam: {where} has a sparse gradient; use torch.optim.SparseAdam")
    if g.dtype != p.dtype:
        raise TypeError(f"roundpipe Adam: {where} has grad dtype {g.dtype} but param dtype {p.dtype}")
    if g.device.type != "cpu":
        raise RuntimeError(f"roundpipe Adam: {where} has its grad on {g.device}; move it to the CPU")
    if g.shape != p.shape:
        raise ValueError(f"roundpipe Adam: {where} has grad shape {tuple(g.shape)} but param shape {tuple(p.shape)}")
    if not p.is_contiguous():
        raise ValueError(f"roundpipe Adam: {where} is not contiguous; make it so with .data = p.contiguous()")
    if not g.is_contiguous():
        raise ValueError(f"roundpipe Adam: {where} has a non-contiguous grad; make it contiguous before step()")


def _check_state(p: Tensor, st: dict[str, Any], amsgrad: bool, where: str) -> None:
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for name in names:
        t = st.get(name)
        if t is None:
            raise RuntimeError(f"roundpipe Adam: {where} has no state[{name!r}] (was amsgrad turned on mid-training?)")
        if t.dtype != p.dtype or t.shape != p.shape or t.device.type != "cpu" or not t.is_contiguous():
            raise RuntimeError(
                f"roundpipe Adam: {where} has state[{name!r}] of dtype {t.dtype}, shape {tuple(t.shape)} "
                f"on {t.device}; expected a contiguous CPU tensor like the param"
            )
    if "step" not in st:
        raise RuntimeError(f"roundpipe Adam: {where} has no state['step']")


def _amp_scalar(t: Tensor | None, name: str) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.numel() != 1:
        raise ValueError(f"roundpipe Adam: {name} must be a 1-element Tensor, got {t!r}")
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return t


# ---- fallback --------------------------------------------------------------------


def _torch_fused_step(plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The same step through torch's own fused CPU kernel, for hosts without a compiler."""
    group = plan.group
    real = lambda ts: [torch.view_as_real(t) if t.is_complex() else t for t in ts]  # noqa: E731
    params = real(plan.params)
    grads = real(plan.grads)
    exp_avgs = real([st["exp_avg"] for st in plan.states])
    exp_avg_sqs = real([st["exp_avg_sq"] for st in plan.states])
    max_sqs = real([st["max_exp_avg_sq"] for st in plan.states]) if plan.amsgrad else []
    steps = [st["step"] for st in plan.states]
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    fn = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    fn(
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
        amsgrad=plan.amsgrad, lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2),
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        grad_scale=grad_scale, found_inf=found_inf,
    )
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
