/* roundpipe low-memory Adam cores: 8-bit block-wise moments, and bf16 params
 * stored with stochastic rounding (issue 12, items 2 and 3).
 *
 * Standalone numerics, no scheduler: the span functions below take whole
 * blocks (8-bit) or element ranges (SR) and are called by the engine's shared
 * chunk scheduler, one span per thread at a time. scripts/lowmem_harness.py
 * builds this file with a small OpenMP driver and checks it.
 *
 * Rules of this file (as adam.c):
 *  - Built with -O3 -march=native -fno-math-errno -ffp-contract=off. The
 *    Adam arithmetic is written in adam.c's order (fmaf() exactly where
 *    torch's fused kernel fuses), so a step on dequantized moments is the
 *    fp32 step torch would compute on those moments.
 *  - Plain C loops the compiler vectorizes; table lookups become gathers
 *    (vpgatherdd). Check with gcc -fopt-info-vec.
 *  - int64_t indices and sizes.
 *
 * ---- 8-bit moment format ---------------------------------------------------
 * A moment tensor of numel elements is stored as
 *    codes  uint8[numel]              one code per element
 *    scales float32[ceil(numel / B)]  one scale per block of B elements
 * B (block_size) is a multiple of 16, default 256: 1 + 4/256 = 1.016 bytes
 * per element per moment, 2.03 for exp_avg and exp_avg_sq together.
 * Element j of block b is value(codes[j]) * scales[b]. Two code formats, the
 * same layout, chosen per call (fmt): RP8_DYNAMIC, bitsandbytes' dynamic map
 * through tables (below), and RP8_FP8, an arithmetic fp8-style format (see
 * "the arithmetic format"). Measured on the 2-core Zen 4 development machine
 * (64M elements, 1 thread, loaded by other jobs, min of 7): fp32 AdamW
 * (roundpipe) 77 ms, RP8_DYNAMIC 279 ms (3.6x: two gathers per element per
 * moment), RP8_FP8 116 ms (1.5x). Both are compute-bound there; neither
 * meets issue 12's 0.7x. Quality on the harness's teacher-student MLP: both
 * end at or below fp32 AdamW's loss.
 * With RP8_DYNAMIC, exp_avg uses the signed dynamic map, exp_avg_sq the unsigned one (256
 * sorted float32 values in [-1, 1] or [0, 1], both containing 0 and 1;
 * construction in scripts/lowmem_harness.py, dynamic_map()).
 *
 * Quantize a block: scale = max |x| (the absmax), y = x * (1/scale) in fp32,
 * code = the number of thresholds t_j <= y, where t_j (j = 0..254) is the
 * midpoint of qmap[j] and qmap[j+1], computed exactly and rounded to float32.
 * That is the nearest code; a y exactly on a (rounded) midpoint takes the
 * upper code. scale 0 (an all-zero block): every code is the code of 0.0 and
 * the scale stays 0, so it dequantizes to exact zeros, no NaN. An absmax
 * below FLT_MIN (subnormal) is treated as 0: the block flushes to zero (its
 * reciprocal would overflow; values that small do not move an Adam step).
 * Non-finite values: the absmax is taken on bit patterns, where NaN and Inf
 * sort above every finite value, so a block holding one gets scale NaN and
 * dequantizes to NaN entirely at the next step. (fp32 Adam would poison that
 * element only; its param is NaN either way. GradScaler skips such steps
 * before they get here.)
 *
 * Finding the nearest code fast: a lookup by the float's bits. y's top 16
 * bits (sign, exponent, 7 mantissa bits: its bf16 truncation) name a bucket;
 * for |y| in [2^-23, 1] that is 2945 buckets per sign, and every bucket holds
 * at most one threshold (checked when the table is built). The table entry
 * holds the code of the bucket's lowest value (c) and the position of the
 * threshold inside the bucket (t, in y's low 16 bits, ordered by value;
 * 0x10000 when the bucket has none), packed as c << 17 | t. So
 *    code = c + (low16_in_value_order(y) >= t)
 * one gather and a few integer operations, against eight dependent gathers
 * for a binary search over the 256 codes. |y| < 2^-23 is clamped to the
 * lowest bucket and |y| > 1 (rounding of x/absmax, NaN) to the highest: the
 * table builder checks that those buckets hold no threshold. Table:
 * int32[2 * 2945], positive buckets first, then negative ones.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "stochastic_round.h"

#define RP8_BUCKET_LO 0x3400 /* top 16 bits of 2^-23: the lowest bucket */
#define RP8_BUCKET_HI 0x3F80 /* top 16 bits of 1.0: the highest bucket */
#define RP8_BUCKETS (RP8_BUCKET_HI - RP8_BUCKET_LO + 1) /* 2945 per sign */
#define RP8_MAX_BLOCK 4096 /* largest block_size the span's stack buffers take */

