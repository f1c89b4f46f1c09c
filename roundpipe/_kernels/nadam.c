/* roundpipe NAdam rule: torch.optim.NAdam's for-loop step (foreach=False,
 * torch/optim/nadam.py, _single_tensor_nadam) fused into one pass.
 *
 * torch's ops per tensor, each rounded to float32 in this order:
 *   g = -grad (maximize)
 *   p.mul_(1 - lr*wd)                 decoupled weight decay, or
 *   g = g.add(p, alpha=wd)            coupled: fmaf(wd, p, g)
 *   exp_avg.lerp_(g, 1 - beta1)
 *   exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
 *   denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
 *   p.addcdiv_(g, denom, value=c1); p.addcdiv_(exp_avg, denom, value=c2)
 * and per tensor, serially, in Python's double: step += 1, mu and mu_next
 * from 0.96 ** (step * momentum_decay), mu_product *= mu (a float32 tensor
 * times mu rounded to float), c1 = -lr (1 - mu) / (1 - mu_product) and
 * c2 = -lr mu_next / (1 - mu_product mu_next). torch's elementwise kernels
 * round their vector body and scalar tail alike, so no tail regions here.
 * A Python float scalar becomes a float before each op (scalar_t(x)). NaNs:
 * rules.h (rp_nan_from, rp_torch_neg) picks the one torch returns.
 * Built with -ffp-contract=off: every fused multiply-add is an explicit fmaf.
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "nadam.h"

typedef struct {
    float w, w_minus_one;   /* lerp weight (float)(1 - beta1), and w - 1 for large weights */
    float beta2, one_minus_beta2;
    float eps, weight_decay;
    float decay;            /* (float)(1 - lr*wd): decoupled weight decay            */
    float inv_scale;        /* GradScaler: (float)(1 / scale), as torch's unscale_     */
    const void *vml_sqrt;   /* torch's sqrt (rules.h, rp_torch_sqrt): MKL's, or NULL    */
    int sqrt_how;
    int small_w;            /* |w| < 0.5: torch's lerp takes its first form             */
    int maximize, coupled, decoupled, unscale;
} nadam_consts;

#define NADAM_BLOCK 512 /* elements per pass of the three loops below: their buffers stay in L1 */
_Static_assert(NADAM_BLOCK <= RP_BLOCK, "a block's fused lanes must fit an rp_redo");

/* The NAdam update over n <= NADAM_BLOCK fp32 elements, in three loops because
   torch's sqrt may be MKL's (rules.h, rp_torch_sqrt); c1, c2, bc2: this
   tensor's scalars; neg: how -grad negates (rules.h, rp_torch_neg). coupled,
   decoupled and small_w are compile-time constants at each call. */
