"""Standalone harness for the low-memory Adam cores (issue 12, items 2 and 3).

Builds roundpipe/_kernels/adam8bit.c (which includes stochastic_round.h) with
gcc and a small OpenMP driver, loads it with ctypes, and checks:

* the two dynamic code maps and the encode tables (built here in Python; the
  C takes them as pointers), with the builder's own invariants;
* quantize/dequantize: codes bit-exact against a NumPy reference of the same
  scheme (random data, zeros, all-zero blocks, subnormal and huge blocks,
  partial last blocks), the error bound, NaN/Inf behaviour;
* thread independence of the 8-bit step and of the SR step (1 thread against
  2 threads, different chunkings: bit-identical);
* 8-bit AdamW quality on a teacher-student MLP against fp32 AdamW;
* stochastic rounding: unbiasedness, and bf16 training at lr 1e-4 where
  round-to-nearest stalls, against fp32 master weights;
* timings (--bench): the 8-bit step and roundpipe's fp32 AdamW step on the
  same size, the SR bf16 step against the same loop rounding to nearest.

Run from the worktree root:
    PYTHONPATH=$PWD python scripts/lowmem_harness.py            # checks
    PYTHONPATH=$PWD python scripts/lowmem_harness.py --bench    # + timings

The functions dynamic_map, thresholds and encode_table are what the
optimizer needs to ship (roundpipe/optim/adam8bit.py): they build the tables
adam8bit.c reads.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
KERNELS = ROOT / "roundpipe" / "_kernels"  # stochastic_round.h
HERE = Path(__file__).resolve().parent  # adam8bit.c: a prototype, not built into roundpipe
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-std=gnu11"]

# ---- the code maps (ship these) ------------------------------------------------

BUCKET_LO = 0x3400  # top 16 bits of 2**-23, as RP8_BUCKET_LO in adam8bit.c
BUCKET_HI = 0x3F80  # top 16 bits of 1.0
BUCKETS = BUCKET_HI - BUCKET_LO + 1  # 2945 per sign
NO_THRESHOLD = 0x10000


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256-entry dynamic quantization map of bitsandbytes' create_dynamic_map
    (max_exponent_bits=7, total_bits=8), sorted, as float32.

    Decade d = 0..6 covers [0.1, 1] * 10**(d-6) with n = 2**d values (signed,
    and their negatives) or 2**(d+1) values (unsigned): the midpoints of n equal
    intervals of [0.1, 1], i.e. 0.1 + 0.9*(j+0.5)/n. Plus 0 and 1.
    Signed: 2*127 + 2 = 256 values in [-0.993, 1]; unsigned: 254 + 2 in [0, 1].
    Computed in double and rounded once to float32 (bitsandbytes computes
    the means in float32 with torch.linspace: the same values up to an ulp).
    """
    values = [0.0, 1.0]
    for d in range(7):
        n = 2**d if signed else 2 ** (d + 1)
        for j in range(n):
            v = 10.0 ** (d - 6) * (0.1 + 0.9 * (j + 0.5) / n)
            values.append(v)
            if signed:
                values.append(-v)
    q = np.array(sorted(values), dtype=np.float64).astype(np.float32)
    if q.shape != (256,) or not np.all(np.diff(q) > 0):
        raise RuntimeError("dynamic map: expected 256 distinct sorted float32 values")
    return q


def thresholds(qmap: np.ndarray) -> np.ndarray:
    """t_j = midpoint of qmap[j] and qmap[j+1], exact in double, rounded to float32.
    The code of y is the number of t_j <= y (a tie goes to the upper code)."""
    q = qmap.astype(np.float64)
    return ((q[:-1] + q[1:]) / 2).astype(np.float32)


def encode_table(qmap: np.ndarray) -> np.ndarray:
    """int32[2 * BUCKETS] for rp8_encode: entry = c << 17 | t, see adam8bit.c."""
    mid = thresholds(qmap)
    if not np.all(np.diff(mid) > 0):
        raise RuntimeError("thresholds not strictly increasing")
    keys = np.arange(BUCKET_LO, BUCKET_HI + 1, dtype=np.uint32)
    table = np.empty(2 * BUCKETS, dtype=np.int64)
    for sign in (0, 1):
        top = (keys | (sign << 15)) << 16
        # the bucket's lowest and highest values: for negatives the largest magnitude is lowest
        lo_bits, hi_bits = (top, top | 0xFFFF) if sign == 0 else (top | 0xFFFF, top)
        lo_val, hi_val = lo_bits.view(np.float32), hi_bits.view(np.float32)
        c = np.searchsorted(mid, lo_val, side="right")
        count = np.searchsorted(mid, hi_val, side="right") - c
        if count.max() > 1:
            raise RuntimeError("a bucket holds two thresholds: the table needs more mantissa bits")
        t = np.full(BUCKETS, NO_THRESHOLD, dtype=np.int64)
        has = count == 1
        tb = mid[np.minimum(c, 254)].view(np.uint32).astype(np.int64)
        if np.any((tb[has] >> 16) != top[has] >> 16):
            raise RuntimeError("threshold outside its bucket")
        low = tb & 0xFFFF if sign == 0 else 0xFFFF - (tb & 0xFFFF)  # value order within the bucket
        t[has] = low[has]
        table[sign * BUCKETS : (sign + 1) * BUCKETS] = (c << 17) | t
        # clamped inputs: |y| < 2**-23 goes to bucket 0, |y| > 1 (and NaN) to the top bucket
        zero = np.float32(-0.0 if sign else 0.0)
        if count[0] or c[0] != np.searchsorted(mid, zero, side="right"):
            raise RuntimeError("a threshold lies below the lowest bucket")
        if count[-1] or c[-1] != (255 if sign == 0 else 0):
            raise RuntimeError("a threshold lies above the highest bucket")
    return table.astype(np.int32)


