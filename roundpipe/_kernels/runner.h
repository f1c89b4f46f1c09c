/* roundpipe's runner: the C that every update rule shares, inlined into each
 * rule's file (adam.c, sgd.c, adagrad.c, lion.c).
 *
 *  - rp_run: one OpenMP parallel region per param group; threads pull chunks
 *    from a shared counter, so there is no fork/join per tensor. Results never
 *    depend on the thread count: every element is computed by the same code
 *    whichever chunk it falls in.
 *  - rp_reduce: the reduction phase, passes that reduce over tensors, rows,
 *    columns or blocks before the element pass, deterministically (see there). Only GOMP_parallel and omp_get_* are used
 *    from the OpenMP runtime, so the module runs against the libgomp that the
 *    torch wheel ships (see _build.py, which links against the runtime torch
 *    loaded).
 *  - bf16/fp16 <-> fp32 conversions, and rp_staged_span: a rule written over
 *    fp32 arrays steps 16-bit params, moments and fp32 master copies through
 *    small fp32 blocks that stay in L1, so memory is still read and written
 *    once.
 * All indices and sizes are int64_t: tensors above 2^31 elements work.
 */
#ifndef ROUNDPIPE_RUNNER_H
#define ROUNDPIPE_RUNNER_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "engine.h"

#ifdef __F16C__
#include <immintrin.h> /* fp16 <-> fp32 conversion only: GCC 12 does not vectorize it */
#endif

#define RP_BLOCK 512 /* elements staged per conversion block: 5 x 2 KiB of L1 */

/* Set in a fork() child (engine.c): never enter an OpenMP region there. */
extern volatile int rp_forked_child_flag;

/* ---- element conversions --------------------------------------------------- */

static inline float float_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Element access for the direct loops below. dt is a compile-time constant
   at every call site (always_inline), so each variant compiles to plain
   loads and stores: bf16 <-> fp32 is a 16-bit shift one way and integer
   round-to-nearest-even the other, which GCC vectorizes inline. (GCC 12 does
   not vectorize fp16 conversions without AVX512-FP16: fp16 has its own loops,
   adam_f16_direct, or goes through staging.) */
static inline __attribute__((always_inline)) float load_elem(const void *base, int dt, int64_t i)
{
    if (dt == RP_BF16) return float_from_bits((uint32_t)((const uint16_t *)base)[i] << 16);
    return ((const float *)base)[i];
}

/* fp32 -> bf16, rounded to nearest even. torch writes a NaN two ways: its
   vector conversion (cvtfp32_bf16, also behind .to() and copy_()) as 0xFFFF,
   the scalar c10::BFloat16 of its fused tail loop as 0x7FC0. */
#define RP_BF16_NAN_VEC 0xFFFFu
#define RP_BF16_NAN_SCALAR 0x7FC0u
static inline __attribute__((always_inline)) uint16_t bf16_from_float(float x, uint32_t nan_bits)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(x != x ? nan_bits : r);
}

static inline __attribute__((always_inline)) void store_elem(void *base, int dt, int64_t i, float x)
{
    /* bf16 is stored by the direct loops only, which run torch's vector elements */
    if (dt == RP_BF16) ((uint16_t *)base)[i] = bf16_from_float(x, RP_BF16_NAN_VEC);
    else ((float *)base)[i] = x;
}

/* ---- dtype conversion for the staging blocks ---------------------------- */

/* One fp16 value: the F16C instruction when there is one (the same rounding
   as the vector path), else the compiler's _Float16 conversion (RNE too). */
static inline float half_to_float(uint16_t h)
{
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#endif
}

static inline uint16_t float_to_half(float x)
{
#ifdef __F16C__
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 f = (_Float16)x;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
#endif
}

static inline void load_block(float *restrict dst, const void *src, int dtype, int64_t n)
{
    if (dtype == RP_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = float_from_bits((uint32_t)s[i] << 16);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        int64_t i = 0;
#ifdef __F16C__
        /* GCC 12 does not vectorize _Float16 conversions without AVX512-FP16
           (fp16 steps ran 3x slower than bf16): convert 8 at a time by hand. */
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) dst[i] = half_to_float(s[i]);
    }
}

