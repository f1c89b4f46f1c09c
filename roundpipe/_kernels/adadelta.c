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
 * One pass over memory: blocks of RP_BLOCK elements in three phases that stay
 * in L1 (up to the two sqrt arguments, torch's sqrt of both, the rest), each
 * intermediate rounded where torch's op rounds it, as in rmsprop.c: add with
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

static void adadelta_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                             const void *ctx_)
{
    const adadelta_ctx *ctx = ctx_;
    const adadelta_consts *k = &ctx->k;
    const int f = ctx->flags, cplx = (t->scalar[3] != 0.0f);
    const int64_t tail_start = t->numel - t->numel % ctx->torch_vec; /* torch's complex vector body */
    float gd[RP_BLOCK], gc[RP_BLOCK], x[2 * RP_BLOCK], y[2 * RP_BLOCK];
    for (int64_t o = 0; o < n; o += RP_BLOCK) {
        const int64_t m = n - o < RP_BLOCK ? n - o : RP_BLOCK;
        float *po = p + o, *go = g + o, *sq = s[0] + o, *acc = s[1] + o;
        if (ctx->unscale) rp_unscale(m, go, ctx->inv_scale);
        if (cplx && f) { /* torch's complex -grad and weight decay first */
            rp_complex_axpy(m, gc, go, po, k->weight_decay, f & ADA_MAXIMIZE, f & ADA_DECAY, first + o, tail_start, t->numel);
            adadelta_pre(m, po, gc, gd, sq, acc, x, k, 0);
        } else {
            switch (f) {
            case 0: adadelta_pre(m, po, go, gd, sq, acc, x, k, 0); break;
            case ADA_DECAY: adadelta_pre(m, po, go, gd, sq, acc, x, k, ADA_DECAY); break;
            case ADA_MAXIMIZE: adadelta_pre(m, po, go, gd, sq, acc, x, k, ADA_MAXIMIZE); break;
            default: adadelta_pre(m, po, go, gd, sq, acc, x, k, ADA_DECAY | ADA_MAXIMIZE); break;
            }
        }
        rp_torch_sqrt(ctx->vml_sqrt, ctx->sqrt_how, 2 * m, x, y);                          /* both sqrt_() in one call */
        int64_t mul_self[3]; /* where delta.mul_(grad) takes delta's NaN, relative to this block */
        rp_mul_self_nan(t->numel, first + o, &mul_self[0], &mul_self[1], &mul_self[2]);
        if (cplx) {
            adadelta_post(m, po, gd, y, acc, gc, k, 1, mul_self);
            rp_complex_axpy(m, po, po, gc, k->neg_lr, 0, 1, first + o, tail_start, t->numel);
        } else {
            adadelta_post(m, po, gd, y, acc, NULL, k, 0, mul_self);
        }
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