/* Scalars of one tensor's step, named as adam.c's rp_consts and computed the
   same way (consts_for_group there), so the engine fills both alike. */
typedef struct {
    float neg_step_size;         /* -(lr / bias_correction1)                 */
    float bias_correction2_sqrt;
    float eps;
    float beta2, sq_coeff;       /* exp_avg_sq = fmaf(sq_coeff*g, g, exp_avg_sq*beta2) */
    float lerp_coeff;            /* exp_avg.lerp_(g, 1-beta1): see adam.c */
    int32_t lerp_from_exp_avg;
    float weight_decay;          /* Adam: g += weight_decay * p (one FMA) */
    float decay_factor;          /* AdamW: p *= 1 - lr*weight_decay      */
    int32_t maximize, coupled_decay, decoupled_decay;
} rp8_consts;

/* The code maps and their encode tables, built once in Python. */
typedef struct {
    const float *m_qmap;    /* 256 floats: the signed map (exp_avg)        */
    const int32_t *m_enc;   /* 2 * RP8_BUCKETS entries for m_qmap          */
    const float *v_qmap;    /* 256 floats: the unsigned map (exp_avg_sq)   */
    const int32_t *v_enc;   /* 2 * RP8_BUCKETS entries for v_qmap          */
} rp8_maps;

