"""The engine every roundpipe optimizer runs on: checks, plans, the one C call per param group.

An optimizer is a subclass of :class:`FusedOptimizer` that supplies its rule:

* its signature and ``defaults`` (``__init__``), and its value checks (``_check_group``);
* its state layout: ``_state_keys`` (the tensors the C loop reads and writes, in the
  order of ``rp_tensor.state``), ``_new_state`` (what a first step creates, as torch
  does), ``_HAS_STEP`` (a ``step`` tensor the C code counts);
* its per-param scalar state, if any: ``_extra_state`` names 1-element state tensors
  beyond ``_state_keys`` (Adam's ``sr_seed``, NAdam's ``mu_product``, ASGD's ``eta``
  and ``mu``), each of the dtype ``_EXTRA_STATE_DTYPES`` declares. They are checked with
  the rest of the state, kept in that dtype by ``load_state_dict`` (torch would cast
  them to the param's dtype), and the C code reaches them through ``rp_tensor.aux``
  (in ``_extra_state`` order), to update them serially before ``rp_run``;
* its scalars per step: ``_fill_hyper`` writes its C hyperparameter struct ``_C_HYPER``,
  and ``_C_STEP`` names the C entry point (one file per rule in ``roundpipe/_kernels``);
* ``_fallback_step``: the same step with torch's own kernels, for hosts without a compiler.

Rules whose state is not shaped like the param, differs from param to param, or that reduce
before their element pass (Adafactor's row and column sums of squares and norms; block scales), add:

* ``_param_state_keys``: the keys one param has, where params of a group differ (a subset of
  ``_state_keys``, which then lists them all; rp_tensor.state follows the param's own order);
* ``_state_shape``: each state tensor's shape, from the param and its group (default: the param's);
* ``_FIXED_STATE_DTYPES``: state keys whose dtype is the rule's whatever the param's (8-bit
  codes in uint8, their scales in float32); a non-floating one comes back from a checkpoint
  in its own dtype (torch's load_state_dict casts it to the param's).
* ``_REDUCE_SCALARS``: not None to run the reduction phase (``rp_reduce`` in runner.h): the
  engine plans reduction chunks from each param's shape (rp_tensor.rows, cols: its last two
  dims; whole rows, never split by the thread count) and a zeroed scratch of this many floats
  per chunk plus one per column, and hands both to the C entry point in rp_run_opts.

Everything else is written once, here: validation before anything is mutated, with
errors that name the group and parameter; plans reused between steps and rechecked
each step (every tensor the C code will touch: address, storage size, layout, dtype;
one C pass over torch's tensor structs, see _plan.py);
refusal of memory shared by two params or a param and a state tensor; fresh grads
repointed in one C call; the flattened chunk list and one C call per param group with
the GIL released; the thread count from ``torch.get_num_threads()``; one step at a
time per optimizer; DTensor local shards; GradScaler's ``grad_scale``/``found_inf``;
master weights and 16-bit state; torch's step wrapper only when something observes
it; torch.compile; and checkpoints that torch's own optimizers resume.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast, overload

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import Optimizer, ParamsT

from .. import _build, _threads
from ._plan import _GroupPlan, _state_column

# Elements per chunk: 16 Ki fp32 = 64 KiB per array, 320 KiB for the five
# arrays an amsgrad step touches, which fits in L2 with room to spare; big
# enough that taking a chunk from the shared counter costs nothing.
CHUNK_ELEMS = 16384
# Param groups with fewer elements run on the calling thread: waking the
# OpenMP team costs more than it saves. Measured by scripts/bench.py --sweep-serial.
SERIAL_BELOW = 32768

# Elements per chunk of the reduction phase (whole rows, rp_plan_rchunks): 16 MiB of fp32.
# A tensor that fits in one chunk is reduced in exactly the order of one sequential loop
# (torch's norms are such loops: Adafactor gets torch's bits), bigger ones fold their
# chunks' partials in chunk order; smaller chunks would balance threads better.
RCHUNK_ELEMS = 1 << 22

# torch's fused CPU optimizers run Vectorized<float> of 8 lanes: their kernels are built
# for AVX2 and not registered for AVX-512 (REGISTER_DISPATCH), and the NEON, SVE256 and
# scalar builds are 8 wide too. The last numel % 8 elements of a tensor go through
# torch's scalar tail loop, which may fuse multiply-adds differently; each rule's C
# reproduces that (tests compare against torch).
_TORCH_VEC = 8


def torch_dispatch_vec() -> int:
    """Vectorized<float>::size() in torch's kernels that are registered for AVX-512 too
    (fused SGD and Adagrad): 16 floats where torch dispatches to AVX-512, else 8."""
    return 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}  # engine.h RP_F32 ...
# Param dtypes the engine steps (complex64 as its float32 real view, where a rule allows it).
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
_REAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Choices for the state dtype options (exp_avg_dtype, ...); None: torch's layout, see _layout_dtypes.
_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def native_available() -> bool:
    """True when steps run in roundpipe's compiled kernel, False on the torch fallback."""
    return _build.load_kernel() is not None


def _scalar(x: float | Tensor) -> float:
    return x.item() if isinstance(x, Tensor) else float(x)


def check_number(group: dict[str, Any], key: str, where: str, *, tensor_ok: bool = False) -> float:
    """group[key] as a float, or TypeError naming it: every rule checks every hyperparameter's
    type with this before its range, for every group, before any group steps (so ``None`` or a
    string in group 1 raises before group 0 is touched). A 1-element Tensor passes where torch
    takes one (``lr``, ``betas``) and tensor_ok is set; bools are refused (True is not a rate)."""
    value = group.get(key)
    if isinstance(value, Tensor) and tensor_ok and value.numel() == 1 and not value.is_complex():
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a real number or a 1-element Tensor" if tensor_ok else "a real number"
        raise TypeError(f"{key} must be {kind}{where}, got {value!r}")
    return float(value)


