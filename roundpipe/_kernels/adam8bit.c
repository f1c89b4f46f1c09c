/* roundpipe's 8-bit Adam rule: Adam8bit and AdamW8bit (roundpipe/optim/adam8bit.py).
 *
 * Each param's exp_avg and exp_avg_sq are kept as one byte per element plus one
 * fp32 absmax per block of block_size elements, in quant8.h's format. A step
 * walks a chunk block by block, in one pass over memory: the block's codes are
 * decoded into fp32 arrays on the stack (L1), Adam's update runs on them and on
 * the param and grad exactly as adam.c computes it (adam_math.h: torch's fused
 * fp32 step, its tail loop's rounding included), the block's new absmax is taken
 * and the block is encoded again. The update therefore uses this step's fp32
 * moments, as bitsandbytes and torchao do; only what is stored between steps is
 * 8-bit. In one sentence: a step is torch's fused fp32 Adam/AdamW step on the
 * decoded moments, which are then encoded (the torch fallback does just that).
 *
 * Chunks (engine.c, rp_plan_chunks) are 16384 elements from a tensor's start and
 * block_size divides 16384, so a chunk holds whole blocks and no two threads
 * share one: results do not depend on the thread count.
 *
 * Params under min_8bit_size elements keep fp32 moments (as in bitsandbytes) and
 * take Adam's own fp32 path, bit-identical to torch's fused Adam/AdamW.
 * Rules of adam.c apply (-ffp-contract=off, -fno-math-errno, int64_t indices).
 */
#include "runner.h"
#include "adam8bit.h"
#include "adam_math.h"
#include "quant8.h"

/* rp_tensor.state of an 8-bit tensor, in the order of Adam8bit._param_state_keys */
enum { M_CODE = 0, M_ABSMAX = 1, V_CODE = 2, V_ABSMAX = 3 };
/* ... and of a tensor under min_8bit_size elements */
enum { EXP_AVG = 0, EXP_AVG_SQ = 1 };

/* The largest block: the engine's chunk (CHUNK_ELEMS in optim/_engine.py). */
#define Q8_MAX_BLOCK 16384

typedef struct {
    rp_consts group;
    int unscale;
    int64_t torch_vec, block;
} q8_ctx;


/* A block whose moments are updated (m, v: fp32) but not yet encoded into mc, vc:
   q8_span encodes it inside the next block's fused loop, or alone (q8_flush). */
typedef struct {
    const float *m, *v;
    uint8_t *mc, *vc;
    rp_q8_block qm, qv;
    int64_t n;
    int on;
} q8_pending;

/* A block whose moments m, v were just updated: its new absmaxes stored, its encoding pending. */
static q8_pending q8_updated(const float *m, const float *v, uint8_t *mc, uint8_t *vc, float *ma, float *va,
                             uint32_t am, uint32_t av, int64_t n)
{
    *ma = float_from_bits(am);
    *va = float_from_bits(av);
    return (q8_pending){m, v, mc, vc, rp_q8_block_of(am, 0), rp_q8_block_of(av, 1), n, 1};
}

static void q8_flush(q8_pending *w)
{
    if (!w->on) return;
    rp_q8_encode(w->mc, w->m, w->n, &w->qm, 0);
    rp_q8_encode(w->vc, w->v, w->n, &w->qv, 1);
    w->on = 0;
}

/* Blocks up to this size are pipelined: their encoding runs in the next block's loop */
#define Q8_PIPE_MAX 2048

#ifdef RP_Q8_AVX512
/* One block of an fp32 param (no master), wholly in torch's vector body, n a multiple of
   16, neither moment's block tiny: decoding, Adam's update (adam_elements' vector-loop
   arithmetic, lane for lane the same bits), both new absmaxes, and the encoding of the
   previous block w (q8_pending), in one loop over 16 lanes. The update is bound by the
   divider (sqrt and two divisions per element); decoding, the absmax and the encoding
   are integer and conversion work that runs beside it. The new fp32 moments go to mb and
   vb, encoded in the next block's loop. Measured on the 2-core Zen 4, one thread, 256 Ki
   elements in cache (scripts/q8_bench.py): 0.42 ns per element, against 0.49 with each
   step its own loop over the block; on the 34M mix 0.81x the fp32 AdamW step (was 0.95x)
   at 1 thread and 0.65x (0.73x) at 2. */
