/* Shared by the update rules (sgd.c, adagrad.c, lion.c, and the for-loop rules nadam.c, asgd.c,
 * rmsprop.c, adadelta.c, rprop.c): where torch's
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

#include "runner.h" /* RP_BLOCK */

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
   VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is not correctly rounded: about
   one result in six is 1 ulp off sqrtf's. `how` says which sqrt torch's is
   here, as roundpipe/optim/_for_loop.py found it (checked on a probe):
     RP_SQRT_IEEE   sqrtf (torch without MKL: its Vectorized sqrt is IEEE);
     RP_SQRT_MKL_Z0 MKL's AVX-512 kernel (mkl_vml_kernel_sSqrt_Z0HAynn, what
                    MKL runs on Intel CPUs), the same instructions inline;
     RP_SQRT_MKL_L9 MKL's AVX2 kernel (..._L9HAynn);
     RP_SQRT_MKL_H8 MKL's unfused SSE kernel (..._H8HAynn: what MKL 2024 runs
                    on AMD CPUs, which it does not give its AVX2/AVX-512 code);
     RP_SQRT_CALL   `vml` itself, MKL's vmsSqrt, called per block: ~9 us a
                    call, several times the cost of the rest of a NAdam step.
   The kernels' first step is the CPU's own rsqrt estimate, which differs
   between vendors: the probe decides, on the host that runs the step.
   Results do not depend on n or on where a block starts. */
typedef void (*rp_vml_fn)(int n, const float *a, float *r, unsigned long long mode);
/* The lanes MKL's AVX2/SSE kernels leave to their own path (zeros, denormals, Inf, NaN,
   negatives): x is not a positive normal iff bits(x) + RP_SQRT_SPECIAL_ADD > RP_SQRT_SPECIAL_GT
   as signed 32-bit integers. */
#define RP_SQRT_SPECIAL_ADD 0x7f800000
#define RP_SQRT_SPECIAL_GT ((int)0xfeffffff)
#define RP_VML_TORCH_MODE 0x140102ull /* VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE */
enum { RP_SQRT_IEEE = 0, RP_SQRT_MKL_Z0 = 1, RP_SQRT_MKL_L9 = 2, RP_SQRT_MKL_H8 = 3, RP_SQRT_CALL = 4 };

#ifdef __AVX512F__
#include <immintrin.h>
/* MKL's AVX-512 sqrt, from its disassembly: y = rsqrt14(x), s = x*y, h = y/2,
   then s + h (x - s*s) with both steps fused; where y > 2^39 (tiny x) the
   residual is taken on x * 2^78 and s * 2^39 and h scaled back by 2^-78.
   Zeros and +Inf are returned as they are, negative x (and -Inf) as +qNaN,
   NaNs through the arithmetic (quieted). */
static inline __m512 rp_mkl_sqrt16(__m512 x)
{
    const __m512 y = _mm512_rsqrt14_ps(x);
    const __m512 h = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
    const __m512 s = _mm512_mul_ps(y, x);
    const __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_set1_ps(0x1p39f), y, _CMP_LT_OS);
    const __m512 xs = _mm512_mask_mul_ps(x, tiny, x, _mm512_set1_ps(0x1p78f));
    const __m512 ss = _mm512_mask_mul_ps(s, tiny, s, _mm512_set1_ps(0x1p39f));
    const __m512 hs = _mm512_mask_mul_ps(h, tiny, h, _mm512_set1_ps(0x1p-78f));
    const __m512 r = _mm512_fnmadd_ps(ss, ss, xs);           /* x - s*s */
    __m512 out = _mm512_fmadd_ps(r, hs, s);                  /* s + h * (x - s*s) */
    /* +-0, +-Inf and negative finite x (fpclass 0x5e): x itself, negatives then NaN */
    const __mmask16 special = _mm512_fpclass_ps_mask(x, 0x5e);
    out = _mm512_mask_mov_ps(out, special, x);
    const __mmask16 negative = _mm512_fpclass_ps_mask(x, 0x50); /* -Inf, negative finite */
    return _mm512_mask_mov_ps(out, negative, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)));
}
#endif

