/* roundpipe Adam kernel.
 *
 * Reference: https://pytorch.org/docs/stable/generated/torch.optim.Adam.html
 * and, for the exact order of floating-point operations, torch's CPU fused
 * kernel aten/src/ATen/native/cpu/FusedAdamKernel.cpp. Every fp32 result
 * here is meant to be bit-identical to torch.optim.Adam(fused=True).
 *
 * Rules of this file:
 *  - Plain C loops over float arrays; the compiler vectorizes them under
 *    -O3 -march=native. Check with python -m roundpipe info --vec (gcc -fopt-info-vec).
 *    The one exception is fp16 <-> fp32 conversion, which GCC 12 does not
 *    vectorize: F16C/AVX-512 intrinsics, measured 2x faster (adam_f16_direct).
 *  - Built with -ffp-contract=off: the compiler must not decide where a
 *    multiply and an add fuse. Every fused multiply-add that torch's build
 *    performs (measured against torch 2.13's fused kernel: the lerp of
 *    exp_avg, the exp_avg_sq update, coupled weight decay) is written as
 *    fmaf(); everything else rounds twice, as in torch.
 *  - Built with -fno-math-errno so that sqrtf becomes one vsqrtps instead of
 *    a libm call guarded by an errno branch (4x slower loop). No other math
 *    relaxation: NaN and Inf must propagate exactly as in torch.
 *  - All indices and sizes are int64_t: tensors above 2^31 elements work.
 *  - The scheduling (chunks, threads, fork) and the dtype conversions are the
 *    engine's, shared by every rule: runner.h. This file is Adam's rule.
 */
#include "runner.h"
#include "adam.h"
#include "stochastic_round.h"

/* Adam's state slots in rp_tensor.state, in the order of Adam._state_keys */
enum { EXP_AVG = 0, EXP_AVG_SQ = 1, MAX_EXP_AVG_SQ = 2 };


/* Scalars of one tensor's step, all already rounded to float the way torch
   rounds them (double math first, then one conversion). */
typedef struct {
    float neg_step_size, bias_correction2_sqrt, eps;
    float beta2, sq_coeff;      /* exp_avg_sq = exp_avg_sq*beta2 + (sq_coeff*g)*g */
    float lerp_coeff;           /* exp_avg.lerp_(g, 1-beta1), see adam_elements */
    int lerp_from_exp_avg;
    float one_minus_w;          /* 1 - (1-beta1), rounded in float: torch's tail lerp */
    float neg_one, one;         /* -1 and 1 at run time, so that g * -1 stays a multiply */
    int maximize_negates;       /* see adam_elements: how torch's build flips the grad */
    float weight_decay, decay_factor;
    int maximize, coupled_decay, decoupled_decay;
    float grad_scale;
} rp_consts;

/* The Adam update over n elements, computed in fp32. p, g, m, v, vmax point
   at arrays of dtype pdt (p and g), mdt (m) and vdt (v, vmax): the tensors
   themselves, or fp32 staging blocks. With a master copy (master != NULL,
   pdt bf16) the fp32 param is read from and written to master, and p gets the
   result rounded to bf16. The dtypes and amsgrad, unscale and torch_tail are
   compile-time constants at each call site, so every variant is its own
   vectorized loop. */