static inline __attribute__((always_inline)) void q8_fused(
    int64_t n, float *restrict p, float *restrict g, const uint8_t *restrict mc, const uint8_t *restrict vc,
    float sm, float sv, float *restrict mb, float *restrict vb, const rp_consts *k, uint32_t *am, uint32_t *av,
    const q8_pending *w, const int unscale, const int negate, const int coupled, const int decoupled, const int from_m)
{
    const __m512 rm = _mm512_set1_ps(w->qm.r), rv = _mm512_set1_ps(w->qv.r);
    const __m512 smv = _mm512_set1_ps(sm), svv = _mm512_set1_ps(sv);
    const __m512 scale = _mm512_set1_ps(k->grad_scale);
    const __m512 factor = _mm512_set1_ps(k->maximize && !negate ? k->neg_one : k->one);
    const __m512 wd = _mm512_set1_ps(k->weight_decay), decay = _mm512_set1_ps(k->decay_factor);
    const __m512 lc = _mm512_set1_ps(k->lerp_coeff), beta2 = _mm512_set1_ps(k->beta2);
    const __m512 sqc = _mm512_set1_ps(k->sq_coeff), bc2 = _mm512_set1_ps(k->bias_correction2_sqrt);
    const __m512 eps = _mm512_set1_ps(k->eps), nss = _mm512_set1_ps(k->neg_step_size);
    const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), sign = _mm512_set1_epi32((int)0x80000000);
    __m512i mm = _mm512_setzero_si512(), mv = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 gi = _mm512_loadu_ps(g + i);
        if (unscale) {
            gi = _mm512_div_ps(gi, scale);
            _mm512_storeu_ps(g + i, gi);
        }
        gi = _mm512_mul_ps(gi, factor);
        if (negate) gi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gi), sign));
        __m512 pi = _mm512_loadu_ps(p + i);
        if (coupled) gi = _mm512_fmadd_ps(pi, wd, gi);
        if (decoupled) pi = _mm512_mul_ps(pi, decay);
        const __m512 m0 = rp_q8_decode16(mc + i, smv, 0), v0 = rp_q8_decode16(vc + i, svv, 1);
        const __m512 m1 = _mm512_fmadd_ps(lc, _mm512_sub_ps(gi, m0), from_m ? m0 : gi);
        const __m512 v1 = _mm512_fmadd_ps(_mm512_mul_ps(sqc, gi), gi, _mm512_mul_ps(v0, beta2));
        _mm512_storeu_ps(mb + i, m1);
        _mm512_storeu_ps(vb + i, v1);
        mm = _mm512_max_epu32(mm, _mm512_and_si512(_mm512_castps_si512(m1), mag));
        mv = _mm512_max_epu32(mv, _mm512_and_si512(_mm512_castps_si512(v1), mag));
        const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v1), bc2), eps);
        _mm512_storeu_ps(p + i, _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(nss, m1), den)));
        /* the previous block's codes, in the shadow of this block's divisions */
        rp_q8_encode16(w->mc + i, w->m + i, rm, 0);
        rp_q8_encode16(w->vc + i, w->v + i, rv, 1);
    }
    *am = (uint32_t)_mm512_reduce_max_epu32(mm);
    *av = (uint32_t)_mm512_reduce_max_epu32(mv);
}

/* q8_fused's variants, chosen per call (each its own loop). No loop distribution: GCC
   would split the previous block's encoding back out of the loop (measured). */
__attribute__((optimize("no-tree-loop-distribution"))) static void q8_fused_any(int64_t n, float *p, float *g, const uint8_t *mc, const uint8_t *vc, float sm, float sv,
                         float *mb, float *vb, const rp_consts *k, uint32_t *am, uint32_t *av, const q8_pending *w,
                         int unscale)
{
    const int negate = k->maximize && (unscale || k->maximize_negates);
#define Q8F(U, N, C, D, F) q8_fused(n, p, g, mc, vc, sm, sv, mb, vb, k, am, av, w, U, N, C, D, F)
#define Q8F_DECAY(U, N, F) do { if (k->coupled_decay) Q8F(U, N, 1, 0, F); else if (k->decoupled_decay) Q8F(U, N, 0, 1, F); \
                                else Q8F(U, N, 0, 0, F); } while (0)
#define Q8F_FROM(U, N) do { if (k->lerp_from_exp_avg) Q8F_DECAY(U, N, 1); else Q8F_DECAY(U, N, 0); } while (0)
    if (unscale) { if (negate) Q8F_FROM(1, 1); else Q8F_FROM(1, 0); }
    else { if (negate) Q8F_FROM(0, 1); else Q8F_FROM(0, 0); }
#undef Q8F_FROM
#undef Q8F_DECAY
#undef Q8F
}
#endif