#ifdef __AVX2__
#include <immintrin.h>
/* MKL's AVX2 sqrt (fused: ..._L9HAynn) and its SSE one (unfused: ..._H8HAynn,
   what MKL 2024 runs on AMD CPUs), from their disassembly, for positive
   normal x: y = rsqrt(x) (the CPU's 12-bit estimate), s = x*y, h = y/2,
   e = 1/2 - s*h, s1 = s + s*e, h1 = h + h*e, then s1 + h1 (x - s1*s1). Other
   lanes (zeros, denormals, Inf, NaN, negatives) take MKL's own per-element
   path: rp_torch_sqrt hands them to vmsSqrt. Returns the mask of those lanes. */
static inline int rp_mkl_sqrt8(const float *a, float *r, const int fused)
{
    const __m256 x = _mm256_loadu_ps(a);
    /* not a positive normal (RP_SQRT_SPECIAL_ADD, _GT) */
    const __m256i t = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(RP_SQRT_SPECIAL_ADD));
    const __m256i special = _mm256_cmpgt_epi32(t, _mm256_set1_epi32(RP_SQRT_SPECIAL_GT));
    const __m256 y = _mm256_rsqrt_ps(x);
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256 s = _mm256_mul_ps(y, x), h = _mm256_mul_ps(y, half);
    __m256 res;
    if (fused) {
        const __m256 e = _mm256_fnmadd_ps(s, h, half);
        const __m256 s1 = _mm256_fmadd_ps(e, s, s), h1 = _mm256_fmadd_ps(e, h, h);
        res = _mm256_fmadd_ps(h1, _mm256_fnmadd_ps(s1, s1, x), s1);
    } else {
        const __m256 e = _mm256_sub_ps(half, _mm256_mul_ps(s, h));
        const __m256 s1 = _mm256_add_ps(_mm256_mul_ps(s, e), s), h1 = _mm256_add_ps(_mm256_mul_ps(e, h), h);
        const __m256 rr = _mm256_sub_ps(x, _mm256_mul_ps(s1, s1));
        res = _mm256_add_ps(_mm256_mul_ps(rr, h1), s1);
    }
    _mm256_storeu_ps(r, res);
    return _mm256_movemask_ps(_mm256_castsi256_ps(special));
}

static inline void rp_mkl_sqrt_avx2(const void *vml, int64_t n, const float *restrict a, float *restrict r,
                                    const int fused)
{
    int64_t i = 0;
    int special = 0;
    /* One tight loop first, and MKL's own path for the rare special lanes after it: a
       call inside this loop made GCC keep its counters on the stack (store-to-load
       forwarding on every iteration: ~5 cycles per 8 elements, half of RMSprop's step). */
    for (; i + 8 <= n; i += 8) special |= rp_mkl_sqrt8(a + i, r + i, fused);
    for (int64_t j = 0; special && j < i; j++) { /* rare but for zeros */
        uint32_t u;
        memcpy(&u, &a[j], 4);
        if ((int32_t)(u + (uint32_t)RP_SQRT_SPECIAL_ADD) > RP_SQRT_SPECIAL_GT)
            ((rp_vml_fn)vml)(1, a + j, r + j, RP_VML_TORCH_MODE);
    }
    for (; i < n; i++) { /* fewer than 8 left: one at a time, through a padded copy */
        float in[8] = {1, 1, 1, 1, 1, 1, 1, 1}, out[8];
        in[0] = a[i];
        if (rp_mkl_sqrt8(in, out, fused) & 1) ((rp_vml_fn)vml)(1, a + i, r + i, RP_VML_TORCH_MODE);
        else r[i] = out[0];
    }
}
#endif

static inline void rp_torch_sqrt(const void *vml, int how, int64_t n, const float *restrict a, float *restrict r)
{
#ifdef __AVX2__
    if (how == RP_SQRT_MKL_L9 && vml) {
        rp_mkl_sqrt_avx2(vml, n, a, r, 1);
        return;
    }
    if (how == RP_SQRT_MKL_H8 && vml) {
        rp_mkl_sqrt_avx2(vml, n, a, r, 0);
        return;
    }
#endif
#ifdef __AVX512F__
    if (how == RP_SQRT_MKL_Z0) {
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(r + i, rp_mkl_sqrt16(_mm512_loadu_ps(a + i)));
        if (i < n) {
            const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
            _mm512_mask_storeu_ps(r + i, m, rp_mkl_sqrt16(_mm512_maskz_loadu_ps(m, a + i)));
        }
        return;
    }
#endif
    if (how != RP_SQRT_IEEE && vml) {
        ((rp_vml_fn)vml)((int)n, a, r, RP_VML_TORCH_MODE);
        return;
    }
    for (int64_t i = 0; i < n; i++) r[i] = sqrtf(a[i]);
}

