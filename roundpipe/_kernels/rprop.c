/* roundpipe Rprop rule: the fp32 element loop of torch.optim.Rprop.
 *
 * Reference: torch/optim/rprop.py, _single_tensor_rprop (torch 2.13's default
 * CPU path, foreach=False), one torch op after another per tensor:
 *   grad = -grad                                   (maximize)
 *   sign = grad.mul(prev).sign()
 *   sign[sign.gt(0)] = etaplus; sign[sign.lt(0)] = etaminus; sign[sign.eq(0)] = 1
 *   step_size.mul_(sign).clamp_(step_size_min, step_size_max)
 *   grad = grad.clone(); grad[sign.eq(etaminus)] = 0
 *   param.addcmul_(grad.sign(), step_size, value=-1)
 *   prev.copy_(grad)
 * In one pass, element by element, with torch's exact semantics:
 *  - sign() is (x > 0) - (x < 0): +0 for zeros of either sign and for NaN;
 *  - the three masked assignments run in order on float32 values, with the
 *    etas rounded to float (a tiny etaminus that rounds to 0 is then replaced
 *    by the third, one that rounds to 1 matches sign.eq(etaminus) where the
 *    product was 0; both as torch);
 *  - clamp keeps a NaN (its own bits), and zeros as they are; min > max gives
 *    max; a NaN bound makes torch fill the whole result with NaN (its clamp
 *    checks the bounds first): the step sizes become 0x7fc00000;
 *  - addcmul(s, ss, value=-1) is fmaf(-1 * s, ss, p), -1 * s exact.
 * Every op is a float32 elementwise kernel whose vector body and scalar tail
 * agree; only a complex param's -grad differs between them (rp_complex_axpy,
 * rules.h). scripts/loop_rules_harness.py checks it bit for bit.
 * Built with -ffp-contract=off, int64_t indices; no OpenMP here.
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "rprop.h"

typedef struct {
    float etaminus, etaplus;        /* rounded to float, as torch's masked assignments store them */
    float lo, hi;                   /* step_size_min, step_size_max, rounded to float             */
    float neg_one;                  /* -1 at run time: value=-1 stays a multiply                   */
    int nan_bound;                  /* a NaN bound: clamp fills NaN                                */
} rprop_consts;

static inline __attribute__((always_inline)) float rp_sign(float x)
{
    return (float)(x > 0.0f) - (float)(x < 0.0f);
}

/* n fp32 elements; g is torch's grad (negated already when maximize is handled outside). */
static inline __attribute__((always_inline)) void rprop_elements(
    int64_t n, float *restrict p, const float *restrict g, float *restrict prev, float *restrict ss,
    const rprop_consts *k, const int maximize)
{
    const rprop_consts c = *k;
    const float nan_fill = float_from_bits(0x7fc00000u); /* torch's fill_(quiet_NaN()) */
    for (int64_t i = 0; i < n; i++) {
        const float gi = maximize ? rp_flip_sign(g[i]) : g[i];        /* -grad */
        float s = rp_sign(gi * prev[i]);                              /* grad.mul(prev).sign() */
        s = s > 0.0f ? c.etaplus : s;                                 /* the masked assignments, in order */
        s = s < 0.0f ? c.etaminus : s;
        s = s == 0.0f ? 1.0f : s;
        float st = ss[i] * s;                                         /* step_size.mul_(sign) */
        st = st != st ? st : st < c.lo ? c.lo : st;                   /* .clamp_(min, max) */
        st = st != st ? st : st > c.hi ? c.hi : st;
        st = c.nan_bound ? nan_fill : st;
        ss[i] = st;
        const float gz = s == c.etaminus ? 0.0f : gi;                 /* grad[sign.eq(etaminus)] = 0 */
        p[i] = rp_nan_from(st, fmaf(c.neg_one * rp_sign(gz), st, p[i])); /* addcmul_(grad.sign(), ss, value=-1) */
        prev[i] = gz;                                                 /* prev.copy_(grad) */
    }
}

/* ---- the step: the engine's scheduler over rprop_fp32_fn -------------------------- */

typedef struct {
    rprop_consts k;
    int maximize, unscale;
    float inv_scale;         /* GradScaler: (float)(1 / scale), as torch's unscale_ */
    int64_t torch_vec;    /* torch's SIMD width in floats (rp_complex_axpy) */
} rprop_ctx;

static void rprop_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                          const void *ctx_)
{
    const rprop_ctx *ctx = ctx_;
    if (ctx->unscale) rp_unscale(n, g, ctx->inv_scale);
    if (!((t->scalar[3] != 0.0f) && ctx->maximize)) {
        if (ctx->maximize) rprop_elements(n, p, g, s[0], s[1], &ctx->k, 1);
        else rprop_elements(n, p, g, s[0], s[1], &ctx->k, 0);
        return;
    }
    /* a complex param's -grad is a complex op in torch: rp_complex_axpy makes it */
    const int64_t tail_start = t->numel - t->numel % ctx->torch_vec; /* torch's complex vector body */
    float gc[RP_BLOCK];
    for (int64_t o = 0; o < n; o += RP_BLOCK) {
        const int64_t m = n - o < RP_BLOCK ? n - o : RP_BLOCK;
        rp_complex_axpy(m, gc, g + o, NULL, 0.0f, 1, 0, first + o, tail_start, t->numel);
        rprop_elements(m, p + o, gc, s[0] + o, s[1] + o, &ctx->k, 0);
    }
}

static void rprop_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const rprop_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 2, ctx->unscale, rprop_fp32_fn, ctx);
}

int rp_rprop_step(const rp_run_opts *run, const rp_rprop_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                  const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    for (int64_t i = 0; i < n_tensors; i++) *tensors[i].step += 1.0f; /* step += 1 */
    rprop_ctx ctx;
    ctx.k.etaminus = (float)h->etaminus;
    ctx.k.etaplus = (float)h->etaplus;
    ctx.k.lo = (float)h->step_size_min;
    ctx.k.hi = (float)h->step_size_max;
    ctx.k.neg_one = -1.0f;
    ctx.k.nan_bound = isnan(h->step_size_min) || isnan(h->step_size_max);
    ctx.maximize = h->maximize != 0;
    ctx.unscale = run->grad_scale != NULL;
    ctx.inv_scale = rp_inv_scale(run->grad_scale);
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, rprop_chunk, &ctx);
    return 1;
}
