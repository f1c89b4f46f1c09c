/* roundpipe SGD rule: the fp32 element loop of torch.optim.SGD(fused=True).
 *
 * Reference: https://pytorch.org/docs/stable/generated/torch.optim.SGD.html
 * and, for the order of operations, aten/src/ATen/native/cpu/FusedSGDKernel.cpp
 * (sgd_math, float variant) and torch/optim/sgd.py (_fused_sgd). Every fp32
 * result is bit-identical to torch 2.13's fused kernel; scripts/rules_harness.py
 * proves it (all flag combinations, every tail length, NaN/Inf grads).
 *
 * Same rules as adam.c: built with -ffp-contract=off, so each multiply-add
 * that torch's build fuses is an explicit fmaf(); int64_t indices; the flags
 * are compile-time constants in each call of sgd_elements, so every variant is
 * its own vectorized loop. No OpenMP here: the shared scheduler calls
 * sgd_fp32_span on spans of a tensor.
 *
 * torch's kernel rounds differently in three regions of a tensor (rules.h):
 * its Vectorized loop, the 8-lane body GCC made of its tail loop, and that
 * loop's scalar epilogue. Measured, not guessed: each fmaf() below was chosen
 * by comparing bits against torch 2.13 (AVX-512 and AVX2 kernels) on random
 * data where the fused and unfused forms differ, per region; NaN signs were
 * read off NaN grads in each region. scripts/rules_harness.py then checks
 * every flag combination, sizes 1..67 and large, several steps, NaN/Inf.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "sgd.h"

/* One param group's scalars, rounded to float as torch rounds them:
   scalar_t(x) of a double, computed in double first (1 - dampening, -lr). */
typedef struct {
    float weight_decay;   /* scalar_t(weight_decay)                                  */
    float momentum;       /* scalar_t(momentum)                                      */
    float damp_coeff;     /* scalar_t(1 - dampening)                                 */
    float neg_lr;         /* scalar_t(-lr): the vector loop adds g * -lr             */
    float lr;             /* scalar_t(lr): the tail loop subtracts g * lr            */
    float grad_scale;     /* *grad_scale (GradScaler), 1 when there is none          */
    float neg_one;        /* -1 at run time, so that g * -1 stays a multiply         */
    int maximize;         /* negate the gradient                                     */
    int decay;            /* weight_decay != 0: g += p * weight_decay                */
} sgd_consts;

static void sgd_consts_init(sgd_consts *k, double lr, double momentum, double dampening,
                            double weight_decay, int maximize, const float *grad_scale)
{
    k->weight_decay = (float)weight_decay;
    k->momentum = (float)momentum;
    k->damp_coeff = (float)(1.0 - dampening);
    k->neg_lr = (float)(-lr);
    k->lr = (float)lr;
    k->grad_scale = grad_scale ? *grad_scale : 1.0f;
    k->neg_one = -1.0f;
    k->maximize = maximize != 0;
    k->decay = weight_decay != 0.0;
}

/* Momentum modes (torch's momentum != 0 and is_first_step). */
enum { SGD_PLAIN = 0, SGD_FIRST = 1, SGD_MOMENTUM = 2 };

/* The SGD update over n fp32 elements of one region (RP_VEC, RP_TAILVEC or
   RP_SCALAR, see rules.h). mode, nesterov, unscale and region are
   compile-time constants at every call site (always_inline). */
static inline __attribute__((always_inline)) void sgd_elements(
    int64_t n, float *restrict p, float *restrict g, float *restrict buf, const sgd_consts *k,
    const int mode, const int nesterov, const int unscale, const int region)
{
    const sgd_consts c = *k; /* locals: the compiler must see they don't alias */
    const int vec = region == RP_VEC;
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        if (unscale) {            /* GradScaler: unscale in place, g / scale */
            gi = gi / c.grad_scale;
            g[i] = gi;
        }
        const float pi = p[i];
        /* maximize: torch writes g * -1 (vector loop) and -g (tail loop).
           Its build flips the sign bit, except in the scalar epilogue with
           weight decay and no grad scale, where the negation folds into the
           decay's FMA (p*wd - g), which keeps a NaN grad's sign, as a multiply
           by a run-time -1 does. Measured on NaN grads in each region. */
        if (c.maximize)
            gi = region == RP_SCALAR && c.decay && !unscale ? gi * c.neg_one : rp_flip_sign(gi);
        if (c.decay) gi = fmaf(pi, c.weight_decay, gi);           /* g += p * wd, fused */
        if (mode != SGD_PLAIN) {
            float b;
            if (mode == SGD_FIRST) b = gi;                       /* first step: buf = g */
            /* buf*m + g*(1-d): GCC fuses the second product into the add,
               its scalar epilogue the first */
            else if (region == RP_SCALAR) b = fmaf(buf[i], c.momentum, gi * c.damp_coeff);
            else b = fmaf(gi, c.damp_coeff, buf[i] * c.momentum);
            buf[i] = b;
            if (nesterov) gi = fmaf(b, c.momentum, gi);          /* g += buf * m */
            else gi = b;                                          /* g = buf */
        }
        /* p -= lr * g: the vector loop adds g * (-lr), the tail subtracts g * lr */
        p[i] = vec ? fmaf(gi, c.neg_lr, pi) : fmaf(-gi, c.lr, pi);
    }
}