/* ---- fused 16-lane loops over torch's sqrt (RMSprop, Adadelta, NAdam, RAdam) --------

   A rule that splits a block into phases around rp_torch_sqrt (the MKL kernels may hand
   a lane to vmsSqrt, a call) leaves memory idle while it computes in L1. With AVX-512
   and an inline kernel (IEEE, Z0, L9, H8) it can instead run one loop over 16 lanes at
   a time, loads to stores, as adam.c does: rp_vsqrt gives the lanes MKL computes on its
   own path (zeros, denormals, Inf, NaN, negatives: `special`, only for L9 and H8), the
   loop leaves those lanes unwritten (masked stores) and records them, and the rule redoes
   each of them afterwards with its phased code, one element at a time (rp_redo). The
   lanes are the same bits as rp_torch_sqrt's: the same operations in the same order. */
#ifdef __AVX512F__
static inline int rp_vsqrt_inline(int how, const void *vml)
{
    return how == RP_SQRT_IEEE || how == RP_SQRT_MKL_Z0 || ((how == RP_SQRT_MKL_L9 || how == RP_SQRT_MKL_H8) && vml);
}

/* torch's sqrt of 16 lanes, `how` fixed per call site; *special: the lanes to redo. */
static inline __attribute__((always_inline)) __m512 rp_vsqrt(__m512 x, int how, __mmask16 *special)
{
    if (how == RP_SQRT_IEEE) { *special = 0; return _mm512_sqrt_ps(x); }
    if (how == RP_SQRT_MKL_Z0) { *special = 0; return rp_mkl_sqrt16(x); }
    /* rp_mkl_sqrt8's arithmetic at 16 lanes; only the 12-bit vrsqrtps estimate is taken per
       8-lane half (it has no 16-lane form). Calling rp_mkl_sqrt8's 8-lane code on each half
       instead gives the same bits but measured 25-35% slower in cache (RMSprop, Adadelta,
       NAdam, RAdam on Zen 4). */
    const __m512i t = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(RP_SQRT_SPECIAL_ADD));
    *special = _mm512_cmpgt_epi32_mask(t, _mm512_set1_epi32(RP_SQRT_SPECIAL_GT));
    const __m256 ylo = _mm256_rsqrt_ps(_mm512_castps512_ps256(x));
    const __m256 yhi = _mm256_rsqrt_ps(_mm512_extractf32x8_ps(x, 1));
    const __m512 y = _mm512_insertf32x8(_mm512_castps256_ps512(ylo), yhi, 1);
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512 s = _mm512_mul_ps(y, x), h = _mm512_mul_ps(y, half);
    if (how == RP_SQRT_MKL_L9) {
        const __m512 e = _mm512_fnmadd_ps(s, h, half);
        const __m512 s1 = _mm512_fmadd_ps(e, s, s), h1 = _mm512_fmadd_ps(e, h, h);
        return _mm512_fmadd_ps(h1, _mm512_fnmadd_ps(s1, s1, x), s1);
    }
    const __m512 e = _mm512_sub_ps(half, _mm512_mul_ps(s, h));
    const __m512 s1 = _mm512_add_ps(_mm512_mul_ps(s, e), s), h1 = _mm512_add_ps(_mm512_mul_ps(e, h), h);
    const __m512 rr = _mm512_sub_ps(x, _mm512_mul_ps(s1, s1));
    return _mm512_add_ps(_mm512_mul_ps(rr, h1), s1);
}

/* The lanes a fused loop left for the phased code: 16-lane groups at offset off[i]. Only the
   mask is recorded in the loop; rp_redo_elements lists the elements afterwards (appending
   element offsets inside the loop measured slower in cache: RMSprop 10-25%, NAdam 4-13%). */