/* Elements [b, e) of an 8-bit tensor, b a multiple of the block size, one block
   at a time: decode its moments into fp32 arrays on the stack, Adam's update,
   then its absmax and codes. The param and grad are read in place when fp32
   (the master copy stands in for a 16-bit param), else staged through fp32
   blocks of RP_BLOCK elements. With AVX-512, an fp32 param's blocks take
   q8_fused instead: one loop per block, which also encodes the block before it.
   Measured slower (CPU time, one thread, 16 M elements): stages of several blocks
   (4096 or 16384 elements, so that each loop streams longer; 1.5-2x) and software
   prefetch of the next blocks. */
static void q8_span(const rp_tensor *t, int64_t b, int64_t e, const rp_consts *k, int64_t block, int unscale,
                    int64_t tail_start)
{
    float mb[Q8_MAX_BLOCK] __attribute__((aligned(64)));
    float vb[Q8_MAX_BLOCK] __attribute__((aligned(64)));
    float pb[RP_BLOCK] __attribute__((aligned(64)));
    float gb[RP_BLOCK] __attribute__((aligned(64)));
    const int pdt = t->param_dtype;
    const size_t psz = pdt == RP_F32 ? 4 : 2;
    uint8_t *mc = t->state[M_CODE], *vc = t->state[V_CODE];
    float *ma = t->state[M_ABSMAX], *va = t->state[V_ABSMAX];
#ifdef RP_Q8_AVX512
    /* the fused blocks alternate between mb/vb and mb2/vb2: one is encoded while the
       other is updated. `idle` encodes zeros into scratch when nothing is pending. */
    static const float zeros[Q8_PIPE_MAX] __attribute__((aligned(64)));
    float mb2[Q8_PIPE_MAX] __attribute__((aligned(64)));
    float vb2[Q8_PIPE_MAX] __attribute__((aligned(64)));
    uint8_t scratch[2][Q8_PIPE_MAX];
    float *bufs[2][2] = {{mb, vb}, {mb2, vb2}};
    int which = 0;
    const rp_q8_block zero_block = rp_q8_block_of(0, 0);
    const q8_pending idle = {zeros, zeros, scratch[0], scratch[1], zero_block, zero_block, 0, 0};
#endif
    q8_pending w = {0};
    for (int64_t s0 = b; s0 < e; s0 += block) {
        const int64_t n = e - s0 < block ? e - s0 : block, blk = s0 / block;
        uint32_t bits;
        memcpy(&bits, &ma[blk], 4);
        const rp_q8_block qm = rp_q8_block_of(bits & 0x7FFFFFFFu, 0);
        memcpy(&bits, &va[blk], 4);
        const rp_q8_block qv = rp_q8_block_of(bits & 0x7FFFFFFFu, 1);
#ifdef RP_Q8_AVX512
        if (pdt == RP_F32 && !t->master && n % 16 == 0 && n <= Q8_PIPE_MAX && s0 + n <= tail_start
            && qm.post == 1.0f && qv.post == 1.0f) {
            /* the pending block is encoded in this block's loop when it is as long and not tiny,
               else alone first, and a block of zeros is encoded into scratch instead */
            const int pipe = w.on && w.n == n && w.qm.pre == 1.0f && w.qv.pre == 1.0f;
            if (!pipe) {
                q8_flush(&w);
                w = idle;
            }
            float *m1 = bufs[which][0], *v1 = bufs[which][1];
            uint32_t am, av;
            q8_fused_any(n, (float *)t->param + s0, (float *)t->grad + s0, mc + s0, vc + s0, qm.s, qv.s, m1, v1, k,
                         &am, &av, &w, unscale);
            w = q8_updated(m1, v1, mc + s0, vc + s0, ma + blk, va + blk, am, av, n);
            which ^= 1;
            continue;
        }
        q8_flush(&w); /* mb and vb are free again */
#endif
        rp_q8_decode(mb, mc + s0, n, &qm, 0);
        rp_q8_decode(vb, vc + s0, n, &qv, 1);
        if (pdt == RP_F32 && !t->master) {
            adam_fp32(s0, n, tail_start, (float *)t->param + s0, (float *)t->grad + s0, mb, vb, NULL, k, 0,
                      unscale);
        } else {
            for (int64_t o = 0; o < n; o += RP_BLOCK) {
                const int64_t len = n - o < RP_BLOCK ? n - o : RP_BLOCK;
                char *param = (char *)t->param + (s0 + o) * psz, *grad = (char *)t->grad + (s0 + o) * psz;
                float *p, *g;
                if (t->master) p = t->master + s0 + o;
                else if (pdt == RP_F32) p = (float *)param;
                else { load_block(pb, param, pdt, len); p = pb; }
                if (pdt == RP_F32) g = (float *)grad; else { load_block(gb, grad, pdt, len); g = gb; }
                adam_fp32(s0 + o, len, tail_start, p, g, mb + o, vb + o, NULL, k, 0, unscale);
                /* the param rounded to nearest even from the master or the staged block */
                if (pdt != RP_F32) store_block(param, pdt, p, len, RP_BF16_NAN_VEC);
                if (unscale && pdt != RP_F32) store_block(grad, pdt, g, len, RP_BF16_NAN_VEC);
            }
        }
        w = q8_updated(mb, vb, mc + s0, vc + s0, ma + blk, va + blk, rp_q8_absmax_bits(mb, n),
                       rp_q8_absmax_bits(vb, n), n);
        q8_flush(&w);
    }
    q8_flush(&w);
}