static inline __attribute__((always_inline)) void adam_elements(
    int64_t n, void *restrict p, float *restrict master, void *restrict g, void *restrict m,
    void *restrict v, void *restrict vmax, const rp_consts *k, const int pdt, const int mdt,
    const int vdt, const int amsgrad, const int unscale, const int torch_tail,
    const int sr, const uint32_t sr_base, const uint32_t sr_key)
{
    const rp_consts c = *k; /* locals: the compiler must see they don't alias */
    /* torch's vector maximum() returns all-ones bits when either side is NaN */
    const float nan_all_ones = float_from_bits(0xFFFFFFFFu);
    /* maximize: torch writes g * -1. Its build turns that into a sign flip
       except in the fp32 vector loop of Adam with coupled weight decay and no
       grad scale, where it folds into the decay's FMA; the two differ only in
       a NaN's sign. Both
       are done unconditionally (a multiply by +-1, a select) so that the loop
       stays vectorized: a conditional multiply is not (GCC 12, COND_MUL). */
    const int negate = c.maximize && (torch_tail || unscale || c.maximize_negates);
    const float factor = c.maximize && !negate ? c.neg_one : c.one;
    for (int64_t i = 0; i < n; i++) {
        float gi = load_elem(g, pdt, i);
        if (unscale) {                       /* GradScaler: unscale in place */
            gi = gi / c.grad_scale;
            store_elem(g, pdt, i, gi);
        }
        gi = gi * factor; /* x * 1 is x, NaNs included */
        if (negate) gi = -gi;
        float pi = master ? master[i] : load_elem(p, pdt, i);
        if (c.coupled_decay) gi = fmaf(pi, c.weight_decay, gi); /* Adam: decay joins the gradient */
        if (c.decoupled_decay) pi = pi * c.decay_factor;      /* AdamW: p *= 1 - lr*wd */
        /* exp_avg.lerp_(g, w) with w = 1-beta1, torch's two-sided lerp:
           w < 0.5: m + w*(g-m); else g + (w-1)*(g-m); one fused multiply-add. */
        float mi = load_elem(m, mdt, i);
        if (torch_tail && !c.lerp_from_exp_avg)
            mi = fmaf(-(gi - mi), c.one_minus_w, gi); /* tail: g - (g-m)*(1-w), one FMA */
        else
            mi = fmaf(c.lerp_coeff, gi - mi, c.lerp_from_exp_avg ? mi : gi);
        /* exp_avg_sq*beta2 + (1-beta2)*g*g with one of the two products fused
           into the add: torch's vector loop fuses the second, its scalar tail
           loop (two statements there) the first. */
        const float v0 = load_elem(v, vdt, i);
        float vi = torch_tail ? fmaf(v0, c.beta2, (c.sq_coeff * gi) * gi)
                              : fmaf(c.sq_coeff * gi, gi, v0 * c.beta2);
        store_elem(m, mdt, i, mi);
        store_elem(v, vdt, i, vi);
        float den = vi;
        if (amsgrad) {
            float old = load_elem(vmax, vdt, i);
            /* vector loop: torch's maximum() (NaN in either gives all-ones bits);
               tail loop: std::max(old, v), which keeps old when v is NaN */
            float mx = torch_tail ? (old < vi ? vi : old)
                                  : (old != old || vi != vi) ? nan_all_ones : (old > vi ? old : vi);
            store_elem(vmax, vdt, i, mx);
            den = mx;
        }
        den = sqrtf(den) / c.bias_correction2_sqrt + c.eps;
        const float update = (c.neg_step_size * mi) / den;
        /* both NaN: torch's tail returns the param's NaN (its first operand) */
        const float out = (torch_tail && pi != pi) ? pi : pi + update;
        if (master) master[i] = out;
        if (sr) /* bf16_stochastic_round: the bits of element sr_base + i of this step, see stochastic_round.h */
            ((uint16_t *)p)[i] = rp_bf16_sr(out, rp_sr_hash(sr_base + (uint32_t)i, sr_key));
        else
            store_elem(p, pdt, i, out); /* with a master: the master rounded to bf16 */
    }
}

#define F32 RP_F32

static void adam_fp32_body(int64_t n, float *p, float *g, float *m, float *v, float *vmax,
                           const rp_consts *k, int amsgrad, int unscale)
{
    if (amsgrad) {
        if (unscale) adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 1, 1, 0, 0, 0, 0);
        else adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 1, 0, 0, 0, 0, 0);
    } else {
        if (unscale) adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 0, 1, 0, 0, 0, 0);
        else adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 0, 0, 0, 0, 0, 0);
    }
}

/* The last numel % torch_vec elements of a tensor, which torch computes in its
   scalar tail loop. Few elements: one generic loop serves every variant. */
