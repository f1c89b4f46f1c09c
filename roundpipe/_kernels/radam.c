/* roundpipe RAdam rule: the fp32 element loop of torch.optim.RAdam's default
 * CPU path (foreach=False, _single_tensor_radam in torch/optim/radam.py):
 *   grad = -grad                                           (maximize; complex: rp_torch_neg)
 *   param.mul_(1 - lr*wd)  or  grad = grad.add(param, alpha=wd)   (weight_decay)
 *   exp_avg.lerp_(grad, 1 - beta1)
 *   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
 *   x = exp_avg / bias_correction1 * lr
 *   rho_t > 5:  x = x * ((bias_correction2 ** 0.5) / exp_avg_sq.sqrt().add_(eps)) * rect
 *   param.add_(x, alpha=-1.0)
 * torch runs up to fourteen tensor ops per param, most with a temporary; here
 * one pass, each op rounded to float32 where torch materializes it, in torch's
 * order. Whether a step is rectified, and its Python scalars (double, glibc's
 * pow as Python's ** uses), are decided per tensor before the pass, as torch
 * decides them per param. Bit-identical to torch 2.13, NaN bits included
 * (scripts/loop_rules_harness.py).
 *
 * Rounding, as torch's kernels do it (measured):
 *  - grad.add(param, alpha) and param.add_(x, alpha=-1): one fmaf each;
 *  - addcmul_(g, g, value=s): fmaf(s*g, g, v), the product s*g rounded first;
 *  - a Python float / tensor is reciprocal(tensor) * float (Tensor.__rdiv__),
 *    two roundings; a tensor / Python float is one division;
 *  - mul_/add_/div by a Python float: the float rounded to float once.
 * -ffp-contract=off: every fused multiply-add is an explicit fmaf().
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "radam.h"

/* RAdam's state slots in rp_tensor.state, in the order of RAdam._state_keys */
enum { EXP_AVG = 0, EXP_AVG_SQ = 1 };
/* Its per-tensor scalars in rp_tensor.scalar (radam.h) */
enum { BC1 = 0, BC2_SQRT = 1, RECT = 2 }; /* and RP_SCALAR_COMPLEX (rules.h) */

/* torch's exp_avg_sq.sqrt() is MKL's vmsSqrt where torch is built with MKL, not
   correctly rounded: rules.h, rp_torch_sqrt, gives its bits, one block at a time. */
#define RADAM_BLOCK 512 /* elements per square-root block: 2 KiB, in L1 with the arrays' lines */
_Static_assert(RADAM_BLOCK <= RP_BLOCK, "a block's fused lanes must fit an rp_redo");

/* Scalars of one tensor's step, rounded to float as torch rounds them. */
typedef struct {
    rp_lerp_weight lerp;          /* 1 - beta1 */
    float beta2, one_minus_beta2, eps, lr, weight_decay, decay, inv_scale, neg_one, one;
    float bc1, bc2_sqrt, rect;    /* per tensor: rp_tensor.scalar */
    int maximize;
    const void *vml_sqrt;         /* torch's sqrt (rules.h, rp_torch_sqrt): MKL's, or NULL */
    int sqrt_how;
} radam_consts;

/* What one loop over elements does: the whole un-rectified step; or, for a rectified
   step, the moments first (MOMENTS), then the params from sqrt(exp_avg_sq) (PARAMS). */
enum { UNRECTIFIED = 0, MOMENTS = 1, PARAMS = 2 };

/* n fp32 elements of one region; the flags are compile-time constants at each call.
   coupled: grad += wd*param; decoupled: param *= 1 - lr*wd; tail: the elements are in
   torch's scalar remainder loop (rules.h, rp_lerp); complex_vec: in the vector loop of a
   complex param (rp_torch_neg); sq: sqrt(exp_avg_sq) for PARAMS. */