/* A tensor under min_8bit_size elements: fp32 moments, Adam's fp32 path with
   torch's tail (rp_staged_span stages 16-bit params and grads). */
static int64_t q8_tail_start(const rp_tensor *t, int64_t torch_vec)
{
    return torch_vec > 1 ? t->numel - t->numel % torch_vec : t->numel;
}

static void q8_fp32_moments(const rp_tensor *t, int64_t first, int64_t n, float *p, float *g, float *const *s,
                            const void *ctx_)
{
    const q8_ctx *ctx = ctx_;
    rp_consts k = ctx->group;
    consts_for_tensor(&k, t);
    const int64_t tail_start = q8_tail_start(t, ctx->torch_vec);
    adam_fp32(first, n, tail_start, p, g, s[EXP_AVG], s[EXP_AVG_SQ], NULL, &k, 0, ctx->unscale);
}

static void q8_chunk(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx_)
{
    const q8_ctx *ctx = ctx_;
    if (t->state_dtype[M_CODE] != RP_U8) {
        rp_staged_span(t, begin, end, 2, ctx->unscale, q8_fp32_moments, ctx);
        return;
    }
    rp_consts k = ctx->group;
    consts_for_tensor(&k, t);
    q8_span(t, begin, end, &k, ctx->block, ctx->unscale, q8_tail_start(t, ctx->torch_vec));
}

int rp_adam8bit_step(const rp_run_opts *run, const rp_adam8bit_hyper *h, rp_tensor *tensors, int64_t n_tensors,
                     const rp_chunk *chunks, int64_t n_chunks)
{
    /* Adam8bit checks block_size; this guards the stack buffers and block alignment. */
    if (h->block_size < 16 || h->block_size > Q8_MAX_BLOCK || Q8_MAX_BLOCK % h->block_size) return -1;
    if (rp_skipped(run)) return 0;
    const adam_scalars s = {h->lr, h->beta1, h->beta2, h->eps, h->weight_decay,
                            h->maximize != 0, h->decoupled_weight_decay != 0};
    adam_step_scalars(&s, tensors, n_tensors);
    q8_ctx ctx;
    consts_for_group(&s, run, &ctx.group);
    ctx.unscale = run->grad_scale != NULL;
    ctx.torch_vec = run->torch_vec;
    ctx.block = h->block_size;
    rp_run(run, tensors, n_tensors, chunks, n_chunks, q8_chunk, &ctx);
    return 1;
}

/* ---- the codec alone ---------------------------------------------------------- */

void rp_q8_encode_blocks(const float *x, int64_t n, int64_t block_size, int32_t sq, uint8_t *codes, float *absmax)
{
    for (int64_t s0 = 0, blk = 0; s0 < n; s0 += block_size, blk++) {
        const int64_t len = n - s0 < block_size ? n - s0 : block_size;
        const uint32_t a = rp_q8_absmax_bits(x + s0, len);
        const rp_q8_block q = rp_q8_block_of(a, sq);
        if (sq) rp_q8_encode(codes + s0, x + s0, len, &q, 1);
        else rp_q8_encode(codes + s0, x + s0, len, &q, 0);
        absmax[blk] = float_from_bits(a);
    }
}

void rp_q8_decode_blocks(float *x, int64_t n, int64_t block_size, int32_t sq, const uint8_t *codes, const float *absmax)
{
    for (int64_t s0 = 0, blk = 0; s0 < n; s0 += block_size, blk++) {
        const int64_t len = n - s0 < block_size ? n - s0 : block_size;
        uint32_t a;
        memcpy(&a, &absmax[blk], 4);
        const rp_q8_block q = rp_q8_block_of(a & 0x7FFFFFFFu, sq);
        if (sq) rp_q8_decode(x + s0, codes + s0, len, &q, 1);
        else rp_q8_decode(x + s0, codes + s0, len, &q, 0);
    }
}