__attribute__((noinline)) static void adam_fp32_tail(int64_t n, float *p, float *g, float *m,
                                                     float *v, float *vmax, const rp_consts *k,
                                                     int amsgrad, int unscale)
{
    for (int64_t i = 0; i < n; i++) {
        float *x = amsgrad ? vmax + i : NULL;
        if (amsgrad) {
            if (unscale) adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 1, 1, 1, 0, 0, 0);
            else adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 1, 0, 1, 0, 0, 0);
        } else {
            if (unscale) adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 0, 1, 1, 0, 0, 0);
            else adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 0, 0, 1, 0, 0, 0);
        }
    }
}

/* Elements [first, first+n) of a tensor whose torch tail starts at tail_start. */
static void adam_fp32(int64_t first, int64_t n, int64_t tail_start, float *p, float *g, float *m,
                      float *v, float *vmax, const rp_consts *k, int amsgrad, int unscale)
{
    int64_t body = tail_start - first;
    if (body > n) body = n;
    if (body < 0) body = 0;
    if (body > 0) adam_fp32_body(body, p, g, m, v, vmax, k, amsgrad, unscale);
    if (body < n)
        adam_fp32_tail(n - body, p + body, g + body, m + body, v + body,
                       amsgrad ? vmax + body : NULL, k, amsgrad, unscale);
}

/* bf16 params read and written in place, no staging: the common layouts of
   torch's bf16 Adam (bf16 moments) and of master weights (fp32 master and
   moments, or bf16 moments). Vector-loop elements only; the caller sends
   torch's tail through the staging path. The staging path gives the same
   bits, one block at a time: this one saves its extra passes through L1,
   which made bf16 steps compute-bound on two cores.
   Only the common variant (no amsgrad, no grad scale: bf16 needs no loss
   scaling) is compiled here; the others take the staging path. Each variant
   is a whole inlined loop, and all of them tripled the first build (1.0 s
   to 2.4 s of compiling, against a 3 s budget for the cold import). */
static int bf16_direct_ok(int pdt, int mdt, int vdt, int has_master, int amsgrad, int unscale)
{
    if (pdt != RP_BF16 || mdt != vdt || amsgrad || unscale) return 0;
    return mdt == RP_BF16 || (mdt == RP_F32 && has_master);
}

static void adam_bf16_direct(int64_t n, void *p, float *master, void *g, void *m, void *v, int mdt,
                             const rp_consts *k)
{
    /* A literal NULL, so that the variant without a master has no branch on it. */
    if (!master) adam_elements(n, p, NULL, g, m, v, NULL, k, RP_BF16, RP_BF16, RP_BF16, 0, 0, 0, 0, 0, 0);
    else if (mdt == RP_BF16) adam_elements(n, p, master, g, m, v, NULL, k, RP_BF16, RP_BF16, RP_BF16, 0, 0, 0, 0, 0, 0);
    else adam_elements(n, p, master, g, m, v, NULL, k, RP_BF16, RP_F32, RP_F32, 0, 0, 0, 0, 0, 0);
}

/* fp32 params with bf16 moments (exp_avg_dtype = exp_avg_sq_dtype = bf16, the
   low-memory layout): the moments are converted in registers, so a step moves
   20 bytes per element instead of 28. Through the staging blocks it moved the
   same bytes but ran slower than the fp32-moment step (issue 12). No amsgrad;
   with and without a grad scale. Vector-loop elements only, as above. */
static void adam_f32_bf16m_direct(int64_t n, float *p, float *g, void *m, void *v, const rp_consts *k,
                                  int unscale)
{
    if (unscale) adam_elements(n, p, NULL, g, m, v, NULL, k, RP_F32, RP_BF16, RP_BF16, 0, 1, 0, 0, 0, 0);
    else adam_elements(n, p, NULL, g, m, v, NULL, k, RP_F32, RP_BF16, RP_BF16, 0, 0, 0, 0, 0, 0);
}

