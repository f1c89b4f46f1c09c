"""Bit-for-bit harness for the SGD, Adagrad and Lion element loops.

Compiles roundpipe/_kernels/{sgd,adagrad,lion}.c with a tiny wrapper (gcc
-shared, loaded with ctypes) under the flags roundpipe builds with, and
compares each step against the reference:

  SGD      torch.optim.SGD(fused=True)
  Adagrad  torch.optim.Adagrad(fused=True)
  Lion     lion_pytorch.Lion (maximize: the same optimizer fed -grad)

for every flag combination, tensor sizes 1..67 plus a few large ones, several
steps (state evolves), random values with zeros, denormals, huge values, and
NaN/Inf in the grads. Every float of param, grad (unscaled in place) and state
is compared as raw bits, so NaN signs count too.

Usage: python scripts/rules_harness.py [sgd|adagrad|lion ...] [--quick]
Exit status 0 when every combination is bit-identical.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import pathlib
import subprocess
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "roundpipe" / "_kernels"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-std=gnu11", "-fPIC", "-shared"]

# One exported entry per rule: fill the consts, then step the tensor in chunks
# (as the lead's scheduler will), so chunk boundaries are exercised too.
WRAPPER = r"""
#include <stdint.h>
#include "RULE.c"
#define CHUNKS(BODY) for (int64_t b = 0; b < numel; b += chunk) { \
    const int64_t n = numel - b < chunk ? numel - b : chunk; BODY; }

void h_sgd(int64_t numel, int64_t tail_start, int64_t chunk, float *p, float *g, float *buf,
           double lr, double momentum, double dampening, double wd, int nesterov, int maximize,
           int first_step, const float *scale)
{
    sgd_consts k;
    sgd_consts_init(&k, lr, momentum, dampening, wd, maximize, scale);
    CHUNKS(sgd_fp32_span(b, n, tail_start, numel, p + b, g + b, buf ? buf + b : 0, &k, momentum != 0.0,
                         nesterov, first_step, scale != 0))
}

void h_adagrad(int64_t numel, int64_t tail_start, int64_t chunk, float *p, float *g, float *sum,
               double lr, double lr_decay, double wd, double eps, int maximize, float step,
               const float *scale)
{
    adagrad_consts k;
    adagrad_consts_init(&k, lr, lr_decay, wd, eps, maximize, scale, step);
    CHUNKS(adagrad_fp32_span(b, n, tail_start, numel, p + b, g + b, sum + b, &k, scale != 0))
}

float h_adagrad_clr(double lr, double lr_decay, float step) { return adagrad_clr(lr, lr_decay, step); }

void h_lion(int64_t numel, int64_t tail_start, int64_t chunk, float *p, float *g, float *m,
            double lr, double beta1, double beta2, double wd, int decoupled, double init_lr,
            int maximize)
{
    lion_consts k;
    lion_consts_init(&k, lr, beta1, beta2, wd, decoupled, init_lr, maximize);
    CHUNKS(lion_fp32_span(b, n, tail_start, numel, p + b, g + b, m + b, &k))
}
"""

ENTRIES = {"sgd": "h_sgd", "adagrad": "h_adagrad", "lion": "h_lion"}


def build(rule: str, tmp: str) -> ctypes.CDLL:
    src = pathlib.Path(tmp) / f"h_{rule}.c"
    text = WRAPPER.replace("RULE", str(KERNELS / rule))
    # keep only this rule's entry: the others name types this file lacks
    head, rest = text.split("void h_sgd", 1)
    parts = {"sgd": "void h_sgd" + rest.split("void h_adagrad")[0],
             "adagrad": "void h_adagrad" + rest.split("void h_adagrad")[1].split("void h_lion")[0],
             "lion": "void h_lion" + rest.split("void h_lion")[1]}
    src.write_text(head + parts[rule])
    so = pathlib.Path(tmp) / f"h_{rule}.so"
    # engine.c: what the rule's entry point (rp_run, via runner.h) links against
    subprocess.run(["gcc", *CFLAGS, "-fopenmp", "-I" + str(KERNELS), "-o", str(so), str(src),
                    str(KERNELS / "engine.c"), "-lm"], check=True)
    return ctypes.CDLL(str(so))


def torch_vec() -> int:
    """torch's Vectorized<float> lane count: where its scalar tail starts."""
    cap = torch.backends.cpu.get_cpu_capability()
    return 16 if cap.startswith("AVX512") else 8


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


