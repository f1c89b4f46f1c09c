/* roundpipe's 8-bit block codec: Adam's moments as one byte per element plus one
 * fp32 absmax per block (adam8bit.c; roundpipe/optim/adam8bit.py replicates it
 * bit for bit with torch ops, _encode/_decode there).
 *
 * ---- the format -------------------------------------------------------------
 * A code is the top bits of an IEEE fp16 number, so that decoding is a shift and
 * one vcvtph2ps (no table, no gather):
 *   exp_avg    (signed):   h = (c & 0x80) << 8 | (c & 0x7F) << 7
 *                          sign, fp16 exponent field 0..15, 3 mantissa bits;
 *                          value = fp16(h) * absmax, |value| in 2^-17 .. 1 of absmax
 *   exp_avg_sq (unsigned): h = c << 7
 *                          fp16 exponent field 0..30, 3 mantissa bits;
 *                          value = fp16(h) * (absmax * 2^-15), in 2^-32 .. 1 of absmax
 * Both keep 3 bits of relative precision over their range (fp16 subnormals fill
 * the bottom binades); exp_avg_sq's wider range is what sqrt() needs. K is the
 * value the absmax maps to: 1 for exp_avg, 2^15 for exp_avg_sq (powers of two,
 * so the stored absmax scales exactly).
 *
 * ---- the rounding rule (the torch fallback follows it step by step) ---------
 * For a block x[0..n) (n = block_size, the last block of a tensor may be shorter):
 *  1. absmax = max |x| taken on bit patterns: max over (bits(x) & 0x7FFFFFFF) as
 *     integers, which orders finite floats as their magnitudes and puts Inf and
 *     NaN above every finite value (vectorizes as an integer max). Stored as is.
 *  2. pre = 2^64 if absmax < 2^-96 else 1 (a tiny block: K / absmax would
 *     overflow fp32 for exp_avg_sq once absmax < 2^-113; the scaling is exact);
 *     R = absmax > 0 ? K / (absmax * pre) : 0, in fp32 (Inf and NaN absmax give
 *     0 and NaN: such a block decodes to non-finite values, see below).
 *  3. q = (x * pre) * R in fp32 (two roundings at most, the first exact).
 *  4. h = q rounded to fp16, to nearest even (vcvtps2ph, torch's .to(float16)).
 *  5. a = h & 0x7FFF; a = (a + 0x3F + ((a >> 7) & 1)) >> 7: its 10-bit mantissa
 *     rounded to 3 bits, to nearest even, on the integer bits (a carry moves
 *     into the exponent, as it should).
 *  6. exp_avg:    c = (a | ((h >> 8) & 0x80)) & 0xFF;
 *     exp_avg_sq: c = a & 0xFF, and c = max(c, 1) where x > 0, so that a
 *     non-zero exp_avg_sq never decodes to 0 (m / sqrt(v) would blow up: the
 *     zero-point problem of Li et al. 2023, "Memory Efficient Optimizers with
 *     4-bit States").
 * Decoding: y = fp16(h) * S in fp32 with S = absmax * pre * K^-1 (exact), then
 * y * 2^-64 for a tiny block (y * 1 otherwise: the same bits).
 * A block holding Inf or NaN gets absmax Inf or NaN and decodes to non-finite
 * values at the next step: its params are NaN already (fp32 Adam poisons the one
 * element; GradScaler skips such steps before they reach here).
 *
 * ---- why this format (issue 12's prototype, measured on the 2-core Zen 4 machine) --
 * bitsandbytes' dynamic map (a 256-entry table, the nearest code found by a lookup
 * per element) cost 3.6x the fp32 AdamW step: gathers, ~13 cycles per 16 lanes, two
 * per element per moment. An fp8-style code decoded with integer operations cost
 * 1.5x. A block absmax taken with float compares was slower than one on the bit
 * patterns as integers (which also orders NaN and Inf above every finite value).
 * Here decoding is a shift and vcvtph2ps, and encoding vcvtps2ph plus a few integer
 * operations; no table. Stages larger than one block (4096 or 16384 elements, so
 * that each loop streams longer) and software prefetch measured slower.
 *
 * ---- speed -------------------------------------------------------------------
 * With AVX-512 (F, BW, VL) 16 elements at a time: vpmovzxbw, a shift (a
 * vpternlog for the sign), vcvtph2ps and one multiply to decode; a multiply,
 * vcvtps2ph, five integer ops and vpmovwb to encode. GCC 12 vectorizes neither
 * fp16 conversion by itself, so these are intrinsics; elsewhere plain loops with
 * the same rounding (half_to_float / float_to_half in runner.h).
 */
#ifndef ROUNDPIPE_QUANT8_H
#define ROUNDPIPE_QUANT8_H

#include <stdint.h>
#include <string.h>

#include "runner.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RP_Q8_AVX512 1
#include <immintrin.h>
#endif

#define RP_Q8_K_SQ 32768.0f            /* K of exp_avg_sq: 2^15 */
#define RP_Q8_K_SQ_INV 3.0517578125e-05f /* 2^-15 */
#define RP_Q8_TINY 0x0F800000u          /* bits of 2^-96: blocks below it are pre-scaled */
#define RP_Q8_PRE 18446744073709551616.0f /* 2^64 */
#define RP_Q8_POST 5.42101086242752217e-20f /* 2^-64 */

/* A block's scalars, from its absmax (rule step 2 above); sq: exp_avg_sq's K, else exp_avg's. */
typedef struct {
    float pre;    /* x * pre before R: 1, or 2^64 for a tiny block          */
    float r;      /* K / (absmax * pre), 0 for an all-zero block            */
    float s;      /* decode: fp16(h) * s ...                                 */
    float post;   /* ... * post (1, or 2^-64 for a tiny block)               */
} rp_q8_block;