/* One variant of the loop for each (mode, nesterov), with the other flags given. */
#define SGD_VARIANTS(N, P, G, B, UNS, REGION)                                          \
    do {                                                                               \
        if (mode == SGD_PLAIN) sgd_elements(N, P, G, B, k, SGD_PLAIN, 0, UNS, REGION);  \
        else if (mode == SGD_FIRST) {                                                  \
            if (nesterov) sgd_elements(N, P, G, B, k, SGD_FIRST, 1, UNS, REGION);      \
            else sgd_elements(N, P, G, B, k, SGD_FIRST, 0, UNS, REGION);               \
        } else {                                                                       \
            if (nesterov) sgd_elements(N, P, G, B, k, SGD_MOMENTUM, 1, UNS, REGION);   \
            else sgd_elements(N, P, G, B, k, SGD_MOMENTUM, 0, UNS, REGION);            \
        }                                                                              \
    } while (0)

/* torch's tail loop (fewer than 16 elements): one element at a time, not inlined. */
__attribute__((noinline)) static void sgd_fp32_tail(int64_t n, int region, float *p, float *g,
                                                    float *buf, const sgd_consts *k, int mode,
                                                    int nesterov, int unscale)
{
    for (int64_t i = 0; i < n; i++) {
        float *b = buf ? buf + i : NULL;
        if (region == RP_TAILVEC) {
            if (unscale) SGD_VARIANTS(1, p + i, g + i, b, 1, RP_TAILVEC);
            else SGD_VARIANTS(1, p + i, g + i, b, 0, RP_TAILVEC);
        } else {
            if (unscale) SGD_VARIANTS(1, p + i, g + i, b, 1, RP_SCALAR);
            else SGD_VARIANTS(1, p + i, g + i, b, 0, RP_SCALAR);
        }
    }
}

/* Elements [first, first+n) of a tensor of numel elements whose torch tail
   starts at tail_start (numel - numel % torch_vec). p, g, buf point at element
   `first`; buf (momentum_buffer) may be NULL when momentum_on is 0.
   first_step: torch's is_first_step, true when no param of the group had a
   buffer yet (buf is then only written). unscale: divide g by k->grad_scale
   and store it back, as torch does with a GradScaler. */
static void sgd_fp32_span(int64_t first, int64_t n, int64_t tail_start, int64_t numel, float *p,
                          float *g, float *buf, const sgd_consts *k, int momentum_on,
                          int nesterov, int first_step, int unscale)
{
    const int mode = !momentum_on ? SGD_PLAIN : first_step ? SGD_FIRST : SGD_MOMENTUM;
    if (mode == SGD_PLAIN) buf = NULL;
    int64_t len[3];
    rp_regions(first, n, tail_start, numel, len);
    if (len[RP_VEC] > 0) {
        if (unscale) SGD_VARIANTS(len[RP_VEC], p, g, buf, 1, RP_VEC);
        else SGD_VARIANTS(len[RP_VEC], p, g, buf, 0, RP_VEC);
    }
    for (int r = RP_TAILVEC; r <= RP_SCALAR; r++) {
        const int64_t o = r == RP_TAILVEC ? len[RP_VEC] : len[RP_VEC] + len[RP_TAILVEC];
        if (len[r] > 0)
            sgd_fp32_tail(len[r], r, p + o, g + o, buf ? buf + o : NULL, k, mode, nesterov, unscale);
    }
}

/* ---- the step: the engine's scheduler over sgd_fp32_span -------------------- */

typedef struct {
    sgd_consts k;
    int momentum_on, nesterov, unscale;
    int64_t torch_vec;
} sgd_ctx;

static void sgd_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                        const void *ctx_)
{
    const sgd_ctx *ctx = ctx_;
    const int64_t tail_start = t->numel - t->numel % ctx->torch_vec;
    sgd_fp32_span(first, n, tail_start, t->numel, p, g, s[0], &ctx->k, ctx->momentum_on, ctx->nesterov,
                  t->fresh, ctx->unscale);
}

static void sgd_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const sgd_ctx *ctx = ctx_;
    rp_staged_span(t, begin, end, ctx->momentum_on, ctx->unscale, sgd_fp32_fn, ctx);
}

int rp_sgd_step(const rp_run_opts *run, const rp_sgd_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    sgd_ctx ctx;
    sgd_consts_init(&ctx.k, h->lr, h->momentum, h->dampening, h->weight_decay, h->maximize, run->grad_scale);
    ctx.momentum_on = h->momentum != 0.0;
    ctx.nesterov = h->nesterov != 0;
    ctx.unscale = run->grad_scale != NULL;
    ctx.torch_vec = run->torch_vec;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, sgd_chunk, &ctx);
    for (int64_t i = 0; i < n_tensors; i++) tensors[i].fresh = 0; /* the buffers hold a grad now */
    return 1;
}