def check_lr(lr: Any, where: str) -> None:
    """torch's learning-rate checks, shared by the rules: a float or a 1-element Tensor, >= 0."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element{where}, got {lr.numel()} elements")
    if not 0.0 <= check_number({"lr": lr}, "lr", where, tensor_ok=True):
        raise ValueError(f"Invalid learning rate: {lr}{where}")


def _dtensor_type() -> type | None:
    """torch's DTensor class, or None while torch.distributed.tensor is not imported.

    FSDP2 and tensor parallel hand the optimizer DTensors, whose local shards the kernel steps.
    No DTensor can exist before its module is imported, so look it up instead of importing it:
    importing torch.distributed.tensor costs over a second.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _is_dtensor(t: Tensor) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def _local(t: Tensor) -> Tensor:
    """The plain tensor behind t: its local shard for a DTensor (whose data_ptr() is 0), else t."""
    return cast(Any, t).to_local() if _is_dtensor(t) else t


def _local_ptr(t: Tensor) -> int:
    return _local(t).data_ptr()


def _local_storage(t: Tensor) -> Any:
    return _local(t).untyped_storage()


class FusedOptimizer(Optimizer):
    """What every roundpipe optimizer shares; a subclass adds its rule (see the module doc)."""

    _NAME: ClassVar[str]  # as messages name it: "Adam", "SGD", ...
    _C_STEP: ClassVar[str]  # the rule's C entry point: int f(run, hyper, tensors, n, chunks, n_chunks)
    _C_HYPER: ClassVar[str]  # its hyperparameter struct, as cffi names it
    # The C file (_kernels/NAME.c) that holds _C_STEP, built on first use; None: NAME in rp_NAME_step.
    _KERNEL: ClassVar[str | None] = None
    _HAS_STEP: ClassVar[bool] = True  # state["step"]: a 0-dim float32 tensor the C code counts
    _PARAM_DTYPES: ClassVar[tuple[torch.dtype, ...]] = _REAL_DTYPES
    _TORCH_VEC: ClassVar[int | None] = None  # the rule's torch vector width; None: _TORCH_VEC
    _TORCH_FUSED: ClassVar[bool] = True  # torch's class of the same name has fused=True
    # Group options with their signature defaults, for groups loaded without them (__setstate__).
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {}
    _BOOL_OPTIONS: ClassVar[tuple[str, ...]] = ("maximize", "capturable", "differentiable")
    # State key -> the group option that sets its dtype (torch.float32 / torch.bfloat16 / None).
    _STATE_DTYPE_OPTIONS: ClassVar[dict[str, str]] = {}
    # Each _extra_state key -> its dtype (a 1-element CPU tensor; the C code reads it through rp_tensor.aux).
    _EXTRA_STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {}
    # State keys whose first step writes them without reading them (SGD's momentum_buffer, which
    # takes the grad; rp_tensor.fresh). A param whose state lacks one steps as on its first step
    # (momentum turned on mid-training), and a step GradScaler skips creates no state at all:
    # a buffer no step has written would be read as momentum after a checkpoint or a plan rebuild.
    _FIRST_STEP_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_group(defaults, "")
        self._check_options(defaults, "")
        for name in ("capturable", "differentiable"):
            if defaults.get(name):
                what = ("roundpipe steps CPU tensors, where there is no CUDA graph to capture"
                        if name == "capturable" else "the compiled step is not differentiable")
                raise ValueError(f"{name}=True is not supported: {what}. "
                                 f"Use torch.optim.{self._NAME}({name}=True) instead.")
        for name in ("foreach", "fused"):
            value = defaults.get(name)
            if value is not None:
                warnings.warn(
                    f"roundpipe.optim.{self._NAME} ignores {name}={value!r}: its step is always one fused "
                    f"C call per param group. The value is kept in param_groups so that state_dict "
                    f"round-trips with torch.optim.{self._NAME}.",
                    UserWarning,
                    stacklevel=3,
                )
        super().__init__(params, defaults)
        # GradScaler hands us grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        self._kernel = _build.load_kernel(self._kernel_rule())
        self._plans: dict[int, _GroupPlan] = {}
        self._step_lock = threading.RLock()

    # ---- the rule's hooks --------------------------------------------------------

    @classmethod
    def _kernel_rule(cls) -> str:
        """The rule's C file name: _KERNEL, else NAME in its entry point rp_NAME_step."""
        return cls._KERNEL or cls._C_STEP.removeprefix("rp_").removesuffix("_step")

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """Raise for bad hyperparameter values; `where` names the group (empty at construction)."""

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors the C code reads and writes, in rp_tensor.state order."""
        raise NotImplementedError

    def _new_state(self, p: Tensor, g: Tensor, group: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
        """The state a first step creates, torch's layout (dtypes: each state key's dtype)."""
        raise NotImplementedError

    def _fill_hyper(self, h: Any, group: dict[str, Any]) -> None:
        """Write the group's hyperparameters into the rule's C struct."""
        raise NotImplementedError

    def _config(self, group: dict[str, Any]) -> tuple:
        """What the C arrays depend on in a group, beyond the state dtypes: a change rebuilds them."""
        return ()

    def _check_param(self, p: Tensor, group: dict[str, Any], where: str) -> None:
        """Raise for a param the rule's options do not allow (beyond _check_tensor's rules)."""

    # State key -> its dtype whatever the param's (uint8 codes, float32 scales), see the module doc.
    _FIXED_STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {}

    # Not None: the rule runs the reduction phase, with this many floats of partials per
    # reduction chunk (plus one per column of the param's last dim), see the module doc.
    _REDUCE_SCALARS: ClassVar[int | None] = None

    def _param_state_keys(self, p: Tensor, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors of param p, in rp_tensor.state order (default: _state_keys(group))."""
        return self._state_keys(group)

    def _state_shape(self, p: Tensor, key: str, group: dict[str, Any]) -> tuple[int, ...]:
        """The shape of state[key] for param p of group (default: the param's)."""
        return tuple(p.shape)

    def _extra_state(self, group: dict[str, Any]) -> tuple[str, ...]:
        """1-element state tensors beyond _state_keys (dtypes in _EXTRA_STATE_DTYPES), in rp_tensor.aux order."""
        return ()

    def _new_extra_state(self, key: str, p: Tensor, state: dict[str, Any]) -> Tensor:
        """State[key] for an _extra_state key that p's state lacks (new state, or an option turned
        on over existing state); state holds everything else, its ``step`` a float32 tensor."""
        raise NotImplementedError

    def _fill_tensor(self, t: Any, ffi: Any, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        """Set the rule's own rp_tensor fields for param p (besides pointers, dtypes, step)."""

    def _fallback_step(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The same step through torch's own kernels, for hosts without a compiler."""
        raise NotImplementedError

    # ---- options shared by every rule --------------------------------------------

    def _check_options(self, group: dict[str, Any], where: str) -> None:
        """Booleans must be bools, master_weights too; state dtypes from the short list."""
        flags = {k: group[k] for k in (*self._BOOL_OPTIONS, "master_weights") if k in group}
        flags.update({k: group[k] for k in ("foreach", "fused") if k in group})
        _check_flags(flags, where)
        for name in sorted(set(self._STATE_DTYPE_OPTIONS.values())):
            value = group.get(name)
            if value not in _STATE_DTYPES:
                raise TypeError(f"{name} must be torch.float32, torch.bfloat16 or None{where}, got {value!r}")

    def _layout(self, group: dict[str, Any], p: Tensor) -> tuple[bool, dict[str, torch.dtype]]:
        """(keeps an fp32 master copy, each state key's dtype) for param p in group.

        torch's layout is the param's dtype; with master weights it is float32; a state
        dtype option (exp_avg_dtype, ...) overrides either.
        """
        master = bool(group.get("master_weights")) and p.dtype in _LOW_PRECISION
        base = torch.float32 if master else p.dtype
        dtypes = {}
        for key in self._param_state_keys(p, group):
            option = self._STATE_DTYPE_OPTIONS.get(key)
            dtypes[key] = self._FIXED_STATE_DTYPES.get(key) or (group.get(option) if option else None) or base
        return master, dtypes

    def _full_config(self, group: dict[str, Any]) -> tuple:
        options = tuple(group.get(o) for o in sorted(set(self._STATE_DTYPE_OPTIONS.values())))
        return (bool(group.get("master_weights")), *options, *self._config(group))

    # ---- pickling, groups, checkpoints ---------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Options a loaded group lacks (a torch checkpoint has no master_weights) come from
        # this optimizer's constructor arguments, else from the signature's defaults.
        defaults = {**self._GROUP_DEFAULTS, **getattr(self, "defaults", {})}
        for group in self.param_groups:
            for key in self._GROUP_DEFAULTS:
                group.setdefault(key, defaults[key])
            if self._HAS_STEP:
                for p in group["params"]:
                    p_state = self.state.get(p, [])
                    if len(p_state) != 0 and "step" in p_state and not torch.is_tensor(p_state["step"]):
                        p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)
        self._kernel = _build.load_kernel(self._kernel_rule())
        self._plans = {}
        if not hasattr(self, "_step_lock"):  # unpickling; load_state_dict keeps the lock it holds
            self._step_lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_kernel", "_plans", "_step_lock")}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, with errors that name the new group and param."""
        where = f" (param group {len(self.param_groups)})"
        merged = {**self.defaults, **param_group}
        self._check_group(merged, where)
        self._check_options(merged, where)
        params = param_group.get("params")
        if isinstance(params, (list, tuple)):
            _check_no_duplicates([*self.param_groups, {"params": params}], self._NAME)
        _TORCH_ADD_PARAM_GROUP(self, param_group)
        if hasattr(self, "_plans"):  # not yet during __init__
            self._plans.clear()

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, with ``fused=True`` in each group that left it unset.

        torch's optimizers take every hyperparameter from a loaded checkpoint, ``fused``
        included: a checkpoint that says ``fused=None`` would resume on torch's for-loop
        implementation, slower and no longer bit-identical. Our step is always fused, so
        the checkpoint says so, except where torch's fused kernel could not take the group
        (complex params) or where ``foreach=True`` was asked for (torch refuses both).
        """
        sd = super().state_dict()
        if self._TORCH_FUSED:
            for saved, group in zip(sd["param_groups"], self.param_groups, strict=True):
                if ("fused" in saved and saved["fused"] is None and not saved.get("foreach")
                        and all(p.is_floating_point() for p in group["params"])):
                    saved["fused"] = True
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, with state dtypes set by each param's layout.

        torch casts every floating state tensor to its param's dtype. That is
        right for state in torch's layout (an fp32 checkpoint resumed on bf16
        params, or the reverse), but it would round fp32 master copies and
        state kept in fp32 on purpose (``master_weights``, ``exp_avg_dtype``)
        to bf16: those are cast from the saved values to the dtype the group's
        layout asks for, so nothing is rounded twice.
        """
        with self._step_lock:
            super().load_state_dict(state_dict)
            for group, p, saved, st in self._loaded_states(state_dict):
                if p.dtype not in self._PARAM_DTYPES:
                    continue
                _, dtypes = self._layout(group, p)
                for key, dtype in {**dtypes, "master_param": torch.float32}.items():
                    value = saved.get(key)
                    if not isinstance(value, Tensor) or key not in st or st[key].dtype == dtype:
                        continue
                    # torch casts every state tensor of a float param to its dtype, uint8 codes too
                    if value.is_floating_point() or not dtype.is_floating_point:
                        st[key] = value.to(device=p.device, dtype=dtype, copy=True)
                for key in self._extra_state(group):  # torch casts sr_seed, mu_product, ... to the param's dtype
                    value, dtype = saved.get(key), self._EXTRA_STATE_DTYPES[key]
                    if isinstance(value, Tensor) and st[key].dtype != dtype:
                        st[key] = value.to(device=p.device, dtype=dtype, copy=True)
            self._plans.clear()

    # ---- step ------------------------------------------------------------------------

    def _loaded_states(self, state_dict: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Tensor, dict, dict]]:
        """(group, param, its saved state, its loaded state) for each param that has both, after
        torch's load_state_dict: the saved checkpoint's ids paired with the params in order."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pairs = ((g, p) for g in self.param_groups for p in g["params"])
        for pid, (group, p) in zip(saved_ids, pairs, strict=True):
            saved = state_dict["state"].get(pid)
            st = self.state.get(p)
            if saved and st:
                yield group, p, saved, st

    @overload
    def step(self, closure: None = None, *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None) -> float: ...

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
                skipped (params, state and step counters stay as they are).

        Concurrent calls on one optimizer, from several threads, run one after
        the other: a call waits until the running step has returned.
        """
        if torch.compiler.is_compiling():  # traced by a path that ignores _opaque_to_torch_compile
            raise RuntimeError(_COMPILE_MESSAGE)
        if type(self).step is FusedOptimizer.step and _needs_torch_step_wrapper(self):
            # A profiler or a step hook is active: torch's own wrapper runs them, as for any optimizer.
            args = (self,) if closure is None else (self, closure)
            kwargs = {k: v for k, v in (("grad_scale", grad_scale), ("found_inf", found_inf)) if v is not None}
            return _torch_hooked_step(*args, **kwargs)
        loss = self._step(closure, grad_scale=grad_scale, found_inf=found_inf)
        self._optimizer_step_code()  # what torch's wrapper calls after a step (a profiler entry point)
        return loss

    # torch's Optimizer wraps every subclass's step in profile_hook_step: a record_function and
    # the step hooks, about 10 us a call even with no profiler and no hook (half of a small
    # step). step above takes that path only when something would observe it.
    step.hooked = True  # type: ignore[attr-defined]

    @torch.no_grad()
    def _step(self, closure: Callable[[], float] | None = None, *, grad_scale: Tensor | None = None,
              found_inf: Tensor | None = None) -> float | None:
        _threads.warn_once()  # torchrun's one thread per rank on a many-core host: say so, once per process
        # One step at a time per optimizer: a step() entered from another thread waits here
        # until the running one has returned, so no plan, grad or state tensor that the C
        # call reads is replaced or freed under it.
        with self._step_lock:
            return self._locked_step(closure, grad_scale, found_inf)

    def _locked_step(self, closure: Callable[[], float] | None, grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        grad_scale = _amp_scalar(grad_scale, "grad_scale", self._NAME)
        found_inf = _amp_scalar(found_inf, "found_inf", self._NAME)

        # Check everything before touching anything: an error leaves params,
        # state and step counters exactly as they were.
        cached = dict(self._plans)
        plans = [self._plan(gi, group) for gi, group in enumerate(self.param_groups)]
        if any(plan is not cached.get(gi) for gi, plan in enumerate(plans)):
            _check_no_duplicates(self.param_groups, self._NAME)  # params may have moved between groups
            _check_no_overlap(plans, self.state, self._NAME)
        # State for params stepped for the first time, and the C arrays, for every group
        # before any group steps. A step that GradScaler skips creates the state too,
        # as torch's does, except state that only a real step can initialize (_FIRST_STEP_KEYS).
        skipped = found_inf is not None and found_inf.item() != 0.0
        if not (skipped and self._FIRST_STEP_KEYS):
            for plan in plans:
                if plan.params and not plan.built:
                    self._build(plan)
        if skipped:
            return loss
        for plan in plans:
            if plan.params:
                self._run(plan, grad_scale, found_inf)
        return loss

    def _plan(self, gi: int, group: dict[str, Any]) -> _GroupPlan:
        """Validate group `gi` and return its kernel plan. Mutates nothing but the plan cache."""
        where = f" (param group {gi})"
        self._check_group(group, where)
        _check_flags({k: group[k] for k in self._BOOL_OPTIONS if k in group}, where)
        all_grads = [p.grad for p in group["params"]]
        config = self._full_config(group)
        plan = self._plans.get(gi)
        if plan is not None and plan.group is group and plan.config == config:
            changed = plan.grads_changed(group["params"], all_grads, self.state)
            if changed is not None:
                if changed and not plan.layouts_match():  # the full check, where it is needed
                    for slot in plan.changed_slots():
                        i = plan.group_index[slot]
                        _check_tensor(plan.params[slot], all_grads[i], f"param group {gi}, param {i}",
                                      self._NAME, self._PARAM_DTYPES)
                        if _needs_copy(all_grads[i]):
                            plan.copy_pending_grad(slot)
                plan.all_grads = all_grads
                return plan
        # Full check of every tensor and its state; state for new params and the
        # C arrays are made on the first run, after every group has passed.
        self._check_options(group, where)
        plan = _GroupPlan(group, config)
        plan.all_grads = all_grads
        plan.group_params = list(group["params"])
        for i, (p, g) in enumerate(zip(group["params"], all_grads, strict=True)):
            if g is None:
                continue
            at = f"param group {gi}, param {i}"
            _check_tensor(p, g, at, self._NAME, self._PARAM_DTYPES)
            self._check_param(p, group, at)
            layout = self._layout(group, p)
            if p.is_complex() and any(d != p.dtype for d in layout[1].values()):
                raise TypeError(f"roundpipe {self._NAME}: {at} is complex; state dtype options apply "
                                "to real params only")
            st = self.state.get(p)
            if st:
                self._check_state(p, st, layout, at, group)
            plan.group_index.append(i)
            plan.params.append(p)
            plan.grads.append(g.contiguous() if _needs_copy(g) else g)
        self._plans[gi] = plan
        return plan

    def _check_state(self, p: Tensor, st: dict[str, Any], layout: tuple[bool, dict[str, torch.dtype]],
                     where: str, group: dict[str, Any]) -> None:
        """A param's existing state must be what the C code will read: keys, dtypes, shapes, memory."""
        who = self._NAME
        extra = self._extra_state(group)
        for name in extra:  # 1-element scalars; a missing integer one (a seed) is created on the first step
            t, dtype = st.get(name), self._EXTRA_STATE_DTYPES[name]
            if t is None and dtype.is_floating_point:
                raise RuntimeError(f"roundpipe {who}: {where} has no state[{name!r}]")
            if t is not None and not (isinstance(t, Tensor) and t.numel() == 1 and t.dtype == dtype
                                      and t.device.type == "cpu" and not _is_dtensor(t)):
                raise RuntimeError(f"roundpipe {who}: {where} has state[{name!r}] = {t!r}; it must be a "
                                   f"1-element {str(dtype).removeprefix('torch.')} CPU tensor")
            if isinstance(t, Tensor):
                _check_allocated(t, f"state[{name!r}]", where, who)
        master, dtypes = layout
        expected = dict(dtypes)
        if master and "master_param" in st:
            expected["master_param"] = torch.float32
        for name, dtype in expected.items():
            t = st.get(name)
            if t is None and name in self._FIRST_STEP_KEYS:
                continue  # created by this step, which is then its first (as torch's SGD does)
            if t is None:
                raise RuntimeError(f"roundpipe {who}: {where} has no state[{name!r}] "
                                   "(was an option such as amsgrad or momentum turned on mid-training?)")
            if not isinstance(t, Tensor):
                raise RuntimeError(f"roundpipe {who}: {where} has state[{name!r}] = {t!r}, not a tensor")
            lt = _local(t)
            shape = tuple(p.shape) if name == "master_param" else self._state_shape(p, name, group)
            local_shape = _local(p).shape if shape == tuple(p.shape) else shape
            if (t.dtype != dtype or tuple(t.shape) != shape or lt.shape != local_shape or t.device.type != "cpu"
                    or not lt.is_contiguous()):
                raise RuntimeError(
                    f"roundpipe {who}: {where} has state[{name!r}] of dtype {t.dtype}, shape {tuple(t.shape)} "
                    f"on {t.device}; this group keeps it as a contiguous CPU {dtype} tensor of shape {shape}"
                )
            if lt.numel():
                _check_allocated(lt, f"state[{name!r}]", where, who)
        if not self._HAS_STEP:
            return
        step = st.get("step")
        if step is None:
            raise RuntimeError(f"roundpipe {who}: {where} has no state['step']")
        if isinstance(step, Tensor):
            if step.numel() != 1 or step.is_complex() or _is_dtensor(step):
                raise RuntimeError(
                    f"roundpipe {who}: {where} has state['step'] of shape {tuple(step.shape)} and dtype "
                    f"{step.dtype}; it must be a 1-element real tensor (torch keeps a 0-dim float32 one)")
            if step.device.type == "cpu" and not step.is_meta:
                _check_allocated(step, "state['step']", where, who)
        elif isinstance(step, bool) or not isinstance(step, (int, float)):
            raise RuntimeError(f"roundpipe {who}: {where} has state['step'] = {step!r}; it must be a number or a tensor")

    def _build(self, plan: _GroupPlan) -> None:
        """State for new params, then the C arrays; raises nothing after _plan's checks."""
        self._init_state(plan)
        plan.kernel = self._kernel
        if self._kernel is not None:
            self._build_native(plan)
            plan.record(self._kernel)
        plan.built = True

    def _init_state(self, plan: _GroupPlan) -> None:
        """Create state for params stepped for the first time (torch's layout plus master copies)."""
        group = plan.group
        plan.fresh = []
        extra = self._extra_state(group)
        for p, g in zip(plan.params, plan.grads, strict=True):
            state = self.state[p]
            master, dtypes = self._layout(group, p)
            fresh = not state or any(k not in state for k in self._FIRST_STEP_KEYS if k in dtypes)
            if fresh:
                for key, value in self._new_state(p, g, group, dtypes).items():
                    state.setdefault(key, value)
            plan.fresh.append(fresh)
            if master and "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            if self._HAS_STEP:
                step = state["step"]
                if not (type(step) is Tensor and step.dtype == torch.float32 and step.dim() == 0
                        and step.device.type == "cpu"):
                    state["step"] = torch.tensor(_scalar(step), dtype=torch.float32)
            for key in extra:  # missing where an option was turned on over existing state
                if key not in state:
                    state[key] = self._new_extra_state(key, p, state)
        plan.states = [self.state[p] for p in plan.params]
        plan.param_dtypes = [p.dtype for p in plan.params]
        plan.has_complex = any(map(Tensor.is_complex, plan.params))
        if any(map(_is_dtensor, plan.params)):
            plan.ptr_of = _local_ptr
            plan.storage_of = _local_storage
        plan.param_sig = plan.signature(plan.params)
        plan.grad_sig = plan.signature(plan.grads)
        plan.param_bytes = plan.storage_bytes(plan.params)
        plan.grad_bytes = plan.storage_bytes(plan.grads)
        keys = [*(["step"] if self._HAS_STEP else []), *self._state_keys(group), *self._extra_state(group)]
        if group.get("master_weights") and any(p.dtype in _LOW_PRECISION for p in plan.params):
            keys.append("master_param")
        plan.state_keys = tuple(keys)
        plan.state_every = type(self)._param_state_keys is FusedOptimizer._param_state_keys
        plan.state_tensors = [_state_column(plan.states, k, plan.state_every) for k in keys]
        plan.state_ptrs = [list(map(plan.ptr_of, ts)) for ts in plan.state_tensors]
        plan.state_dtypes = [[t.dtype for t in ts] for ts in plan.state_tensors]
        # A 0-dim step's storage cannot shrink in place and keep its address (resize_(0) makes it
        # NULL, which its address check sees): its size is not rechecked each step.
        plan.state_bytes = [None if k == "step" else plan.storage_bytes(ts)
                            for k, ts in zip(keys, plan.state_tensors, strict=True)]

    def _build_native(self, plan: _GroupPlan) -> None:
        kernel = cast(Any, self._kernel)  # called only when the kernel loaded
        ffi, lib = kernel.ffi, kernel.lib
        n = len(plan.params)
        tensors = ffi.new("rp_tensor[]", max(n, 1))
        for i, (p, g, st) in enumerate(zip(plan.params, plan.grads, plan.states, strict=True)):
            keys = self._param_state_keys(p, plan.group)
            views = [_local(x) for x in (p, g, *(st[k] for k in keys))]
            views = [torch.view_as_real(x) if x.is_complex() else x for x in views]
            # plan.params, plan.grads and plan.state_tensors hold the tensors behind
            # every pointer (real views share their storage); nothing else is kept,
            # so a replaced grad can be freed.
            t = tensors[i]
            t.param = ffi.cast("void *", views[0].data_ptr())
            t.grad = ffi.cast("void *", views[1].data_ptr())
            for j, v in enumerate(views[2:]):
                t.state[j] = ffi.cast("void *", v.data_ptr())
                t.state_dtype[j] = _DTYPE_CODES[v.dtype]
            master = st.get("master_param") if plan.group.get("master_weights") and p.dtype in _LOW_PRECISION else None
            t.master = ffi.cast("float *", _local_ptr(master)) if master is not None else ffi.NULL
            t.step = ffi.cast("float *", st["step"].data_ptr()) if self._HAS_STEP else ffi.NULL
            t.numel = views[0].numel()
            shape = views[0].shape  # the stack of matrices the reduction phase sees: its last two dims
            t.cols = shape[-1] if len(shape) >= 1 else 1
            t.rows = shape[-2] if len(shape) >= 2 else 1
            if len(shape) == 1:
                t.rows, t.cols = t.numel, 1  # a vector: one column
            t.param_dtype = _DTYPE_CODES[views[0].dtype]
            t.fresh = plan.fresh[i]
            self._fill_tensor(t, ffi, p, st, plan.group)
            for j, key in enumerate(self._extra_state(plan.group)):
                x = st.get(key)
                t.aux[j] = ffi.cast("void *", x.data_ptr()) if x is not None else ffi.NULL
        n_chunks = lib.rp_plan_chunks(tensors, n, CHUNK_ELEMS, ffi.NULL, 0)
        chunks = ffi.new("rp_chunk[]", max(n_chunks, 1))
        lib.rp_plan_chunks(tensors, n, CHUNK_ELEMS, chunks, n_chunks)
        plan.tensors, plan.chunks, plan.n_chunks = tensors, chunks, n_chunks
        plan.hyper = ffi.new(self._C_HYPER + " *")
        plan.run_opts = ffi.new("rp_run_opts *")
        if self._REDUCE_SCALARS is not None:  # the reduction phase's chunks and scratch (zeroed)
            n_scratch = ffi.new("int64_t *")
            n_r = lib.rp_plan_rchunks(tensors, n, RCHUNK_ELEMS, self._REDUCE_SCALARS, ffi.NULL, 0, n_scratch)
            plan.rchunks = ffi.new("rp_rchunk[]", max(n_r, 1))
            lib.rp_plan_rchunks(tensors, n, RCHUNK_ELEMS, self._REDUCE_SCALARS, plan.rchunks, n_r, n_scratch)
            plan.scratch = ffi.new("float[]", max(n_scratch[0], 1))
            plan.run_opts.rchunks, plan.run_opts.n_rchunks = plan.rchunks, n_r
            plan.run_opts.scratch, plan.run_opts.n_scratch = plan.scratch, n_scratch[0]
        plan.grad_ptrs = ffi.new("uintptr_t[]", max(n, 1))

    def _run(self, plan: _GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        # Every tensor behind a pointer in the C arrays stays referenced by the plan (params,
        # grads, state_tensors) for the whole call, and the step lock keeps any other step()
        # from swapping them: a grad the caller drops meanwhile is not freed under the kernel.
        kernel = cast(Any, self._kernel)
        ffi = kernel.ffi if kernel is not None else None
        plan.apply_grads()  # grads checked by _plan; point the arrays at them
        if ffi is None:
            self._fallback_step(plan, grad_scale, found_inf)
            return
        self._fill_hyper(plan.hyper, plan.group)
        run = plan.run_opts
        run.num_threads = torch.get_num_threads()
        run.serial_below = SERIAL_BELOW
        run.torch_vec = self._TORCH_VEC or _TORCH_VEC
        run.grad_scale = ffi.cast("float *", grad_scale.data_ptr()) if grad_scale is not None else ffi.NULL
        run.found_inf = ffi.cast("float *", found_inf.data_ptr()) if found_inf is not None else ffi.NULL
        getattr(kernel.lib, self._C_STEP)(run, plan.hyper, plan.tensors, len(plan.params),
                                                plan.chunks, plan.n_chunks)


_torch_hooked_step: Callable[..., Any] = Optimizer.profile_hook_step(FusedOptimizer._step)
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
_PROFILER_ENABLED = getattr(torch._C._autograd, "_profiler_enabled", None)


def _needs_torch_step_wrapper(opt: Optimizer) -> bool:
    """True when torch's step wrapper has work to do: a profiler records, or a hook is registered."""
    if _GLOBAL_PRE_HOOKS is None or _GLOBAL_POST_HOOKS is None or _PROFILER_ENABLED is None:
        return True  # a torch without these internals: always take its wrapper
    return bool(
        _PROFILER_ENABLED() or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS
        or getattr(opt, "_optimizer_step_pre_hooks", None) or getattr(opt, "_optimizer_step_post_hooks", None)
    )


_COMPILE_MESSAGE = (
    "roundpipe's optimizer step is one compiled C call already and runs eagerly, outside "
    "torch.compile's graph: compile without fullgraph=True (the step is then a graph break), "
    "or compile only the forward and backward"
)


def _opaque_to_torch_compile(fn: Callable[..., Any]) -> None:
    """Make torch.compile run fn eagerly, at a graph break, with everything it calls.

    What ``torch.compiler.disable`` does, without importing torch._dynamo (over a second,
    against an import budget of milliseconds): the attributes make a compiled caller break
    its graph at the call (and ``fullgraph=True`` fail with _COMPILE_MESSAGE), and the code
    strategy makes dynamo skip fn's frame and every frame it calls when fn then runs, or
    when fn itself is compiled. Without these, dynamo traces into cffi and fails with an
    internal error. torch builds without the strategy hook get the attributes alone.
    """
    fn._torchdynamo_disable = True  # type: ignore[attr-defined]
    fn._torchdynamo_disable_msg = _COMPILE_MESSAGE  # type: ignore[attr-defined]
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:
        return
    set_code_exec_strategy(fn.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))



_opaque_to_torch_compile(FusedOptimizer.step)
_opaque_to_torch_compile(FusedOptimizer.add_param_group)
# torch decorates Optimizer.add_param_group with torch._disable_dynamo, whose first call imports
# torch._dynamo: about a second on 2 cores, paid when a process builds its first optimizer. Our
# add_param_group is opaque to the compiler itself (above), so it calls the function underneath.
_TORCH_ADD_PARAM_GROUP: Callable[..., None] = getattr(Optimizer.add_param_group, "__wrapped__",
                                                      Optimizer.add_param_group)


# ---- checks ----------------------------------------------------------------------


def _check_tensor(p: Tensor, g: Tensor, where: str, who: str = "Adam",
                  dtypes: tuple[torch.dtype, ...] = _PARAM_DTYPES) -> None:
    """The one place that decides which params and grads the kernel accepts."""
    if p.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"roundpipe {who}: {where} has dtype {p.dtype}; supported: {names}")
    if p.device.type != "cpu":
        raise RuntimeError(f"roundpipe {who}: {where} is on {p.device}; it steps CPU tensors only")
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"roundpipe {who}: {where} has a sparse gradient; roundpipe steps dense gradients")
    if g.dtype != p.dtype:
        raise TypeError(f"roundpipe {who}: {where} has grad dtype {g.dtype} but param dtype {p.dtype}; they must match")
    if g.device.type != "cpu":
        raise RuntimeError(f"roundpipe {who}: {where} has its grad on {g.device}; move it to the CPU")
    if g.shape != p.shape:
        raise ValueError(f"roundpipe {who}: {where} has grad shape {tuple(g.shape)} but param shape {tuple(p.shape)}")
    if _is_dtensor(p) or _is_dtensor(g):
        if not (_is_dtensor(p) and _is_dtensor(g)):
            raise TypeError(f"roundpipe {who}: {where}: the param and its grad must both be DTensors, or neither")
        dp, dg = cast(Any, p), cast(Any, g)
        if dp.device_mesh != dg.device_mesh or tuple(dp.placements) != tuple(dg.placements):
            raise ValueError(
                f"roundpipe {who}: {where} has a grad placed {tuple(dg.placements)} but the param "
                f"{tuple(dp.placements)}; redistribute the grad (a Partial grad is not reduced yet)"
            )
    lp, lg = _local(p), _local(g)
    if lg.shape != lp.shape:
        raise ValueError(f"roundpipe {who}: {where} has a grad sharded differently from the param")
    for what, t in (("param", lp), ("grad", lg)):
        # a lazy view whose memory holds the unconjugated or unnegated values: the kernel reads memory
        if t.is_conj() or t.is_neg():
            raise ValueError(
                f"roundpipe {who}: {where}: the {what} is a lazy conjugate or negative view; "
                "materialize it first with .resolve_conj().resolve_neg()"
            )
        # A wrapper tensor subclass (torchao's Float8/NF4, TwoTensor) has no memory of its own:
        # data_ptr() is 0 (or raises), and the kernel would write through NULL.
        try:
            ptr = t.data_ptr()
        except RuntimeError:
            ptr = 0
        if t.numel() and type(t) in (Tensor, torch.nn.Parameter):
            _check_allocated(t, what, where, who)
        elif t.numel() and ptr == 0:
            raise TypeError(
                f"roundpipe {who}: {where}: the {what} is a {type(t).__name__}, a tensor subclass with no "
                "memory of its own; roundpipe steps plain CPU tensors and DTensor shards. "
                f"Use torch.optim.{who}(fused=True) for such params"
            )
    if not lp.is_contiguous():
        raise ValueError(f"roundpipe {who}: {where} is not contiguous; make it so with p.data = p.data.contiguous()")
    if not lg.is_contiguous() and not _needs_copy(g):
        raise ValueError(f"roundpipe {who}: {where} has a non-contiguous grad; make it contiguous before step()")


