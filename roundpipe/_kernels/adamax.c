/* roundpipe Adamax rule: the fp32 element loop of torch.optim.Adamax's default
 * CPU path (foreach=False, _single_tensor_adamax in torch/optim/adamax.py):
 *   grad = -grad                                  (maximize; complex: rp_torch_neg)
 *   grad = grad.add(param, alpha=weight_decay)    (weight_decay != 0; complex
 *                                                  params: before view_as_real)
 *   exp_avg.lerp_(grad, 1 - beta1)
 *   torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
 *   param.addcdiv_(exp_avg, exp_inf, value=-(lr / (1 - beta1**step)))
 * Six torch ops and two temporaries per tensor become one pass. Every fp32
 * result, NaN bits included, is bit-identical to torch 2.13 on one thread
 * (scripts/loop_rules_harness.py).
 *
 * Rounding, as torch's kernels do it (measured):
 *  - grad.add(param, alpha): fmaf(alpha, param, grad), one rounding; for a
 *    complex param, the complex product param*(wd + 0i) then the add, each
 *    part rounded (torch's Vectorized<complex<float>> multiply);
 *  - mul_/add_ by a Python float: the float rounded to float once;
 *  - addcdiv_: p + (value * m) / u, no fusion;
 *  - torch.maximum: NaN in either operand gives a NaN whose bits depend on
 *    where the element falls: its vector loop (cpu_kernel_vec, 16 floats a
 *    vector with AVX-512) writes all-ones bits, its scalar remainder (the
 *    last numel % 16 elements of a tensor) writes 0x7FC00000; with two
 *    equal operands (+0 and -0) the vector loop keeps the second, the scalar
 *    loop (std::max) the first.
 * -ffp-contract=off: every fused multiply-add is an explicit fmaf().
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rules.h"
#include "runner.h"
#include "adamax.h"

/* Adamax's state slots in rp_tensor.state, in the order of Adamax._state_keys */
enum { EXP_AVG = 0, EXP_INF = 1 };

/* Scalars of one tensor's step, rounded to float as torch rounds them. */
typedef struct {
    float neg_clr;          /* (float)-(lr / bias_correction): addcdiv_'s value, per tensor */
    rp_lerp_weight lerp;    /* 1 - beta1 */
    float beta2, eps, weight_decay;
    float inv_scale;        /* GradScaler's 1/scale, see rp_inv_scale */
    int maximize, decay;
} adamax_consts;

/* -clr for one tensor at this step: bias_correction = 1 - beta1**step in double
   (Python's float pow is glibc's pow); lr / bias_correction in double, or in
   float when lr is a float32 Tensor (a 0-dim tensor divided by a Python float). */
static float adamax_neg_clr(const rp_adamax_hyper *h, float step)
{
    const double bc = 1.0 - pow(h->beta1, (double)step);
    return h->lr_f32 ? -((float)h->lr / (float)bc) : (float)(-(h->lr / bc));
}

/* The step after the weight decay: lerp, infinity norm, addcdiv; tail: the
   element is in torch's scalar remainder loop (see the header comment). */
static inline __attribute__((always_inline)) float adamax_update(
    float pi, float gi, float *restrict m, float *restrict u, const adamax_consts *c, const int tail)
{
    const float mi = rp_lerp(*m, gi, &c->lerp, tail);          /* exp_avg.lerp_(grad, 1-beta1) */
    *m = mi;
    const float a = *u * c->beta2;                             /* exp_inf.mul_(beta2) */
    const float b = fabsf(gi) + c->eps;                        /* grad.abs().add_(eps) */
    float ui;
    if (tail) ui = (a != a || b != b) ? float_from_bits(0x7FC00000u) : (a < b ? b : a);
    else ui = (a != a || b != b) ? float_from_bits(0xFFFFFFFFu) : (a > b ? a : b);
    *u = ui;                                                   /* torch.maximum(..., out=exp_inf) */
    return pi + (c->neg_clr * mi) / ui;                        /* param.addcdiv_(m, u, value=-clr) */
}

/* n fp32 elements of a real param; the flags are compile-time constants at each call. */
static inline __attribute__((always_inline)) void adamax_elements(
    int64_t n, float *restrict p, float *restrict g, float *restrict m, float *restrict u,
    const adamax_consts *k, const int unscale, const int decay, const int tail)
{
    const adamax_consts c = *k; /* locals: the compiler must see they don't alias */
    for (int64_t i = 0; i < n; i++) {
        float gi = rp_loop_grad(g, i, unscale, c.inv_scale, c.maximize ? RP_NEG_FLIP : RP_NEG_NONE); /* unscale_, -grad */
        const float pi = p[i];
        if (decay) gi = fmaf(c.weight_decay, pi, gi);          /* grad.add(param, alpha=wd) */
        p[i] = adamax_update(pi, gi, m + i, u + i, &c, tail);
    }
}

/* a + b where a NaN a wins over a NaN b, as in torch's _mm512_add_ps(a, b): GCC may
   emit a commuted add, and x86 returns its first operand when both are NaN. */
static inline float adamax_add_first_nan(float a, float b)
{
    uint32_t u;
    memcpy(&u, &a, 4);
    return a != a ? float_from_bits(u | 0x00400000u) /* quieted */ : a + b;
}

