/* roundpipe Adadelta rule: the fp32 element loop of torch.optim.Adadelta.
 *
 * Reference: torch/optim/adadelta.py, _single_tensor_adadelta (torch 2.13's
 * default CPU path, foreach=False), one torch op after another per tensor:
 *   grad = -grad                                   (maximize)
 *   grad = grad.add(param, alpha=weight_decay)     (weight_decay != 0)
 *   square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
 *   std = square_avg.add(eps).sqrt_()
 *   delta = acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
 *   acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
 *   param.add_(delta, alpha=-lr)
 * One pass over memory: with AVX-512 and torch's sqrt inline, one loop over 16
 * lanes (adadelta_fused; lanes MKL takes on its own path redone afterwards, as
 * in rmsprop.c), else blocks of RP_BLOCK elements in three phases that stay in
 * L1 (adadelta_phased: up to the two sqrt arguments, torch's sqrt of both, the
 * rest). The phases held it at 0.77 of its 28-byte roofline on the bench mix at
 * 2 threads, fused 0.95 (2-core Zen 4). Each intermediate is rounded where
 * torch's op rounds it, as in rmsprop.c: add with
 * alpha is one fmaf, addcmul(a, b, value=s) is fmaf(s*a, b, self), sqrt is
 * MKL's (rp_torch_sqrt), two NaNs give the one torch's op returns
 * (rp_nan_from; mul_'s depends on the element: rp_mul_self_nan), scalars
 * (1 - rho, -lr) are computed in double and rounded to float once. Complex
 * params are stepped as their real view, but -grad, the weight decay and the
 * param update are complex ops in torch: rp_complex_axpy (rules.h). scripts/loop_rules_harness.py checks it bit for bit.
 * Built with -ffp-contract=off, int64_t indices; no OpenMP here.
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "adadelta.h"

typedef struct {
    float rho, one_minus_rho;       /* rho and (float)(1 - rho)                              */
    float eps, weight_decay;
    float neg_lr;                   /* (float)(-lr)                                           */
} adadelta_consts;

enum { ADA_DECAY = 1, ADA_MAXIMIZE = 2 };

/* Up to the sqrt: torch's grad (gd), square_avg, and the two sqrt arguments,
   square_avg + eps in x[0..n) and acc_delta + eps in x[n..2n). */
static inline __attribute__((always_inline)) void adadelta_pre(
    int64_t n, const float *restrict p, const float *restrict g, float *restrict gd, float *restrict sq,
    const float *restrict acc, float *restrict x, const adadelta_consts *k, const int flags)
{
    const adadelta_consts c = *k;
    for (int64_t i = 0; i < n; i++) {
        const float gi = rp_torch_grad(g[i], p[i], c.weight_decay, flags & ADA_MAXIMIZE, flags & ADA_DECAY);
        gd[i] = gi;
        const float s = rp_sq_avg(sq[i], gi, c.rho, c.one_minus_rho); /* square_avg */
        sq[i] = s;
        x[i] = s + c.eps;                                             /* square_avg.add(eps) */
        x[n + i] = acc[i] + c.eps;                                    /* acc_delta.add(eps) */
    }
}

/* After the sqrt: delta, acc_delta, and the param (real) or delta kept in dl (complex). */
static inline __attribute__((always_inline)) void adadelta_post(
    int64_t n, float *restrict p, const float *restrict gd, const float *restrict x, float *restrict acc,
    float *restrict dl, const adadelta_consts *k, const int cplx, const int64_t *mul_self)
{
    const adadelta_consts c = *k;
    const int64_t lo = mul_self[0], hi = mul_self[1], one = mul_self[2];
    for (int64_t i = 0; i < n; i++) {
        const float q = rp_nan_from(x[n + i], x[n + i] / x[i]);      /* .div_(std) */
        /* .mul_(grad): grad's NaN where both are NaNs, but delta's at the few elements near
           the tensor's end where torch's mul_ orders its operands the other way (rp_mul_self_nan:
           where acc_delta is NaN and square_avg + eps is 0 or NaN, a NaN delta meets a NaN grad) */
        const int self_nan = (i >= lo && i < hi) || i == one;
        const float d = rp_nan_from(self_nan ? q : gd[i], q * gd[i]);
        acc[i] = rp_sq_avg(acc[i], d, c.rho, c.one_minus_rho);         /* acc_delta */
        if (cplx) dl[i] = d;                                          /* a complex add, below */
        else p[i] = rp_nan_from(d, fmaf(c.neg_lr, d, p[i]));        /* param.add_(delta, alpha=-lr) */
    }
}