def _needs_copy(g: Tensor) -> bool:
    """A broadcast grad (a plain tensor with stride 0 on a dimension of size > 1, as ``expand``
    makes): stepped as the values it holds, through a contiguous copy made each step where the
    plan checks grads, as torch's for-loop step does (torch's fused kernels read it as contiguous
    memory, past its end). Its elements share memory, so GradScaler's unscaled values have no place
    to go: it keeps its scaled values. Other non-contiguous grads are refused (_check_tensor)."""
    return type(g) in (Tensor, torch.nn.Parameter) and any(
        s == 0 and n > 1 for n, s in zip(g.shape, g.stride(), strict=True))


def _check_allocated(t: Tensor, what: str, where: str, who: str = "Adam") -> None:
    """A plain tensor's memory must exist and hold all its elements (not freed by resize_(0))."""
    try:
        nbytes = t.untyped_storage().nbytes()
        ptr = t.data_ptr()
    except RuntimeError:
        nbytes, ptr = 0, 0
    # the last element's offset + 1: a broadcast (stride 0) tensor needs less than numel elements
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    need = (t.storage_offset() + extent) * t.element_size()
    if ptr == 0 or nbytes < need:
        raise RuntimeError(
            f"roundpipe {who}: {where}: the {what}'s data is not allocated (its storage holds {nbytes} "
            f"bytes, {need} needed: was it freed with untyped_storage().resize_(0)?); "
            "give it memory again before step()")