SPECIALS = [0.0, -0.0, 1e-40, -1e-42, 1e-30, 3e38, -3e38, 1e20, 65504.0, float("inf"), float("-inf"), float("nan"), -float("nan")]


def values(n: int, gen: torch.Generator, special: bool, nan: bool) -> torch.Tensor:
    """Random normals, some zeros, and (special) tiny/huge values; (nan) NaN and Inf too."""
    t = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    t[torch.rand(n, generator=gen) < 0.05] = 0.0
    if special:
        pool = [s for s in SPECIALS if nan or math.isfinite(s)]
        idx = torch.rand(n, generator=gen) < 0.03
        choice = torch.randint(len(pool), (int(idx.sum()),), generator=gen)
        t[idx] = torch.tensor(pool)[choice]
    return t


def sizes(quick: bool) -> list[int]:
    return list(range(1, 68)) + ([1000, 100003] if quick else [1000, 4099, 100003, 262147])


class Case:
    """Compare one flag combination over all sizes and steps; count mismatches."""

    def __init__(self, name: str) -> None:
        self.name, self.bad, self.first = name, 0, None
        self.nan_only = True  # every difference so far is a NaN against a NaN (sign or payload)
        self.pending: list = []

    def check(self, what: str, ref: torch.Tensor, ours: torch.Tensor, size: int, step: int) -> None:
        self.pending.append((what, ref, ours, size, step))

    def flush(self) -> None:
        """Compare everything checked since the last flush: one concatenated compare, then details."""
        if not self.pending:
            return
        allref = torch.cat([bits(r).flatten() for _, r, _, _, _ in self.pending])
        allours = torch.cat([bits(o).flatten() for _, _, o, _, _ in self.pending])
        pending, self.pending = self.pending, []
        if torch.equal(allref, allours):
            return
        for what, ref, ours, size, step in pending:
            d = bits(ref) != bits(ours)
            if bool(d.any()):
                self.bad += 1
                self.nan_only &= bool((ref.isnan() & ours.isnan())[d].all())
                if self.first is None:
                    i = int(d.nonzero()[0])
                    self.first = (f"{what} size={size} step={step} idx={i} ref={ref.flatten()[i].item()!r} "
                                  f"({int(bits(ref).flatten()[i]) & 0xffffffff:08x}) ours={ours.flatten()[i].item()!r} "
                                  f"({int(bits(ours).flatten()[i]) & 0xffffffff:08x}) count={int(d.sum())}")


def grads_for(ps, gen, nan):
    return [values(p.numel(), gen, True, nan) for p in ps]


def run_sgd(lib, quick: bool) -> tuple[int, int]:
    fn = lib.h_sgd
    fn.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_double] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    V = torch_vec()
    combos = []
    for mom, damp, nest, wd, maxi, scale, lr, nan in itertools.product(
            [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.013], [False, True], [None, 1024.0, 3.0], [0.1, 1e-3],
            [False, True]):
        if mom == 0.0 and (damp or nest):
            continue
        if nest and damp:
            continue
        combos.append((mom, damp, nest, wd, maxi, scale, lr, nan))
    ok = skipped = nan_only = 0
    for ci, (mom, damp, nest, wd, maxi, scale, lr, nan) in enumerate(combos):
        case = Case(f"sgd mom={mom} damp={damp} nest={nest} wd={wd} max={maxi} scale={scale} lr={lr} nan={nan}")
        if not selected(case.name):
            skipped += 1
            continue
        gen = torch.Generator().manual_seed(ci)
        ns = sizes(quick)
        ps = [values(n, gen, True, nan) for n in ns]
        ours = [p.clone() for p in ps]
        bufs = [None] * len(ps)
        params = [torch.nn.Parameter(p.clone()) for p in ps]
        opt = torch.optim.SGD(params, lr=lr, momentum=mom, dampening=damp, weight_decay=wd,
                              nesterov=nest, maximize=maxi, fused=True)
        for step in range(3):
            gs = grads_for(ps, gen, nan)
            sc = torch.tensor([scale], dtype=torch.float32) if scale else None
            if scale:
                opt.grad_scale, opt.found_inf = sc.clone().reshape(()), torch.zeros(())
            for prm, g in zip(params, gs, strict=True):
                prm.grad = g.clone()
            opt.step()
            first = all(b is None for b in bufs) and mom != 0.0
            for i, (n, g) in enumerate(zip(ns, gs, strict=True)):
                og = g.clone()
                if first:
                    bufs[i] = torch.empty_like(og)
                chunk = 32 if n < 1000 else 16384
                fn(n, n - n % V, chunk, ptr(ours[i]), ptr(og), ptr(bufs[i] if mom else None), lr, mom, damp, wd,
                   int(nest), int(maxi), int(first), ptr(sc))
                case.check("param", params[i].data, ours[i], n, step)
                case.check("grad", params[i].grad, og, n, step)
                if mom:
                    case.check("momentum_buffer", opt.state[params[i]]["momentum_buffer"], bufs[i], n, step)
            case.flush()  # before the next step changes these tensors
        case.flush()
        report(case)
        ok += case.bad == 0
        nan_only += case.bad > 0 and case.nan_only
        if STOP and case.bad:
            break
    return ok, nan_only, len(combos) - skipped


