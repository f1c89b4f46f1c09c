"""A param group's plan: the tensors behind the C arrays, and the per-step checks that they still fit.

FusedOptimizer (_engine.py) builds plans and steps them; this module holds what a plan
caches between steps and how a step checks that the cache still describes the tensors.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_DTYPE_OF = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_STORAGE_NBYTES = torch.UntypedStorage.nbytes


def _state_column(states: list[dict[str, Any]], key: str) -> list[Tensor]:
    """state[key] of every param, in C-level passes; masters only where there is one
    (the fp32 params of a master_weights group have none)."""
    if key == "master_param":
        return [t for t in map(operator.methodcaller("get", key), states) if t is not None]
    return list(map(operator.itemgetter(key), states))


class _GroupPlan:
    """One param group's tensors as the kernel sees them, reused while nothing changes.

    Built by ``FusedOptimizer._plan``: the C arrays of tensor pointers and the chunk list
    live here between steps. A later step checks, with C-speed identity
    comparisons, that the params, their storage and their state are the ones
    the arrays point at; grads that are new tensors (``zero_grad()`` sets them
    to None every step) are validated and only their pointers are updated.
    """

    def __init__(self, group: dict[str, Any], config: tuple) -> None:
        self.group = group
        self.config = config  # what the arrays depend on in the group: FusedOptimizer._config
        self.all_grads: list[Tensor | None] = []  # p.grad of every param in the group
        self.group_params: list[Tensor] = []  # group["params"] when the plan was made
        self.params: list[Tensor] = []  # those with a grad, in group order
        self.grads: list[Tensor] = []
        self.states: list[dict[str, Any]] = []
        self.state_keys: tuple[str, ...] = ()
        self.state_tensors: list[list[Tensor]] = []  # per key in state_keys, per param
        self.group_index: list[int] = []  # slot -> index in group["params"], for messages
        self.param_sig: tuple = ()  # signature() of params and of grads when the arrays were filled
        self.param_bytes: list[int] = []  # storage sizes of params, grads and state tensors when the
        self.grad_bytes: list[int] = []  # arrays were filled: a storage shrunk in place at the same
        self.state_bytes: list[list[int] | None] = []  # address (resize_(0), then resize_(m)) must not be written
        self.state_ptrs: list[list[int]] = []  # data pointers of the state tensors, per key
        self.grad_sig: tuple = ([], [], [])
        # Grads checked by _plan that the next run points the C arrays at, and their signature.
        self.pending_grads: list[Tensor] | None = None
        self.pending_grad_sig: tuple = ([], [], [])
        self.pending_grad_bytes: list[int] = []
        self.param_dtypes: list[torch.dtype] = []  # of self.params, for the bulk grad check
        self.has_complex = False  # a complex param: its grads may be lazy conjugates
        self.tensors: Any = None  # rp_tensor[] (native path)
        self.chunks: Any = None  # rp_chunk[]
        self.n_chunks = 0
        self.hyper: Any = None  # the rule's hyperparameter struct (rp_adam_hyper *, ...)
        self.run_opts: Any = None  # rp_run_opts *
        self.grad_ptrs: Any = None  # uintptr_t[], staging for rp_set_grads
        self.fresh: list[bool] = []  # per slot: its state was created for this plan's first step
        self.built = False  # state created and C arrays filled (on the first run)
        self.ptr_of: Callable[[Tensor], int] = Tensor.data_ptr  # _local_ptr when there are DTensors
        self.storage_of: Callable[[Tensor], Any] = Tensor.untyped_storage  # of the local shard for DTensors

    def signature(self, tensors: list[Tensor]) -> tuple[list[int], list[tuple[int, ...]], list[int]]:
        """Where each tensor's memory is and how it is laid out: what the C arrays depend on."""
        try:
            return list(map(self.ptr_of, tensors)), list(map(Tensor.stride, tensors)), list(map(Tensor.numel, tensors))
        except RuntimeError:  # a tensor without strides or storage (sparse, meta): never matches
            return [-1] * len(tensors), [()] * len(tensors), [-1] * len(tensors)

    def storage_bytes(self, tensors: list[Tensor]) -> list[int]:
        """The size in bytes of each tensor's storage (C-level passes; -1 where there is none)."""
        try:
            return list(map(_STORAGE_NBYTES, map(self.storage_of, tensors)))
        except (RuntimeError, NotImplementedError):
            return [-1] * len(tensors)

    def grads_changed(self, group_params: list[Tensor], all_grads: list[Tensor | None], state: dict) -> bool | None:
        """Whether some grads are new, or were moved or reshaped in place; None if the plan no longer fits.

        The plan fits while every pointer in its C arrays is still valid: the
        params (address, strides, size, dtype and storage size), the identity
        of every state dict and state tensor, and each state tensor's address
        and storage size (``t.data = ...``, ``t.set_(...)`` and
        ``t.untyped_storage().resize_()`` keep the object and move its memory).
        Costs a few C-level passes over the group (about 1.8 us a tensor). When
        grads changed, they and their signature wait in pending_grads and
        pending_grad_sig for the checks in _plan.
        """
        if not self.built or len(group_params) != len(self.group_params):
            return None
        if not all(map(operator.is_, group_params, self.group_params)):
            return None  # params were added to, removed from or replaced in the group
        if not all(map(operator.is_, all_grads, self.all_grads)):
            for g, g0 in zip(all_grads, self.all_grads, strict=True):
                if (g is None) != (g0 is None):
                    return None  # another set of params has grads
        params = self.params
        if not all(map(operator.is_, map(_DTYPE_OF, params), self.param_dtypes)):
            return None  # p.data = p.data.view(other dtype)
        if self.signature(params) != self.param_sig or self.storage_bytes(params) != self.param_bytes:
            return None  # a param's storage or shape changed (p.data = ..., resize_)
        if not all(map(operator.is_, map(state.get, params), self.states)):
            return None
        try:
            for key, tensors, ptrs, nbytes in zip(self.state_keys, self.state_tensors, self.state_ptrs, self.state_bytes, strict=True):
                current = _state_column(self.states, key)
                if not all(map(operator.is_, current, tensors)):
                    return None  # a state tensor was replaced
                if list(map(self.ptr_of, current)) != ptrs or (nbytes is not None and self.storage_bytes(current) != nbytes):
                    return None  # its memory moved under the same object
        except (KeyError, RuntimeError):
            return None  # opt.state[p].clear(), or a tensor without storage: the full check decides
        grads = [g for g in all_grads if g is not None]
        sig = self.signature(grads)
        nbytes = self.storage_bytes(grads)
        if all(map(operator.is_, grads, self.grads)) and sig == self.grad_sig and nbytes == self.grad_bytes:
            self.pending_grads = None  # any left by a step that raised later were never applied
            return False
        self.pending_grads, self.pending_grad_sig, self.pending_grad_bytes = grads, sig, nbytes
        return True

    def layouts_match(self) -> bool:
        """True if no pending grad needs a full check: all are plain contiguous CPU tensors of
        their param's dtype, not lazy conjugate or negative views, with the strides and sizes of
        the grads they replace (which passed _check_tensor, so they have their param's shape).
        C-level passes, no Python per tensor: the common case of zero_grad(set_to_none=True),
        where every grad is new each step. When it fails, _check_tensor decides slot by slot."""
        grads = self.pending_grads
        if grads is None:
            return True
        ptrs, strides, numels = self.pending_grad_sig
        return (
            strides == self.grad_sig[1] and numels == self.grad_sig[2]
            and all(ptrs)  # a freed storage (resize_(0)) has a NULL pointer: the full check names it
            and self.pending_grad_bytes == self.grad_bytes
            and all(map(operator.is_, map(type, grads), itertools.repeat(Tensor)))
            and all(map(operator.is_, map(_DTYPE_OF, grads), self.param_dtypes))
            and all(map(_IS_CPU, grads)) and all(map(Tensor.is_contiguous, grads))
            and not any(map(Tensor.is_neg, grads))
            and not (self.has_complex and any(map(Tensor.is_conj, grads)))
        )

    def changed_slots(self) -> list[int]:
        """Slots whose pending grad is a new tensor or was moved or reshaped in place."""
        ptrs, strides, numels = self.pending_grad_sig
        old_ptrs, old_strides, old_numels = self.grad_sig
        if self.pending_grads is None:
            return []
        return [
            slot for slot, (g, g0, a, a0, b, b0, c, c0, d, d0) in enumerate(zip(
                self.pending_grads, self.grads, ptrs, old_ptrs, strides, old_strides, numels, old_numels,
                self.pending_grad_bytes, self.grad_bytes, strict=True))
            if g is not g0 or a != a0 or b != b0 or c != c0 or d != d0
        ]