static inline rp_q8_block rp_q8_block_of(uint32_t absmax_bits, const int sq)
{
    const float k = sq ? RP_Q8_K_SQ : 1.0f, k_inv = sq ? RP_Q8_K_SQ_INV : 1.0f;
    rp_q8_block b;
    const float absmax = float_from_bits(absmax_bits);
    const int tiny = absmax_bits < RP_Q8_TINY;
    b.pre = tiny ? RP_Q8_PRE : 1.0f;
    b.post = tiny ? RP_Q8_POST : 1.0f;
    const float scaled = absmax * b.pre;
    b.r = absmax_bits != 0 ? k / scaled : 0.0f;
    b.s = scaled * k_inv;
    return b;
}

/* max over (bits(x[i]) & 0x7FFFFFFF) as integers: |x|'s bits, Inf and NaN on top. */
static inline uint32_t rp_q8_absmax_bits(const float *restrict x, int64_t n)
{
    const uint32_t *u = (const uint32_t *)x;
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = u[i] & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}

/* ---- one element, any CPU (the vector loops below give the same bits) ---------- */

static inline uint16_t rp_q8_round3(uint16_t h) /* rule step 5 */
{
    const uint32_t a = h & 0x7FFFu;
    return (uint16_t)((a + 0x3Fu + ((a >> 7) & 1u)) >> 7);
}

static inline uint8_t rp_q8_encode_signed1(float x, const rp_q8_block *b)
{
    const uint16_t h = float_to_half((x * b->pre) * b->r);
    return (uint8_t)(rp_q8_round3(h) | ((h >> 8) & 0x80u));
}

static inline uint8_t rp_q8_encode_unsigned1(float x, const rp_q8_block *b)
{
    const uint16_t h = float_to_half((x * b->pre) * b->r);
    const uint8_t c = (uint8_t)rp_q8_round3(h);
    return (x > 0.0f && c == 0) ? 1 : c;
}

static inline float rp_q8_decode_signed1(uint8_t c, const rp_q8_block *b)
{
    const uint16_t h = (uint16_t)(((c & 0x80u) << 8) | ((c & 0x7Fu) << 7));
    return (half_to_float(h) * b->s) * b->post;
}

static inline float rp_q8_decode_unsigned1(uint8_t c, const rp_q8_block *b)
{
    return (half_to_float((uint16_t)(c << 7)) * b->s) * b->post;
}

/* ---- a block --------------------------------------------------------------- */

#ifdef RP_Q8_AVX512
/* 16 codes decoded, for a block whose post is 1: fp16(h) * s. */
static inline __attribute__((always_inline)) __m512 rp_q8_decode16(const uint8_t *c, __m512 s, const int sq)
{
    __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)c));
    /* signed: (c + (c & 0x80)) << 7 moves the sign bit to bit 15 and the
       magnitude to bits 13..7: (c & 0x80) << 8 | (c & 0x7F) << 7 */
    if (!sq) w = _mm256_add_epi16(w, _mm256_and_si256(w, _mm256_set1_epi16(0x80)));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_slli_epi16(w, 7)), s);
}
#endif

/* x[0..n) decoded from codes c; sq: exp_avg_sq's unsigned code, else exp_avg's. */
static inline void rp_q8_decode(float *restrict x, const uint8_t *restrict c, int64_t n,
                                const rp_q8_block *b, const int sq)
{
    int64_t i = 0;
#ifdef RP_Q8_AVX512
    const __m512 s = _mm512_set1_ps(b->s);
    if (b->post == 1.0f)
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, rp_q8_decode16(c + i, s, sq));
#endif
    for (; i < n; i++) x[i] = sq ? rp_q8_decode_unsigned1(c[i], b) : rp_q8_decode_signed1(c[i], b);
}

#ifdef RP_Q8_AVX512
/* 16 codes of x[0..16) for a block whose pre is 1; r: its R (rule steps 3-6). */
static inline __attribute__((always_inline)) void rp_q8_encode16(uint8_t *c, const float *x, __m512 r, const int sq)
{
    const __m256i one = _mm256_set1_epi16(1);
    const __m512 xv = _mm512_loadu_ps(x);
    /* imm 0: round to nearest even */
    const __m256i h = _mm512_cvtps_ph(_mm512_mul_ps(xv, r), 0);
    const __m256i a = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi16(a, 7), one);
    __m256i q = _mm256_srli_epi16(_mm256_add_epi16(_mm256_add_epi16(a, _mm256_set1_epi16(0x3F)), lsb), 7);
    if (sq) /* max(code, 1) where x > 0 */
        q = _mm256_mask_max_epu16(q, _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_GT_OQ), q, one);
    else
        q = _mm256_or_si256(q, _mm256_and_si256(_mm256_srli_epi16(h, 8), _mm256_set1_epi16(0x80)));
    _mm_storeu_si128((__m128i *)c, _mm256_cvtepi16_epi8(q)); /* vpmovwb: the low byte */
}
#endif

/* codes c[0..n) for x; b from the block's absmax. */
static inline void rp_q8_encode(uint8_t *restrict c, const float *restrict x, int64_t n,
                                const rp_q8_block *b, const int sq)
{
    int64_t i = 0;
#ifdef RP_Q8_AVX512
    const __m512 r = _mm512_set1_ps(b->r);
    if (b->pre == 1.0f)
        for (; i + 16 <= n; i += 16) rp_q8_encode16(c + i, x + i, r, sq);
#endif
    for (; i < n; i++) c[i] = sq ? rp_q8_encode_unsigned1(x[i], b) : rp_q8_encode_signed1(x[i], b);
}

#endif /* ROUNDPIPE_QUANT8_H */