# ---- NumPy reference of the same quantization --------------------------------

FLT_MIN = np.float32(2.0**-126)


def ref_quantize(x: np.ndarray, block: int, qmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales as the docs of adam8bit.c define them (finite x)."""
    x = np.asarray(x, dtype=np.float32)
    mid = thresholds(qmap)
    nb = -(-x.size // block)
    codes = np.empty(x.size, dtype=np.uint8)
    scales = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        blk = x[b * block : (b + 1) * block]
        a = np.abs(blk).max()
        if not np.isfinite(a):  # NaN or Inf in the block: scale NaN (its codes are not specified)
            inv, scales[b] = np.float32(0), np.float32(np.nan)
        elif a >= FLT_MIN:
            inv, scales[b] = np.float32(1) / a, a
        else:
            inv, scales[b] = np.float32(0), np.float32(0)
        y = (blk * inv).astype(np.float32)
        codes[b * block : b * block + blk.size] = np.searchsorted(mid, y, side="right")
    return codes, scales


def ref_dequantize(codes: np.ndarray, scales: np.ndarray, block: int, qmap: np.ndarray) -> np.ndarray:
    return qmap[codes] * np.repeat(scales, block)[: codes.size]


# ---- the arithmetic (fp8-style) format: NumPy reference ---------------------

M_BIAS = 0x3F8 - 127  # as RP8_M_BIAS
V_BIAS = 0x3F8 - 255


def fp8_values(signed: bool) -> np.ndarray:
    """The value of every code (index = code)."""
    c = np.arange(256, dtype=np.uint32)
    if signed:
        mag = np.where(c & 0x7F, ((c & 0x7F) + M_BIAS) << 20, 0).astype(np.uint32)
        return (mag | ((c & 0x80) << 24)).astype(np.uint32).view(np.float32)
    return np.where(c, (c + V_BIAS) << 20, 0).astype(np.uint32).view(np.float32)


def ref_fp8_codes(y: np.ndarray, signed: bool) -> np.ndarray:
    u = np.asarray(y, np.float32).view(np.uint32).astype(np.int64)
    a = u & 0x7FFFFFFF
    bias, cmax = (M_BIAS, 127) if signed else (V_BIAS, 255)
    c = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - bias
    below = (a >= (((1 + bias) << 20) - (1 << 23))).astype(np.int64)
    c = np.where(c < 1, below, np.minimum(c, cmax))
    if signed:
        c |= (u >> 24) & 0x80
    return c.astype(np.uint8)


def ref_fp8_quantize(x: np.ndarray, block: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    nb = -(-x.size // block)
    codes = np.empty(x.size, dtype=np.uint8)
    scales = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        blk = x[b * block : (b + 1) * block]
        a = np.abs(blk).max()
        if not np.isfinite(a):
            inv, scales[b] = np.float32(0), np.float32(np.nan)
        elif a >= FLT_MIN:
            inv, scales[b] = np.float32(1) / a, a
        else:
            inv, scales[b] = np.float32(0), np.float32(0)
        codes[b * block : b * block + blk.size] = ref_fp8_codes((blk * inv).astype(np.float32), signed)
    return codes, scales


# ---- build and bindings ----------------------------------------------------

DRIVER = r"""
#include "adam8bit.c"
#include <omp.h>

void h_quantize(const float *x, int64_t numel, int64_t block, uint8_t *codes, float *scales,
                const int32_t *enc, int kind) { rp8_quantize(x, numel, block, codes, scales, enc, kind); }
void h_dequantize(const uint8_t *codes, const float *scales, int64_t numel, int64_t block,
                  const float *qmap, int kind, float *out) { rp8_dequantize(codes, scales, numel, block, qmap, kind, out); }

/* A stand-in for the engine's scheduler: threads take chunks of
   blocks_per_chunk blocks from a shared counter. */
void h_adam8bit_step(int threads, int64_t numel, int64_t block, int64_t blocks_per_chunk,
                     float *p, const float *g, uint8_t *mc, float *ms, uint8_t *vc, float *vs,
                     const rp8_consts *k, const rp8_maps *maps, int fmt)
{
    const int64_t nblocks = (numel + block - 1) / block;
    const int64_t nchunks = (nblocks + blocks_per_chunk - 1) / blocks_per_chunk;
    int64_t next = 0;
#pragma omp parallel num_threads(threads)
    for (;;) {
        const int64_t c = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
        if (c >= nchunks) break;
        adam8bit_span(c * blocks_per_chunk, blocks_per_chunk, numel, block, p, g, mc, ms, vc, vs, k, maps, fmt);
    }
}

void h_adam_bf16_step(int threads, int64_t numel, int64_t chunk, uint16_t *p, uint16_t *g,
                      uint16_t *m, uint16_t *v, const rp8_consts *k, uint64_t seed, uint64_t step,
                      int sr)
{
    const uint64_t key = rp_sr_key(seed, step);
    const int64_t nchunks = (numel + chunk - 1) / chunk;
    int64_t next = 0;
#pragma omp parallel num_threads(threads)
    for (;;) {
        const int64_t c = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
        if (c >= nchunks) break;
        const int64_t b = c * chunk, n = numel - b < chunk ? numel - b : chunk;
        adam_bf16_sr_span(b, n, p, g, m, v, k, key, sr);
    }
}

/* fp32 -> bf16 with SR for elements [first, first+n) of a tensor */
void h_sr_round(const float *x, int64_t first, int64_t n, uint64_t seed, uint64_t step, uint16_t *out)
{
    const uint64_t key = rp_sr_key(seed, step);
    for (int64_t j = 0; j < n; j++) out[j] = rp_bf16_sr(x[j], rp_sr_bits(key, (uint64_t)(first + j)));
}
"""


class Consts(ctypes.Structure):
    _fields_ = [
        ("neg_step_size", ctypes.c_float),
        ("bias_correction2_sqrt", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("sq_coeff", ctypes.c_float),
        ("lerp_coeff", ctypes.c_float),
        ("lerp_from_exp_avg", ctypes.c_int32),
        ("weight_decay", ctypes.c_float),
        ("decay_factor", ctypes.c_float),
        ("maximize", ctypes.c_int32),
        ("coupled_decay", ctypes.c_int32),
        ("decoupled_decay", ctypes.c_int32),
    ]


class Maps(ctypes.Structure):
    _fields_ = [("m_qmap", ctypes.c_void_p), ("m_enc", ctypes.c_void_p),
                ("v_qmap", ctypes.c_void_p), ("v_enc", ctypes.c_void_p)]


def f32(x: float) -> float:
    return float(np.float32(x))


def make_consts(lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                decoupled: bool, maximize: bool = False) -> Consts:
    """As adam.c's consts_for_group and rp_adam_step compute them (double, then float)."""
    beta1, beta2 = betas
    w = np.float32(1.0 - beta1)
    lerp_from = abs(w) < 0.5
    k = Consts()
    k.lerp_from_exp_avg = int(lerp_from)
    k.lerp_coeff = float(w if lerp_from else w - np.float32(1.0))
    k.beta2, k.sq_coeff, k.eps = f32(beta2), f32(1.0 - beta2), f32(eps)
    k.maximize = int(maximize)
    k.coupled_decay = int(weight_decay != 0 and not decoupled)
    k.decoupled_decay = int(weight_decay != 0 and decoupled)
    k.weight_decay = f32(weight_decay)
    k.decay_factor = f32(1.0 - lr * weight_decay)  # adam.c fuses this in double: same float here
    k.neg_step_size = f32(-(lr / (1.0 - beta1**step)))
    k.bias_correction2_sqrt = f32(math.sqrt(1.0 - beta2**step))
    return k


def build(workdir: str) -> ctypes.CDLL:
    src = Path(workdir) / "lowmem_driver.c"
    src.write_text(DRIVER)
    so = Path(workdir) / "lowmem.so"
    cmd = ["gcc", *CFLAGS, "-fPIC", "-shared", f"-I{KERNELS}", f"-I{HERE}", str(src), "-o", str(so), "-lm"]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    i64, vp, i32, u64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64
    lib.h_quantize.argtypes = [vp, i64, i64, vp, vp, vp, i32]
    lib.h_dequantize.argtypes = [vp, vp, i64, i64, vp, i32, vp]
    lib.h_adam8bit_step.argtypes = [i32, i64, i64, i64, vp, vp, vp, vp, vp, vp,
                                    ctypes.POINTER(Consts), ctypes.POINTER(Maps), i32]
    lib.h_adam_bf16_step.argtypes = [i32, i64, i64, vp, vp, vp, vp, ctypes.POINTER(Consts), u64, u64, i32]
    lib.h_sr_round.argtypes = [vp, i64, i64, u64, u64, vp]
    return lib


def vec_report(workdir: str) -> str:
    """gcc -fopt-info-vec lines for the kernel file (which loops vectorized)."""
    src = Path(workdir) / "lowmem_driver.c"
    r = subprocess.run(["gcc", *CFLAGS, "-fPIC", "-c", f"-I{KERNELS}", f"-I{HERE}", str(src), "-o", os.devnull,
                        "-fopt-info-vec-optimized"], capture_output=True, text=True, check=True)
    return "\n".join(line for line in r.stderr.splitlines() if "adam8bit.c" in line or "stochastic_round.h" in line)


# ---- torch-side state and step --------------------------------------------------


class Tables:
    def __init__(self) -> None:
        self.m_qmap = torch.from_numpy(dynamic_map(True))
        self.v_qmap = torch.from_numpy(dynamic_map(False))
        self.m_enc = torch.from_numpy(encode_table(self.m_qmap.numpy()))
        self.v_enc = torch.from_numpy(encode_table(self.v_qmap.numpy()))
        self.maps = Maps(self.m_qmap.data_ptr(), self.m_enc.data_ptr(),
                         self.v_qmap.data_ptr(), self.v_enc.data_ptr())


class State8:
    """codes uint8[numel] and scales float32[ceil(numel/B)] per moment."""

    def __init__(self, numel: int, block: int, fmt: int = 0) -> None:
        nb = -(-numel // block)
        self.block = block
        self.fmt = fmt  # 0: dynamic map (tables), 1: arithmetic fp8-style
        self.mc = torch.zeros(numel, dtype=torch.uint8)
        self.vc = torch.zeros(numel, dtype=torch.uint8)
        self.ms = torch.zeros(nb, dtype=torch.float32)
        self.vs = torch.zeros(nb, dtype=torch.float32)
        self.step = 0


def step8(lib, tables: Tables, p: torch.Tensor, g: torch.Tensor, st: State8, lr: float,
          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True, threads=1,
          blocks_per_chunk=64) -> None:
    st.step += 1
    k = make_consts(lr, betas, eps, weight_decay, st.step, decoupled)
    lib.h_adam8bit_step(threads, p.numel(), st.block, blocks_per_chunk, p.data_ptr(), g.data_ptr(),
                        st.mc.data_ptr(), st.ms.data_ptr(), st.vc.data_ptr(), st.vs.data_ptr(),
                        ctypes.byref(k), ctypes.byref(tables.maps), st.fmt)


def step_bf16(lib, p, g, m, v, step: int, lr: float, seed: int, sr: bool, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, threads=1, chunk=16384) -> None:
    k = make_consts(lr, betas, eps, weight_decay, step, True)
    lib.h_adam_bf16_step(threads, p.numel(), chunk, p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                         ctypes.byref(k), seed, step, int(sr))


# ---- checks ----------------------------------------------------------------

RESULTS: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    line = f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else "")
    RESULTS.append(line)
    print(line, flush=True)


def c_quantize(lib, x: np.ndarray, block: int, enc, kind: int = 0):
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.empty(x.size, np.uint8)
    scales = np.empty(-(-x.size // block), np.float32)
    lib.h_quantize(x.ctypes.data, x.size, block, codes.ctypes.data, scales.ctypes.data,
                   None if enc is None else enc.ctypes.data, kind)
    return codes, scales


def c_dequantize(lib, codes, scales, block, qmap, kind: int = 0):
    out = np.empty(codes.size, np.float32)
    lib.h_dequantize(codes.ctypes.data, scales.ctypes.data, codes.size, block,
                     None if qmap is None else qmap.ctypes.data, kind, out.ctypes.data)
    return out


def check_quantize(lib) -> None:
    rng = np.random.default_rng(0)
    for signed in (True, False):
        q = dynamic_map(signed)
        enc = encode_table(q)
        name = "signed" if signed else "unsigned"
        # exhaustive over every float32 in [-1, 1] would be 2**31 values; instead every
        # threshold, its two neighbours, every code value, and dense random data
        mid = thresholds(q)
        probes = [mid, np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2)), q,
                  np.float32([0.0, -0.0, 1.0, -1.0, 2.0**-24, -(2.0**-24), 2.0**-23, 1e-30])]
        y = np.concatenate(probes).astype(np.float32)
        if not signed:
            y = np.abs(y)
        # one block with absmax exactly 1, so that x/absmax is y itself
        x = np.concatenate([y, np.float32([1.0])])
        codes, _ = c_quantize(lib, x, x.size + 16 - x.size % 16, enc)
        want = np.searchsorted(mid, x, side="right")
        check(f"{name} map: codes at every threshold, its neighbours and every code value", np.array_equal(codes, want),
              f"{int((codes != want).sum())} mismatches of {x.size}")
        for block in (256, 64, 4096):
            data = [rng.standard_normal(100_003).astype(np.float32) * np.float32(10.0) ** rng.integers(-8, 3, 100_003).astype(np.float32)]
            data.append(np.zeros(3 * block + 5, np.float32))  # all-zero blocks and a partial one
            blk = rng.standard_normal(block).astype(np.float32)
            blk[::3] = 0
            data.append(blk)
            data.append(np.full(block, 1e-40, np.float32))  # subnormal absmax: flushed to zero
            data.append(np.float32(rng.standard_normal(block) * 1e37))  # huge values
            x = np.concatenate(data)
            if not signed:
                x = np.abs(x) if rng.random() < 2 else x
            codes, scales = c_quantize(lib, x, block, enc)
            rc, rs = ref_quantize(x, block, q)
            check(f"{name} B={block}: codes and scales bit-exact vs NumPy reference ({x.size} values)",
                  np.array_equal(codes, rc) and np.array_equal(scales.view(np.uint32), rs.view(np.uint32)),
                  f"{int((codes != rc).sum())} code mismatches")
            deq = c_dequantize(lib, codes, scales, block, q)
            check(f"{name} B={block}: dequantize == qmap[code]*scale, no NaN", np.array_equal(deq, ref_dequantize(rc, rs, block, q))
                  and not np.isnan(deq).any())
            # error bound: half the largest gap of the map, or (signed) the distance
            # from -1 to the lowest code, relative to the block's absmax
            gap = max(np.diff(q.astype(np.float64)).max() / 2, 1.0 + float(q[0]))
            a = np.repeat(rs.astype(np.float64), block)[: x.size]
            finite_blocks = a > 0
            err = np.abs(deq.astype(np.float64) - x)[finite_blocks] / a[finite_blocks]
            check(f"{name} B={block}: |error| <= half the largest code gap ({gap:.4g}) x absmax (+ fp32 rounding)", err.max() <= gap + 2.0**-22,
                  f"max {err.max():.4g}")
        # non-finite behaviour (documented in adam8bit.c): the block dequantizes to NaN
        for bad in (np.nan, np.inf, -np.inf):
            x = rng.standard_normal(512).astype(np.float32)
            x[300] = bad
            codes, scales = c_quantize(lib, x, 256, enc)
            deq = c_dequantize(lib, codes, scales, 256, q)
            ok = np.isnan(scales[1]) and np.isnan(deq[256:]).all() and np.array_equal(deq[:256], ref_dequantize(*ref_quantize(x[:256], 256, q), 256, q))
            check(f"{name}: a {bad} poisons its block only (scale NaN, all NaN)", bool(ok))
    # the arithmetic format: bit-exact vs its reference, and nearest-code property
    for signed in (True, False):
        kind = 1 if signed else 2
        name = "fp8 signed" if signed else "fp8 unsigned"
        vals = fp8_values(signed)
        for block in (256, 64):
            x = np.concatenate([rng.standard_normal(50_001).astype(np.float32) * np.float32(10.0) ** rng.integers(-12, 3, 50_001).astype(np.float32),
                                np.zeros(block + 3, np.float32), np.full(block, 1e-40, np.float32)])
            if not signed:
                x = np.abs(x)
            codes, scales = c_quantize(lib, x, block, None, kind)
            rc, rs = ref_fp8_quantize(x, block, signed)
            check(f"{name} B={block}: codes and scales bit-exact vs NumPy reference", np.array_equal(codes, rc)
                  and np.array_equal(scales.view(np.uint32), rs.view(np.uint32)), f"{int((codes != rc).sum())} mismatches")
            deq = c_dequantize(lib, codes, scales, block, None, kind)
            check(f"{name} B={block}: dequantize == value[code]*scale, no NaN",
                  np.array_equal(deq, vals[codes] * np.repeat(scales, block)[: x.size]) and not np.isnan(deq).any())
        # nearest: every y in [-1, 1] gets a code no farther than any other code
        y = np.concatenate([rng.uniform(-1, 1, 200_000), np.sign(rng.standard_normal(200_000)) * 2.0 ** rng.uniform(-40, 0, 200_000),
                            vals[np.isfinite(vals)]]).astype(np.float32)
        if not signed:
            y = np.abs(y)
        cy = ref_fp8_codes(y, signed)
        d = np.abs(vals[cy].astype(np.float64) - y)
        sv = np.sort(np.unique(vals.astype(np.float64)))
        pos = np.clip(np.searchsorted(sv, y), 1, sv.size - 1)
        dmin = np.minimum(np.abs(sv[pos] - y), np.abs(sv[pos - 1] - y))
        check(f"{name}: every code is a nearest one (ties excepted)", bool((d <= dmin).all()), f"{int((d > dmin).sum())} not nearest")
    # the signed map's extremes
    q = dynamic_map(True)
    check("signed map holds 0 and 1, min -0.99297", q[0] < -0.99 and 0.0 in q and q[-1] == 1.0, f"min {q[0]:.6f}")


def run_adam8(lib, tables, p0, grads, block, threads, blocks_per_chunk, lr=1e-3, wd=0.0, decoupled=True, fmt=0):
    p = p0.clone()
    st = State8(p.numel(), block, fmt)
    for g in grads:
        step8(lib, tables, p, g, st, lr, weight_decay=wd, decoupled=decoupled, threads=threads,
              blocks_per_chunk=blocks_per_chunk)
    return p, st


def check_adam8(lib, tables) -> None:
    torch.manual_seed(0)
    n = 256 * 1000 + 77  # partial last block
    p0 = torch.randn(n)
    grads = [torch.randn(n) * (0.1 + i) for i in range(5)]
    for fmt in (0, 1):
        check_adam8_fmt(lib, tables, p0, grads, fmt)


def check_adam8_fmt(lib, tables, p0, grads, fmt) -> None:
    tag = ("dynamic map", "fp8-style")[fmt]
    # thread/chunk independence
    outs = [run_adam8(lib, tables, p0, grads, 256, t, bpc, fmt=fmt) for t, bpc in ((1, 1000), (2, 1), (2, 7), (1, 3))]
    same = all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1].mc, outs[0][1].mc) and torch.equal(o[1].ms, outs[0][1].ms)
               and torch.equal(o[1].vc, outs[0][1].vc) and torch.equal(o[1].vs, outs[0][1].vs) for o in outs)
    check(f"8-bit step [{tag}]: bit-identical across 1/2 threads and chunkings of 1, 3, 7, 1000 blocks", same)
    # one step against fp32 math on the dequantized state (float64 reference, torch formula)
    p, st = run_adam8(lib, tables, p0, grads[:3], 256, 1, 64, fmt=fmt)
    if fmt == 0:
        qm, qv = tables.m_qmap.numpy(), tables.v_qmap.numpy()
    else:
        qm, qv = fp8_values(True), fp8_values(False)
    m = torch.from_numpy(ref_dequantize(st.mc.numpy(), st.ms.numpy(), 256, qm)).double()
    v = torch.from_numpy(ref_dequantize(st.vc.numpy(), st.vs.numpy(), 256, qv)).double()
    g = grads[3].double()
    p_before = p.double().clone()
    step8(lib, tables, p, grads[3], st, 1e-3)
    m1 = m + 0.1 * (g - m)
    v1 = 0.999 * v + 0.001 * g * g
    t = 4
    want = p_before - 1e-3 / (1 - 0.9**t) * m1 / (v1.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8)
    err = (p.double() - want).abs().max().item()
    check(f"8-bit step [{tag}] == fp32 Adam on the dequantized moments (vs float64)", err < 1e-6, f"max |dp| {err:.3g}")
    # requantized moments are the quantization of the updated ones
    rc, rs = ref_quantize(m1.float().numpy(), 256, qm) if fmt == 0 else ref_fp8_quantize(m1.float().numpy(), 256, True)
    agree = (st.mc.numpy() == rc).mean()
    check(f"8-bit step [{tag}]: new exp_avg codes == quantize(updated exp_avg) (fp32 vs float64 rounding aside)", agree > 0.999,
          f"{agree:.5f} agree")
    # all-zero gradients and params: no NaN, scales 0
    p = torch.zeros(1000)
    st = State8(1000, 256, fmt)
    step8(lib, tables, p, torch.zeros(1000), st, 1e-3)
    check(f"8-bit step [{tag}] on zeros: p stays 0, scales 0, no NaN", bool((p == 0).all() and (st.ms == 0).all() and (st.vs == 0).all()))
    # Adam (coupled decay) and maximize run too: compare with torch on a first step from zero
    # state, where the 8-bit state holds exactly 0 before the update
    for decoupled, wd in ((False, 0.1), (True, 0.1)):
        p = torch.randn(4096)
        g = torch.randn(4096)
        ref = p.clone().requires_grad_(True)
        opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)([ref], lr=1e-2, weight_decay=wd)
        ref.grad = g.clone()
        opt.step()
        st = State8(4096, 256, fmt)
        step8(lib, tables, p, g, st, 1e-2, weight_decay=wd, decoupled=decoupled)
        err = (p - ref.detach()).abs().max().item()
        check(f"first 8-bit step [{tag}] == torch {'AdamW' if decoupled else 'Adam'}(wd=0.1) step (exact moments)", err < 1e-6, f"{err:.3g}")