/* bf16 params with stochastic rounding (bf16_stochastic_round=True) in torch's
   layout (bf16 moments), no amsgrad or grad scale: elements [first, first+n) of
   the tensor, every one by the vector loop's rules (no torch tail: the result
   is not torch's anyway), the param stored with rp_bf16_sr. The hash runs on
   32-bit lanes, so the span is split where the index crosses a multiple of 2^32. */
static void adam_bf16_sr_direct(int64_t first, int64_t n, uint16_t *p, uint16_t *g, uint16_t *m, uint16_t *v,
                                const rp_consts *k, uint64_t key)
{
    while (n > 0) {
        const uint64_t hi = (uint64_t)first >> 32;
        const int64_t room = (int64_t)(((hi + 1) << 32) - (uint64_t)first);
        const int64_t len = n < room ? n : room;
        adam_elements(len, p, NULL, g, m, v, NULL, k, RP_BF16, RP_BF16, RP_BF16, 0, 0, 0,
                      1, (uint32_t)first, rp_sr_span_key(key, (uint32_t)hi));
        p += len, g += len, m += len, v += len, first += len, n -= len;
    }
}

#ifdef __F16C__
/* fp16 params in torch's layout (fp16 moments), one vector of F16_W elements
   at a time: the F16C (or AVX-512) instructions convert it, and the fp32
   update runs on it with n a compile-time F16_W, so GCC keeps the blocks in
   registers. GCC 12 does not vectorize fp16 conversions itself, and a
   plain-C conversion, exact but 3-5x slower than these instructions, made
   the step slower than staging. The body's length is a multiple of 16
   (torch's fp16 tail is numel % 16; chunks start at multiples of 32). */
#ifdef __AVX512F__
#define F16_W 16
#define F16_LOAD(src) _mm512_storeu_ps(src##b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + s))))
#define F16_STORE(dst) _mm256_storeu_si256((__m256i *)(dst + s), _mm512_cvtps_ph(_mm512_loadu_ps(dst##b), 0))
#else
#define F16_W 8
#define F16_LOAD(src) _mm256_storeu_ps(src##b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + s))))
#define F16_STORE(dst) _mm_storeu_si128((__m128i *)(dst + s), _mm256_cvtps_ph(_mm256_loadu_ps(dst##b), 0))
#endif
/* imm 0: round to nearest even, as torch's conversion */
#define F16_BLOCKS(UNS)                                                            \
    for (int64_t s = 0; s < n; s += F16_W) {                                       \
        float pb[F16_W], gb[F16_W], mb[F16_W], vb[F16_W];                          \
        F16_LOAD(p);                                                               \
        F16_LOAD(g);                                                               \
        F16_LOAD(m);                                                               \
        F16_LOAD(v);                                                               \
        adam_elements(F16_W, pb, NULL, gb, mb, vb, NULL, k, F32, F32, F32, 0, UNS, 0, 0, 0, 0); \
        F16_STORE(p);                                                              \
        if (UNS) F16_STORE(g);                                                     \
        F16_STORE(m);                                                              \
        F16_STORE(v);                                                              \
    }

/* With master weights: master and fp32 moments in place, the fp16 grad in,
   the master rounded to fp16 out. */
#define F16_MASTER_BLOCKS(UNS)                                                          \
    for (int64_t s = 0; s < n; s += F16_W) {                                                 \
        float gb[F16_W];                                                                     \
        F16_LOAD(g);                                                                         \
        adam_elements(F16_W, master + s, NULL, gb, fm + s, fv + s, NULL, k,                  \
                      F32, F32, F32, 0, UNS, 0, 0, 0, 0);                                             \
        const float *pb = master + s;                                                        \
        F16_STORE(p);                                                                        \
        if (UNS) F16_STORE(g);                                                               \
    }

/* Without amsgrad (which takes the staging path, as for bf16); with and
   without a grad scale, since fp16 training needs loss scaling. */