static inline float rp8_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t rp8_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* The code of y (already divided by the block's absmax). See the file comment. */
static inline __attribute__((always_inline)) uint8_t rp8_encode(float y, const int32_t *enc)
{
    const uint32_t u = rp8_bits(y);
    const uint32_t neg = (uint32_t)((int32_t)u >> 31);      /* all ones for a negative y */
    int32_t key = (int32_t)((u & 0x7FFFFFFFu) >> 16) - RP8_BUCKET_LO;
    key = key < 0 ? 0 : key > RP8_BUCKETS - 1 ? RP8_BUCKETS - 1 : key;
    key += (int32_t)(neg & RP8_BUCKETS);                      /* negative buckets follow */
    const int32_t e = enc[key];
    /* low 16 bits in value order: a larger magnitude is a smaller negative value */
    const int32_t low = (int32_t)((u ^ neg) & 0xFFFFu);
    return (uint8_t)((e >> 17) + (low >= (e & 0x1FFFF)));
}

/* ---- the arithmetic format (fmt RP8_FP8) ---------------------------------
 * The dynamic map needs a table lookup per element each way: a gather, which
 * on the measured CPU (Zen 4) costs ~1 ns per element and made the step 3.7x
 * the fp32 step. This format decodes and encodes with integer operations
 * only, like bf16: a magnitude code c in 1..cmax is the float whose bits are
 * (c + bias) << 20, i.e. an fp32 truncated to 3 mantissa bits, the exponent
 * range chosen so that the top code is exactly 1.0; c = 0 is zero.
 *   exp_avg    (signed):   sign bit | c, c in 0..127: 1.0 down to 2^-16 * 1.25
 *                          (E4M3-like, 16 binades, relative step 1/8 .. 1/16)
 *   exp_avg_sq (unsigned): c in 0..255:               1.0 down to 2^-32 * 1.25
 *                          (E5M3-like, 32 binades: the square of exp_avg's range)
 * Encode = round to nearest even at mantissa bit 3 (the bf16 trick at 20
 * bits), minus the bias; below the smallest code: 0 or the smallest code,
 * whichever is nearer (a tie goes up). */
#define RP8_DYNAMIC 0
#define RP8_FP8 1
#define RP8_M_BIAS (0x3F8 - 127) /* 1.0f >> 20 is 0x3F8: code 127 is 1.0 */
#define RP8_V_BIAS (0x3F8 - 255) /* code 255 is 1.0 */

static inline __attribute__((always_inline)) uint32_t rp8_fp8_magnitude(uint32_t a, int32_t bias, int32_t cmax)
{
    int32_t c = (int32_t)((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - bias;
    const uint32_t half_smallest = (uint32_t)(1 + bias) << 20; /* the smallest code's bits ... */
    const uint32_t below = a >= half_smallest - (1u << 23) ? 1u : 0u; /* ... halved: exponent - 1 */
    c = c > cmax ? cmax : c;
    return c < 1 ? below : (uint32_t)c;
}

static inline __attribute__((always_inline)) uint8_t rp8_fp8_encode_signed(float y)
{
    const uint32_t u = rp8_bits(y);
    return (uint8_t)(rp8_fp8_magnitude(u & 0x7FFFFFFFu, RP8_M_BIAS, 127) | ((u >> 24) & 0x80u));
}

static inline __attribute__((always_inline)) uint8_t rp8_fp8_encode_unsigned(float y)
{
    return (uint8_t)rp8_fp8_magnitude(rp8_bits(y) & 0x7FFFFFFFu, RP8_V_BIAS, 255);
}

static inline __attribute__((always_inline)) float rp8_fp8_decode_signed(uint8_t code)
{
    const uint32_t c = code & 0x7Fu;
    const uint32_t mag = c ? (c + RP8_M_BIAS) << 20 : 0u;
    return rp8_from_bits(mag | ((uint32_t)(code & 0x80u) << 24));
}

static inline __attribute__((always_inline)) float rp8_fp8_decode_unsigned(uint8_t code)
{
    const uint32_t c = code;
    return rp8_from_bits(c ? (c + RP8_V_BIAS) << 20 : 0u);
}

/* 1/absmax for a block whose absmax bit pattern (sign cleared) is a; 0 for
   an all-zero or subnormal block (flushed to zero, see the file comment) and
   for a non-finite one (its codes do not matter: its scale is NaN). */
static inline float rp8_inverse_scale(uint32_t a)
{
    return a >= 0x00800000u && a < 0x7F800000u ? 1.0f / rp8_from_bits(a) : 0.0f;
}

/* The scale stored for that block: the absmax, 0 when flushed, NaN when not finite. */
static inline float rp8_scale(uint32_t a)
{
    return a >= 0x7F800000u ? rp8_from_bits(0x7FC00000u) : a >= 0x00800000u ? rp8_from_bits(a) : 0.0f;
}

/* What a code array holds: dynamic-map codes (with a table), or the
   arithmetic format's signed (exp_avg) or unsigned (exp_avg_sq) codes. */
enum { RP8_KIND_DYNAMIC = 0, RP8_KIND_FP8_SIGNED = 1, RP8_KIND_FP8_UNSIGNED = 2 };

/* Quantize n <= B values of one block: writes n codes, returns the scale. */
static inline __attribute__((always_inline)) float rp8_quantize_block(
    const float *restrict x, int64_t n, uint8_t *restrict codes, const int32_t *restrict enc,
    const int kind)
{
    /* absmax as an integer max over the bit patterns with the sign cleared:
       the same order as |x| for non-negative floats, and GCC vectorizes an
       integer max reduction (not a float one without -ffinite-math-only). */
    uint32_t amax = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = rp8_bits(x[i]) & 0x7FFFFFFFu;
        amax = a > amax ? a : amax;
    }
    const float inv = rp8_inverse_scale(amax);
    for (int64_t i = 0; i < n; i++) {
        const float y = x[i] * inv;
        codes[i] = kind == RP8_KIND_FP8_SIGNED ? rp8_fp8_encode_signed(y)
                   : kind == RP8_KIND_FP8_UNSIGNED ? rp8_fp8_encode_unsigned(y) : rp8_encode(y, enc);
    }
    return rp8_scale(amax);
}

/* Quantize a whole tensor of numel values (a loaded fp32 checkpoint's
   moment): ceil(numel/B) blocks, the last one possibly partial. enc: the
   dynamic map's table, or NULL for the arithmetic kinds. */
static void rp8_quantize(const float *x, int64_t numel, int64_t block, uint8_t *codes,
                         float *scales, const int32_t *enc, int kind)
{
    for (int64_t b = 0, s = 0; s < numel; b++, s += block) {
        const int64_t n = numel - s < block ? numel - s : block;
        if (kind == RP8_KIND_FP8_SIGNED) scales[b] = rp8_quantize_block(x + s, n, codes + s, enc, RP8_KIND_FP8_SIGNED);
        else if (kind == RP8_KIND_FP8_UNSIGNED) scales[b] = rp8_quantize_block(x + s, n, codes + s, enc, RP8_KIND_FP8_UNSIGNED);
        else scales[b] = rp8_quantize_block(x + s, n, codes + s, enc, RP8_KIND_DYNAMIC);
    }
}

/* The inverse, for tests and for exporting an fp32 view of the state.
   qmap: the dynamic map, or NULL for the arithmetic kinds. */
static void rp8_dequantize(const uint8_t *codes, const float *scales, int64_t numel, int64_t block,
                           const float *qmap, int kind, float *out)
{
    for (int64_t b = 0, s = 0; s < numel; b++, s += block) {
        const int64_t n = numel - s < block ? numel - s : block;
        const float sc = scales[b];
        for (int64_t i = 0; i < n; i++) {
            const uint8_t c = codes[s + i];
            const float q = kind == RP8_KIND_FP8_SIGNED ? rp8_fp8_decode_signed(c)
                            : kind == RP8_KIND_FP8_UNSIGNED ? rp8_fp8_decode_unsigned(c) : qmap[c];
            out[s + i] = q * sc;
        }
    }
}

/* One Adam/AdamW step on n <= B elements of one block: dequantize, update
   (adam.c's fp32 vector-loop formula), keep the new moments in the two
   stack buffers mb/vb (L1), then requantize them with their new absmax.
   Memory is read and written once: p r/w, g r, codes r/w, one scale each. */
static inline __attribute__((always_inline)) void adam8bit_block(
    int64_t n, float *restrict p, const float *restrict g, uint8_t *restrict m_codes,
    float *restrict m_scale, uint8_t *restrict v_codes, float *restrict v_scale,
    const rp8_consts *k, const rp8_maps *maps, float *restrict mb, float *restrict vb, const int fmt)
{
    const rp8_consts c = *k; /* locals: the compiler must see they don't alias */
    const float *restrict mq = maps->m_qmap, *restrict vq = maps->v_qmap;
    const float ms = *m_scale, vs = *v_scale;
    const float sign = c.maximize ? -1.0f : 1.0f; /* a multiply by +-1 keeps the loop branch-free */
    uint32_t mmax = 0, vmax = 0;
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * sign;
        float pi = p[i];
        if (c.coupled_decay) gi = fmaf(pi, c.weight_decay, gi);  /* Adam: decay joins the gradient */
        if (c.decoupled_decay) pi = pi * c.decay_factor;          /* AdamW: p *= 1 - lr*wd */
        float mi = (fmt == RP8_FP8 ? rp8_fp8_decode_signed(m_codes[i]) : mq[m_codes[i]]) * ms;
        mi = fmaf(c.lerp_coeff, gi - mi, c.lerp_from_exp_avg ? mi : gi); /* torch's lerp */
        float vi = (fmt == RP8_FP8 ? rp8_fp8_decode_unsigned(v_codes[i]) : vq[v_codes[i]]) * vs;
        vi = fmaf(c.sq_coeff * gi, gi, vi * c.beta2);
        mb[i] = mi;
        vb[i] = vi;
        const uint32_t am = rp8_bits(mi) & 0x7FFFFFFFu, av = rp8_bits(vi) & 0x7FFFFFFFu;
        mmax = am > mmax ? am : mmax;
        vmax = av > vmax ? av : vmax;
        const float den = sqrtf(vi) / c.bias_correction2_sqrt + c.eps;
        p[i] = pi + (c.neg_step_size * mi) / den;
    }
    const float minv = rp8_inverse_scale(mmax), vinv = rp8_inverse_scale(vmax);
    *m_scale = rp8_scale(mmax);
    *v_scale = rp8_scale(vmax);
    const int32_t *restrict me = maps->m_enc, *restrict ve = maps->v_enc;
    for (int64_t i = 0; i < n; i++) {
        m_codes[i] = fmt == RP8_FP8 ? rp8_fp8_encode_signed(mb[i] * minv) : rp8_encode(mb[i] * minv, me);
        v_codes[i] = fmt == RP8_FP8 ? rp8_fp8_encode_unsigned(vb[i] * vinv) : rp8_encode(vb[i] * vinv, ve);
    }
}

/* Blocks [first_block, first_block + n_blocks) of a tensor of numel fp32
   elements with 8-bit moments in block size `block` (a multiple of 16, at
   most RP8_MAX_BLOCK). Pointers are to the start of the tensor and its state
   (not of the span): p, g float[numel]; m_codes, v_codes uint8[numel];
   m_scale, v_scale float[ceil(numel/block)]. Blocks never split across
   threads, so a thread owns its blocks' codes and scales; the last block of
   the tensor may be partial. A block of B elements is computed the same
   whichever span it falls in: results do not depend on the thread count. */
static void adam8bit_span(int64_t first_block, int64_t n_blocks, int64_t numel, int64_t block,
                          float *p, const float *g, uint8_t *m_codes, float *m_scale,
                          uint8_t *v_codes, float *v_scale, const rp8_consts *k,
                          const rp8_maps *maps, int fmt)
{
    float mb[RP8_MAX_BLOCK] __attribute__((aligned(64)));
    float vb[RP8_MAX_BLOCK] __attribute__((aligned(64)));
    for (int64_t b = first_block; b < first_block + n_blocks; b++) {
        const int64_t s = b * block;
        if (s >= numel) break;
        const int64_t n = numel - s < block ? numel - s : block;
        /* fmt a constant in each call, and the default block size as a constant
           trip count: four compiled variants of the block loop */
#define RP8_BLOCK_CALL(N, F) adam8bit_block(N, p + s, g + s, m_codes + s, m_scale + b, v_codes + s, \
                                            v_scale + b, k, maps, mb, vb, F)
        if (fmt == RP8_FP8) {
            if (n == 256) RP8_BLOCK_CALL(256, RP8_FP8); else RP8_BLOCK_CALL(n, RP8_FP8);
        } else {
            if (n == 256) RP8_BLOCK_CALL(256, RP8_DYNAMIC); else RP8_BLOCK_CALL(n, RP8_DYNAMIC);
        }
#undef RP8_BLOCK_CALL
    }
}

