/* Adam's arithmetic, shared by the rules that step Adam's update: adam.c (torch's
 * Adam and AdamW, bit-identical to its fused kernel) and adam8bit.c (the same
 * update on moments decoded from 8-bit codes). Static inline functions only,
 * included by each rule's .c file; the rules of adam.c's header apply
 * (-ffp-contract=off: every fused multiply-add is an explicit fmaf()).
 */
#ifndef ROUNDPIPE_ADAM_MATH_H
#define ROUNDPIPE_ADAM_MATH_H

#include "runner.h"
#include "stochastic_round.h"

/* A param group's Adam hyperparameters, as the rules' hyper structs carry them. */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    int maximize, decoupled_weight_decay;
} adam_scalars;

/* Scalars of one tensor's step, all already rounded to float the way torch
   rounds them (double math first, then one conversion). */
typedef struct {
    float neg_step_size, bias_correction2_sqrt, eps;
    float beta2, sq_coeff;      /* exp_avg_sq = exp_avg_sq*beta2 + (sq_coeff*g)*g */
    float lerp_coeff;           /* exp_avg.lerp_(g, 1-beta1), see adam_elements */
    int lerp_from_exp_avg;
    float one_minus_w;          /* 1 - (1-beta1), rounded in float: torch's tail lerp */
    float neg_one, one;         /* -1 and 1 at run time, so that g * -1 stays a multiply */
    int maximize_negates;       /* see adam_elements: how torch's build flips the grad */
    float weight_decay, decay_factor;
    int maximize, coupled_decay, decoupled_decay;
    float grad_scale;
} rp_consts;

/* The Adam update over n elements, computed in fp32. p, g, m, v, vmax point
   at arrays of dtype pdt (p and g), mdt (m) and vdt (v, vmax): the tensors
   themselves, or fp32 staging blocks. With a master copy (master != NULL,
   pdt bf16) the fp32 param is read from and written to master, and p gets the
   result rounded to bf16. The dtypes and amsgrad, unscale and torch_tail are
   compile-time constants at each call site, so every variant is its own
   vectorized loop. */
static inline __attribute__((always_inline)) void adam_elements(
    int64_t n, void *restrict p, float *restrict master, void *restrict g, void *restrict m,
    void *restrict v, void *restrict vmax, const rp_consts *k, const int pdt, const int mdt,
    const int vdt, const int amsgrad, const int unscale, const int torch_tail,
    const int sr, const uint32_t sr_base, const uint32_t sr_key)
{
    const rp_consts c = *k; /* locals: the compiler must see they don't alias */
    /* torch's vector maximum() returns all-ones bits when either side is NaN */
    const float nan_all_ones = float_from_bits(0xFFFFFFFFu);
    /* maximize: torch writes g * -1. Its build turns that into a sign flip
       except in the fp32 vector loop of Adam with coupled weight decay and no
       grad scale, where it folds into the decay's FMA; the two differ only in
       a NaN's sign. Both
       are done unconditionally (a multiply by +-1, a select) so that the loop
       stays vectorized: a conditional multiply is not (GCC 12, COND_MUL). */
    const int negate = c.maximize && (torch_tail || unscale || c.maximize_negates);
    const float factor = c.maximize && !negate ? c.neg_one : c.one;
    for (int64_t i = 0; i < n; i++) {
        float gi = load_elem(g, pdt, i);
        if (unscale) {                       /* GradScaler: unscale in place */
            gi = gi / c.grad_scale;
            store_elem(g, pdt, i, gi);
        }
        gi = gi * factor; /* x * 1 is x, NaNs included */
        if (negate) gi = -gi;
        float pi = master ? master[i] : load_elem(p, pdt, i);
        if (c.coupled_decay) gi = fmaf(pi, c.weight_decay, gi); /* Adam: decay joins the gradient */
        if (c.decoupled_decay) pi = pi * c.decay_factor;      /* AdamW: p *= 1 - lr*wd */
        /* exp_avg.lerp_(g, w) with w = 1-beta1, torch's two-sided lerp:
           w < 0.5: m + w*(g-m); else g + (w-1)*(g-m); one fused multiply-add. */
        float mi = load_elem(m, mdt, i);
        if (torch_tail && !c.lerp_from_exp_avg)
            mi = fmaf(-(gi - mi), c.one_minus_w, gi); /* tail: g - (g-m)*(1-w), one FMA */
        else
            mi = fmaf(c.lerp_coeff, gi - mi, c.lerp_from_exp_avg ? mi : gi);
        /* exp_avg_sq*beta2 + (1-beta2)*g*g with one of the two products fused
           into the add: torch's vector loop fuses the second, its scalar tail
           loop (two statements there) the first. */
        const float v0 = load_elem(v, vdt, i);
        float vi = torch_tail ? fmaf(v0, c.beta2, (c.sq_coeff * gi) * gi)
                              : fmaf(c.sq_coeff * gi, gi, v0 * c.beta2);
        store_elem(m, mdt, i, mi);
        store_elem(v, vdt, i, vi);
        float den = vi;
        if (amsgrad) {
            float old = load_elem(vmax, vdt, i);
            /* vector loop: torch's maximum() (NaN in either gives all-ones bits);
               tail loop: std::max(old, v), which keeps old when v is NaN */
            float mx = torch_tail ? (old < vi ? vi : old)
                                  : (old != old || vi != vi) ? nan_all_ones : (old > vi ? old : vi);
            store_elem(vmax, vdt, i, mx);
            den = mx;
        }
        den = sqrtf(den) / c.bias_correction2_sqrt + c.eps;
        const float update = (c.neg_step_size * mi) / den;
        /* both NaN: torch's tail returns the param's NaN (its first operand) */
        const float out = (torch_tail && pi != pi) ? pi : pi + update;
        if (master) master[i] = out;
        if (sr) /* bf16_stochastic_round: the bits of element sr_base + i of this step, see stochastic_round.h */
            ((uint16_t *)p)[i] = rp_bf16_sr(out, rp_sr_hash(sr_base + (uint32_t)i, sr_key));
        else
            store_elem(p, pdt, i, out); /* with a master: the master rounded to bf16 */
    }
}