/* nan_bits: what a bf16 NaN is written as (see bf16_from_float). */
static inline void store_block(void *dst, int dtype, const float *restrict src, int64_t n, uint32_t nan_bits)
{
    if (dtype == RP_BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = bf16_from_float(src[i], nan_bits);
    } else { /* round to nearest even, as torch's c10::Half */
        uint16_t *d = (uint16_t *)dst;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; i < n; i++) d[i] = float_to_half(src[i]);
    }
}

/* ---- the scheduler --------------------------------------------------------- */

/* A rule's work on elements [begin, end) of one tensor; ctx is the rule's own. */
typedef void (*rp_span_fn)(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx);

/* 1 when GradScaler saw an inf: the whole step is skipped, nothing is touched. */
static inline int rp_skipped(const rp_run_opts *run)
{
    return run->found_inf && *run->found_inf != 0.0f;
}

/* Work item c of n: one chunk of a pass (or one tensor of a combine). */
typedef void (*rp_item_fn)(int64_t c, const void *arg);

/* Run item(0 .. n-1) of a pass over `total` elements: on the calling thread for
   small groups, after fork(), or with one thread; else on an OpenMP team. The
   one scheduler of every pass (rp_run, rp_reduce). */
static inline void rp_for_each(const rp_run_opts *run, int64_t total, int64_t n, rp_item_fn item, const void *arg)
{
    int threads = run->num_threads;
    if (rp_forked_child_flag || total < run->serial_below || n < 2) threads = 1;
    if (threads <= 1) {
        for (int64_t c = 0; c < n; c++) item(c, arg);
        return;
    }
    if (threads > n) threads = (int)n;
    /* Threads take the next item from a shared counter: no fork/join per
       tensor, and a thread slowed by a noisy neighbour simply takes fewer. */
    int64_t next = 0;
#pragma omp parallel num_threads(threads)
    {
        for (;;) {
            const int64_t c = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (c >= n) break;
            item(c, arg);
        }
    }
}

static inline int64_t rp_total_numel(const rp_tensor *tensors, int64_t n_tensors)
{
    int64_t total = 0;
    for (int64_t i = 0; i < n_tensors; i++) total += tensors[i].numel;
    return total;
}

typedef struct {
    const rp_tensor *tensors;
    const rp_chunk *chunks;
    rp_span_fn span;
    const void *ctx;
} rp_run_args;

static void rp_run_item(int64_t c, const void *arg)
{
    const rp_run_args *a = arg;
    a->span(&a->tensors[a->chunks[c].tensor], a->chunks[c].begin, a->chunks[c].end, a->ctx);
}

/* Run span over every chunk of a param group (the element pass). */
static inline void rp_run(const rp_run_opts *run, const rp_tensor *tensors, int64_t n_tensors,
                          const rp_chunk *chunks, int64_t n_chunks, rp_span_fn span, const void *ctx)
{
    const rp_run_args a = {tensors, chunks, span, ctx};
    rp_for_each(run, rp_total_numel(tensors, n_tensors), n_chunks, rp_run_item, &a);
}

/* ---- the reduction phase ---------------------------------------------------------
 *
 * A rule that needs a reduction over a tensor before its element pass (a norm, the
 * sums of squares of each row and column, a block's absmax) runs one or more
 * rp_reduce passes, then rp_run. One pass:
 *  1. rspan over every reduction chunk (rp_run_opts.rchunks, planned by
 *     rp_plan_rchunks from each tensor's shape alone), in parallel across all the
 *     tensors of the group. A chunk writes only what it owns: its partials at
 *     run->scratch + chunk->part, and any state of the rows or whole matrices it holds.
 *  2. combine over every tensor, in parallel across tensors: one thread folds a
 *     tensor's chunk partials in chunk order (first_rchunk .. + n_rchunks) and writes
 *     the tensor's results (state, rp_tensor.scalar).
 * Every partial is computed by the same code whichever thread runs it and folded
 * in a fixed order, so results never depend on the thread count. The element pass
 * reads the combined results; the C call is still one per param group.
 */

/* A reduction pass's work on one chunk; part: its partials (rp_rchunk.part). */
typedef void (*rp_rspan_fn)(const rp_tensor *t, const rp_rchunk *chunk, float *part, const void *ctx);
/* The fold of one tensor: its chunks are run->rchunks[t->first_rchunk ...]. */
typedef void (*rp_combine_fn)(rp_tensor *t, const rp_run_opts *run, const void *ctx);

typedef struct {
    const rp_run_opts *run;
    rp_tensor *tensors;
    rp_rspan_fn rspan;
    rp_combine_fn combine;
    const void *ctx;
} rp_reduce_args;