/* ---- bf16 params with stochastic rounding ---------------------------------
 * Elements [first, first + n) of a bf16 tensor (p, g, m, v all bf16, pointers
 * to the start of the tensor): the update in fp32 as adam.c's bf16 direct
 * loop computes it, the moments stored rounded to nearest even, p stored
 * with stochastic rounding keyed by (key, element index) where
 * key = rp_sr_key(seed, step). sr = 0 stores p rounded to nearest even
 * instead: the same loop, for comparing speed and quality. */
static inline __attribute__((always_inline)) float rp8_bf16_load(const uint16_t *b, int64_t i)
{
    return rp8_from_bits((uint32_t)b[i] << 16);
}

/* round to nearest even; NaN as torch's vector conversion (0xFFFF), as adam.c */
static inline __attribute__((always_inline)) uint16_t rp8_bf16_rne(float x)
{
    const uint32_t u = rp8_bits(x);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(x != x ? 0xFFFFu : r);
}

static inline __attribute__((always_inline)) void adam_bf16_elements(
    int64_t n, uint16_t *restrict p, uint16_t *restrict g, uint16_t *restrict m,
    uint16_t *restrict v, const rp8_consts *k, uint32_t first32, uint32_t key32, const int sr)
{
    const rp8_consts c = *k;
    const float sign = c.maximize ? -1.0f : 1.0f;
    for (int64_t i = 0; i < n; i++) {
        float gi = rp8_bf16_load(g, i) * sign;
        float pi = rp8_bf16_load(p, i);
        if (c.coupled_decay) gi = fmaf(pi, c.weight_decay, gi);
        if (c.decoupled_decay) pi = pi * c.decay_factor;
        float mi = rp8_bf16_load(m, i);
        mi = fmaf(c.lerp_coeff, gi - mi, c.lerp_from_exp_avg ? mi : gi);
        float vi = rp8_bf16_load(v, i);
        vi = fmaf(c.sq_coeff * gi, gi, vi * c.beta2);
        m[i] = rp8_bf16_rne(mi);
        v[i] = rp8_bf16_rne(vi);
        const float den = sqrtf(vi) / c.bias_correction2_sqrt + c.eps;
        const float out = pi + (c.neg_step_size * mi) / den;
        /* the element's index, low 32 bits: a 32-bit lane (wraps within the segment only at its end) */
        p[i] = sr ? rp_bf16_sr(out, rp_sr_hash(first32 + (uint32_t)i, key32)) : rp8_bf16_rne(out);
    }
}

static void adam_bf16_sr_span(int64_t first, int64_t n, uint16_t *p, uint16_t *g, uint16_t *m,
                              uint16_t *v, const rp8_consts *k, uint64_t key, int sr)
{
    while (n > 0) {
        /* a segment of constant index >> 32 */
        const uint64_t hi = (uint64_t)first >> 32;
        const int64_t room = (int64_t)(((hi + 1) << 32) - (uint64_t)first);
        const int64_t len = n < room ? n : room;
        const uint32_t key32 = rp_sr_span_key(key, (uint32_t)hi);
        if (sr) adam_bf16_elements(len, p + first, g + first, m + first, v + first, k, (uint32_t)first, key32, 1);
        else adam_bf16_elements(len, p + first, g + first, m + first, v + first, k, (uint32_t)first, key32, 0);
        first += len;
        n -= len;
    }
}