# ---- training quality ----------------------------------------------------------


def teacher_student(seed: int = 0, d_in: int = 64, hidden: int = 256, d_out: int = 16, n: int = 4096):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                  torch.nn.Tanh(), torch.nn.Linear(hidden, d_out))
    for prm in teacher.parameters():
        prm.data = torch.randn(prm.shape, generator=g) / math.sqrt(prm.shape[-1])
    x = torch.randn(n, d_in, generator=g)
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(seed + 1)
    student = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                  torch.nn.Tanh(), torch.nn.Linear(hidden, d_out))
    return student, x, y


def train_8bit(lib, tables, steps: int, lr: float, use_8bit: bool, min_8bit_size: int = 4096, fmt: int = 0):
    model, x, y = teacher_student()
    params = list(model.parameters())
    small = [p for p in params if not use_8bit or p.numel() < min_8bit_size]
    big = [p for p in params if use_8bit and p.numel() >= min_8bit_size]
    opt = torch.optim.AdamW(small, lr=lr, weight_decay=0.01) if small else None
    states = {id(p): State8(p.numel(), 256, fmt) for p in big}
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        model.zero_grad()
        loss.backward()
        if opt:
            opt.step()
        for p in big:
            step8(lib, tables, p.data, p.grad, states[id(p)], lr, weight_decay=0.01, decoupled=True)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def train_bf16(lib, steps: int, lr: float, mode: str):
    """mode: 'master' (fp32 master + fp32 moments, torch AdamW, bf16 model), 'sr', 'rne' (bf16 p/m/v, C step)."""
    model, x, y = teacher_student()
    model = model.to(torch.bfloat16)
    xb, yb = x.bfloat16(), y.bfloat16()
    params = list(model.parameters())
    if mode == "master":
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0)
    else:
        ms = [torch.zeros_like(p) for p in params]
        vs = [torch.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(5)
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        loss = torch.nn.functional.mse_loss(model(xb[idx]).float(), yb[idx].float())
        model.zero_grad()
        loss.backward()
        if mode == "master":
            for mp, p in zip(masters, params):
                mp.grad = p.grad.float()
            opt.step()
            with torch.no_grad():
                for mp, p in zip(masters, params):
                    p.copy_(mp)
        else:
            for i, p in enumerate(params):
                step_bf16(lib, p.data, p.grad, ms[i], vs[i], step, lr, seed=1000 + i, sr=mode == "sr")
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(xb).float(), yb.float()).item()