static inline __attribute__((always_inline)) void nadam_block(
    int64_t n, float *restrict p, float *restrict g, float *restrict m, float *restrict v,
    const nadam_consts *k, float c1, float c2, float bc2, int neg, const int coupled,
    const int decoupled, const int small_w)
{
    const nadam_consts c = *k; /* locals: the compiler must see they don't alias */
    float gd[NADAM_BLOCK] __attribute__((aligned(64)));  /* the grad after maximize and decay */
    float q[NADAM_BLOCK] __attribute__((aligned(64)));   /* exp_avg_sq / bias_correction2 */
    float den[NADAM_BLOCK] __attribute__((aligned(64))); /* its sqrt */
    const rp_lerp_weight lerp = {.w = c.w, .w_minus_1 = c.w_minus_one, .small = small_w}; /* small_w: a constant */
    for (int64_t i = 0; i < n; i++) {
        float gi = rp_loop_grad(g, i, c.unscale, c.inv_scale, neg);   /* unscale_, then -grad */
        float pi = p[i];
        if (decoupled) p[i] = pi = pi * c.decay;                        /* p.mul_(1 - lr*wd) */
        if (coupled) gi = rp_coupled_decay(gi, pi, c.weight_decay);    /* g.add(p, alpha=wd) */
        /* lerp_(g, w): torch's vector form (rules.h, rp_lerp), g's NaN first */
        m[i] = rp_nan_from(gi, rp_lerp(m[i], gi, &lerp, 0));
        float vi = v[i] * c.beta2;                                      /* mul_(beta2) */
        vi = rp_nan_from(gi, fmaf(c.one_minus_beta2 * gi, gi, vi));     /* addcmul_: (s*g) rounded, then fused */
        v[i] = vi;
        q[i] = vi / bc2;                                                /* div(bias_correction2) */
        gd[i] = gi;
    }
    rp_torch_sqrt(c.vml_sqrt, c.sqrt_how, n, q, den);                               /* .sqrt() */
    for (int64_t i = 0; i < n; i++) {
        const float di = den[i] + c.eps;                                /* add_(eps) */
        /* addcdiv_(x, denom, value=s): p + (s*x)/denom; divps keeps x's NaN over denom's */
        const float a = (c1 * gd[i]) / di, b = (c2 * m[i]) / di;
        const float pi = rp_nan_from(a, p[i] + a);                      /* value=c1, the grad */
        p[i] = rp_nan_from(b, pi + b);                                  /* value=c2, exp_avg */
    }
}

#ifdef __AVX512F__
/* nadam_block's three loops in one over 16 lanes (rules.h: fused loops), n a multiple of
   16, a real param (neg: NONE or FLIP); lanes with a special sqrt argument are left to r,
   untouched (the grad's unscale_ and the decoupled decay included). */
static inline __attribute__((always_inline)) void nadam_fused(
    int64_t n, float *restrict p, float *restrict g, float *restrict m, float *restrict v, const nadam_consts *k,
    float c1, float c2, float bc2, rp_redo *r, const int unscale, const int flip, const int coupled,
    const int decoupled, const int how)
{
    const __m512 w = _mm512_set1_ps(k->small_w ? k->w : k->w_minus_one);
    const __m512 beta2 = _mm512_set1_ps(k->beta2), omb2 = _mm512_set1_ps(k->one_minus_beta2);
    const __m512 eps = _mm512_set1_ps(k->eps), wd = _mm512_set1_ps(k->weight_decay);
    const __m512 decay = _mm512_set1_ps(k->decay), inv_scale = _mm512_set1_ps(k->inv_scale);
    const __m512 c1v = _mm512_set1_ps(c1), c2v = _mm512_set1_ps(c2), bc2v = _mm512_set1_ps(bc2);
    const int small = k->small_w;
    for (int64_t i = 0; i < n; i += 16) {
        __m512 pv = _mm512_loadu_ps(p + i);
        const __m512 g0 = _mm512_loadu_ps(g + i), mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);
        const __m512 gu = unscale ? _mm512_mul_ps(g0, inv_scale) : g0;
        if (decoupled) pv = _mm512_mul_ps(pv, decay);
        const __m512 gi = rp_vtorch_grad(gu, pv, wd, flip, coupled);
        const __m512 d = _mm512_sub_ps(gi, mv);
        const __m512 m1 = rp_vnan_from(gi, _mm512_fmadd_ps(w, d, small ? mv : gi));   /* rp_lerp, vector form */
        const __m512 v1 = rp_vsq_avg(vv, gi, beta2, omb2);
        __mmask16 special;
        const __m512 di = _mm512_add_ps(rp_vsqrt(_mm512_div_ps(v1, bc2v), how, &special), eps);
        const __m512 a = _mm512_div_ps(_mm512_mul_ps(c1v, gi), di), b = _mm512_div_ps(_mm512_mul_ps(c2v, m1), di);
        const __m512 p1 = rp_vnan_from(a, _mm512_add_ps(pv, a));
        const __mmask16 keep = (__mmask16)~special;
        if (unscale) _mm512_mask_storeu_ps(g + i, keep, gu);
        _mm512_mask_storeu_ps(m + i, keep, m1);
        _mm512_mask_storeu_ps(v + i, keep, v1);
        _mm512_mask_storeu_ps(p + i, keep, rp_vnan_from(b, _mm512_add_ps(p1, b)));
        rp_redo_add(r, i, special);
    }
}