def run_adagrad(lib, quick: bool) -> tuple[int, int]:
    fn = lib.h_adagrad
    fn.argtypes = ([ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_double] * 4 + [ctypes.c_int, ctypes.c_float, ctypes.c_void_p])
    V = torch_vec()
    combos = list(itertools.product([0.0, 0.01, 0.37], [0.0, 0.013], [0.0, 0.1], [1e-10, 1e-3],
                                    [False, True], [None, 1024.0, 3.0], [0.01, 0.7], [False, True]))
    clr_ok, clr_total = check_clr(lib)
    ok = skipped = nan_only = 0
    for ci, (lr_decay, wd, iav, eps, maxi, scale, lr, nan) in enumerate(combos):
        case = Case(f"adagrad lr_decay={lr_decay} wd={wd} iav={iav} eps={eps} max={maxi} scale={scale} lr={lr} nan={nan}")
        if not selected(case.name):
            skipped += 1
            continue
        gen = torch.Generator().manual_seed(1000 + ci)
        ns = sizes(quick)
        ps = [values(n, gen, True, nan) for n in ns]
        ours = [p.clone() for p in ps]
        params = [torch.nn.Parameter(p.clone()) for p in ps]
        opt = torch.optim.Adagrad(params, lr=lr, lr_decay=lr_decay, weight_decay=wd,
                                  initial_accumulator_value=iav, eps=eps, maximize=maxi, fused=True)
        sums = [opt.state[p]["sum"].clone() for p in params]
        step_count = torch.zeros((), dtype=torch.float32)
        for step in range(3):
            gs = grads_for(ps, gen, nan)
            sc = torch.tensor([scale], dtype=torch.float32) if scale else None
            if scale:
                opt.grad_scale, opt.found_inf = sc.clone().reshape(()), torch.zeros(())
            for prm, g in zip(params, gs, strict=True):
                prm.grad = g.clone()
            opt.step()
            step_count += 1  # torch._foreach_add_(state_steps, 1): a float32 count
            for i, (n, g) in enumerate(zip(ns, gs, strict=True)):
                og = g.clone()
                chunk = 32 if n < 1000 else 16384
                fn(n, n - n % V, chunk, ptr(ours[i]), ptr(og), ptr(sums[i]), lr, lr_decay, wd, eps,
                   int(maxi), float(step_count), ptr(sc))
                case.check("param", params[i].data, ours[i], n, step)
                case.check("grad", params[i].grad, og, n, step)
                case.check("sum", opt.state[params[i]]["sum"], sums[i], n, step)
            case.flush()  # before the next step changes these tensors
        case.flush()
        report(case)
        ok += case.bad == 0
        nan_only += case.bad > 0 and case.nan_only
        if STOP and case.bad:
            break
    # the clr check counts as one more combination
    return ok + (clr_ok == clr_total), nan_only, len(combos) - skipped + 1


def clr_cases(count: int) -> list[tuple[float, float, float]]:
    """(lr, lr_decay, step) where lr / (1 + (step-1)*lr_decay) rounds to a different
    float with and without a fused multiply-add in double: lr is put halfway
    between two floats times the two denominators' mean, so that the quotients
    straddle the rounding boundary. Exact arithmetic with Fraction."""
    import random
    from fractions import Fraction

    import numpy as np

    rng, out = random.Random(2), []
    while len(out) < count:
        d, step = rng.random() * 0.5, float(rng.randint(2, 100))
        d1 = (step - 1.0) * d + 1.0
        d2 = float(Fraction(step - 1.0) * Fraction(d) + 1)  # fma in double
        if d1 == d2:
            continue
        x = np.float32(rng.uniform(0.005, 0.02))
        mid = (Fraction(float(x)) + Fraction(float(np.nextafter(x, np.float32(1))))) / 2
        lr = float(mid * (Fraction(d1) + Fraction(d2)) / 2)
        if np.float32(lr / d1) != np.float32(lr / d2):
            out.append((lr, d, step))
    return out