typedef struct {
    int64_t n;
    int64_t off[RP_BLOCK / 16];
    uint32_t mask[RP_BLOCK / 16];
} rp_redo;

static inline __attribute__((always_inline)) void rp_redo_add(rp_redo *r, int64_t off, __mmask16 m)
{
    if (__builtin_expect(m != 0, 0)) {
        r->off[r->n] = off;
        r->mask[r->n++] = m;
    }
}

/* The element offsets of the lanes r holds, in order, into idx (RP_BLOCK of them at most);
   returns their count. */
static inline int64_t rp_redo_elements(const rp_redo *r, int64_t *idx)
{
    int64_t k = 0;
    for (int64_t j = 0; j < r->n; j++)
        for (int64_t l = 0; l < 16; l++)
            if (r->mask[j] >> l & 1) idx[k++] = r->off[j] + l;
    return k;
}

/* Vector forms of the helpers below, lane for lane the same bits. */
static inline __attribute__((always_inline)) __m512 rp_vnan_from(__m512 x, __m512 r)
{
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

static inline __attribute__((always_inline)) __m512 rp_vtorch_grad(__m512 g, __m512 p, __m512 wd, const int maximize,
                                                                   const int decay)
{
    if (maximize) g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32((int)0x80000000)));
    return decay ? rp_vnan_from(p, _mm512_fmadd_ps(p, wd, g)) : g;
}

static inline __attribute__((always_inline)) __m512 rp_vsq_avg(__m512 v, __m512 g, __m512 beta, __m512 omb)
{
    return rp_vnan_from(g, _mm512_fmadd_ps(_mm512_mul_ps(omb, g), g, _mm512_mul_ps(v, beta)));
}
#endif

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

/* Where torch's a.mul_(b) (or a.mul(b)) of two contiguous float tensors of numel elements
   returns a's NaN, not b's, when both are NaNs. Everywhere else it is b's (rp_nan_from(b, a*b)):
   in its Vectorized loop and GCC's vector code for its scalar loop. But GCC finishes that loop
   (basic_loop, over the last numel % 16 elements) with one 4-wide vector where numel % 8 >= 4,
   then up to 3 scalars, and both that 4-wide step and the third scalar after a vector step
   (numel % 4 == 3 and numel % 16 >= 4) order mul's operands the other way. So a's NaN at
     [numel - numel % 8, numel - numel % 8 + 4) where numel % 8 >= 4, and at numel - 1 where
     numel % 4 == 3 and numel % 16 >= 4,
   on torch 2.13's AVX-512 and AVX2 kernels alike (ATEN_CPU_CAPABILITY=avx2), one thread, every
   numel 1..79 and some large ones, any storage alignment. Sets [*lo, *hi) and *one to those
   indices minus base (the tensor index of a block's element 0); *one < 0 where there is none. */