static void nadam_fused_any(int64_t n, float *p, float *g, float *m, float *v, const nadam_consts *k, float c1,
                            float c2, float bc2, rp_redo *r, int flip)
{
#define NADAM_HOW(U, F, C, D, H) case H: nadam_fused(n, p, g, m, v, k, c1, c2, bc2, r, U, F, C, D, H); return
#define NADAM_F(U, F, C, D) do { switch (k->sqrt_how) { NADAM_HOW(U, F, C, D, RP_SQRT_IEEE); \
        NADAM_HOW(U, F, C, D, RP_SQRT_MKL_Z0); NADAM_HOW(U, F, C, D, RP_SQRT_MKL_L9); \
        NADAM_HOW(U, F, C, D, RP_SQRT_MKL_H8); } return; } while (0)
#define NADAM_DECAY(U, F) do { if (k->coupled) NADAM_F(U, F, 1, 0); if (k->decoupled) NADAM_F(U, F, 0, 1); \
                               NADAM_F(U, F, 0, 0); } while (0)
    if (k->unscale) { if (flip) NADAM_DECAY(1, 1); NADAM_DECAY(1, 0); }
    if (flip) NADAM_DECAY(0, 1);
    NADAM_DECAY(0, 0);
#undef NADAM_DECAY
#undef NADAM_F
#undef NADAM_HOW
}
#endif

/* n elements of one tensor (any length), all negated the same way. Loop
   unswitching is off here: GCC would copy each of the six variants below once
   per value of unscale and neg too (36 vectorized loops), which made this
   file take 4x as long to compile as adam.c, for no measurable speed (the
   loop-invariant branches become selects and a masked store). */
__attribute__((optimize("no-unswitch-loops"))) static void nadam_span(int64_t n, float *p, float *g, float *m, float *v, const nadam_consts *k,
                       const rp_tensor *t, int neg)
{
    const float c1 = t->scalar[0], c2 = t->scalar[1], bc2 = t->scalar[2];
    for (int64_t b = 0; b < n; b += NADAM_BLOCK) {
        int64_t len = n - b < NADAM_BLOCK ? n - b : NADAM_BLOCK;
        float *pb = p + b, *gb = g + b, *mb = m + b, *vb = v + b;
#ifdef __AVX512F__
        if (len >= 16 && neg != RP_NEG_SUB && rp_vsqrt_inline(k->sqrt_how, k->vml_sqrt)) {
            rp_redo r;
            r.n = 0;
            const int64_t done = len - len % 16;
            nadam_fused_any(done, pb, gb, mb, vb, k, c1, c2, bc2, &r, neg == RP_NEG_FLIP);
            int64_t idx[RP_BLOCK]; /* the lanes it left, one element each */
            for (int64_t j = 0, nr = rp_redo_elements(&r, idx); j < nr; j++) {
                const int64_t i = idx[j];
                nadam_span(1, pb + i, gb + i, mb + i, vb + i, k, t, neg);
            }
            pb += done, gb += done, mb += done, vb += done, len -= done; /* the last len % 16: below */
            if (len == 0) continue;
        }
#endif
#define NADAM_CALL(CP, DC, SW) nadam_block(len, pb, gb, mb, vb, k, c1, c2, bc2, neg, CP, DC, SW)
        if (k->small_w) {
            if (k->coupled) NADAM_CALL(1, 0, 1); else if (k->decoupled) NADAM_CALL(0, 1, 1); else NADAM_CALL(0, 0, 1);
        } else {
            if (k->coupled) NADAM_CALL(1, 0, 0); else if (k->decoupled) NADAM_CALL(0, 1, 0); else NADAM_CALL(0, 0, 0);
        }
#undef NADAM_CALL
    }
}