def check_quality(lib, tables, steps: int) -> None:
    t0 = time.perf_counter()
    base = train_8bit(lib, tables, steps, 1e-3, use_8bit=False)
    for fmt, tag in ((0, "dynamic map"), (1, "fp8-style")):
        q8 = train_8bit(lib, tables, steps, 1e-3, use_8bit=True, fmt=fmt)
        check(f"8-bit AdamW [{tag}] teacher-student ({steps} steps, lr 1e-3): final loss within 5% of fp32 AdamW",
              q8 <= base * 1.05, f"fp32 {base:.5g}, 8-bit {q8:.5g}, ratio {q8 / base:.4f}, {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    master = train_bf16(lib, steps, 1e-4, "master")
    sr = train_bf16(lib, steps, 1e-4, "sr")
    rne = train_bf16(lib, steps, 1e-4, "rne")
    check(f"bf16 SR teacher-student ({steps} steps, lr 1e-4): within 5% of fp32 master weights", sr <= master * 1.05,
          f"master {master:.5g}, SR {sr:.5g} ({sr / master:.4f}x), round-to-nearest {rne:.5g} ({rne / master:.3f}x), "
          f"{time.perf_counter() - t0:.0f}s")


def check_sr(lib) -> None:
    rng = np.random.default_rng(1)
    # unbiasedness: one value rounded under many (step) keys; and many values, one key
    vals = np.float32([1.0 + 2.0**-10, -3.14159, 1e-3 + 1e-7, 7.0e-39, 123456.7])
    for v in vals:
        xs = np.full(1 << 16, v, np.float32)
        means = []
        for step in range(8):
            out = np.empty(xs.size, np.uint16)
            lib.h_sr_round(xs.ctypes.data, 0, xs.size, 42, step, out.ctypes.data)
            means.append((out.astype(np.uint32) << 16).view(np.float32).astype(np.float64).mean())
        mean = np.mean(means)
        bits = np.float32(v).view(np.uint32)
        lo = (bits & np.uint32(0xFFFF0000)).view(np.float32)  # the two bf16 neighbours
        hi = ((bits | np.uint32(0xFFFF)) + np.uint32(1)).view(np.float32)
        ulp = abs(float(hi) - float(lo))
        p = (bits & 0xFFFF) / 65536  # probability of rounding away from zero
        sd = ulp * math.sqrt(p * (1 - p) / (8 << 16))
        check(f"SR unbiased for {v:.7g}: mean of 2^19 roundings", abs(mean - float(v)) <= 5 * sd + 1e-30,
              f"mean-x {mean - float(v):.3g}, 5 sigma {5 * sd:.3g}")
    # specials
    special = np.float32([np.nan, -np.nan, np.inf, -np.inf, 3.3895314e38, 0.0, -0.0])
    nan_low = np.uint32([0x7F800001, 0xFF800001]).view(np.float32)
    xs = np.concatenate([special, nan_low])
    outs = []
    for step in range(64):
        out = np.empty(xs.size, np.uint16)
        lib.h_sr_round(xs.ctypes.data, 0, xs.size, 7, step, out.ctypes.data)
        outs.append(out)
    o = (np.stack(outs).astype(np.uint32) << 16).view(np.float32)
    ok = (np.isnan(o[:, [0, 1, 7, 8]]).all() and (o[:, 2] == np.inf).all() and (o[:, 3] == -np.inf).all()
          and (o[:, 5] == 0).all() and (o[:, 6] == 0).all() and np.signbit(o[:, 6]).all())
    check("SR specials: NaN stays NaN (also 0x7F800001), +-Inf stays, +-0 stays", bool(ok))
    big = o[:, 4]
    check("SR near bf16 max: rounds to max or Inf (no NaN), as torchao", bool(np.isin(big, [np.float32(3.3895314e38), np.inf]).all()),
          f"{int(np.isinf(big).sum())}/64 went to Inf")
    # chunk independence by construction: round a slice starting at 1000 vs the whole
    x = rng.standard_normal(5000).astype(np.float32)
    whole = np.empty(5000, np.uint16)
    lib.h_sr_round(x.ctypes.data, 0, 5000, 3, 9, whole.ctypes.data)
    part = np.empty(4000, np.uint16)
    lib.h_sr_round(x[1000:].ctypes.data, 1000, 4000, 3, 9, part.ctypes.data)
    check("SR: bits depend on the element index only, not on where a span starts", np.array_equal(whole[1000:], part))
    # the SR bf16 step across threads/chunks
    torch.manual_seed(3)
    n = 100_003
    base = [torch.randn(n).bfloat16() for _ in range(2)] + [torch.zeros(n, dtype=torch.bfloat16)] * 2
    res = []
    for threads, chunk in ((1, 1 << 20), (2, 16384), (2, 96), (1, 4096)):
        p, g, m, v = (t.clone() for t in base)
        for step in range(1, 4):
            step_bf16(lib, p, g, m, v, step, 1e-4, seed=11, sr=True, threads=threads, chunk=chunk)
        res.append((p, m, v))
    check("SR bf16 step: bit-identical across 1/2 threads and chunk sizes 96..1M",
          all(all(torch.equal(a, b) for a, b in zip(r, res[0])) for r in res))
    # the SR step's p is always one of the two bf16 neighbours of the fp32 result of the RNE step
    p1, g, m1, v1 = (t.clone() for t in base)
    p2, m2, v2 = p1.clone(), m1.clone(), v1.clone()
    step_bf16(lib, p1, g, m1, v1, 1, 1e-2, seed=0, sr=False)
    step_bf16(lib, p2, g, m2, v2, 1, 1e-2, seed=0, sr=True)
    d = (p1.view(torch.int16).int() - p2.view(torch.int16).int()).abs()
    check("SR step: moments equal to the RNE step's, p within one bf16 ulp of it", torch.equal(m1, m2) and torch.equal(v1, v2)
          and int(d.max()) <= 1, f"{(d > 0).float().mean().item():.3f} of p differ")


# ---- timings ------------------------------------------------------------------


def bench(lib, tables, n: int, reps: int) -> None:
    import roundpipe.optim as ro

    print(f"\ntimings: {n / 1e6:.0f}M elements, min of {reps} interleaved runs", flush=True)
    torch.manual_seed(0)
    res: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        res.setdefault(name, []).append(time.perf_counter() - t0)

    # fp32 AdamW (roundpipe) vs 8-bit span driver
    p32 = torch.randn(n)
    p32.grad = torch.randn(n)
    opt = ro.AdamW([p32], lr=1e-4)
    p8 = torch.randn(n)
    g8 = torch.randn(n)
    sts = [State8(n, 256, 0), State8(n, 256, 1)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        opt.step()
        for st in sts:
            step8(lib, tables, p8, g8, st, 1e-4, threads=threads)  # warm up, page in
        for _ in range(reps):
            timed(f"fp32 AdamW roundpipe, {threads}t", opt.step)
            for st in sts:
                timed(f"8-bit AdamW fmt{st.fmt}, {threads}t", lambda: step8(lib, tables, p8, g8, st, 1e-4, threads=threads))
    del p32, opt, p8, g8, sts
    # bf16: SR vs RNE store, same loop
    pb, gb = torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    mb, vb = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for sr in (False, True):
            step_bf16(lib, pb, gb, mb, vb, 1, 1e-4, 0, sr, threads=threads)
        for i in range(reps):
            for sr in (False, True):
                timed(f"bf16 AdamW {'SR ' if sr else 'RNE'}, {threads}t",
                      lambda: step_bf16(lib, pb, gb, mb, vb, 2 + i, 1e-4, 0, sr, threads=threads))
    pr = pb.clone()
    pr.grad = gb.clone()
    optb = ro.AdamW([pr], lr=1e-4)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        optb.step()
        for _ in range(reps):
            timed(f"bf16 AdamW roundpipe, {threads}t", optb.step)
    best = {k: min(v) for k, v in res.items()}
    for k, v in best.items():
        print(f"  {k:32s} {v * 1e3:8.1f} ms", flush=True)
    for t in (1, 2):
        for f in (0, 1):
            print(f"  ratio 8-bit fmt{f} / fp32, {t}t: {best[f'8-bit AdamW fmt{f}, {t}t'] / best[f'fp32 AdamW roundpipe, {t}t']:.3f}")
        print(f"  ratio SR / RNE bf16, {t}t: {best[f'bf16 AdamW SR , {t}t'] / best[f'bf16 AdamW RNE, {t}t']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true", help="run the timings too")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--numel", type=int, default=64 << 20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000, help="training steps of the quality checks")
    ap.add_argument("--vec", action="store_true", help="print gcc's vectorization report for the kernel")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)
        if args.vec:
            print(vec_report(tmp))
        tables = Tables()
        torch.set_num_threads(1)
        if not args.bench_only:
            check_quantize(lib)
            check_adam8(lib, tables)
            check_sr(lib)
            check_quality(lib, tables, args.steps)
            fails = [r for r in RESULTS if r.startswith("FAIL")]
            print(f"\n{len(RESULTS) - len(fails)} passed, {len(fails)} failed")
        if args.bench or args.bench_only:
            bench(lib, tables, args.numel, args.reps)
    return 1 if any(r.startswith("FAIL") for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