/* A complex param's real view, (re, im) pairs, where torch's first ops run on the
   complex tensor: -grad (rp_torch_neg), then grad + param * (wd + 0i): its vector loop
   computes re = (pr*wd - pi*0) + gr, im = (pr*0 - pi*(-wd)) + gi, its tail loop
   (c10::complex: grad + alpha * param) re = (wd*pr - 0*pi) + gr, im = (wd*pi + 0*pr) + gi
   where GCC vectorized it (RP_TAILVEC, rules.h) and re = gr + (wd*pr - 0*pi),
   im = gi + (wd*pi + 0*pr) in its scalar epilogue; every product and sum rounded.
   The same values; which NaN wins differs (measured on every combination of finite,
   infinite, zero and NaN operands in each region). */
static void adamax_complex(int64_t n, float *p, float *g, float *m, float *u, const adamax_consts *k,
                           int unscale, int region)
{
    const int tail = region != RP_VEC;
    const adamax_consts c = *k;
    const float zero = 0.0f, neg_wd = -c.weight_decay;
    for (int64_t i = 0; i + 1 < n; i += 2) {
        const int neg = !c.maximize ? RP_NEG_NONE : tail ? RP_NEG_FLIP : RP_NEG_SUB; /* rules.h, rp_torch_neg */
        float gr = rp_loop_grad(g, i, unscale, c.inv_scale, neg), gim = rp_loop_grad(g, i + 1, unscale, c.inv_scale, neg);
        const float pr = p[i], pim = p[i + 1];
        if (c.decay && region == RP_VEC) {
            gr = adamax_add_first_nan(pr * c.weight_decay - pim * zero, gr);
            gim = adamax_add_first_nan(pr * zero - pim * neg_wd, gim);
        } else if (c.decay) {
            const float re = c.weight_decay * pr - zero * pim;
            const float im = adamax_add_first_nan(c.weight_decay * pim, zero * pr);
            gr = region == RP_TAILVEC ? adamax_add_first_nan(re, gr) : adamax_add_first_nan(gr, re);
            gim = region == RP_TAILVEC ? adamax_add_first_nan(im, gim) : adamax_add_first_nan(gim, im);
        }
        p[i] = tail ? adamax_update(pr, gr, m + i, u + i, &c, 1) : adamax_update(pr, gr, m + i, u + i, &c, 0);
        p[i + 1] = tail ? adamax_update(pim, gim, m + i + 1, u + i + 1, &c, 1)
                        : adamax_update(pim, gim, m + i + 1, u + i + 1, &c, 0);
    }
}

/* One region of a span (rules.h): the flags become constants of their own loop. */
static void adamax_region(int64_t n, float *p, float *g, float *m, float *u, const adamax_consts *k,
                          int unscale, int is_complex, int region)
{
    const int tail = region != RP_VEC;
    if (is_complex && (k->maximize || k->decay)) {
        adamax_complex(n, p, g, m, u, k, unscale, region);
    } else if (tail) { /* fewer than 16 elements: one loop for every variant */
        for (int64_t i = 0; i < n; i++) adamax_elements(1, p + i, g + i, m + i, u + i, k, unscale, k->decay, 1);
    } else if (unscale) {
        if (k->decay) adamax_elements(n, p, g, m, u, k, 1, 1, 0);
        else adamax_elements(n, p, g, m, u, k, 1, 0, 0);
    } else {
        if (k->decay) adamax_elements(n, p, g, m, u, k, 0, 1, 0);
        else adamax_elements(n, p, g, m, u, k, 0, 0, 0);
    }
}

/* ---- the step: the engine's scheduler over adamax_region ------------------------ */

typedef struct {
    adamax_consts k;    /* neg_clr is per tensor: rp_tensor.scalar[0] */
    int unscale;
    int64_t torch_vec;  /* torch's vector width (16 floats with AVX-512): its scalar tail is numel % torch_vec */
} adamax_ctx;

static void adamax_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                           const void *ctx_)
{
    const adamax_ctx *ctx = ctx_;
    adamax_consts k = ctx->k;
    k.neg_clr = t->scalar[0];
    const int is_complex = t->scalar[RP_SCALAR_COMPLEX] != 0.0f;
    int64_t len[3], o = 0;
    rp_regions(first, n, t->numel - t->numel % ctx->torch_vec, t->numel, len);
    for (int r = RP_VEC; r <= RP_SCALAR; o += len[r], r++)
        if (len[r] > 0)
            adamax_region(len[r], p + o, g + o, s[EXP_AVG] + o, s[EXP_INF] + o, &k, ctx->unscale, is_complex, r);
}

static void adamax_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const adamax_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 2, ctx->unscale, adamax_fp32_fn, ctx);
}

int rp_adamax_step(const rp_run_opts *run, const rp_adamax_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                   const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    for (int64_t i = 0; i < n_tensors; i++) { /* step_t += 1, then clr per tensor */
        rp_tensor *t = &tensors[i];
        *t->step += 1.0f;
        t->scalar[0] = adamax_neg_clr(h, *t->step);
    }
    adamax_ctx ctx;
    adamax_consts *k = &ctx.k;
    k->neg_clr = 0.0f;
    rp_lerp_weight_init(&k->lerp, 1.0 - h->beta1);
    k->beta2 = (float)h->beta2;
    k->eps = (float)h->eps;
    k->weight_decay = (float)h->weight_decay;
    k->inv_scale = rp_inv_scale(run->grad_scale);
    k->maximize = h->maximize != 0;
    k->decay = h->weight_decay != 0.0;
    ctx.unscale = run->grad_scale != NULL;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, adamax_chunk, &ctx);
    return 1;
}

RP_EXPORT_TORCH_SQRT(rp_adamax_torch_sqrt)
