/* roundpipe ASGD rule: torch.optim.ASGD's for-loop step (foreach=False,
 * torch/optim/asgd.py, _single_tensor_asgd) fused into one pass.
 *
 * torch's ops per tensor, each rounded to float32 in this order:
 *   g = -grad (maximize); g = g.add(p, alpha=wd)      when wd != 0
 *   p.mul_(1 - lambd*eta); p.add_(g, alpha=-eta)     eta: the state's value
 *   ax.add_(p.sub(ax).mul_(mu))  if mu.item() != 1,  else  ax.copy_(p)
 * then, per tensor in Python's double: eta = lr / (1 + lambd*lr*step)**alpha
 * and mu = 1 / max(1, step - t0), each stored into its float32 tensor. The
 * choice between averaging and copying is made per tensor per step, from the
 * mu this step starts with. torch's elementwise kernels round their vector
 * body and scalar tail alike: no tail regions (but see rp_torch_neg). NaNs:
 * rules.h (rp_nan_from) picks the one torch returns. Built with
 * -ffp-contract=off: every fused multiply-add is an explicit fmaf.
 */
#include <math.h>
#include <stdint.h>

#include "rules.h"
#include "runner.h"
#include "asgd.h"

typedef struct {
    float weight_decay;
    float inv_scale;       /* GradScaler: (float)(1 / scale), as torch's unscale_ */
    int maximize, decay, unscale;
    int64_t torch_vec;     /* torch's vector width in floats: where a complex tensor's tail starts */
} asgd_consts;

/* The ASGD update over n fp32 elements; decay = (float)(1 - lambd*eta),
   neg_eta = -eta, mu: this tensor's scalars; neg: how -grad negates (rules.h,
   rp_torch_neg). coupled (wd != 0) and average (mu != 1) are compile-time
   constants at each call. */
static inline __attribute__((always_inline)) void asgd_elements(
    int64_t n, float *restrict p, float *restrict g, float *restrict ax, const asgd_consts *k,
    float decay, float neg_eta, float mu, int neg, const int coupled, const int average)
{
    const asgd_consts c = *k; /* locals: the compiler must see they don't alias */
    for (int64_t i = 0; i < n; i++) {
        float gi = rp_loop_grad(g, i, c.unscale, c.inv_scale, neg);   /* unscale_, then -grad */
        float pi = p[i];
        if (coupled) gi = rp_coupled_decay(gi, pi, c.weight_decay);    /* g.add(p, alpha=wd) */
        pi = pi * decay;                                                /* p.mul_(1 - lambd*eta) */
        pi = rp_nan_from(gi, fmaf(gi, neg_eta, pi));                    /* p.add_(g, alpha=-eta) */
        p[i] = pi;
        if (average) {
            const float a = ax[i];
            const float d = rp_nan_from(a, pi - a) * mu;                /* p.sub(ax).mul_(mu) */
            ax[i] = rp_nan_from(d, a + d);                              /* ax.add_(...) */
        } else {
            ax[i] = pi;                                                 /* ax.copy_(p) */
        }
    }
}

/* Loop unswitching off, as in nadam.c: four variants, not one per unscale and neg value too. */
__attribute__((optimize("no-unswitch-loops"))) static void asgd_span(int64_t n, float *p, float *g, float *ax, const asgd_consts *k, const rp_tensor *t, int neg)
{
    const float decay = t->scalar[0], neg_eta = t->scalar[1], mu = t->scalar[2];
    const int average = mu != 1.0f; /* torch: mu.item() != 1 (NaN averages) */
#define ASGD_CALL(CP, AV) asgd_elements(n, p, g, ax, k, decay, neg_eta, mu, neg, CP, AV)
    if (k->decay) { if (average) ASGD_CALL(1, 1); else ASGD_CALL(1, 0); }
    else { if (average) ASGD_CALL(0, 1); else ASGD_CALL(0, 0); }
#undef ASGD_CALL
}

static void asgd_fp32_fn(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                         const void *ctx_)
{
    const asgd_consts *k = ctx_;
    if (!k->maximize) {
        asgd_span(n, p, g, s[0], k, t, RP_NEG_NONE);
        return;
    }
    /* a complex tensor (scalar[3]) negates by 0 - g in torch's vector body */
    const int64_t split = rp_neg_sub_count(t->scalar[3] != 0.0f, t->numel - t->numel % k->torch_vec, first, n);
    asgd_span(split, p, g, s[0], k, t, RP_NEG_SUB);
    asgd_span(n - split, p + split, g + split, s[0] + split, k, t, RP_NEG_FLIP);
}

static void asgd_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const asgd_consts *k = ctx_;
    rp_staged_span(t, begin, end, 1, k->unscale, asgd_fp32_fn, k);
}

/* torch's x ** alpha for a 0-dim float32 tensor x (pow_tensor_scalar_kernel):
   sqrt, 1/sqrt and 1/x for 0.5, -0.5 and -1, products for 2, 3 and -2, else
   std::pow in float. */
static float asgd_torch_powf(const void *vml_sqrt, int sqrt_how, float x, double alpha)
{
    float r;
    if (alpha == 0.5) { rp_torch_sqrt(vml_sqrt, sqrt_how, 1, &x, &r); return r; }
    if (alpha == -0.5) return 1.0f / sqrtf(x);
    if (alpha == -1.0) return 1.0f / x;
    if (alpha == 2.0) return x * x;
    if (alpha == 3.0) return x * x * x;
    if (alpha == -2.0) return 1.0f / (x * x);
    return powf(x, (float)alpha);
}

int rp_asgd_step(const rp_run_opts *run, const rp_asgd_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                 const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    const double lr = h->lr;
    const float lr_f = (float)lr;
    for (int64_t i = 0; i < n_tensors; i++) { /* torch's Python, serially, per tensor */
        rp_tensor *t = &tensors[i];
        float *eta = t->aux[0], *mu = t->aux[1];
        const float step_f = *t->step + 1.0f; /* step_t += 1 */
        *t->step = step_f;
        const double eta_v = *eta;            /* _get_value(eta) */
        t->scalar[0] = (float)(1.0 - h->lambd * eta_v);
        t->scalar[1] = (float)-eta_v;
        t->scalar[2] = *mu;
        const double step = step_f;
        if (h->lr_f32) /* lr / ((1 + lambd*lr*step) ** alpha) as float32 tensor ops */
            *eta = lr_f / asgd_torch_powf(h->vml_sqrt, h->sqrt_how, 1.0f + ((float)h->lambd * lr_f) * (float)step, h->alpha);
        else
            *eta = (float)(lr / pow(1.0 + h->lambd * lr * step, h->alpha));
        const double since = step - h->t0;
        *mu = since > 1.0 ? (float)(1.0 / since) : 1.0f; /* 1 / max(1, step - t0) */
    }
    asgd_consts k;
    k.weight_decay = (float)h->weight_decay;
    k.maximize = h->maximize != 0;
    k.decay = h->weight_decay != 0.0;
    k.unscale = run->grad_scale != NULL;
    k.torch_vec = run->torch_vec;
    k.inv_scale = rp_inv_scale(run->grad_scale);
    rp_run(run, tensors, n_tensors, chunks, n_chunks, asgd_chunk, &k);
    return 1;
}

RP_EXPORT_TORCH_SQRT(rp_asgd_torch_sqrt)