static inline __attribute__((always_inline)) void radam_elements(
    int64_t n, float *restrict p, float *restrict g, float *restrict m, float *restrict v,
    const float *restrict sq, const radam_consts *k, const int unscale, const int coupled,
    const int decoupled, const int phase, const int tail, const int complex_vec)
{
    const radam_consts c = *k; /* locals: the compiler must see they don't alias */
    for (int64_t i = 0; i < n; i++) {
        float pi = p[i];
        if (phase != PARAMS) {
            /* GradScaler's unscale_, then -grad (rules.h) */
            float gi = rp_loop_grad(g, i, unscale, c.inv_scale, !c.maximize ? RP_NEG_NONE : complex_vec ? RP_NEG_SUB : RP_NEG_FLIP);
            if (coupled) gi = fmaf(c.weight_decay, pi, gi);        /* grad.add(param, alpha=wd) */
            m[i] = rp_lerp(m[i], gi, &c.lerp, tail);               /* exp_avg.lerp_(grad, 1-beta1) */
            v[i] = fmaf(c.one_minus_beta2 * gi, gi, v[i] * c.beta2); /* mul_(beta2).addcmul_(g, g, 1-beta2) */
        }
        if (phase == MOMENTS) continue;
        if (decoupled) pi = pi * c.decay;                      /* param.mul_(1 - lr*wd) */
        float x = m[i] / c.bc1 * c.lr;                         /* exp_avg / bc1 * lr */
        if (phase == PARAMS) {
            const float adaptive_lr = (c.one / (sq[i] + c.eps)) * c.bc2_sqrt; /* bc2**0.5 / (sqrt(v) + eps) */
            x = x * adaptive_lr * c.rect;
        }
        p[i] = fmaf(x, c.neg_one, pi);                         /* param.add_(x, alpha=-1.0) */
    }
}

/* One loop of a region: the flags become constants of their own loop, except in torch's
   tail (fewer than 16 elements) and for complex params, where one loop serves every variant. */
static void radam_loop(int64_t n, float *p, float *g, float *m, float *v, const float *sq, const radam_consts *k,
                       int unscale, int coupled, int decoupled, int phase, int tail, int is_complex)
{
#define RADAM_LOOP(U, C, D, P) radam_elements(n, p, g, m, v, sq, k, U, C, D, P, 0, 0)
#define RADAM_DECAY(U, P) do { if (coupled) RADAM_LOOP(U, 1, 0, P); else if (decoupled) RADAM_LOOP(U, 0, 1, P); \
                               else RADAM_LOOP(U, 0, 0, P); } while (0)
    if (tail || is_complex) {
        for (int64_t i = 0; i < n; i++)
            radam_elements(1, p + i, g + i, m + i, v + i, sq ? sq + i : NULL, k, unscale, coupled, decoupled,
                           phase, tail, is_complex && !tail);
    } else if (phase == PARAMS) {
        if (decoupled) RADAM_LOOP(0, 0, 1, PARAMS);
        else RADAM_LOOP(0, 0, 0, PARAMS);
    } else if (phase == MOMENTS) {
        if (unscale) RADAM_DECAY(1, MOMENTS);
        else RADAM_DECAY(0, MOMENTS);
    } else {
        if (unscale) RADAM_DECAY(1, UNRECTIFIED);
        else RADAM_DECAY(0, UNRECTIFIED);
    }
#undef RADAM_DECAY
#undef RADAM_LOOP
}

#ifdef __AVX512F__
/* A rectified step's MOMENTS, torch's sqrt and PARAMS in one loop over 16 lanes (rules.h:
   fused loops) for n a multiple of 16 in torch's vector body of a real param; lanes with a
   special exp_avg_sq are left to r, untouched (the grad's unscale_ included). */
static inline __attribute__((always_inline)) void radam_fused(
    int64_t n, float *restrict p, float *restrict g, float *restrict m, float *restrict v,
    const radam_consts *k, rp_redo *r, const int unscale, const int coupled, const int decoupled, const int how)
{
    const __m512 w = _mm512_set1_ps(k->lerp.small ? k->lerp.w : k->lerp.w_minus_1);
    const __m512 beta2 = _mm512_set1_ps(k->beta2), omb2 = _mm512_set1_ps(k->one_minus_beta2);
    const __m512 eps = _mm512_set1_ps(k->eps), lr = _mm512_set1_ps(k->lr), wd = _mm512_set1_ps(k->weight_decay);
    const __m512 decay = _mm512_set1_ps(k->decay), inv_scale = _mm512_set1_ps(k->inv_scale);
    const __m512 neg_one = _mm512_set1_ps(k->neg_one), one = _mm512_set1_ps(k->one);
    const __m512 bc1 = _mm512_set1_ps(k->bc1), bc2_sqrt = _mm512_set1_ps(k->bc2_sqrt), rect = _mm512_set1_ps(k->rect);
    const int small = k->lerp.small, maximize = k->maximize;
    for (int64_t i = 0; i < n; i += 16) {
        __m512 pv = _mm512_loadu_ps(p + i), gi = _mm512_loadu_ps(g + i);
        const __m512 mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
        const __m512 gu = unscale ? _mm512_mul_ps(gi, inv_scale) : gi;
        gi = rp_vtorch_grad(gu, pv, wd, maximize, 0);
        if (coupled) gi = _mm512_fmadd_ps(wd, pv, gi);
        const __m512 d = _mm512_sub_ps(gi, mv);
        const __m512 m1 = _mm512_fmadd_ps(w, d, small ? mv : gi);                 /* rp_lerp, vector form */
        const __m512 v1 = _mm512_fmadd_ps(_mm512_mul_ps(omb2, gi), gi, _mm512_mul_ps(vv, beta2));
        __mmask16 special;
        const __m512 sq = rp_vsqrt(v1, how, &special);
        if (decoupled) pv = _mm512_mul_ps(pv, decay);
        __m512 x = _mm512_mul_ps(_mm512_div_ps(m1, bc1), lr);
        const __m512 adaptive = _mm512_mul_ps(_mm512_div_ps(one, _mm512_add_ps(sq, eps)), bc2_sqrt);
        x = _mm512_mul_ps(_mm512_mul_ps(x, adaptive), rect);
        const __mmask16 keep = (__mmask16)~special;
        if (unscale) _mm512_mask_storeu_ps(g + i, keep, gu);
        _mm512_mask_storeu_ps(m + i, keep, m1);
        _mm512_mask_storeu_ps(v + i, keep, v1);
        _mm512_mask_storeu_ps(p + i, keep, _mm512_fmadd_ps(x, neg_one, pv));
        rp_redo_add(r, i, special);
    }
}

