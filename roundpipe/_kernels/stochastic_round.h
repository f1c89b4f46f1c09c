/* Stochastic rounding fp32 -> bf16 with counter-based random bits.
 *
 * Header-only (static inline), for the bf16-param step without a master copy
 * (issue 12, item 3: bf16_stochastic_round=True).
 *
 * Random bits. The 16 bits used for element i of a tensor at a given step are
 * a pure function of (seed, step, i):
 *   key  = rp_sr_key(seed, step)    once per tensor and step (splitmix64, scalar)
 *   bits = rp_sr_bits(key, i)       per element: one 32-bit multiply (rp_sr_hash)
 * `step` is the int64 `sr_step` state, counted by the step itself, not Adam's
 * float32 `step`, which stops counting at 2^24 (every later step would draw
 * the same bits). No state is carried from element to element, so the result
 * does not depend on the thread count, the chunking or the order of
 * evaluation: every element gets the same bits whichever span computes it. A
 * resumed run draws the same bits as long as sr_seed and sr_step are restored
 * (both live in the optimizer state).
 * Give each tensor its own seed (or mix a tensor id into it): with one seed for
 * all, element i of every tensor rounds with the same bits at a step.
 *
 * The per-element bits: x = (index ^ k) * 0x9E3779B1 (mod 2^32), its top 16
 * bits; k is 32 bits of the step's splitmix64 key. Unbiasedness needs only
 * that one element's bits are uniform over steps: k is (pseudo-)uniform per
 * step, so index ^ k is, and a multiply by an odd constant is a bijection.
 * Within a step, neighbouring elements get top bits of a Weyl-like sequence,
 * spread evenly over [0, 2^16) rather than independent: their rounding errors
 * cancel at least as well as independent ones. One 32-bit multiply per
 * element, on 32-bit lanes (vpmulld): a two-multiply avalanche hash
 * (lowbias32) measured 1.15x (min) / 1.44x (median) the round-to-nearest
 * step, this one 0.99x / 1.09x (16M elements, 1 thread, loaded machine).
 * The 64-bit index is folded to 32 bits as lo ^ hi * 0x9E3779B1, once per
 * span: elements whose indices differ only at or above bit 32 can share
 * bits, a correlation between elements 4 G apart that biases nothing.
 *
 * Rounding. bf16 is the upper half of an fp32. Adding 16 uniform random bits
 * to the lower half and truncating rounds the magnitude up with probability
 * (lower half)/2^16 exactly, so E[result] = x for every finite x whose
 * round-up stays finite (sign-magnitude: negative values round away from zero
 * with that probability, so the value is unbiased too). This is torchao's
 * _fp32_to_bf16_sr (it compares rand < fraction; the same probability).
 * Special values:
 *  - NaN stays NaN: the high half is kept with the quiet bit set. (torchao
 *    truncates, so a NaN whose payload sits in the low 16 bits, e.g.
 *    0x7F800001, can become Inf there.)
 *  - +-Inf has a zero lower half: the carry never happens, it stays Inf.
 *  - Finite values above the largest bf16 (0x7F7F...) round up to Inf with
 *    the probability above, as in torchao (and as round-to-nearest does for
 *    values past the midpoint): no saturation.
 *  - Subnormals round like any other value (bf16 has fp32's exponent range).
 */
#ifndef ROUNDPIPE_STOCHASTIC_ROUND_H
#define ROUNDPIPE_STOCHASTIC_ROUND_H

#include <stdint.h>
#include <string.h>

/* splitmix64's output function: one key per (seed, step). Scalar, once per
   tensor and step, so its 64-bit multiplies cost nothing. */
static inline uint64_t rp_sr_key(uint64_t seed, uint64_t step)
{
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (step + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The per-element hash, on 32-bit lanes: x = the element index's low 32 bits,
   k = rp_sr_span_key(key, index >> 32). */
static inline __attribute__((always_inline)) uint32_t rp_sr_hash(uint32_t x, uint32_t k)
{
    return ((x ^ k) * 0x9E3779B1u) >> 16;
}

/* The 32-bit key for the elements whose index has high half hi: the 64-bit
   index folded as lo ^ hi * 0x9E3779B1 (see the file comment). Computed once
   per span (a span crossing a multiple of 2^32 is split there), so the loop
   runs on 32-bit lanes: a 64-bit index in the loop made GCC widen every lane
   to 64 bits. */
static inline uint32_t rp_sr_span_key(uint64_t key, uint32_t hi)
{
    return (uint32_t)key ^ (hi * 0x9E3779B1u);
}

/* 32 random bits for element i under key (scalar convenience). */
static inline uint32_t rp_sr_bits(uint64_t key, uint64_t i)
{
    return rp_sr_hash((uint32_t)i, rp_sr_span_key(key, (uint32_t)(i >> 32)));
}

/* fp32 -> bf16 bits, stochastically rounded with the low 16 bits of r. */
static inline __attribute__((always_inline)) uint16_t rp_bf16_sr(float x, uint32_t r)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t rounded = (u + (r & 0xFFFFu)) >> 16;
    /* NaN (exponent all ones, mantissa non-zero): keep the high half, quiet bit set.
       Both sides are computed and one is selected, so the loop stays branch-free. */
    const uint32_t nan = (u >> 16) | 0x0040u;
    const int is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (uint16_t)(is_nan ? nan : rounded);
}

#endif