def check_clr(lib) -> tuple[int, int]:
    """Adagrad's per-tensor clr on cases that tell torch's double rounding apart:
    with grad 1 and an empty sum, the fused step writes p = -clr exactly."""
    fn = lib.h_adagrad_clr
    fn.argtypes, fn.restype = [ctypes.c_double, ctypes.c_double, ctypes.c_float], ctypes.c_float
    ok = 0
    cases = clr_cases(16)
    for lr, d, step in cases:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adagrad([p], lr=lr, lr_decay=d, fused=True)
        opt.state[p]["step"].fill_(step - 1)
        p.grad = torch.ones(1)
        opt.step()
        ok += -p.item() == fn(lr, d, step)
    print(f"adagrad clr: {ok}/{len(cases)} rounding-sensitive cases identical")
    return ok, len(cases)


def run_lion(lib, quick: bool) -> tuple[int, int]:
    from lion_pytorch import Lion

    fn = lib.h_lion
    fn.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_double] * 4 + [ctypes.c_int, ctypes.c_double, ctypes.c_int]
    V = torch_vec()
    combos = list(itertools.product([1e-4, 0.03], [(0.9, 0.99), (0.95, 0.98), (0.5, 0.0)], [0.0, 0.1, 1.3],
                                    [False, True], [False, True], [False, True]))
    ok = skipped = nan_only = 0
    for ci, (lr, betas, wd, decoupled, maxi, nan) in enumerate(combos):
        case = Case(f"lion lr={lr} betas={betas} wd={wd} decoupled={decoupled} max={maxi} nan={nan}")
        if not selected(case.name):
            skipped += 1
            continue
        gen = torch.Generator().manual_seed(2000 + ci)
        ns = sizes(quick)
        ps = [values(n, gen, True, nan) for n in ns]
        ours = [p.clone() for p in ps]
        ms = [torch.zeros_like(p) for p in ps]
        params = [torch.nn.Parameter(p.clone()) for p in ps]
        opt = Lion(params, lr=lr, betas=betas, weight_decay=wd, decoupled_weight_decay=decoupled)
        for step in range(3):
            if step == 2:  # a scheduler changed the lr: decoupled decay still divides by the initial lr
                opt.param_groups[0]["lr"] = lr * 0.37
            glr = opt.param_groups[0]["lr"]
            gs = grads_for(ps, gen, nan)
            for prm, g in zip(params, gs, strict=True):
                prm.grad = torch.neg(g) if maxi else g.clone()
            opt.step()
            for i, (n, g) in enumerate(zip(ns, gs, strict=True)):
                og = g.clone()
                chunk = 32 if n < 1000 else 16384
                fn(n, n - n % V, chunk, ptr(ours[i]), ptr(og), ptr(ms[i]), glr, betas[0], betas[1], wd,
                   int(decoupled), lr, int(maxi))
                case.check("param", params[i].data, ours[i], n, step)
                case.check("grad", g, og, n, step)  # Lion never writes the grad
                case.check("exp_avg", opt.state[params[i]]["exp_avg"], ms[i], n, step)
            case.flush()  # before the next step changes these tensors
        case.flush()
        report(case)
        ok += case.bad == 0
        nan_only += case.bad > 0 and case.nan_only
        if STOP and case.bad:
            break
    return ok, nan_only, len(combos) - skipped


STOP = "--stop" in sys.argv  # stop at the first mismatching combination
ONLY = [a[7:] for a in sys.argv if a.startswith("--only=")]  # substrings a combination must contain


def selected(name: str) -> bool:
    return all(o in name for o in ONLY)


def report(case: Case) -> None:
    if case.bad:
        print(f"{'NAN-BITS' if case.nan_only else 'MISMATCH'} {case.name}: {case.bad} arrays; first: {case.first}")


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    rules = args or ["sgd", "adagrad", "lion"]
    runners = {"sgd": run_sgd, "adagrad": run_adagrad, "lion": run_lion}
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"vector width {torch_vec()}, {torch.get_num_threads()} threads")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rule in rules:
            lib = build(rule, tmp)
            ok, nan_only, total = runners[rule](lib, quick)
            print(f"{rule}: {ok}/{total} combinations bit-identical; {nan_only} more differ only in NaN bits")
            failed += total - ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
