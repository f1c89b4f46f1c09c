/* roundpipe RMSprop rule: the fp32 element loop of torch.optim.RMSprop.
 *
 * Reference: torch/optim/rmsprop.py, _single_tensor_rmsprop (torch 2.13's
 * default CPU path, foreach=False), one torch op after another per tensor:
 *   grad = -grad                                   (maximize)
 *   grad = grad.add(param, alpha=weight_decay)     (weight_decay != 0)
 *   square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
 *   grad_avg.lerp_(grad, 1 - alpha)                (centered)
 *   avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()   (centered)
 *   avg = square_avg.sqrt()                        (else)
 *   avg.add_(eps)
 *   buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)   (momentum > 0)
 *   param.addcdiv_(grad, avg, value=-lr)           (else)
 * Here that is one pass over memory. With AVX-512 and torch's sqrt inline
 * (rules.h, rp_vsqrt) it is one loop over 16 lanes (rmsprop_fused), loads to
 * stores; lanes whose sqrt MKL takes on its own path are redone afterwards by
 * the phased code. That code (rmsprop_phased: up to the sqrt's argument, torch's
 * sqrt, the rest, in blocks of RP_BLOCK elements that stay in L1) also steps
 * complex params, a block's last n % 16 elements and CPUs without AVX-512. The
 * phases left memory idle while they computed: 0.82 of the 20-byte roofline on
 * the bench's transformer mix at 2 threads, against 0.93-0.95 fused (2-core
 * Zen 4, probe interleaved). Every intermediate is rounded to float exactly
 * where torch's op rounds it:
 *  - add(other, alpha=s) is fmaf(s, other, self): one rounding;
 *  - addcmul(a, b, value=s) is fmaf(s*a, b, self): s*a rounded first;
 *  - addcdiv(a, b, value=s) is self + (s*a)/b: no fusion;
 *  - lerp(end, w) is fmaf(w, end - self, self) when |w| < 0.5, else
 *    fmaf(w - 1, end - self, end) (torch's lerp_vec; its scalar loop agrees);
 *  - sqrt is MKL's, not sqrtf (rp_torch_sqrt, rules.h);
 *  - where two operands are NaN, the one torch's op returns (rp_nan_from);
 *  - Python's scalars (1 - alpha, -lr) are computed in double, then rounded
 *    to float once, as torch's Scalar arguments are.
 * torch's elementwise kernels round the same in their vector body and scalar
 * tail, so there are no tail regions here (unlike sgd.c). value=-1 is a
 * multiply by a run-time -1, as torch's: a NaN keeps its sign (a negation
 * would flip it, and GCC folds x * -1.0f into one). Complex params are
 * stepped as their real view; only the weight decay is complex arithmetic
 * there (rp_complex_axpy, rules.h). scripts/loop_rules_harness.py checks every
 * flag combination, sizes 1..67 and large, several steps, NaN/Inf, bit for bit.
 * Built with -ffp-contract=off (every fused multiply-add is an fmaf() above),
 * int64_t indices; no OpenMP here: the shared scheduler calls rmsprop_fp32_fn.
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "rmsprop.h"

typedef struct {
    float alpha, one_minus_alpha;   /* alpha and (float)(1 - alpha): also lerp's weight     */
    float lerp_w_minus_1;           /* w - 1 in float, lerp's coefficient when |w| >= 0.5   */
    int lerp_small;                 /* |w| < 0.5: lerp's other formula                       */
    float eps, momentum, weight_decay;
    float neg_lr;                   /* (float)(-lr)                                           */
    float neg_one;                  /* -1 at run time: value=-1 stays a multiply              */
} rmsprop_consts;

/* Which ops a variant runs: compile-time constants in each loop below. */
enum { RMS_CENTERED = 1, RMS_DECAY = 2, RMS_MAXIMIZE = 4, RMS_MOMENTUM = 8 };

/* Up to the sqrt: the grad torch steps with (gd), square_avg (and grad_avg), and the
   sqrt's argument (x), for n elements; gavg is NULL unless centered. */