static void adam_f16_direct(int64_t n, uint16_t *p, float *master, uint16_t *g, void *m_, void *v_,
                            const rp_consts *k, int unscale)
{
    if (!master) {
        uint16_t *m = m_, *v = v_;
        if (unscale) { F16_BLOCKS(1) } else { F16_BLOCKS(0) }
    } else {
        float *fm = m_, *fv = v_;
        if (unscale) { F16_MASTER_BLOCKS(1) } else { F16_MASTER_BLOCKS(0) }
    }
}
#endif

/* 1 for the layouts torch's own fused kernel steps in half precision: a bf16
   or fp16 param without a master, with moments of its dtype. Its rules (16
   lanes, its tail's bf16 NaN, maximize as a sign flip) apply there; every
   other 16-bit layout is a fp32 step on fp32 copies, with torch's fp32 rules,
   as the torch fallback (_torch_fused_step) computes it. */
static int torch_half_layout(const rp_tensor *t)
{
    return t->param_dtype != RP_F32 && !t->master && t->state_dtype[EXP_AVG] == t->param_dtype &&
           t->state_dtype[EXP_AVG_SQ] == t->param_dtype;
}

/* Elements [b, e) of one tensor. fp32 tensors are updated directly; any other
   dtype goes through fp32 staging blocks that stay in L1, so memory is still
   read and written once. A master copy, when present, is the fp32 param. */