static void radam_fused_any(int64_t n, float *p, float *g, float *m, float *v, const radam_consts *k, rp_redo *r,
                            int unscale, int coupled, int decoupled)
{
#define RADAM_HOW(U, C, D, H) case H: radam_fused(n, p, g, m, v, k, r, U, C, D, H); return
#define RADAM_F(U, C, D) do { switch (k->sqrt_how) { RADAM_HOW(U, C, D, RP_SQRT_IEEE); RADAM_HOW(U, C, D, RP_SQRT_MKL_Z0); \
                             RADAM_HOW(U, C, D, RP_SQRT_MKL_L9); RADAM_HOW(U, C, D, RP_SQRT_MKL_H8); } return; } while (0)
    if (unscale) { if (coupled) RADAM_F(1, 1, 0); if (decoupled) RADAM_F(1, 0, 1); RADAM_F(1, 0, 0); }
    if (coupled) RADAM_F(0, 1, 0);
    if (decoupled) RADAM_F(0, 0, 1);
    RADAM_F(0, 0, 0);
#undef RADAM_F
#undef RADAM_HOW
}
#endif

/* One region of a span: a rectified step goes block by block through the moments,
   torch's square root of exp_avg_sq, then the params. */
static void radam_region(int64_t n, float *p, float *g, float *m, float *v, const radam_consts *k,
                         int unscale, int coupled, int decoupled, int tail, int is_complex)
{
    const int rectified = k->rect != 0.0f; /* radam_scalars */
    if (!rectified) {
        radam_loop(n, p, g, m, v, NULL, k, unscale, coupled, decoupled, UNRECTIFIED, tail, is_complex);
        return;
    }
    float sq[RADAM_BLOCK] __attribute__((aligned(64)));
    for (int64_t b = 0; b < n; b += RADAM_BLOCK) {
        const int64_t len = n - b < RADAM_BLOCK ? n - b : RADAM_BLOCK;
        int64_t done = 0;
#ifdef __AVX512F__
        if (len >= 16 && !tail && !is_complex && rp_vsqrt_inline(k->sqrt_how, k->vml_sqrt)) {
            rp_redo r;
            r.n = 0;
            done = len - len % 16;
            radam_fused_any(done, p + b, g + b, m + b, v + b, k, &r, unscale, coupled, decoupled);
            int64_t idx[RP_BLOCK]; /* the lanes it left, one element each */
            for (int64_t j = 0, nr = rp_redo_elements(&r, idx); j < nr; j++) {
                const int64_t i = b + idx[j];
                radam_region(1, p + i, g + i, m + i, v + i, k, unscale, coupled, decoupled, 0, 0);
            }
        }
#endif
        if (done == len) continue;
        float *pb = p + b + done, *gb = g + b + done, *mb = m + b + done, *vb = v + b + done;
        radam_loop(len - done, pb, gb, mb, vb, NULL, k, unscale, coupled, decoupled, MOMENTS, tail, is_complex);
        rp_torch_sqrt(k->vml_sqrt, k->sqrt_how, len - done, vb, sq);               /* exp_avg_sq.sqrt() */
        radam_loop(len - done, pb, gb, mb, vb, sq, k, unscale, coupled, decoupled, PARAMS, tail, is_complex);
    }
}

