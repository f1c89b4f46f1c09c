/* roundpipe Adagrad rule: the fp32 element loop of torch.optim.Adagrad(fused=True).
 *
 * Reference: https://pytorch.org/docs/stable/generated/torch.optim.Adagrad.html
 * and, for the order of operations, aten/src/ATen/native/cpu/FusedAdagradKernel.cpp
 * (adagrad_math, float variant) and torch/optim/adagrad.py (_fused_adagrad).
 * Every finite fp32 result is bit-identical to torch 2.13's fused kernel;
 * scripts/rules_harness.py proves it (all flags, every tail length).
 *
 * Rules as in adam.c: built with -ffp-contract=off, each multiply-add that
 * torch's build fuses is an explicit fmaf(); int64_t indices; flags are
 * compile-time constants per call of adagrad_elements. No OpenMP here.
 * rules.h: the three regions of a tensor where torch rounds differently.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "adagrad.h"

/* One tensor's scalars, rounded to float as torch rounds them. */
typedef struct {
    float clr;            /* scalar_t(lr / (1 + (step-1) * lr_decay)), per tensor   */
    float eps;            /* scalar_t(eps)                                           */
    float weight_decay;   /* scalar_t(weight_decay)                                  */
    float grad_scale;     /* *grad_scale (GradScaler), 1 when there is none          */
    float neg_one;        /* -1 at run time, so that g * -1 stays a multiply         */
    int maximize;         /* negate the gradient                                     */
    int decay;            /* weight_decay != 0: g += p * weight_decay                */
} adagrad_consts;

/* torch: step = state_step.item<float>() (already incremented by
   _foreach_add_ in float), then clr = lr / (1.0 + (step - 1.0) * lr_decay)
   in double and scalar_t(clr). torch's build fuses the double multiply-add
   (measured: fma matches on steps and lr_decay values where the two differ). */
static float adagrad_clr(double lr, double lr_decay, float step)
{
    return (float)(lr / fma((double)step - 1.0, lr_decay, 1.0));
}

static void adagrad_consts_init(adagrad_consts *k, double lr, double lr_decay, double weight_decay,
                                double eps, int maximize, const float *grad_scale, float step)
{
    k->clr = adagrad_clr(lr, lr_decay, step);
    k->eps = (float)eps;
    k->weight_decay = (float)weight_decay;
    k->grad_scale = grad_scale ? *grad_scale : 1.0f;
    k->neg_one = -1.0f;
    k->maximize = maximize != 0;
    k->decay = weight_decay != 0.0;
}

/* The Adagrad update over n fp32 elements of one region (rules.h). */
static inline __attribute__((always_inline)) void adagrad_elements(
    int64_t n, float *restrict p, float *restrict g, float *restrict sum, const adagrad_consts *k,
    const int unscale, const int region)
{
    const adagrad_consts c = *k; /* locals: the compiler must see they don't alias */
    (void)region;
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        if (unscale) {            /* GradScaler: unscale in place, g / scale */
            gi = gi / c.grad_scale;
            g[i] = gi;
        }
        const float pi = p[i];
        /* maximize: torch writes g * -1 (vector) and -g (tail). Its build
           flips the sign bit, except with weight decay and no grad scale:
           there the negation folds into the decay's FMA (p*wd - g), which
           keeps a NaN grad's sign, as a multiply by a run-time -1 does.
           Measured on NaN grads in all three regions. */
        if (c.maximize) gi = c.decay && !unscale ? gi * c.neg_one : rp_flip_sign(gi);
        if (c.decay) gi = fmaf(pi, c.weight_decay, gi);   /* g += p * wd, fused */
        const float s = fmaf(gi, gi, sum[i]);             /* sum += g * g, fused */
        sum[i] = s;
        const float std = sqrtf(s) + c.eps;               /* sqrt(sum) + eps */
        p[i] = pi - (c.clr * gi) / std;                   /* p -= clr * g / std: no FMA possible */
    }
}

/* torch's tail loop (fewer than 16 elements): one element at a time, not inlined. */
__attribute__((noinline)) static void adagrad_fp32_tail(int64_t n, int region, float *p, float *g,
                                                        float *sum, const adagrad_consts *k,
                                                        int unscale)
{
    for (int64_t i = 0; i < n; i++) {
        if (region == RP_TAILVEC) {
            if (unscale) adagrad_elements(1, p + i, g + i, sum + i, k, 1, RP_TAILVEC);
            else adagrad_elements(1, p + i, g + i, sum + i, k, 0, RP_TAILVEC);
        } else {
            if (unscale) adagrad_elements(1, p + i, g + i, sum + i, k, 1, RP_SCALAR);
            else adagrad_elements(1, p + i, g + i, sum + i, k, 0, RP_SCALAR);
        }
    }
}

/* Elements [first, first+n) of a tensor of numel elements whose torch tail
   starts at tail_start (numel - numel % torch_vec); p, g, sum point at
   element `first`. unscale: divide g by k->grad_scale and store it back. */
static void adagrad_fp32_span(int64_t first, int64_t n, int64_t tail_start, int64_t numel,
                              float *p, float *g, float *sum, const adagrad_consts *k, int unscale)
{
    int64_t len[3];
    rp_regions(first, n, tail_start, numel, len);
    if (len[RP_VEC] > 0) {
        if (unscale) adagrad_elements(len[RP_VEC], p, g, sum, k, 1, RP_VEC);
        else adagrad_elements(len[RP_VEC], p, g, sum, k, 0, RP_VEC);
    }
    for (int r = RP_TAILVEC; r <= RP_SCALAR; r++) {
        const int64_t o = r == RP_TAILVEC ? len[RP_VEC] : len[RP_VEC] + len[RP_TAILVEC];
        if (len[r] > 0) adagrad_fp32_tail(len[r], r, p + o, g + o, sum + o, k, unscale);
    }
}

/* ---- the step: the engine's scheduler over adagrad_fp32_span ------------------ */

typedef struct {
    adagrad_consts k; /* clr is per tensor: rp_tensor.scalar[0] */
    int unscale;
    int64_t torch_vec;
} adagrad_ctx;

static void adagrad_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                            const void *ctx_)
{
    const adagrad_ctx *ctx = ctx_;
    adagrad_consts k = ctx->k;
    k.clr = t->scalar[0];
    const int64_t tail_start = t->numel - t->numel % ctx->torch_vec;
    adagrad_fp32_span(first, n, tail_start, t->numel, p, g, s[0], &k, ctx->unscale);
}

static void adagrad_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const adagrad_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 1, ctx->unscale, adagrad_fp32_fn, ctx);
}

int rp_adagrad_step(const rp_run_opts *run, const rp_adagrad_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                    const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    for (int64_t i = 0; i < n_tensors; i++) { /* torch._foreach_add_(state_steps, 1), then clr per tensor */
        rp_tensor *t = &tensors[i];
        *t->step += 1.0f;
        t->scalar[0] = adagrad_clr(h->lr, h->lr_decay, *t->step);
    }
    adagrad_ctx ctx;
    adagrad_consts_init(&ctx.k, h->lr, h->lr_decay, h->weight_decay, h->eps, h->maximize, run->grad_scale, 1.0f);
    ctx.unscale = run->grad_scale != NULL;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, adagrad_chunk, &ctx);
    return 1;
}