static void adam_span(const rp_tensor *t, int64_t b, int64_t e, const rp_consts *k,
                      int amsgrad, int unscale, int64_t torch_vec)
{
    const int pdt = t->param_dtype, mdt = t->state_dtype[EXP_AVG], vdt = t->state_dtype[EXP_AVG_SQ];
    /* torch's half-precision kernels run twice as many lanes as its fp32 one;
       with a master copy the reference is torch's fp32 step on the master. */
    const int64_t tv = torch_half_layout(t) ? 2 * torch_vec : torch_vec;
    const int64_t tail_start = tv > 1 ? t->numel - t->numel % tv : t->numel;
    if (pdt == RP_F32 && mdt == RP_F32 && vdt == RP_F32 && !t->master) {
        adam_fp32(b, e - b, tail_start, (float *)t->param + b, (float *)t->grad + b, (float *)t->state[EXP_AVG] + b,
                  (float *)t->state[EXP_AVG_SQ] + b,
                  amsgrad ? (float *)t->state[MAX_EXP_AVG_SQ] + b : NULL, k, amsgrad, unscale);
        return;
    }
    const size_t psz = pdt == RP_F32 ? 4 : 2, msz = mdt == RP_F32 ? 4 : 2, vsz = vdt == RP_F32 ? 4 : 2;
    /* The direct loops take torch's vector elements; its tail, and what they
       leave, goes through the staging blocks below. */
    const int64_t vec_end = e < tail_start ? e : tail_start;
    int64_t direct_end = b;
    if (t->seed && pdt == RP_BF16 && mdt == RP_BF16 && vdt == RP_BF16 && !t->master && !amsgrad && !unscale) {
        adam_bf16_sr_direct(b, e - b, (uint16_t *)t->param + b, (uint16_t *)t->grad + b,
                            (uint16_t *)t->state[EXP_AVG] + b, (uint16_t *)t->state[EXP_AVG_SQ] + b, k, t->sr_key);
        return;
    }
    if (b < vec_end && bf16_direct_ok(pdt, mdt, vdt, t->master != NULL, amsgrad, unscale)) {
        direct_end = vec_end;
        adam_bf16_direct(direct_end - b, (uint16_t *)t->param + b, t->master ? t->master + b : NULL,
                         (uint16_t *)t->grad + b, (char *)t->state[EXP_AVG] + b * msz, (char *)t->state[EXP_AVG_SQ] + b * vsz,
                         mdt, k);
    }
    else if (b < vec_end && pdt == RP_F32 && !t->master && mdt == RP_BF16 && vdt == RP_BF16 && !amsgrad) {
        direct_end = vec_end;
        adam_f32_bf16m_direct(direct_end - b, (float *)t->param + b, (float *)t->grad + b,
                              (uint16_t *)t->state[EXP_AVG] + b, (uint16_t *)t->state[EXP_AVG_SQ] + b, k, unscale);
    }
#ifdef __F16C__
    /* fp16 in torch's layout, or with a master and fp32 moments; no amsgrad */
    else if (b < vec_end && pdt == RP_F16 && mdt == vdt && mdt == (t->master ? RP_F32 : RP_F16) && !amsgrad) {
        direct_end = b + (vec_end - b) / F16_W * F16_W;
        adam_f16_direct(direct_end - b, (uint16_t *)t->param + b, t->master ? t->master + b : NULL,
                        (uint16_t *)t->grad + b, (char *)t->state[EXP_AVG] + b * msz, (char *)t->state[EXP_AVG_SQ] + b * vsz,
                        k, unscale);
    }
#endif
    b = direct_end;
    if (b >= e) return;
    float pb[RP_BLOCK] __attribute__((aligned(64)));
    float gb[RP_BLOCK] __attribute__((aligned(64)));
    float mb[RP_BLOCK] __attribute__((aligned(64)));
    float vb[RP_BLOCK] __attribute__((aligned(64)));
    float xb[RP_BLOCK] __attribute__((aligned(64)));
    for (int64_t s = b; s < e; s += RP_BLOCK) {
        const int64_t n = e - s < RP_BLOCK ? e - s : RP_BLOCK;
        char *param = (char *)t->param + s * psz, *grad = (char *)t->grad + s * psz;
        char *ea = (char *)t->state[EXP_AVG] + s * msz, *es = (char *)t->state[EXP_AVG_SQ] + s * vsz;
        char *ex = amsgrad ? (char *)t->state[MAX_EXP_AVG_SQ] + s * vsz : NULL;
        float *p, *g, *m, *v, *x = NULL;
        if (t->master) p = t->master + s;
        else if (pdt == RP_F32) p = (float *)param;
        else { load_block(pb, param, pdt, n); p = pb; }
        if (pdt == RP_F32) g = (float *)grad; else { load_block(gb, grad, pdt, n); g = gb; }
        if (mdt == RP_F32) m = (float *)ea; else { load_block(mb, ea, mdt, n); m = mb; }
        if (vdt == RP_F32) v = (float *)es; else { load_block(vb, es, vdt, n); v = vb; }
        if (amsgrad) {
            if (vdt == RP_F32) x = (float *)ex; else { load_block(xb, ex, vdt, n); x = xb; }
        }
        adam_fp32(s, n, tail_start, p, g, m, v, x, k, amsgrad, unscale);
        /* bf16 NaNs: torch's scalar form in its tail loop of a bf16 step, its
           vector form everywhere else (vector loop, or .to()/copy_() after an
           fp32 step on the master). A block may straddle the tail. */
        int64_t nb = tail_start - s;
        nb = nb < 0 ? 0 : nb > n ? n : nb;
        const uint32_t tail_nan = torch_half_layout(t) && pdt == RP_BF16 ? RP_BF16_NAN_SCALAR : RP_BF16_NAN_VEC;
        for (int part = 0; part < 2; part++) {
            const int64_t o = part ? nb : 0, len = part ? n - nb : nb;
            const uint32_t nan_bits = part ? tail_nan : RP_BF16_NAN_VEC;
            if (len == 0) continue;
            if (t->seed) /* bf16_stochastic_round: the layouts without a direct loop */
                for (int64_t j = 0; j < len; j++)
                    ((uint16_t *)param)[o + j] = rp_bf16_sr(p[o + j], rp_sr_bits(t->sr_key, (uint64_t)(s + o + j)));
            else if (pdt != RP_F32)
                store_block(param + o * psz, pdt, p + o, len, nan_bits); /* from the master, if any */
            if (unscale && pdt != RP_F32) store_block(grad + o * psz, pdt, g + o, len, nan_bits);
            if (mdt != RP_F32) store_block(ea + o * msz, mdt, m + o, len, nan_bits);
            if (vdt != RP_F32) store_block(es + o * vsz, vdt, v + o, len, nan_bits);
            if (amsgrad && vdt != RP_F32) store_block(ex + o * vsz, vdt, x + o, len, nan_bits);
        }
    }
}