/* ---- the step: the engine's scheduler over adadelta_fp32_fn ---------------------- */

typedef struct {
    adadelta_consts k;
    int flags, unscale;
    float inv_scale;         /* GradScaler: (float)(1 / scale), as torch's unscale_ */
    const void *vml_sqrt;
    int sqrt_how;
    int64_t torch_vec;    /* torch's SIMD width in floats (rp_complex_axpy) */
} adadelta_ctx;

/* n real elements in phases (adadelta_pre, both sqrt_() in one call, adadelta_post),
   n <= RP_BLOCK: a block's last n % 16 elements, lanes the fused loop left (n = 1), and
   every element where there is no fused loop. */
static void adadelta_phased(int64_t n, float *p, const float *g, float *sq, float *acc, const adadelta_ctx *ctx,
                            int f, int64_t numel, int64_t first)
{
    float gd[RP_BLOCK], x[2 * RP_BLOCK], y[2 * RP_BLOCK];
    switch (f) {
    case 0: adadelta_pre(n, p, g, gd, sq, acc, x, &ctx->k, 0); break;
    case ADA_DECAY: adadelta_pre(n, p, g, gd, sq, acc, x, &ctx->k, ADA_DECAY); break;
    case ADA_MAXIMIZE: adadelta_pre(n, p, g, gd, sq, acc, x, &ctx->k, ADA_MAXIMIZE); break;
    default: adadelta_pre(n, p, g, gd, sq, acc, x, &ctx->k, ADA_DECAY | ADA_MAXIMIZE); break;
    }
    rp_torch_sqrt(ctx->vml_sqrt, ctx->sqrt_how, 2 * n, x, y);
    int64_t mul_self[3]; /* where delta.mul_(grad) takes delta's NaN: elements first.. of numel */
    rp_mul_self_nan(numel, first, &mul_self[0], &mul_self[1], &mul_self[2]);
    adadelta_post(n, p, gd, y, acc, NULL, &ctx->k, 0, mul_self);
}

#ifdef __AVX512F__
/* adadelta_pre, both sqrt_() and adadelta_post in one loop over 16 lanes (rules.h: fused
   loops), for n a multiple of 16; lanes with a special sqrt argument are left to r. */
static inline __attribute__((always_inline)) void adadelta_fused(
    int64_t n, float *restrict p, const float *restrict g, float *restrict sq, float *restrict acc,
    const adadelta_consts *k, rp_redo *r, const int flags, const int how)
{
    const __m512 rho = _mm512_set1_ps(k->rho), omr = _mm512_set1_ps(k->one_minus_rho);
    const __m512 eps = _mm512_set1_ps(k->eps), wd = _mm512_set1_ps(k->weight_decay);
    const __m512 nlr = _mm512_set1_ps(k->neg_lr);
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 pv = _mm512_loadu_ps(p + i), av = _mm512_loadu_ps(acc + i);
        const __m512 gi = rp_vtorch_grad(_mm512_loadu_ps(g + i), pv, wd, flags & ADA_MAXIMIZE, flags & ADA_DECAY);
        const __m512 s = rp_vsq_avg(_mm512_loadu_ps(sq + i), gi, rho, omr);
        __mmask16 sp1, sp2;
        const __m512 std = rp_vsqrt(_mm512_add_ps(s, eps), how, &sp1);
        const __m512 dl = rp_vsqrt(_mm512_add_ps(av, eps), how, &sp2);
        const __m512 q = rp_vnan_from(dl, _mm512_div_ps(dl, std));
        const __m512 d = rp_vnan_from(gi, _mm512_mul_ps(q, gi));
        const __m512 a = rp_vsq_avg(av, d, rho, omr);
        const __m512 out = rp_vnan_from(d, _mm512_fmadd_ps(nlr, d, pv));
        const __mmask16 special = sp1 | sp2, keep = (__mmask16)~special;
        _mm512_mask_storeu_ps(sq + i, keep, s);
        _mm512_mask_storeu_ps(acc + i, keep, a);
        _mm512_mask_storeu_ps(p + i, keep, out);
        rp_redo_add(r, i, special);
    }
}

