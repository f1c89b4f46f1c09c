/* Shared by the update rules sgd.c, adagrad.c and lion.c: where torch's
 * rounding changes along a tensor.
 *
 * torch's fused CPU kernels run an explicit Vectorized<float> loop over the
 * first numel - numel % V elements (V = 16 with AVX-512, 8 with AVX2), then a
 * plain C++ loop over the rest. GCC auto-vectorizes that plain loop with
 * 8-lane vectors and finishes it with scalar code, and the two halves contract
 * multiply-adds differently. So a tensor has three regions, measured against
 * torch 2.13 on both its AVX-512 and AVX2 kernels (ATEN_CPU_CAPABILITY=avx2),
 * tail lengths 0..15 (scripts/rules_harness.py):
 *   RP_VEC      [0, tail_start)             torch's Vectorized loop
 *   RP_TAILVEC  [tail_start, scalar_start)  its tail loop, GCC's 8-lane body
 *   RP_SCALAR   [scalar_start, numel)       its tail loop, scalar epilogue
 * with tail_start = numel - numel % V and scalar_start = numel - numel % 8.
 * With V = 8 the middle region is empty.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { RP_VEC = 0, RP_TAILVEC = 1, RP_SCALAR = 2 };

/* Split the span [first, first+n) of a tensor of numel elements into its
   parts in each region: len[RP_VEC], len[RP_TAILVEC], len[RP_SCALAR]. */
static inline void rp_regions(int64_t first, int64_t n, int64_t tail_start, int64_t numel,
                              int64_t len[3])
{
    const int64_t scalar_start = numel - numel % 8;
    int64_t a = tail_start - first, b = scalar_start - first;
    a = a < 0 ? 0 : a > n ? n : a;
    b = b < a ? a : b > n ? n : b;
    len[RP_VEC] = a;
    len[RP_TAILVEC] = b - a;
    len[RP_SCALAR] = n - b;
}

/* -x as a sign-bit flip that GCC cannot fold into a following FMA. torch's
   -g flips a NaN's sign bit, but GCC turns fma(-a, b, c) into one vfnmadd,
   which returns a NaN operand unchanged, and fma(-g, -g, s) into fma(g, g, s). */
static inline __attribute__((always_inline)) float rp_flip_sign(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    u ^= 0x80000000u;
    memcpy(&x, &u, 4);
    return x;
}

/* torch's .sqrt() of a contiguous float tensor, element for element. Where
   torch is built with MKL, its unary kernel calls MKL's vmsSqrt (VML_HA |
   VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is not correctly rounded (about
   one result in six is 1 ulp off sqrtf's); `vml` is then that function,
   looked up in torch's own library (roundpipe/optim/_for_loop.py), else NULL
   and torch's Vectorized sqrt is IEEE sqrt. Results do not depend on n or on
   where a block starts (checked by tests/test_rules23.py). */
typedef void (*rp_vml_fn)(int n, const float *a, float *r, unsigned long long mode);
#define RP_VML_TORCH_MODE 0x140102ull /* VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE */

static inline void rp_torch_sqrt(const void *vml, int64_t n, const float *restrict a, float *restrict r)
{
    if (vml) {
        ((rp_vml_fn)vml)((int)n, a, r, RP_VML_TORCH_MODE);
        return;
    }
    for (int64_t i = 0; i < n; i++) r[i] = sqrtf(a[i]);
}

/* r, unless x is a NaN: then x, unchanged. torch's elementwise binary ops (add,
   sub, mul, lerp, addcmul, addcdiv) return the NaN of their second tensor
   operand when both operands are NaNs (addcdiv: tensor1's, then tensor2's,
   then self's), in their vector body and scalar tail alike (measured with
   distinct NaN payloads). GCC orders a commutative op's operands as it likes,
   and x86 returns the first operand's NaN: rules pick the NaN explicitly. */
static inline __attribute__((always_inline)) float rp_nan_from(float x, float r)
{
    return x != x ? x : r;
}

/* torch's -g, element i of a tensor whose torch vector body ends at tail_start
   (rp_regions): a sign flip for real tensors and in a complex tensor's scalar
   tail, but 0 - g in a complex tensor's vector body (Vectorized<complex>::neg),
   which keeps a NaN's sign and turns -0 into +0. How each element negates is
   decided per span by the rule (negate_mode below), not per element. */
enum { RP_NEG_NONE = 0, RP_NEG_FLIP = 1, RP_NEG_SUB = 2 };

static inline __attribute__((always_inline)) float rp_torch_neg(float g, int mode)
{
    if (mode == RP_NEG_FLIP) return rp_flip_sign(g);
    if (mode == RP_NEG_SUB) return 0.0f - g;
    return g;
}

/* Element i's grad in a rule whose reference is torch's for-loop step: GradScaler's
   unscale_ first (g * inv_scale, stored back, as GradScaler does before torch's
   step), then torch's -g for maximize (neg: rp_torch_neg's mode). */
static inline __attribute__((always_inline)) float rp_loop_grad(float *g, int64_t i, int unscale,
                                                                float inv_scale, int neg)
{
    float gi = g[i];
    if (unscale) {
        gi = gi * inv_scale;
        g[i] = gi;
    }
    return rp_torch_neg(gi, neg);
}

/* torch's g.add(p, alpha=wd): one rounding, and p's NaN before g's. */
static inline __attribute__((always_inline)) float rp_coupled_decay(float g, float p, float wd)
{
    return rp_nan_from(p, fmaf(p, wd, g));
}

/* With maximize, how many of the n elements from `first` on negate as torch's
   complex vector body does (RP_NEG_SUB); the rest flip their sign. 0 for a
   real tensor. numel, tail_start: the tensor's, in floats (rp_regions). */
static inline int64_t rp_neg_sub_count(int is_complex, int64_t tail_start, int64_t first, int64_t n)
{
    const int64_t k = is_complex ? tail_start - first : 0;
    return k < 0 ? 0 : k > n ? n : k;
}