/* ---- the step -------------------------------------------------------------- */

static void consts_for_group(const rp_adam_hyper *h, const rp_run_opts *run, rp_consts *k)
{
    memset(k, 0, sizeof *k);
    /* torch: exp_avg.lerp_(grad, 1-beta1) with weight w = float(1-beta1);
       |w| < 0.5 lerps from exp_avg with w, else from grad with w-1. */
    const float w = (float)(1.0 - h->beta1);
    k->lerp_from_exp_avg = fabsf(w) < 0.5f;
    k->lerp_coeff = k->lerp_from_exp_avg ? w : w - 1.0f;
    k->beta2 = (float)h->beta2;
    k->sq_coeff = (float)(1.0 - h->beta2);
    k->eps = (float)h->eps;
    k->one_minus_w = 1.0f - w;
    k->neg_one = -1.0f;
    k->one = 1.0f;
    k->maximize_negates = !(h->weight_decay != 0.0 && !h->decoupled_weight_decay);
    k->maximize = h->maximize != 0;
    k->coupled_decay = h->weight_decay != 0.0 && !h->decoupled_weight_decay;
    k->decoupled_decay = h->weight_decay != 0.0 && h->decoupled_weight_decay;
    k->weight_decay = (float)h->weight_decay;
    k->decay_factor = (float)fma(-h->lr, h->weight_decay, 1.0); /* torch's build fuses 1 - lr*wd */
    k->grad_scale = run->grad_scale ? *run->grad_scale : 1.0f;
}

typedef struct {
    rp_consts group;
    int amsgrad, unscale;
    int64_t torch_vec;
} adam_ctx;

static void adam_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const adam_ctx *ctx = ctx_;
    rp_consts k = ctx->group;
    k.neg_step_size = t->scalar[0];
    k.bias_correction2_sqrt = t->scalar[1];
    /* torch's half-precision vector loop flips the grad's sign for maximize even
       where its fp32 loop folds the -1 into the decay FMA (seen as a NaN's sign) */
    if (torch_half_layout(t)) k.maximize_negates = 1;
    adam_span(t, begin, end, &k, ctx->amsgrad, ctx->unscale, ctx->torch_vec);
}

int rp_adam_step(const rp_run_opts *run, const rp_adam_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                 const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;

    /* Per-tensor scalars, once per step, in double as torch computes them.
       Tensors usually share a step count, so the last result is reused. */
    float last_step = -1.0f, last_nss = 0.0f, last_bc2 = 0.0f;
    for (int64_t i = 0; i < n_tensors; i++) {
        rp_tensor *t = &tensors[i];
        const float step = *t->step + 1.0f; /* torch._foreach_add_(state_steps, 1) */
        *t->step = step;
        if (step != last_step) {
            const double bc1 = 1.0 - pow(h->beta1, (double)step);
            const double bc2 = 1.0 - pow(h->beta2, (double)step);
            last_nss = (float)(-(h->lr / bc1));
            last_bc2 = (float)sqrt(bc2);
            last_step = step;
        }
        t->scalar[0] = last_nss;
        t->scalar[1] = last_bc2;
        if (t->seed) { /* this step's random bits, keyed on an int64 count that does not saturate */
            const int64_t count = *t->sr_step + 1;
            *t->sr_step = count;
            t->sr_key = rp_sr_key((uint64_t)*t->seed, (uint64_t)count);
        }
    }
    adam_ctx ctx;
    consts_for_group(h, run, &ctx.group);
    ctx.amsgrad = h->amsgrad != 0;
    ctx.unscale = run->grad_scale != NULL;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, adam_chunk, &ctx);
    return 1;
}
