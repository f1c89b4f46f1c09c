"""A param group's plan: the tensors behind the C arrays, and the per-step checks that they still fit.

FusedOptimizer (_engine.py) builds plans and steps them; this module holds what a plan
caches between steps and how a step checks that the cache still describes the tensors.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

_DTYPE_OF = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_STORAGE_NBYTES = torch.UntypedStorage.nbytes
_NBYTES = operator.attrgetter("nbytes")


def _state_column(states: list[dict[str, Any]], key: str, every: bool = True) -> list[Tensor]:
    """state[key] of every param, in C-level passes; masters only where there is one
    (the fp32 params of a master_weights group have none), and likewise any key that not
    every param has (every=False: a rule with _param_state_keys)."""
    if key == "master_param" or not every:
        return [t for t in map(operator.methodcaller("get", key), states) if t is not None]
    return list(map(operator.itemgetter(key), states))


# ---- torch's tensor structs, read from C (engine.h: rp_meta_check) -------------------------

_CDATA = operator.attrgetter("_cdata")  # a tensor's c10::TensorImpl *, a storage's c10::StorageImpl *
# How much of its own tensors' structs the probe reads, in 8-byte words: a TensorImpl is 176
# bytes in torch 2.13 (the dispatch keys last), a StorageImpl over 96, a Python tensor over 32.
_SCAN_WORDS, _SCAN_STORAGE, _SCAN_OBJECT = 22, 12, 4
_layouts: dict[int, Any] = {}  # id(ffi) -> its rp_meta_layout *, or None where the probe failed
# False turns the C check off: every step then takes the Python checks (tests run both).
META_CHECK = True


def _words(ffi: Any, addr: int, n: int) -> list[int]:
    return list(ffi.unpack(ffi.cast("uint64_t *", addr), n))


def _find(words: list[int], value: int) -> set[int]:
    return {i * 8 for i, w in enumerate(words) if w == value}


def _probe_layout(ffi: Any) -> Any | None:
    """The offsets and bits of torch's TensorImpl and StorageImpl that rp_meta_check reads,
    found on tensors made here, or None when anything is not as expected.

    Each field is found by value, on tensors whose sizes, strides, offsets and storages
    differ, and must sit at the same offset in every one: the TensorImpl pointer in the
    Python object (``Tensor._cdata``), the StorageImpl pointer, its data
    pointer and size; the dimension count followed by the inline sizes and then strides;
    the storage offset and numel; the dtype (the byte that differs between any two dtypes:
    torch's dtypes are the ScalarType values, all below 256, of TypeMeta's low byte);
    the dispatch-key set (the word that differs for a lazy negative view). The check
    compares those bits only (the rest of the block holds padding left by malloc), and is
    used only if, under that mask, tensors of one kind made in different ways agree and
    each property the check relies on (dtype, lazy negative and conjugate views, device,
    sparse layout, sizes, strides, storage offset, numel) tells two tensors apart.
    """
    tensors = [torch.empty(1021, 3), torch.empty(41000)[1237:1237 + 19 * 2041].view(19, 2041),
               torch.empty(2, 3, 5, 7, 11)[1], torch.empty(3, 2, 5, 7, 11), torch.empty(7, 11, 13).transpose(0, 2),
               torch.frombuffer(bytearray(4 * 777), dtype=torch.float32)]
    found: dict[str, set[int]] = {}

    def same_everywhere(name: str, offsets: set[int]) -> None:
        found[name] = offsets if name not in found else found[name] & offsets

    for t in [*tensors, torch.nn.Parameter(torch.zeros(3)), torch.zeros(4).requires_grad_()]:
        st = t.untyped_storage()
        w, sw = _words(ffi, t._cdata, _SCAN_WORDS), _words(ffi, st._cdata, _SCAN_STORAGE)
        same_everywhere("object", _find(_words(ffi, id(t), _SCAN_OBJECT), t._cdata))
        same_everywhere("storage", _find(w, st._cdata))
        same_everywhere("data", _find(sw, st.data_ptr()))
        same_everywhere("nbytes", _find(sw, int(st.nbytes())))
        same_everywhere("dim", {i * 8 for i in range(_SCAN_WORDS - t.dim())
                                if w[i] == t.dim() and w[i + 1:i + 1 + t.dim()] == list(t.shape)})
    if not (found["data"] and all(len(found[k]) == 1 for k in ("object", "storage", "nbytes", "dim"))):
        return None
    lo = found["dim"].pop() // 8  # in words from here on
    inline = next((cap for cap in range(5, 9) if all(
        _words(ffi, t._cdata, _SCAN_WORDS)[lo + 1 + cap:lo + 1 + cap + t.dim()] == list(t.stride())
        for t in tensors[:5])), None)
    if inline is None:
        return None
    for t in tensors[:5]:
        w = _words(ffi, t._cdata, _SCAN_WORDS)
        same_everywhere("offset", {i for i in _find(w, int(t.storage_offset())) if i // 8 > lo + 2 * inline})
        same_everywhere("numel", {i for i in _find(w, int(t.numel())) if i // 8 > lo + 2 * inline})
    if len(found["offset"]) != 1 or len(found["numel"]) != 1:
        return None
    numel_at = found["numel"].pop() // 8
    full = [*range(lo, lo + 1 + 2 * inline), found["offset"].pop() // 8, numel_at]  # whole words compared

    def window(t: Tensor) -> bytes:  # the TensorImpl's bytes after numel, where dtype and keys are
        return bytes(ffi.buffer(ffi.cast("char *", t._cdata + 8 * (numel_at + 1)), 8 * (_SCAN_WORDS - numel_at - 1)))

    def telling(kinds: list[list[Tensor]]) -> set[int]:
        """The window's bytes that tell the kinds apart: one value within each kind (tensors made in
        different ways), another in every other kind. Padding bytes hold what malloc left there and
        may differ between two tensors by chance (one probe in about 200 went wrong when a single
        pair decided), but they do not repeat within a kind and differ across kinds."""
        values = [[window(t) for t in kind] for kind in kinds]
        return {i for i in range(len(values[0][0]))
                if all(len({w[i] for w in ws}) == 1 for ws in values)
                and len({ws[0][i] for ws in values}) == len(values)}

    z, c = torch.zeros(6, 4), torch.zeros(6, 4, dtype=torch.complex64)
    dtypes = [torch.float32, torch.int32, torch.bfloat16, torch.float16, torch.float64, torch.complex64,
              torch.uint8, torch.int8, torch.bool]
    # The first word a lazy negative view changes: the dispatch keys (where the TensorImpl ends in
    # torch 2.13; any words after it would differ too). The dtype is the byte before it that tells
    # every dtype apart.
    plain = [z, torch.zeros(3), torch.empty(5, 2).fill_(2.0), torch.zeros(9, 7, 3, 2)[4], z.clone()]
    key_words = telling([plain, [torch._neg_view(t) for t in plain]])
    if not key_words:
        return None
    end = (min(key_words) // 8 + 1) * 8
    dtype_bytes = {i for i in telling([[torch.zeros(6, 4, dtype=d), torch.zeros(3, dtype=d), torch.ones(2, 5, dtype=d)[1]]
                                       for d in dtypes]) if i < end}
    if len(dtype_bytes) != 1:
        return None
    mask = dict.fromkeys(full, 2**64 - 1)
    dtype_at, key_at = 8 * (numel_at + 1) + dtype_bytes.pop(), numel_at + end // 8
    mask[dtype_at // 8] = mask.get(dtype_at // 8, 0) | 0xFF << 8 * (dtype_at % 8)
    mask[key_at] = 2**64 - 1
    if max(mask) - lo >= 16:
        return None
    layout = ffi.new("rp_meta_layout *")
    layout.object, layout.storage, layout.dim, layout.inline_dims = (found["object"].pop(), found["storage"].pop(),
                                                                     8 * lo, inline)
    layout.lo, layout.words = 8 * lo, max(mask) - lo + 1
    layout.data, layout.nbytes = min(found["data"]), found["nbytes"].pop()
    for i, m in mask.items():
        layout.mask[i - lo] = m

    def block(t: Tensor) -> list[int]:
        return [w & m for w, m in zip(_words(ffi, t._cdata + 8 * lo, layout.words), layout.mask, strict=False)]

    # Random values from a generator of the probe's own: the probe runs at a first step, and
    # drawing from torch's global one would change what the caller's next torch.randn gives.
    gen = torch.Generator().manual_seed(0)
    twins = [(z, torch.randn(6, 4, generator=gen)), (z, torch.empty(6, 4).fill_(1.0)), (z, z.clone()),
             (z, torch.zeros(4, 6).t().contiguous()), (c, torch.ones(6, 4, dtype=torch.complex64)),
             (torch.zeros(8, 6), torch.randn(5, 8, generator=gen).t() @ torch.ones(5, 6))]  # a weight's grad
    distinct = [(z, torch.zeros(6, 4, dtype=torch.int32)), (torch.zeros(6, 4, dtype=torch.bfloat16), torch.zeros(6, 4, dtype=torch.float16)),
                (z, torch._neg_view(torch.zeros(6, 4))), (c, torch.zeros(6, 4, dtype=torch.complex64).conj()),
                (z, torch.zeros(6, 4, device="meta")), (z, torch.zeros(6, 4).to_sparse()), (z, torch.zeros(4, 6)),
                (z, torch.zeros(4, 6).t()), (z, torch.zeros(25, 4)[1:]), (z, torch.zeros(24)), (z, torch.zeros(6, 4)[:, None]),
                (torch.zeros(6, 4, 5), torch.zeros(6, 4, 7)[:, :, :5])]
    if not all(block(a) == block(b) for a, b in twins) or any(block(a) == block(b) for a, b in distinct):
        return None
    return layout


def meta_layout(kernel: Any) -> Any | None:
    """The rp_meta_layout * for the C checks with this kernel, or None: steps then check in Python."""
    if not META_CHECK or kernel is None:
        return None
    key = id(kernel.ffi)
    if key not in _layouts:
        try:
            _layouts[key] = _probe_layout(kernel.ffi)
        except (RuntimeError, TypeError, ValueError, AttributeError):
            _layouts[key] = None
    return _layouts[key]


class _GroupPlan:
    """One param group's tensors as the kernel sees them, reused while nothing changes.

    Built by ``FusedOptimizer._plan``: the C arrays of tensor pointers and the chunk list
    live here between steps. A later step checks that the params, their storage and
    their state are the ones the arrays point at, with the layouts and dtypes the full
    check accepted; grads that are new tensors (``zero_grad()`` sets them to None every
    step) are validated and only their pointers are updated.

    Two ways to check, the same checks: in C (``meta`` set, the native kernel on a torch
    whose tensor structs the probe above understood, no DTensor), one pass over torch's
    TensorImpls against what the full check saw; else in Python, C-level passes of
    torch's attribute getters (the torch fallback, DTensor shards).
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
        # Grads checked by _plan that the next run points the C arrays at.
        self.pending_grads: list[Tensor] | None = None
        self.param_dtypes: list[torch.dtype] = []  # of self.params, for the bulk grad check
        self.has_complex = False  # a complex param: its grads may be lazy conjugates
        self.tensors: Any = None  # rp_tensor[] (native path)
        self.chunks: Any = None  # rp_chunk[]
        self.n_chunks = 0
        self.rchunks: Any = None  # rp_rchunk[] and float[] scratch: the reduction phase's plan
        self.scratch: Any = None
        self.state_every = True  # every param has every state key (False: a rule with _param_state_keys)
        self.hyper: Any = None  # the rule's hyperparameter struct (rp_adam_hyper *, ...)
        self.run_opts: Any = None  # rp_run_opts *
        self.grad_ptrs: Any = None  # uintptr_t[], staging for rp_set_grads
        self.fresh: list[bool] = []  # per slot: its state was created for this plan's first step
        self.built = False  # state created and C arrays filled (on the first run)
        self.ptr_of: Callable[[Tensor], int] = Tensor.data_ptr  # _local_ptr when there are DTensors
        self.storage_of: Callable[[Tensor], Any] = Tensor.untyped_storage  # of the local shard for DTensors
        # The C check: rp_meta[] of the params then each state key's tensors, as the full check
        # saw them, and their Python objects' addresses (id: the plan holds the objects, and
        # grads_changed compares them by identity first); rp_meta[] of the grads, their data
        # pointers and bad flags from the last check; the layout.
        self.meta: Any = None
        self.meta_objects: Any = None
        self.grad_meta: Any = None
        self.meta_ptrs: Any = None
        self.meta_bad: Any = None
        self.meta_scratch: tuple[Any, Any] = (None, None)  # the same for params and state (unused)
        self.meta_layout: Any = None
        self.kernel: Any = None
        self.bad_slots: list[int] = []  # grads the last C check could not vouch for
        # The Python check: signature() of params and grads, storage sizes of params, grads
        # and state tensors, and the state tensors' addresses and dtypes, as the arrays were filled.
        self.param_sig: tuple = ()
        self.grad_sig: tuple = ([], [], [], [])
        self.param_bytes: list[int] = []  # a storage shrunk in place at the same address
        self.grad_bytes: list[int] = []  # (resize_(0), then resize_(m)) must not be written
        self.state_bytes: list[list[int] | None] = []
        self.state_ptrs: list[list[int]] = []
        self.state_dtypes: list[list[torch.dtype]] = []
        self.pending_grad_sig: tuple = ([], [], [], [])
        self.pending_grad_bytes: list[int] = []

    def signature(self, tensors: list[Tensor]) -> tuple[list[int], list[tuple[int, ...]], list[int], list[torch.dtype]]:
        """Where each tensor's memory is, how it is laid out and its dtype: what the C arrays depend on."""
        try:
            return (list(map(self.ptr_of, tensors)), list(map(Tensor.stride, tensors)),
                    list(map(Tensor.numel, tensors)), list(map(_DTYPE_OF, tensors)))
        except RuntimeError:  # a tensor without strides or storage (sparse, meta): never matches
            return [-1] * len(tensors), [()] * len(tensors), [-1] * len(tensors), [cast(Any, None)] * len(tensors)

    def storage_bytes(self, tensors: list[Tensor]) -> list[int]:
        """The size in bytes of each tensor's storage (C-level passes; -1 where there is none)."""
        try:
            return list(map(_STORAGE_NBYTES, map(self.storage_of, tensors)))
        except (RuntimeError, NotImplementedError):
            return [-1] * len(tensors)

    def grads_changed(self, group_params: list[Tensor], all_grads: list[Tensor | None], state: dict) -> bool | None:
        """Whether some grads are new, or were moved or reshaped in place; None if the plan no longer fits.

        The plan fits while every pointer in its C arrays is still valid and every tensor
        is what the full check accepted: the identity of the group's params, of every
        state dict and state tensor; and for each param and state tensor its address,
        sizes, strides, dtype and storage size (``t.data = ...``, ``t.set_(...)`` and
        ``t.untyped_storage().resize_()`` keep the object and change its memory or type).
        Grads that changed (new objects, or moved, retyped or reshaped in place) wait in
        pending_grads for the checks in _plan: changed_slots() names those that need
        _check_tensor. Identity in C-level passes, then the rest in one C pass over
        torch's structs (``meta``), else in C-level passes of torch's getters.
        """
        if not self.built or len(group_params) != len(self.group_params):
            return None
        if not all(map(operator.is_, group_params, self.group_params)):
            return None  # params were added to, removed from or replaced in the group
        if not all(map(operator.is_, all_grads, self.all_grads)):
            for g, g0 in zip(all_grads, self.all_grads, strict=True):
                if (g is None) != (g0 is None):
                    return None  # another set of params has grads
        if not all(map(operator.is_, map(state.get, self.params), self.states)):
            return None
        try:
            for key, tensors in zip(self.state_keys, self.state_tensors, strict=True):
                current = _state_column(self.states, key, self.state_every)
                if len(current) != len(tensors) or not all(map(operator.is_, current, tensors)):
                    return None  # a state tensor was replaced, added or removed
        except KeyError:
            return None  # opt.state[p].clear(): the full check decides
        grads = [g for g in all_grads if g is not None]
        if self.meta is not None:
            return self._meta_changed(grads)
        return self._python_changed(grads)

    def _meta_changed(self, grads: list[Tensor]) -> bool | None:
        """The C check: every param and state tensor, then every grad, against what the full check saw."""
        ffi, lib = self.kernel.ffi, self.kernel.lib
        n, fixed = len(self.params), len(self.meta_objects)
        self.pending_grads = grads
        scratch_ptrs, scratch_bad = self.meta_scratch
        if lib.rp_meta_check(self.meta_layout, self.meta_objects, 1, self.meta, fixed, scratch_ptrs, scratch_bad):
            return None  # a param or state tensor changed: the full check decides
        impls = array("Q", map(_CDATA, grads))
        if lib.rp_meta_check(self.meta_layout, ffi.from_buffer("uintptr_t[]", impls), 0, self.grad_meta, n,
                             self.meta_ptrs, self.meta_bad) == 0:
            self.bad_slots = []
        else:
            self.bad_slots = list(itertools.compress(range(n), bytes(ffi.buffer(self.meta_bad, n))))
        return True

    def _python_changed(self, grads: list[Tensor]) -> bool | None:
        """The Python check: C-level passes of torch's getters."""
        params = self.params
        if self.signature(params) != self.param_sig or self.storage_bytes(params) != self.param_bytes:
            return None  # a param's storage, shape or dtype changed (p.data = ..., resize_)
        try:
            for tensors, ptrs, nbytes, dtypes in zip(self.state_tensors, self.state_ptrs, self.state_bytes,
                                                     self.state_dtypes, strict=True):
                if (list(map(self.ptr_of, tensors)) != ptrs or list(map(_DTYPE_OF, tensors)) != dtypes
                        or (nbytes is not None and self.storage_bytes(tensors) != nbytes)):
                    return None  # its memory moved or its dtype changed under the same object
        except RuntimeError:
            return None  # a tensor without storage: the full check decides
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
        The C check has decided this already (bad_slots). The Python check: C-level passes, no
        Python per tensor, for the common case of zero_grad(set_to_none=True), where every grad
        is new each step. When it fails, _check_tensor decides slot by slot."""
        if self.meta is not None:
            return not self.bad_slots
        grads = self.pending_grads
        if grads is None:
            return True
        ptrs, strides, numels, dtypes = self.pending_grad_sig
        return (
            strides == self.grad_sig[1] and numels == self.grad_sig[2]
            and all(ptrs)  # a freed storage (resize_(0)) has a NULL pointer: the full check names it
            and self.pending_grad_bytes == self.grad_bytes
            and all(map(operator.is_, map(type, grads), itertools.repeat(Tensor)))
            and all(map(operator.is_, dtypes, self.param_dtypes))
            and all(map(_IS_CPU, grads)) and all(map(Tensor.is_contiguous, grads))
            and not any(map(Tensor.is_neg, grads))
            and not (self.has_complex and any(map(Tensor.is_conj, grads)))
        )

    def changed_slots(self) -> list[int]:
        """Slots whose pending grad is a new tensor or was moved, retyped or reshaped in place."""
        if self.meta is not None:
            return self.bad_slots
        if self.pending_grads is None:
            return []
        new = zip(self.pending_grads, *self.pending_grad_sig, self.pending_grad_bytes, strict=True)
        old = zip(self.grads, *self.grad_sig, self.grad_bytes, strict=True)
        return [slot for slot, (a, b) in enumerate(zip(new, old, strict=True))
                if a[0] is not b[0] or a[1:] != b[1:]]

    def copy_pending_grad(self, slot: int) -> None:
        """Step slot on a contiguous copy of its pending grad (a broadcast grad, see _engine._needs_copy).

        The copy is what the C arrays point at and what the check records: the next step finds
        the caller's grad unlike it (its strides) and checks and copies it again, so every step
        reads the grad's current values. Only slots that changed_slots() names get here."""
        grads = cast(list[Tensor], self.pending_grads)
        work = grads[slot] = grads[slot].contiguous()
        if self.meta is not None:
            return  # apply_grads records the bad slots from pending_grads: the copy
        self.pending_grad_sig[0][slot] = self.ptr_of(work)
        self.pending_grad_sig[1][slot] = work.stride()
        self.pending_grad_bytes[slot] = self.storage_bytes([work])[0]

    def record(self, kernel: Any) -> None:
        """After the full check and _build: the C check's record of every tensor, where it applies."""
        layout = meta_layout(kernel)
        if layout is None or self.ptr_of is not Tensor.data_ptr:
            return  # the torch fallback, a torch whose structs the probe did not understand, DTensors
        ffi, lib = kernel.ffi, kernel.lib
        fixed = [t for ts in (self.params, *self.state_tensors) for t in ts]
        objects = [id(t) for t in fixed]
        # The objects' TensorImpl, as C will read it, must be torch's: a check of the layout.
        if [ffi.cast("uintptr_t *", a + layout.object)[0] for a in objects] != list(map(_CDATA, fixed)):
            return
        meta, grad_meta = ffi.new("rp_meta[]", max(len(fixed), 1)), ffi.new("rp_meta[]", max(len(self.grads), 1))
        if self._record(ffi, lib, layout, fixed, 1, meta):
            return  # a param or state tensor the C check cannot follow: check this plan in Python
        self._record(ffi, lib, layout, self.grads, 0, grad_meta)
        self.kernel, self.meta_layout, self.meta, self.grad_meta = kernel, layout, meta, grad_meta
        self.meta_objects = ffi.new("uintptr_t[]", objects)
        self.meta_ptrs = ffi.new("uintptr_t[]", max(len(self.grads), 1))
        self.meta_bad = ffi.new("uint8_t[]", max(len(self.grads), 1))
        self.meta_scratch = ffi.new("uintptr_t[]", max(len(fixed), 1)), ffi.new("uint8_t[]", max(len(fixed), 1))
        self.meta_ptrs[0:len(self.grads)] = list(map(Tensor.data_ptr, self.grads))

    @staticmethod
    def _record(ffi: Any, lib: Any, layout: Any, tensors: list[Tensor], exact: int, out: Any) -> int:
        impls = array("Q", map(_CDATA, tensors))
        ptrs = array("Q", map(Tensor.data_ptr, tensors))
        spans = array("q", map(_NBYTES, tensors))
        return int(lib.rp_meta_record(layout, ffi.from_buffer("uintptr_t[]", impls), ffi.from_buffer("uintptr_t[]", ptrs),
                                      ffi.from_buffer("int64_t[]", spans), exact, out, len(tensors)))

    def apply_grads(self) -> None:
        """Point the C arrays at the pending grads, which _plan has checked."""
        grads = self.pending_grads
        if grads is None:
            return
        self.grads, self.pending_grads = grads, None
        if self.meta is not None:
            ffi, lib = self.kernel.ffi, self.kernel.lib
            n = len(grads)
            for slot in self.bad_slots:  # checked by _check_tensor: the next step's C check vouches for them
                g = grads[slot]
                self._record(ffi, lib, self.meta_layout, [g], 0, self.grad_meta + slot)
                self.meta_ptrs[slot] = g.data_ptr()
            self.bad_slots = []
            lib.rp_set_grads(self.tensors, self.meta_ptrs, n)
            return
        self.grad_sig, self.grad_bytes = self.pending_grad_sig, self.pending_grad_bytes
        if self.tensors is not None:
            ptrs = self.grad_sig[0]
            self.grad_ptrs[0:len(ptrs)] = ptrs
            self.kernel.lib.rp_set_grads(self.tensors, self.grad_ptrs, len(ptrs))