static inline __attribute__((always_inline)) void rmsprop_pre(
    int64_t n, const float *restrict p, const float *restrict g, float *restrict gd, float *restrict sq,
    float *restrict gavg, float *restrict x, const rmsprop_consts *k, const int flags)
{
    const rmsprop_consts c = *k; /* locals: the compiler must see they don't alias */
    for (int64_t i = 0; i < n; i++) {
        const float gi = rp_torch_grad(g[i], p[i], c.weight_decay, flags & RMS_MAXIMIZE, flags & RMS_DECAY);
        gd[i] = gi;
        const float s = rp_sq_avg(sq[i], gi, c.alpha, c.one_minus_alpha); /* square_avg */
        sq[i] = s;
        if (flags & RMS_CENTERED) {
            const float a = gavg[i], d = gi - a;                      /* grad_avg.lerp_(grad, 1 - alpha) */
            const float ga = rp_nan_from(gi, c.lerp_small ? fmaf(c.one_minus_alpha, d, a)
                                                           : fmaf(c.lerp_w_minus_1, d, gi));
            gavg[i] = ga;
            x[i] = rp_nan_from(ga, fmaf(c.neg_one * ga, ga, s));     /* addcmul(ga, ga, value=-1) */
        } else {
            x[i] = s;
        }
    }
}

/* After the sqrt (avg holds it): eps, then the momentum buffer and the param. */
static inline __attribute__((always_inline)) void rmsprop_post(
    int64_t n, float *restrict p, const float *restrict gd, const float *restrict avg, float *restrict buf,
    const rmsprop_consts *k, const int momentum)
{
    const rmsprop_consts c = *k;
    for (int64_t i = 0; i < n; i++) {
        const float a = avg[i] + c.eps;                               /* avg.add_(eps) */
        if (momentum) {
            /* buf.mul_(m).addcdiv_(grad, avg) */
            const float b = rp_nan_from(gd[i], rp_nan_from(a, buf[i] * c.momentum + gd[i] / a));
            buf[i] = b;
            p[i] = rp_nan_from(b, fmaf(c.neg_lr, b, p[i]));         /* param.add_(buf, alpha=-lr) */
        } else {                                                      /* param.addcdiv_(grad, avg, value=-lr) */
            p[i] = rp_nan_from(gd[i], rp_nan_from(a, p[i] + (c.neg_lr * gd[i]) / a));
        }
    }
}

/* ---- the step: the engine's scheduler over rmsprop_fp32_fn ------------------------ */

typedef struct {
    rmsprop_consts k;
    int flags, n_state, unscale;
    float inv_scale;         /* GradScaler: (float)(1 / scale), as torch's unscale_ */
    const void *vml_sqrt;
    int sqrt_how;
    int64_t torch_vec;    /* torch's SIMD width in floats: where its complex ops' scalar
                             tails fall (rp_complex_axpy)                                   */
} rmsprop_ctx;

/* n elements in phases (rmsprop_pre, torch's sqrt, rmsprop_post), n <= RP_BLOCK: a
   block's last n % 16 elements, lanes a fused loop left (n = 1), and every element
   where there is no fused loop. g is the grad torch steps with before maximize/decay
   (a complex param's is made by rp_complex_axpy, and f has no RMS_DECAY/RMS_MAXIMIZE). */
static void rmsprop_phased(int64_t n, float *p, const float *g, float *sq, float *gavg, float *buf,
                           const rmsprop_ctx *ctx, int f)
{
    float gd[RP_BLOCK], x[RP_BLOCK], avg[RP_BLOCK];
#define RMS_PRE(F) case F: rmsprop_pre(n, p, g, gd, sq, gavg, x, &ctx->k, F); break
    switch (f & (RMS_CENTERED | RMS_DECAY | RMS_MAXIMIZE)) {
        RMS_PRE(0); RMS_PRE(1); RMS_PRE(2); RMS_PRE(3); RMS_PRE(4); RMS_PRE(5); RMS_PRE(6); RMS_PRE(7);
    }
#undef RMS_PRE
    rp_torch_sqrt(ctx->vml_sqrt, ctx->sqrt_how, n, x, avg);
    if (buf) rmsprop_post(n, p, gd, avg, buf, &ctx->k, 1);
    else rmsprop_post(n, p, gd, avg, NULL, &ctx->k, 0);
}