/* ---- the step: the engine's scheduler over radam_region --------------------------- */

typedef struct {
    radam_consts k;     /* bc1, bc2_sqrt and rect are per tensor: rp_tensor.scalar */
    int unscale, coupled, decoupled;
    int64_t torch_vec;  /* torch's vector width (16 floats with AVX-512): its scalar tail is numel % torch_vec */
} radam_ctx;

static void radam_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                          const void *ctx_)
{
    const radam_ctx *ctx = ctx_;
    radam_consts k = ctx->k;
    k.bc1 = t->scalar[BC1];
    k.bc2_sqrt = t->scalar[BC2_SQRT];
    k.rect = t->scalar[RECT];
    const int is_complex = t->scalar[RP_SCALAR_COMPLEX] != 0.0f;
    int64_t body = t->numel - t->numel % ctx->torch_vec - first; /* elements before torch's tail */
    body = body < 0 ? 0 : body > n ? n : body;
    if (body > 0)
        radam_region(body, p, g, s[EXP_AVG], s[EXP_AVG_SQ], &k, ctx->unscale, ctx->coupled, ctx->decoupled,
                     0, is_complex);
    if (body < n)
        radam_region(n - body, p + body, g + body, s[EXP_AVG] + body, s[EXP_AVG_SQ] + body, &k, ctx->unscale,
                     ctx->coupled, ctx->decoupled, 1, is_complex);
}

static void radam_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const radam_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 2, ctx->unscale, radam_fp32_fn, ctx);
}

/* torch's Python scalars for one tensor at `step` (a float32 count, as item() gives it),
   in double, in Python's order of operations; ** is glibc's pow, as in Python. out[RECT]
   is 0 when the step is not rectified (rho_t <= 5): a rectified step's rect is at least
   sqrt(3 / rho_inf^2) > 1e-16, since 5 < rho_t <= rho_inf < 2 / (1 - beta2) < 2^54. */
static void radam_scalars(const rp_radam_hyper *h, float step_f, float out[3])
{
    const double step = (double)step_f;
    const double bc1 = 1.0 - pow(h->beta1, step);
    const double bc2 = 1.0 - pow(h->beta2, step);
    const double rho_inf = 2.0 / (1.0 - h->beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * step * pow(h->beta2, step) / bc2;
    out[BC1] = (float)bc1;
    out[BC2_SQRT] = (float)pow(bc2, 0.5);
    out[RECT] = rho_t > 5.0
        ? (float)pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)
        : 0.0f;
}

int rp_radam_step(const rp_run_opts *run, const rp_radam_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                  const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    float last_step = -1.0f, last[3] = {0.0f, 0.0f, 0.0f};
    for (int64_t i = 0; i < n_tensors; i++) { /* step_t += 1, then the scalars per tensor */
        rp_tensor *t = &tensors[i];
        *t->step += 1.0f;
        if (*t->step != last_step) { /* tensors usually share a step count */
            last_step = *t->step;
            radam_scalars(h, last_step, last);
        }
        t->scalar[BC1] = last[BC1], t->scalar[BC2_SQRT] = last[BC2_SQRT], t->scalar[RECT] = last[RECT];
    }
    radam_ctx ctx;
    radam_consts *k = &ctx.k;
    rp_lerp_weight_init(&k->lerp, 1.0 - h->beta1);
    k->beta2 = (float)h->beta2;
    k->one_minus_beta2 = (float)(1.0 - h->beta2);
    k->eps = (float)h->eps;
    k->lr = (float)h->lr;
    k->weight_decay = (float)h->weight_decay;
    /* 1 - lr*wd: Python doubles, or float32 tensor arithmetic for a float32 Tensor lr */
    k->decay = h->lr_f32 ? 1.0f - (float)h->lr * (float)h->weight_decay
                         : (float)(1.0 - h->lr * h->weight_decay);
    k->inv_scale = rp_inv_scale(run->grad_scale);
    k->neg_one = -1.0f;
    k->one = 1.0f;
    k->bc1 = k->bc2_sqrt = k->rect = 0.0f;
    k->maximize = h->maximize != 0;
    k->vml_sqrt = h->vml_sqrt;
    k->sqrt_how = h->sqrt_how;
    ctx.unscale = run->grad_scale != NULL;
    ctx.coupled = h->weight_decay != 0.0 && !h->decoupled_weight_decay;
    ctx.decoupled = h->weight_decay != 0.0 && h->decoupled_weight_decay;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, radam_chunk, &ctx);
    return 1;
}

RP_EXPORT_TORCH_SQRT(rp_radam_torch_sqrt)
