/* roundpipe Lion rule: the fp32 element loop of lion-pytorch's Lion.
 *
 * Lion: Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".
 * Reference implementation: lion-pytorch 0.2.5 (lucidrains/lion-pytorch,
 * lion_pytorch/lion_pytorch.py, update_fn), four torch ops per tensor:
 *   p.mul_(1 - lr*wd)
 *   update = exp_avg.clone().mul_(beta1).add(grad, alpha=1-beta1).sgn_()
 *   p.add_(update, alpha=-lr)
 *   exp_avg.mul_(beta2).add_(grad, alpha=1-beta2)
 * Every fp32 result is bit-identical to those ops on torch 2.13's CPU kernels
 * (scripts/rules_harness.py); maximize (not in lion-pytorch) is lion-pytorch
 * fed torch.neg(grad).
 *
 * How torch rounds each op, measured with bit comparisons on random data
 * where the fused and unfused forms differ:
 *  - a Python float scalar becomes a float (opmath) before the op: mul_(x)
 *    is p * (float)x, one rounding;
 *  - add(other, alpha) is self + alpha*other with ONE rounding (fmaf): its
 *    vector loop calls vec::fmadd, and its scalar remainder is contracted
 *    the same way, so no element of a tensor rounds differently (unlike the
 *    fused SGD/Adagrad kernels, no tail regions here);
 *  - sgn_ of a real tensor is sign(): +1, -1, or +0 for zeros of either sign
 *    and for NaN (torch: (0 < x) - (x < 0)), so a NaN interpolation leaves
 *    the param undecayed-only;
 *  - the scalars 1 - lr*wd, 1 - beta1, 1 - beta2 and -lr are computed by
 *    Python in double (no FMA: -ffp-contract=off here keeps 1.0 - lr*wd
 *    unfused too), then rounded to float.
 * No OpenMP here: the shared scheduler calls lion_fp32_span on spans.
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "lion.h"

typedef struct {
    float decay;        /* (float)(1 - lr*wd), wd divided by the initial lr if decoupled */
    float beta1, one_minus_beta1;
    float beta2, one_minus_beta2;
    float neg_lr;       /* (float)(-lr): alpha of p.add_(update)                          */
    int maximize;       /* negate the grad first (a sign flip, as torch.neg)              */
} lion_consts;

/* lr: the group's current lr; init_lr: the lr the optimizer was constructed
   with (lion-pytorch's self._init_lr), used only by decoupled weight decay. */
static void lion_consts_init(lion_consts *k, double lr, double beta1, double beta2,
                             double weight_decay, int decoupled, double init_lr, int maximize)
{
    const double wd = decoupled ? weight_decay / init_lr : weight_decay; /* wd /= init_lr */
    k->decay = (float)(1.0 - lr * wd);
    k->beta1 = (float)beta1;
    k->one_minus_beta1 = (float)(1.0 - beta1);
    k->beta2 = (float)beta2;
    k->one_minus_beta2 = (float)(1.0 - beta2);
    k->neg_lr = (float)(-lr);
    k->maximize = maximize != 0;
}

/* The Lion update over n fp32 elements; maximize is a compile-time constant. */
static inline __attribute__((always_inline)) void lion_elements(
    int64_t n, float *restrict p, const float *restrict g, float *restrict m, const lion_consts *k,
    const int maximize)
{
    const lion_consts c = *k; /* locals: the compiler must see they don't alias */
    for (int64_t i = 0; i < n; i++) {
        const float gi = maximize ? rp_flip_sign(g[i]) /* as torch.neg */ : g[i];
        const float mi = m[i];
        const float pi = p[i] * c.decay;                              /* p.mul_(1 - lr*wd) */
        const float x = fmaf(gi, c.one_minus_beta1, mi * c.beta1);   /* m*beta1 + (1-beta1)*g */
        const float u = (float)(x > 0.0f) - (float)(x < 0.0f);      /* sgn_: NaN and +-0 give +0 */
        p[i] = fmaf(u, c.neg_lr, pi);                                 /* p.add_(u, alpha=-lr): exact product */
        m[i] = fmaf(gi, c.one_minus_beta2, mi * c.beta2);            /* exp_avg.mul_(beta2).add_(g, alpha=1-beta2) */
    }
}

/* Elements [first, first+n) of a tensor of numel elements; p, g, m (exp_avg)
   point at element `first`. tail_start and numel are unused (torch's Lion
   ops round every element alike) but keep the signature of the other rules. */
static void lion_fp32_span(int64_t first, int64_t n, int64_t tail_start, int64_t numel, float *p,
                           float *g, float *m, const lion_consts *k)
{
    (void)first, (void)tail_start, (void)numel;
    if (k->maximize) lion_elements(n, p, g, m, k, 1);
    else lion_elements(n, p, g, m, k, 0);
}

/* ---- the step: the engine's scheduler over lion_fp32_span ---------------------- */

typedef struct {
    lion_consts k;
    int unscale;
    float grad_scale;
} lion_ctx;

static void lion_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                         const void *ctx_)
{
    const lion_ctx *ctx = ctx_;
    if (ctx->unscale) /* GradScaler: unscale in place first (lion-pytorch has no grad scale) */
        for (int64_t i = 0; i < n; i++) g[i] = g[i] / ctx->grad_scale;
    lion_fp32_span(first, n, 0, t->numel, p, g, s[0], &ctx->k);
}

static void lion_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const lion_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 1, ctx->unscale, lion_fp32_fn, ctx);
}

int rp_lion_step(const rp_run_opts *run, const rp_lion_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                 const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    lion_ctx ctx;
    lion_consts_init(&ctx.k, h->lr, h->beta1, h->beta2, h->weight_decay, h->decoupled_weight_decay, h->init_lr,
                     h->maximize);
    ctx.unscale = run->grad_scale != NULL;
    ctx.grad_scale = run->grad_scale ? *run->grad_scale : 1.0f;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, lion_chunk, &ctx);
    return 1;
}