static inline void rp_mul_self_nan(int64_t numel, int64_t base, int64_t *lo, int64_t *hi, int64_t *one)
{
    const int64_t b = numel - numel % 8;
    *lo = b - base;
    *hi = b + (numel % 8 >= 4 ? 4 : 0) - base;
    *one = (numel % 4 == 3 && numel % 16 >= 4 ? numel - 1 : -1) - base;
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

/* GradScaler's 1 / scale as its unscale_ hands it to a for-loop optimizer's grads:
   the reciprocal in double, rounded to float (1 when there is no scale). */
static inline float rp_inv_scale(const float *grad_scale)
{
    return grad_scale ? (float)(1.0 / (double)*grad_scale) : 1.0f;
}

/* torch's g.add(p, alpha=wd): one rounding, and p's NaN before g's. */
static inline __attribute__((always_inline)) float rp_coupled_decay(float g, float p, float wd)
{
    return rp_nan_from(p, fmaf(p, wd, g));
}

/* ---- Adamax, RAdam (the AdamFamily rules, roundpipe/optim/_for_loop.py) ---------------- */

/* exp_avg.lerp_(grad, w) with a Python-float weight (torch's LerpKernel.cpp, float):
   its vector loop computes fma(coeff, end - self, base) with coeff = w, base = self
   when |w| < 0.5, else coeff = w - 1, base = end; its scalar tail (Lerp.h, contracted
   by torch's build) self + w*(end - self), or end - (end - self)*(1 - w): the same
   value, but -(end - self) flips a NaN's sign. The three weights are rounded to float
   once, as torch's opmath_t weight. (NAdam's lerp, nadam.c, picks its NaNs with
   rp_nan_from and takes no tail form.) */
typedef struct {
    float w, w_minus_1, one_minus_w;
    int small;              /* |w| < 0.5: lerp from self */
} rp_lerp_weight;

static inline void rp_lerp_weight_init(rp_lerp_weight *l, double weight)
{
    l->w = (float)weight;
    l->small = fabsf(l->w) < 0.5f;
    l->w_minus_1 = l->w - 1.0f;
    l->one_minus_w = 1.0f - l->w;
}

/* self.lerp_(end, w) for one element; tail: the element is in torch's scalar tail loop. */
static inline __attribute__((always_inline)) float rp_lerp(float self, float end, const rp_lerp_weight *l,
                                                           const int tail)
{
    const float d = end - self;
    if (l->small) return fmaf(l->w, d, self);
    return tail ? fmaf(-d, l->one_minus_w, end) : fmaf(l->w_minus_1, d, end);
}

/* The rp_tensor.scalar slot that holds 1 for a complex param's real view, 0 otherwise:
   set when the plan is built (ForLoopRule._fill_tensor), never by a step. */
enum { RP_SCALAR_COMPLEX = 3 };

/* With maximize, how many of the n elements from `first` on negate as torch's
   complex vector body does (RP_NEG_SUB); the rest flip their sign. 0 for a
   real tensor. numel, tail_start: the tensor's, in floats (rp_regions). */
static inline int64_t rp_neg_sub_count(int is_complex, int64_t tail_start, int64_t first, int64_t n)
{
    const int64_t k = is_complex ? tail_start - first : 0;
    return k < 0 ? 0 : k > n ? n : k;
}

/* A rule's exported copy of rp_torch_sqrt, for roundpipe/optim/_for_loop.py to
   check `how` against torch.sqrt once (each rule's module may be built alone). */
#define RP_EXPORT_TORCH_SQRT(name) \
    void name(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n) { rp_torch_sqrt(vml_sqrt, how, n, a, r); }

/* GradScaler's unscale_ of n grads in place, before a rule's own pass over them
   (RMSprop, Adadelta, Rprop): g * (float)(1 / scale), as rp_loop_grad. */
static inline void rp_unscale(int64_t n, float *restrict g, float inv_scale)
{
    for (int64_t i = 0; i < n; i++) rp_loop_grad(g, i, 1, inv_scale, RP_NEG_NONE);
}

/* torch's real grad: -grad (maximize, a sign flip), then grad.add(param,
   alpha=wd) (decay). maximize and decay are compile-time constants at the
   call sites (RMSprop, Adadelta). */
static inline __attribute__((always_inline)) float rp_torch_grad(float g, float p, float wd, const int maximize,
                                                                 const int decay)
{
    g = rp_torch_neg(g, maximize ? RP_NEG_FLIP : RP_NEG_NONE);
    return decay ? rp_coupled_decay(g, p, wd) : g;
}

/* v.mul_(beta).addcmul_(g, g, value=1 - beta), omb = (float)(1 - beta): a running
   average of squares, g's NaN first. */
static inline __attribute__((always_inline)) float rp_sq_avg(float v, float g, float beta, float omb)
{
    return rp_nan_from(g, fmaf(omb * g, g, v * beta));
}

/* ---- complex64 tensors: torch's complex ops, element for element ------------------------

   torch's single-tensor RMSprop, Adadelta and Rprop step a complex param as its real view,
   except for a few ops on the complex tensors themselves: -grad (maximize),
   grad.add(param, alpha=wd), Adadelta's param.add_(delta, alpha=-lr). Their values are
   those of the real ops, but NaN and zero signs depend on where an element falls: torch's
   Vectorized<complex<float>> loop computes -x as 0 - x (rp_torch_neg's RP_NEG_SUB) and
   a + alpha*b as (alpha*b) + a, its scalar tail flips signs and adds a + (alpha*b). Where
   two NaNs meet, x86 returns the first operand's, made explicit below. Measured on torch
   2.13 against every combination of 0, -0, finite, +-inf and +-NaN parts in both regions
   (scripts/loop_rules_harness.py).
   The add has a third region between the two, rp_regions' RP_TAILVEC: GCC's 4-complex vectors
   in the scalar tail loop, where numel % 16 >= 8 floats. There alpha*b is a + (alpha*b) as in
   the vector loop, but each part of alpha*b is one fused multiply-add (re = fma(alpha, b_re,
   -(0*b_im)), im = fma(alpha, b_im, 0*b_re)): a NaN part of b comes first, then the other
   term's NaN, before the default NaN of an alpha = +-0 times an inf part (the unfused op's).
   Measured with distinct NaN payloads in every part, alpha -0.5, +-0, 0.05, -1, complex sizes
   1..69 and large, on torch's AVX-512 kernels (the rules' tail_start = numel - numel % 16).
   Known gap: torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) split complex -x and add at
   numel - numel % 16 floats too, but the rules pass numel - numel % torch_vec = % 8 there, so
   on an AVX2-only CPU the NaN and zero signs of complex sizes with numel % 16 >= 8 floats differ.
   Where torch's scalar tails are: the last numel % vec elements (rp_neg_sub_count), as
   torch on one thread or any tensor under 32768 elements; above that, on T threads,
   at::parallel_for gives each of its chunks a tail of its own, so torch's NaN and zero signs
   there depend on its thread count. Ours never do: they are torch's on one thread. */

static inline float rp_add_first(float a, float b) { return rp_nan_from(a, a + b); }
static inline float rp_sub_first(float a, float b) { return rp_nan_from(a, a - b); }

/* out = (neg ? -x : x), then .add(y, alpha=a) when axpy: complex64 as n floats of (re, im)
   pairs starting at float `first` of a tensor of numel floats whose torch vector body ends at
   float tail_start. The product alpha*y with alpha = (a, +0) is re = a*y_re - 0*y_im,
   im = a*y_im + 0*y_re (the vector loop adds 0*y_re first), each rounded, then added to x:
   two roundings where the real op is one fmaf, and an inf part of y makes the other part NaN
   (0 * inf). In RP_TAILVEC (fused) each part is one fma, whose values are the same (the 0*y
   term is +-0 or NaN) but whose NaN is an operand's first (above). out may be x (in place):
   each pair is read before it is written. */
static inline void rp_complex_axpy(int64_t n, float *out, const float *x, const float *y, float a, int neg, int axpy,
                                   int64_t first, int64_t tail_start, int64_t numel)
{
    const float zero = 0.0f; /* 0 * y is not folded: no -ffast-math */
    const int64_t scalar_start = numel - numel % 8; /* rp_regions */
    for (int64_t i = 0; i + 1 < n; i += 2) {
        const int tail = first + i >= tail_start, scalar = first + i >= scalar_start;
        float xr = x[i], xi = x[i + 1];
        if (neg) {
            xr = rp_torch_neg(xr, tail ? RP_NEG_FLIP : RP_NEG_SUB);
            xi = rp_torch_neg(xi, tail ? RP_NEG_FLIP : RP_NEG_SUB);
        }
        if (axpy) {
            const float yr = y[i], yi = y[i + 1], cr = zero * yi, ci = zero * yr;
            float tr, ti;
            if (tail && !scalar) { /* RP_TAILVEC: fused, y's NaN, then 0*y's, then 0*inf's */
                tr = rp_nan_from(yr, rp_nan_from(cr, a * yr - cr));
                ti = rp_nan_from(yi, rp_nan_from(ci, a * yi + ci));
            } else {
                tr = rp_sub_first(a * yr, cr);
                ti = scalar ? rp_add_first(a * yi, ci) : rp_add_first(ci, a * yi);
            }
            xr = scalar ? rp_add_first(xr, tr) : rp_add_first(tr, xr);
            xi = scalar ? rp_add_first(xi, ti) : rp_add_first(ti, xi);
        }
        out[i] = xr;
        out[i + 1] = xi;
    }
}