#define F32 RP_F32

static void adam_fp32_body(int64_t n, float *p, float *g, float *m, float *v, float *vmax,
                           const rp_consts *k, int amsgrad, int unscale)
{
    if (amsgrad) {
        if (unscale) adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 1, 1, 0, 0, 0, 0);
        else adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 1, 0, 0, 0, 0, 0);
    } else {
        if (unscale) adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 0, 1, 0, 0, 0, 0);
        else adam_elements(n, p, NULL, g, m, v, vmax, k, F32, F32, F32, 0, 0, 0, 0, 0, 0);
    }
}

/* The last numel % torch_vec elements of a tensor, which torch computes in its
   scalar tail loop. Few elements: one generic loop serves every variant. */
__attribute__((noinline)) static void adam_fp32_tail(int64_t n, float *p, float *g, float *m,
                                                     float *v, float *vmax, const rp_consts *k,
                                                     int amsgrad, int unscale)
{
    for (int64_t i = 0; i < n; i++) {
        float *x = amsgrad ? vmax + i : NULL;
        if (amsgrad) {
            if (unscale) adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 1, 1, 1, 0, 0, 0);
            else adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 1, 0, 1, 0, 0, 0);
        } else {
            if (unscale) adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 0, 1, 1, 0, 0, 0);
            else adam_elements(1, p + i, NULL, g + i, m + i, v + i, x, k, F32, F32, F32, 0, 0, 1, 0, 0, 0);
        }
    }
}

/* Elements [first, first+n) of a tensor whose torch tail starts at tail_start. */
static void adam_fp32(int64_t first, int64_t n, int64_t tail_start, float *p, float *g, float *m,
                      float *v, float *vmax, const rp_consts *k, int amsgrad, int unscale)
{
    int64_t body = tail_start - first;
    if (body > n) body = n;
    if (body < 0) body = 0;
    if (body > 0) adam_fp32_body(body, p, g, m, v, vmax, k, amsgrad, unscale);
    if (body < n)
        adam_fp32_tail(n - body, p + body, g + body, m + body, v + body,
                       amsgrad ? vmax + body : NULL, k, amsgrad, unscale);
}

/* The group's constants, rounded to float as torch rounds them. */
static void consts_for_group(const adam_scalars *h, const rp_run_opts *run, rp_consts *k)
{
    memset(k, 0, sizeof *k);
    /* torch: exp_avg.lerp_(grad, 1-beta1) with weight w = float(1-beta1);
       |w| < 0.5 lerps from exp_avg with w, else from grad with w-1. */
    const float w = (float)(1.0 - h->beta1);
    k->lerp_from_exp_avg = fabsf(w) < 0.5f;
    k->lerp_coeff = k->lerp_from_exp_avg ? w : w - 1.0f;
    k->beta2 = (float)h->beta2;
    k->sq_coeff = (float)(1.0 - h->beta2);
    k->eps = (float)h->eps;
    k->one_minus_w = 1.0f - w;
    k->neg_one = -1.0f;
    k->one = 1.0f;
    k->maximize_negates = !(h->weight_decay != 0.0 && !h->decoupled_weight_decay);
    k->maximize = h->maximize != 0;
    k->coupled_decay = h->weight_decay != 0.0 && !h->decoupled_weight_decay;
    k->decoupled_decay = h->weight_decay != 0.0 && h->decoupled_weight_decay;
    k->weight_decay = (float)h->weight_decay;
    k->decay_factor = (float)fma(-h->lr, h->weight_decay, 1.0); /* torch's build fuses 1 - lr*wd */
    k->grad_scale = run->grad_scale ? *run->grad_scale : 1.0f;
}

/* Count each tensor's step and write its scalars: scalar[0] = -(lr / bias_correction1),
   scalar[1] = sqrt(bias_correction2), in double as torch computes them, once per
   step. Tensors usually share a step count, so the last result is reused. */
static void adam_step_scalars(const adam_scalars *h, rp_tensor *tensors, int64_t n_tensors)
{
    float last_step = -1.0f, last_nss = 0.0f, last_bc2 = 0.0f;
    for (int64_t i = 0; i < n_tensors; i++) {
        rp_tensor *t = &tensors[i];
        const float step = *t->step + 1.0f; /* torch._foreach_add_(state_steps, 1) */
        *t->step = step;
        if (step != last_step) {
            const double bc1 = 1.0 - pow(h->beta1, (double)step);
            const double bc2 = 1.0 - pow(h->beta2, (double)step);
            last_nss = (float)(-(h->lr / bc1));
            last_bc2 = (float)sqrt(bc2);
            last_step = step;
        }
        t->scalar[0] = last_nss;
        t->scalar[1] = last_bc2;
    }
}

/* A tensor's scalars (adam_step_scalars) into the group's constants. */
static inline void consts_for_tensor(rp_consts *k, const rp_tensor *t)
{
    k->neg_step_size = t->scalar[0];
    k->bias_correction2_sqrt = t->scalar[1];
}

#endif /* ROUNDPIPE_ADAM_MATH_H */
