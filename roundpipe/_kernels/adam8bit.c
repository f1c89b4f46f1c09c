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


/* Elements [b, e) of an 8-bit tensor, b a multiple of the block size, one block
   at a time: decode its moments into fp32 arrays on the stack, Adam's update,
   then its absmax and codes. The param and grad are read in place when fp32
   (the master copy stands in for a 16-bit param), else staged through fp32
   blocks of RP_BLOCK elements. Measured slower (CPU time, one thread, 16 M
   elements): stages of several blocks (4096 or 16384 elements, so that each
   loop streams longer; 1.5-2x), software prefetch of the next blocks, and one
   loop that decodes 16 elements into registers, updates them and takes their
   absmax on the way (7.5 ms against 7.0). */
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
    for (int64_t s0 = b; s0 < e; s0 += block) {
        const int64_t n = e - s0 < block ? e - s0 : block, blk = s0 / block;
        uint32_t bits;
        memcpy(&bits, &ma[blk], 4);
        rp_q8_block qm = rp_q8_block_of(bits & 0x7FFFFFFFu, 1.0f, 1.0f);
        memcpy(&bits, &va[blk], 4);
        rp_q8_block qv = rp_q8_block_of(bits & 0x7FFFFFFFu, RP_Q8_K_SQ, RP_Q8_K_SQ_INV);
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
        const uint32_t am = rp_q8_absmax_bits(mb, n), av = rp_q8_absmax_bits(vb, n);
        qm = rp_q8_block_of(am, 1.0f, 1.0f);
        qv = rp_q8_block_of(av, RP_Q8_K_SQ, RP_Q8_K_SQ_INV);
        rp_q8_encode(mc + s0, mb, n, &qm, 0);
        rp_q8_encode(vc + s0, vb, n, &qv, 1);
        ma[blk] = float_from_bits(am);
        va[blk] = float_from_bits(av);
    }
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
        const rp_q8_block q = sq ? rp_q8_block_of(a, RP_Q8_K_SQ, RP_Q8_K_SQ_INV) : rp_q8_block_of(a, 1.0f, 1.0f);
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
        const rp_q8_block q = sq ? rp_q8_block_of(a & 0x7FFFFFFFu, RP_Q8_K_SQ, RP_Q8_K_SQ_INV)
                                 : rp_q8_block_of(a & 0x7FFFFFFFu, 1.0f, 1.0f);
        if (sq) rp_q8_decode(x + s0, codes + s0, len, &q, 1);
        else rp_q8_decode(x + s0, codes + s0, len, &q, 0);
    }
}
