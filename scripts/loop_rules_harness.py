"""Bit-for-bit harness for the rules whose reference is torch's for-loop step (NAdam, ASGD,
RMSprop, Adadelta, Rprop, Adamax, RAdam).

Unlike scripts/rules_harness.py (which compiles one rule's element loop alone), this one
steps the public classes: their per-tensor scalar state (NAdam's mu_product, ASGD's eta
and mu) is updated by each rule's C entry point, and some of torch's ops on complex params
are complex ops (RMSprop's and Adadelta's weight decay, Adadelta's update, -grad), so the
whole step is what is compared.
Each combination trains roundpipe's optimizer and torch's (``foreach=False``, its default
on CPU) on the same params and grads:

* every flag combination of the rule's grid (REGISTRY), with a float lr and a float32
  Tensor lr, and a GradScaler-style unscale (a power of two and a scale that is not;
  real params and finite grads there, as GradScaler steps nothing else);
* tensor sizes 1..67 plus a few large ones (> 32768, so torch's own parallel split
  happens), plus complex64 params;
* random values with zeros, denormals, huge values, and NaN/Inf in the grads;
* several steps (ASGD's averaging starts within them where t0 is small);
* roundpipe on 1 and 2 threads against torch at 1 thread; torch at its default thread
  count must equal that but for NaN bits and zero signs, which its parallel split can change
  (counted).

Every float of params, grads (unscaled in place) and state is compared as raw bits, so
NaN signs count too. ``--foreach`` also counts where torch's ``foreach=True`` differs
from its default (reported, not a failure: roundpipe matches the default).

Usage: python scripts/loop_rules_harness.py [nadam|asgd|rmsprop|adadelta|rprop|adamax|radam ...] [--quick] [--foreach] [--stop]
Exit status 0 when every combination is bit-identical.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import roundpipe.optim as rpo  # noqa: E402  (the source tree's, not an installed copy)

SPECIALS = [0.0, -0.0, 1e-40, -1e-42, 1e-30, 3e38, -3e38, 1e20, 65504.0,
            float("inf"), float("-inf"), float("nan"), -float("nan")]


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


# rule -> (roundpipe class, torch class, flag grid, what to skip)
REGISTRY: dict[str, tuple[type, type, list[dict[str, Any]]]] = {
    "nadam": (rpo.NAdam, torch.optim.NAdam, [
        f for f in grid(weight_decay=[0.0, 0.05], decoupled_weight_decay=[False, True], maximize=[False, True],
                        betas=[(0.9, 0.999), (0.3, 0.5)], momentum_decay=[4e-3, 0.3], eps=[1e-8, 0.0])
        if f["weight_decay"] or not f["decoupled_weight_decay"]
    ]),
    "asgd": (rpo.ASGD, torch.optim.ASGD, grid(
        weight_decay=[0.0, 0.05], maximize=[False, True], t0=[1e6, 0.0, 2.5],
        lambd=[1e-4, 0.5], alpha=[0.75, 0.5, 2.0])),
    "rmsprop": (rpo.RMSprop, torch.optim.RMSprop, grid(
        centered=[False, True], momentum=[0.0, 0.9], weight_decay=[0.0, 0.05], maximize=[False, True],
        alpha=[0.99, 0.3], eps=[1e-8, 0.0])),
    "adadelta": (rpo.Adadelta, torch.optim.Adadelta, grid(
        lr=[1.0, 0.0], rho=[0.9, 0.0, 1.0], eps=[1e-6, 0.0], weight_decay=[0.0, 0.05], maximize=[False, True])),
    # etas that round to 0 or 1 in float, min > max, unbounded, a NaN bound, lr = 0
    "rprop": (rpo.Rprop, torch.optim.Rprop, grid(
        lr=[0.01, 0.0], etas=[(0.5, 1.2), (1e-50, 1.7), (0.9999999999, 1.2)],
        step_sizes=[(1e-6, 50.0), (3.0, 2.0), (0.0, float("inf")), (float("nan"), 1.0)], maximize=[False, True])),
    "adamax": (rpo.Adamax, torch.optim.Adamax, grid(
        weight_decay=[0.0, 0.1], maximize=[False, True],
        betas=[(0.9, 0.999), (0.3, 0.5), (0.0, 0.0), (0.95, 0.9)], eps=[1e-8, 0.0])),
    "radam": (rpo.RAdam, torch.optim.RAdam, [
        f for f in grid(weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True],
                        betas=[(0.9, 0.999), (0.3, 0.9), (0.0, 0.0), (0.9, 0.5)], eps=[1e-8, 0.0])
        if f["weight_decay"] or not f["decoupled_weight_decay"]
    ]),
}
LRS = {"nadam": 2e-2, "asgd": 5e-2, "rmsprop": 1e-2, "adamax": 2e-2, "radam": 1e-2}  # else the flags' lr
STEPS = {"radam": 9}  # RAdam: its rectified branch starts near step 6 (rho_t > 5) with beta2 = 0.999
# complex64 params of these sizes: every region of torch's loops, and 20005 (40010 floats) past its
# parallel split, where torch at its default thread count may differ from itself at 1 thread in NaN
# and zero signs only (the reference is torch at 1 thread; rules.h)
COMPLEX_SIZES = (1, 5, 8, 12, 17, 33, 67, 1000, 20005)


def values(n: int, gen: torch.Generator, special: bool, nan: bool) -> torch.Tensor:
    """Random normals over many magnitudes, some zeros, and (special) tiny/huge values; (nan) NaN/Inf."""
    t = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    t[torch.rand(n, generator=gen) < 0.05] = 0.0
    if special:
        pool = [s for s in SPECIALS if nan or math.isfinite(s)]
        idx = torch.rand(n, generator=gen) < 0.03
        t[idx] = torch.tensor(pool)[torch.randint(len(pool), (int(idx.sum()),), generator=gen)]
    return t


def sizes(quick: bool) -> list[int]:
    return list(range(1, 68)) + ([1000, 40000] if quick else [1000, 4099, 40000, 100003])


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view(torch.int32).flatten()


def make(n: int, gen: torch.Generator, complex_: bool, nan: bool) -> torch.Tensor:
    if complex_:
        return torch.complex(values(n, gen, True, nan), values(n, gen, True, nan))
    return values(n, gen, True, nan)


def train(cls: Callable[..., torch.optim.Optimizer], kw: dict[str, Any], init: list[torch.Tensor],
          grads: list[list[torch.Tensor]], scale: float | None, threads: int | None, ours: bool
          ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = [t.clone().requires_grad_() for t in init]
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    opt = cls(params, **kw)
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            if scale is None:
                opt.step()
            elif ours:  # as GradScaler.step hands an optimizer that unscales itself its scale
                opt.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
            else:  # as GradScaler.unscale_ treats torch's for-loop optimizers: grad * (1/scale)
                inv = torch.tensor(scale).double().reciprocal().float()
                for p in params:
                    p.grad.mul_(inv)
                opt.step()
    finally:
        torch.set_num_threads(before)
    return params, opt


def compare(a: tuple, b: tuple) -> tuple[int, int, str]:
    """(arrays that differ, of which only in NaN bits or zero signs, the first difference) between two runs."""
    (pa, oa), (pb, ob) = a, b
    bad = nan_only = 0
    first = ""
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        pairs = [("param", x, y), ("grad", x.grad, y.grad)]
        sa, sb = oa.state[x], ob.state[y]
        if sa.keys() != sb.keys():
            return 1, 0, f"param {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        pairs += [(k, sa[k], sb[k]) for k in sorted(sa)]
        for what, u, v in pairs:
            if u.dtype != v.dtype or u.shape != v.shape:
                return 1, 0, f"param {i} {what}: {u.dtype} {tuple(u.shape)} vs {v.dtype} {tuple(v.shape)}"
            bu, bv = bits(u), bits(v)
            if torch.equal(bu, bv):
                continue
            d = bu != bv
            bad += 1
            fu = torch.view_as_real(u.detach()).flatten() if u.is_complex() else u.detach().flatten()
            fv = torch.view_as_real(v.detach()).flatten() if v.is_complex() else v.detach().flatten()
            if bool(((fu.isnan() & fv.isnan()) | ((fu == 0) & (fv == 0)))[d].all()):  # NaN bits, zero signs
                nan_only += 1
            if not first:
                j = int(d.nonzero()[0])
                first = (f"param {i} ({u.numel()} elements) {what}[{j}]: {fu[j].item()!r} "
                         f"({int(bu[j]) & 0xffffffff:08x}) vs {fv[j].item()!r} ({int(bv[j]) & 0xffffffff:08x}), "
                         f"{int(d.sum())} elements")
    return bad, nan_only, first


def run_rule(rule: str, quick: bool, foreach: bool, stop: bool) -> tuple[int, int, int, int]:
    ours_cls, torch_cls, flags = REGISTRY[rule]
    gen = torch.Generator().manual_seed(0)
    ok = total = foreach_diff = torch_threads_nan = 0
    steps = STEPS.get(rule, 4 if quick else 6)
    for fi, f in enumerate(flags):
        for lr_kind, scale in itertools.product(["float", "tensor"], [None, 1024.0, 1000.0]):
            if quick and (lr_kind, scale) not in (("float", None), ("tensor", 1000.0)):
                continue
            # Every other combination has NaN/Inf in its grads, except under a grad scale: GradScaler
            # skips such steps. torch's GradScaler cannot unscale complex grads on the CPU
            # (_amp_foreach_non_finite_check_and_unscale_ is not implemented for them).
            nan = fi % 2 == 1 and scale is None
            shapes = [(n, False) for n in sizes(quick)] + [(n, True) for n in COMPLEX_SIZES if scale is None]
            init = [make(n, gen, c, False) for n, c in shapes]
            grads = [[make(n, gen, c, nan) for n, c in shapes] for _ in range(steps)]
            lr = f.get("lr", LRS.get(rule))
            kw = {**f, "lr": torch.tensor(lr) if lr_kind == "tensor" else lr}
            ref = train(torch_cls, {**kw, "foreach": False}, init, grads, scale, 1, False)
            runs = [(f"roundpipe at {t} thread(s)", train(ours_cls, kw, init, grads, scale, t, True)) for t in (1, 2)]
            name = f"{rule} {f} lr={lr_kind} scale={scale} nan={nan}"
            total += 1
            failed = False
            for what, a in runs:
                bad, nan_only, first = compare(a, ref)
                if bad:
                    failed = True
                    kind = "NAN/ZERO-BITS" if bad == nan_only else "MISMATCH"
                    print(f"{kind} {name} ({what} vs torch at 1 thread): {bad} arrays; first: {first}")
            # torch at its default thread count: its parallel split gives each piece of a large
            # tensor its own vector body and scalar tail, where Adamax's torch.maximum and the
            # lerp of Adamax/RAdam write other NaN bits and zero signs; only those may differ from 1 thread.
            bad, nan_only, first = compare(train(torch_cls, {**kw, "foreach": False}, init, grads, scale, None, False),
                                           ref)
            if bad and bad != nan_only:
                failed = True
                print(f"MISMATCH {name} (torch at its default thread count vs at 1): {bad} arrays; first: {first}")
            elif bad:
                torch_threads_nan += 1
            ok += not failed
            if foreach and scale is None:
                fe = train(torch_cls, {**kw, "foreach": True}, init, grads, scale, None, False)
                bad, _, first = compare(fe, ref)
                if bad:
                    foreach_diff += 1
                    if foreach_diff <= 3:
                        print(f"foreach=True differs from foreach=False: {name}: {first}")
            if failed and stop:
                return ok, total, foreach_diff, torch_threads_nan
    return ok, total, foreach_diff, torch_threads_nan


def main() -> int:
    rules = [a for a in sys.argv[1:] if not a.startswith("--")] or list(REGISTRY)
    quick, foreach, stop = "--quick" in sys.argv, "--foreach" in sys.argv, "--stop" in sys.argv
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, native kernel: {rpo.native_available()}")
    failed = 0
    for rule in rules:
        ok, total, foreach_diff, torch_threads_nan = run_rule(rule, quick, foreach, stop)
        line = f"{rule}: {ok}/{total} combinations bit-identical to torch at 1 thread"
        line += f"; torch at its default thread count differs in NaN bits or zero signs in {torch_threads_nan}"
        if foreach:
            line += f"; torch's foreach=True differs from its default in {foreach_diff} of them"
        print(line)
        failed += total - ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