static void rp_rspan_item(int64_t c, const void *arg)
{
    const rp_reduce_args *a = arg;
    const rp_rchunk *ch = &a->run->rchunks[c];
    a->rspan(&a->tensors[ch->tensor], ch, a->run->scratch + ch->part, a->ctx);
}

static void rp_combine_item(int64_t i, const void *arg)
{
    const rp_reduce_args *a = arg;
    a->combine(&a->tensors[i], a->run, a->ctx);
}

/* One reduction pass over a param group: rspan on every chunk, then combine on
   every tensor (either may be NULL). */
static inline void rp_reduce(const rp_run_opts *run, rp_tensor *tensors, int64_t n_tensors,
                             rp_rspan_fn rspan, rp_combine_fn combine, const void *ctx)
{
    const rp_reduce_args a = {run, tensors, rspan, combine, ctx};
    const int64_t total = rp_total_numel(tensors, n_tensors);
    if (rspan) rp_for_each(run, total, run->n_rchunks, rp_rspan_item, &a);
    if (combine) rp_for_each(run, total, n_tensors, rp_combine_item, &a);
}

/* ---- 16-bit params and state for rules written over fp32 arrays ------------- */

/* A rule's update on n fp32 elements of tensor t; first is the index of p[0] in
   t (for torch's tail), s[i] its state arrays. p is the master when there is one. */
typedef void (*rp_fp32_fn)(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                           const void *ctx);

/* Elements [b, e) of t through fn: all-fp32 tensors in place; any other dtype
   through fp32 staging blocks in L1, written back rounded to nearest even
   (a bf16 NaN as 0xFFFF, torch's vector conversion). With a master copy the
   fp32 step runs on the master and the param gets it rounded. The grad is
   written back only when the step unscaled it (unscale != 0). */
static inline void rp_staged_span(const rp_tensor *t, int64_t b, int64_t e, int n_state, int unscale,
                                  rp_fp32_fn fn, const void *ctx)
{
    const int pdt = t->param_dtype;
    int all_f32 = pdt == RP_F32 && !t->master;
    for (int i = 0; i < n_state; i++) all_f32 &= t->state_dtype[i] == RP_F32;
    if (all_f32) {
        float *s[3] = {NULL, NULL, NULL};
        for (int i = 0; i < n_state; i++) s[i] = (float *)t->state[i] + b;
        fn(t, b, e - b, (float *)t->param + b, (float *)t->grad + b, s, ctx);
        return;
    }
    float pb[RP_BLOCK] __attribute__((aligned(64)));
    float gb[RP_BLOCK] __attribute__((aligned(64)));
    float sb[3][RP_BLOCK] __attribute__((aligned(64)));
    const size_t psz = pdt == RP_F32 ? 4 : 2;
    for (int64_t s0 = b; s0 < e; s0 += RP_BLOCK) {
        const int64_t n = e - s0 < RP_BLOCK ? e - s0 : RP_BLOCK;
        char *param = (char *)t->param + s0 * psz, *grad = (char *)t->grad + s0 * psz;
        float *p, *g, *s[3] = {NULL, NULL, NULL};
        if (t->master) p = t->master + s0;
        else if (pdt == RP_F32) p = (float *)param;
        else { load_block(pb, param, pdt, n); p = pb; }
        if (pdt == RP_F32) g = (float *)grad; else { load_block(gb, grad, pdt, n); g = gb; }
        for (int i = 0; i < n_state; i++) {
            const int sdt = t->state_dtype[i];
            char *st = (char *)t->state[i] + s0 * (sdt == RP_F32 ? 4 : 2);
            if (sdt == RP_F32) s[i] = (float *)st; else { load_block(sb[i], st, sdt, n); s[i] = sb[i]; }
        }
        fn(t, s0, n, p, g, s, ctx);
        if (pdt != RP_F32) store_block(param, pdt, p, n, RP_BF16_NAN_VEC); /* from the master, if any */
        if (unscale && pdt != RP_F32) store_block(grad, pdt, g, n, RP_BF16_NAN_VEC);
        for (int i = 0; i < n_state; i++) {
            const int sdt = t->state_dtype[i];
            if (sdt != RP_F32) store_block((char *)t->state[i] + s0 * 2, sdt, s[i], n, RP_BF16_NAN_VEC);
        }
    }
}

#endif /* ROUNDPIPE_RUNNER_H */