def _check_flags(options: dict[str, Any], where: str = "") -> None:
    """Booleans must be bools: maximize="false" is truthy and would do gradient ascent."""
    for name, value in options.items():
        allowed = (bool, type(None)) if name in ("foreach", "fused") else (bool,)
        if not isinstance(value, allowed):
            kind = "a bool or None" if name in ("foreach", "fused") else "a bool"
            raise TypeError(f"{name} must be {kind}{where}, got {value!r}")


def _span(t: Tensor, name: str) -> tuple[int, int, str] | None:
    """[start, end) of the memory a contiguous tensor covers, or None if it covers none."""
    t = _local(t)
    n = t.numel()
    if n == 0:
        return None
    start = t.data_ptr()
    return start, start + n * t.element_size(), name


def _check_no_overlap(plans: list[_GroupPlan], state: dict[Any, dict[str, Any]], who: str = "Adam") -> None:
    """Refuse memory shared by two stepped params, or by a param and a state tensor.

    Two Parameter objects over one storage would be stepped twice, by threads
    racing on the same cache lines; a state tensor over a param's memory, or a
    ``step`` tensor shared by two params, would be updated twice. Views of one
    flat buffer that do not overlap (FSDP's FlatParameter) are fine. Sort and
    sweep over address intervals: O(n log n), run when a plan is (re)built.
    """
    spans: list[tuple[int, int, str]] = []
    for gi, plan in enumerate(plans):
        for slot, p in enumerate(plan.params):
            where = f"param group {gi}, param {plan.group_index[slot]}"
            spans.append(_span(p, where))  # type: ignore[arg-type]
            for key, t in (state.get(p) or {}).items():
                if isinstance(t, Tensor) and not t.is_meta:
                    spans.append(_span(t, f"state[{key!r}] of {where}"))  # type: ignore[arg-type]
    end, owner = -1, ""
    for start, stop, name in sorted(sp for sp in spans if sp is not None):
        if start < end:
            raise ValueError(
                f"roundpipe {who}: {name} and {owner} share memory; each param and each state tensor "
                "must have memory of its own (non-overlapping views of one buffer are fine)")
        if stop > end:
            end, owner = stop, name