#ifdef __AVX512F__
/* rmsprop_pre, torch's sqrt and rmsprop_post in one loop over 16 lanes (rules.h: fused
   loops), for n a multiple of 16; lanes with a special sqrt argument are left to r. */
static inline __attribute__((always_inline)) void rmsprop_fused(
    int64_t n, float *restrict p, const float *restrict g, float *restrict sq, float *restrict gavg,
    float *restrict buf, const rmsprop_consts *k, rp_redo *r, const int flags, const int how)
{
    const __m512 alpha = _mm512_set1_ps(k->alpha), omb = _mm512_set1_ps(k->one_minus_alpha);
    const __m512 wm1 = _mm512_set1_ps(k->lerp_w_minus_1), eps = _mm512_set1_ps(k->eps);
    const __m512 mom = _mm512_set1_ps(k->momentum), wd = _mm512_set1_ps(k->weight_decay);
    const __m512 nlr = _mm512_set1_ps(k->neg_lr), neg_one = _mm512_set1_ps(k->neg_one);
    const int lerp_small = k->lerp_small;
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 pv = _mm512_loadu_ps(p + i);
        const __m512 gi = rp_vtorch_grad(_mm512_loadu_ps(g + i), pv, wd, flags & RMS_MAXIMIZE, flags & RMS_DECAY);
        const __m512 s = rp_vsq_avg(_mm512_loadu_ps(sq + i), gi, alpha, omb);
        __m512 x = s, ga = s;
        if (flags & RMS_CENTERED) {
            const __m512 a = _mm512_loadu_ps(gavg + i), d = _mm512_sub_ps(gi, a);
            ga = rp_vnan_from(gi, lerp_small ? _mm512_fmadd_ps(omb, d, a) : _mm512_fmadd_ps(wm1, d, gi));
            x = rp_vnan_from(ga, _mm512_fmadd_ps(_mm512_mul_ps(neg_one, ga), ga, s));
        }
        __mmask16 special;
        const __m512 a = _mm512_add_ps(rp_vsqrt(x, how, &special), eps);
        const __mmask16 keep = (__mmask16)~special;
        __m512 out, b = a;
        if (flags & RMS_MOMENTUM) {
            b = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(buf + i), mom), _mm512_div_ps(gi, a));
            b = rp_vnan_from(gi, rp_vnan_from(a, b));
            out = rp_vnan_from(b, _mm512_fmadd_ps(nlr, b, pv));
        } else {
            out = rp_vnan_from(gi, rp_vnan_from(a, _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(nlr, gi), a))));
        }
        _mm512_mask_storeu_ps(sq + i, keep, s);
        if (flags & RMS_CENTERED) _mm512_mask_storeu_ps(gavg + i, keep, ga);
        if (flags & RMS_MOMENTUM) _mm512_mask_storeu_ps(buf + i, keep, b);
        _mm512_mask_storeu_ps(p + i, keep, out);
        rp_redo_add(r, i, special);
    }
}

/* The fused loop's variants: flags and how at compile time. */
static int64_t rmsprop_fused_any(int64_t n, float *p, const float *g, float *sq, float *gavg, float *buf,
                              const rmsprop_consts *k, int64_t *idx, int flags, int how)
{
    rp_redo redo;
    rp_redo *r = &redo;
    redo.n = 0;
#define RMS_HOW(F, H) case H: rmsprop_fused(n, p, g, sq, gavg, buf, k, r, F, H); break
#define RMS_F(F) case F: switch (how) { RMS_HOW(F, RP_SQRT_IEEE); RMS_HOW(F, RP_SQRT_MKL_Z0); \
                                         RMS_HOW(F, RP_SQRT_MKL_L9); RMS_HOW(F, RP_SQRT_MKL_H8); } break
    switch (flags) {
        RMS_F(0); RMS_F(1); RMS_F(2); RMS_F(3); RMS_F(4); RMS_F(5); RMS_F(6); RMS_F(7);
        RMS_F(8); RMS_F(9); RMS_F(10); RMS_F(11); RMS_F(12); RMS_F(13); RMS_F(14); RMS_F(15);
    }
#undef RMS_F
#undef RMS_HOW
    return rp_redo_elements(r, idx);
}
#endif