/* The fused loop's variants: flags and how at compile time. */
static int64_t adadelta_fused_any(int64_t n, float *p, const float *g, float *sq, float *acc, const adadelta_consts *k,
                               int64_t *idx, int flags, int how)
{
    rp_redo redo;
    rp_redo *r = &redo;
    redo.n = 0;
#define ADA_HOW(F, H) case H: adadelta_fused(n, p, g, sq, acc, k, r, F, H); break
#define ADA_F(F) case F: switch (how) { ADA_HOW(F, RP_SQRT_IEEE); ADA_HOW(F, RP_SQRT_MKL_Z0); \
                                         ADA_HOW(F, RP_SQRT_MKL_L9); ADA_HOW(F, RP_SQRT_MKL_H8); } break
    switch (flags) { ADA_F(0); ADA_F(1); ADA_F(2); ADA_F(3); }
#undef ADA_F
#undef ADA_HOW
    return rp_redo_elements(r, idx);
}
#endif

static void adadelta_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                             const void *ctx_)
{
    const adadelta_ctx *ctx = ctx_;
    const adadelta_consts *k = &ctx->k;
    const int f = ctx->flags, cplx = (t->scalar[3] != 0.0f);
    const int64_t tail_start = t->numel - t->numel % ctx->torch_vec; /* torch's complex vector body */
#ifdef __AVX512F__
    const int fused = !cplx && rp_vsqrt_inline(ctx->sqrt_how, ctx->vml_sqrt);
#endif
    float gd[RP_BLOCK], gc[RP_BLOCK], x[2 * RP_BLOCK], y[2 * RP_BLOCK];
    for (int64_t o = 0; o < n; o += RP_BLOCK) {
        const int64_t m = n - o < RP_BLOCK ? n - o : RP_BLOCK;
        float *po = p + o, *go = g + o, *sq = s[0] + o, *acc = s[1] + o;
        if (ctx->unscale) rp_unscale(m, go, ctx->inv_scale);
        if (cplx) { /* torch's complex -grad and weight decay first, and a complex param update */
            const float *gs = go;
            if (f) {
                rp_complex_axpy(m, gc, go, po, k->weight_decay, f & ADA_MAXIMIZE, f & ADA_DECAY, first + o, tail_start, t->numel);
                gs = gc;
            }
            adadelta_pre(m, po, gs, gd, sq, acc, x, k, 0);
            rp_torch_sqrt(ctx->vml_sqrt, ctx->sqrt_how, 2 * m, x, y);                      /* both sqrt_() in one call */
            int64_t mul_self[3]; /* where delta.mul_(grad) takes delta's NaN, relative to this block */
            rp_mul_self_nan(t->numel, first + o, &mul_self[0], &mul_self[1], &mul_self[2]);
            adadelta_post(m, po, gd, y, acc, gc, k, 1, mul_self);
            rp_complex_axpy(m, po, po, gc, k->neg_lr, 0, 1, first + o, tail_start, t->numel);
            continue;
        }
        int64_t idx[RP_BLOCK], nr = 0, done = 0; /* as in rmsprop.c */
#ifdef __AVX512F__
        if (fused) done = m - m % 16, nr = adadelta_fused_any(done, po, go, sq, acc, k, idx, f, ctx->sqrt_how);
#endif
        for (int64_t j = 0; j < nr; j++)
            adadelta_phased(1, po + idx[j], go + idx[j], sq + idx[j], acc + idx[j], ctx, f, t->numel, first + o + idx[j]);
        if (done < m)
            adadelta_phased(m - done, po + done, go + done, sq + done, acc + done, ctx, f, t->numel, first + o + done);
    }
}

static void adadelta_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const adadelta_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 2, ctx->unscale, adadelta_fp32_fn, ctx);
}

int rp_adadelta_step(const rp_run_opts *run, const rp_adadelta_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                     const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    for (int64_t i = 0; i < n_tensors; i++) *tensors[i].step += 1.0f; /* step += 1 */
    adadelta_ctx ctx;
    ctx.k.rho = (float)h->rho;
    ctx.k.one_minus_rho = (float)(1.0 - h->rho);
    ctx.k.eps = (float)h->eps;
    ctx.k.weight_decay = (float)h->weight_decay;
    ctx.k.neg_lr = (float)(-h->lr);
    ctx.flags = (h->weight_decay != 0.0 ? ADA_DECAY : 0) | (h->maximize ? ADA_MAXIMIZE : 0);
    ctx.unscale = run->grad_scale != NULL;
    ctx.inv_scale = rp_inv_scale(run->grad_scale);
    ctx.vml_sqrt = h->vml_sqrt;
    ctx.sqrt_how = h->sqrt_how;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, adadelta_chunk, &ctx);
    return 1;
}

RP_EXPORT_TORCH_SQRT(rp_adadelta_torch_sqrt)