def _check_no_duplicates(groups: list[dict[str, Any]], who: str = "Adam") -> None:
    seen: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                raise ValueError(
                    f"roundpipe {who}: param group {gi}, param {i} is also in param group {seen[id(p)]}; "
                    "a tensor may appear in one param group only"
                )
            seen[id(p)] = gi


def _amp_scalar(t: Tensor | None, name: str, who: str = "Adam") -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.numel() != 1:
        raise ValueError(f"roundpipe {who}: {name} must be a 1-element Tensor, got {t!r}")
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return t




# ---- the torch fallback, shared by the rules that step 16-bit tensors through fp32 ----------


def fp32_working_set(plan: _GroupPlan, keys: tuple[str, ...], unscale: bool
                     ) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """The group's params, grads and state (per key) as fp32 tensors for torch's kernels.

    fp32 tensors are used as they are, complex64 ones as their real view; a master copy
    stands in for its param; any other
    tensor gets an fp32 copy, listed in the returned (destination, copy) pairs to be
    copied back after the step. The grad is copied back only when the step unscales it.
    """
    params: list[Tensor] = []
    grads: list[Tensor] = []
    states: list[list[Tensor]] = [[] for _ in keys]
    back: list[tuple[Tensor, Tensor]] = []
    use_master = bool(plan.group.get("master_weights"))

    def fp32(t: Tensor, write_back: bool = True) -> Tensor:
        if t.is_complex():  # complex64: its float32 real view, in place
            return torch.view_as_real(t)
        if t.dtype == torch.float32:
            return t
        if t.dtype == torch.complex64:  # stepped as its real view, as torch's for-loop rules do
            return torch.view_as_real(t)
        work = t.float()
        if write_back:
            back.append((t, work))
        return work

    for p, g, st in zip(plan.params, plan.grads, plan.states, strict=True):
        master = st.get("master_param") if use_master and p.dtype in _LOW_PRECISION else None
        if master is not None:
            back.append((p, master))
        params.append(master if master is not None else fp32(p))
        grads.append(fp32(g, unscale))
        for lst, key in zip(states, keys, strict=True):
            lst.append(fp32(st[key]))
    return params, grads, states, back