static void rmsprop_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                            const void *ctx_)
{
    const rmsprop_ctx *ctx = ctx_;
    const rmsprop_consts *k = &ctx->k;
    const int f = ctx->flags;
    /* complex params with maximize or weight decay: rp_complex_axpy makes torch's grad, which
       pre then takes as it is */
    const int cplx = (t->scalar[3] != 0.0f) && (f & (RMS_DECAY | RMS_MAXIMIZE));
    const int64_t tail_start = t->numel - t->numel % ctx->torch_vec; /* torch's complex vector body */
    float *sq = s[0], *buf = f & RMS_MOMENTUM ? s[1] : NULL;
    float *gavg = f & RMS_CENTERED ? s[f & RMS_MOMENTUM ? 2 : 1] : NULL;
#ifdef __AVX512F__
    const int fused = !cplx && rp_vsqrt_inline(ctx->sqrt_how, ctx->vml_sqrt);
#endif
    float gc[RP_BLOCK];
    for (int64_t o = 0; o < n; o += RP_BLOCK) {
        const int64_t m = n - o < RP_BLOCK ? n - o : RP_BLOCK;
        float *po = p + o, *go = g + o, *so = sq + o, *ga = gavg ? gavg + o : NULL, *bo = buf ? buf + o : NULL;
        if (ctx->unscale) rp_unscale(m, go, ctx->inv_scale);
        if (cplx) {
            rp_complex_axpy(m, gc, go, po, k->weight_decay, f & RMS_MAXIMIZE, f & RMS_DECAY, first + o, tail_start, t->numel);
            rmsprop_phased(m, po, gc, so, ga, bo, ctx, f & (RMS_CENTERED | RMS_MOMENTUM));
            continue;
        }
        /* whole 16-lane groups fused, then the lanes that loop left and the rest phased */
        int64_t idx[RP_BLOCK], nr = 0, done = 0;
#ifdef __AVX512F__
        if (fused) done = m - m % 16, nr = rmsprop_fused_any(done, po, go, so, ga, bo, k, idx, f, ctx->sqrt_how);
#endif
        for (int64_t j = 0; j < nr; j++) {
            const int64_t i = idx[j];
            rmsprop_phased(1, po + i, go + i, so + i, ga ? ga + i : NULL, bo ? bo + i : NULL, ctx, f);
        }
        if (done < m)
            rmsprop_phased(m - done, po + done, go + done, so + done, ga ? ga + done : NULL, bo ? bo + done : NULL,
                           ctx, f);
    }
}

static void rmsprop_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const rmsprop_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, ctx->n_state, ctx->unscale, rmsprop_fp32_fn, ctx);
}

int rp_rmsprop_step(const rp_run_opts *run, const rp_rmsprop_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                    const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    for (int64_t i = 0; i < n_tensors; i++) *tensors[i].step += 1.0f; /* step += 1 */
    rmsprop_ctx ctx;
    rmsprop_consts *k = &ctx.k;
    k->alpha = (float)h->alpha;
    k->one_minus_alpha = (float)(1.0 - h->alpha);
    k->lerp_w_minus_1 = k->one_minus_alpha - 1.0f;
    k->lerp_small = fabsf(k->one_minus_alpha) < 0.5f;
    k->eps = (float)h->eps;
    k->momentum = (float)h->momentum;
    k->weight_decay = (float)h->weight_decay;
    k->neg_lr = (float)(-h->lr);
    k->neg_one = -1.0f;
    ctx.flags = (h->centered ? RMS_CENTERED : 0) | (h->momentum > 0.0 ? RMS_MOMENTUM : 0)
              | (h->weight_decay != 0.0 ? RMS_DECAY : 0) | (h->maximize ? RMS_MAXIMIZE : 0);
    ctx.n_state = 1 + (h->momentum > 0.0) + (h->centered != 0);
    ctx.unscale = run->grad_scale != NULL;
    ctx.inv_scale = rp_inv_scale(run->grad_scale);
    ctx.vml_sqrt = h->vml_sqrt;
    ctx.sqrt_how = h->sqrt_how;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, rmsprop_chunk, &ctx);
    return 1;
}

RP_EXPORT_TORCH_SQRT(rp_rmsprop_torch_sqrt)