typedef struct {
    nadam_consts k;
    int unscale;
    int64_t torch_vec;
} nadam_ctx;

static void nadam_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                          const void *ctx_)
{
    const nadam_ctx *ctx = ctx_;
    const nadam_consts *k = &ctx->k;
    if (!k->maximize) {
        nadam_span(n, p, g, s[0], s[1], k, t, RP_NEG_NONE);
        return;
    }
    /* a complex tensor (scalar[3]) negates by 0 - g in torch's vector body */
    const int64_t split = rp_neg_sub_count(t->scalar[3] != 0.0f, t->numel - t->numel % ctx->torch_vec, first, n);
    nadam_span(split, p, g, s[0], s[1], k, t, RP_NEG_SUB);
    nadam_span(n - split, p + split, g + split, s[0] + split, s[1] + split, k, t, RP_NEG_FLIP);
}

static void nadam_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const nadam_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, 2, ctx->unscale, nadam_fp32_fn, ctx);
}

int rp_nadam_step(const rp_run_opts *run, const rp_nadam_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                  const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    const double lr = h->lr;
    const float lr_f = (float)lr; /* a float32 Tensor lr: torch's scalar math in float */
    for (int64_t i = 0; i < n_tensors; i++) { /* torch's Python, serially, per tensor */
        rp_tensor *t = &tensors[i];
        const float step_f = *t->step + 1.0f; /* step_t += 1 */
        *t->step = step_f;
        const double step = step_f;           /* _get_value(step_t) */
        const double mu = h->beta1 * (1.0 - 0.5 * pow(0.96, step * h->momentum_decay));
        const double mu_next = h->beta1 * (1.0 - 0.5 * pow(0.96, (step + 1.0) * h->momentum_decay));
        float *mu_product = t->aux[0];
        *mu_product = *mu_product * (float)mu; /* mu_product *= mu: the double rounded first */
        const double mp = *mu_product, mp_next = mp * mu_next;
        if (h->lr_f32) { /* -lr * x / y with lr a float32 tensor: each op rounded to float */
            t->scalar[0] = (-lr_f * (float)(1.0 - mu)) / (float)(1.0 - mp);
            t->scalar[1] = (-lr_f * (float)mu_next) / (float)(1.0 - mp_next);
        } else {
            t->scalar[0] = (float)(-lr * (1.0 - mu) / (1.0 - mp));
            t->scalar[1] = (float)((-lr * mu_next) / (1.0 - mp_next));
        }
        t->scalar[2] = (float)(1.0 - pow(h->beta2, step));
    }
    nadam_ctx ctx;
    nadam_consts *k = &ctx.k;
    const double w = 1.0 - h->beta1;
    k->w = (float)w;
    k->w_minus_one = k->w - 1.0f;
    k->small_w = fabsf(k->w) < 0.5f;
    k->beta2 = (float)h->beta2;
    k->one_minus_beta2 = (float)(1.0 - h->beta2);
    k->eps = (float)h->eps;
    k->weight_decay = (float)h->weight_decay;
    k->decay = h->lr_f32 ? 1.0f - lr_f * (float)h->weight_decay : (float)(1.0 - lr * h->weight_decay);
    k->maximize = h->maximize != 0;
    k->coupled = h->weight_decay != 0.0 && !h->decoupled_weight_decay;
    k->decoupled = h->weight_decay != 0.0 && h->decoupled_weight_decay;
    k->unscale = ctx.unscale = run->grad_scale != NULL;
    ctx.torch_vec = run->torch_vec;
    k->vml_sqrt = h->vml_sqrt;
    k->sqrt_how = h->sqrt_how;
    k->inv_scale = rp_inv_scale(run->grad_scale);
    rp_run(run, tensors, n_tensors, chunks, n_chunks, nadam_chunk, &ctx);
    return 1;
}

RP_EXPORT_TORCH_SQRT(rp_nadam_torch_sqrt)
