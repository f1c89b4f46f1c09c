/* roundpipe Adafactor rule: torch.optim.Adafactor (torch 2.13, _single_tensor_adafactor)
 * on the engine's reduction phase (runner.h rp_reduce).
 *
 * torch's step per param, with w = step^beta2_decay, rho = min(lr, 1/sqrt(step)):
 *   alpha = max(eps2, ||p|| / sqrt(numel)) * rho          (Python doubles)
 *   p *= 1 - lr*wd                                          (if wd != 0)
 *   2+ dims: row_var.lerp_(||g||_row^2 / cols, w); col_var.lerp_(||g||_col^2 / rows, w)
 *            v = (row_var @ col_var) / clamp_min(mean(row_var over rows), eps1)
 *   vectors: variance.lerp_(g*g, w); v = variance
 *   u = rsqrt(clamp_min(v, eps1^2)) * g;  denom = max(1, ||u|| / (sqrt(numel) d))
 *   p += (-alpha / denom) * u
 * Three passes, parallel across all tensors of the group (1 and 2 over its reduction
 * chunks, 3 over its element chunks):
 *   1. reads p and g: ||p|| and the row/column sums of squares of g (rows and whole
 *      matrices finish in the chunk; columns of a matrix split over chunks are folded
 *      in chunk order by af_combine1), or the variance lerp for vectors;
 *   2. reads g (and the O(rows + cols) state): ||u||, then -alpha/denom per tensor;
 *   3. reads p and g, writes p: the update (and the unscaled grad with GradScaler).
 * ||u|| needs the finished row and column factors, and the update needs ||u||: so g
 * is read three times and p twice (24 bytes per fp32 element), never u stored.
 *
 * Rounding, measured against torch 2.13 on this machine (scripts/adafactor_harness.py):
 *  - every norm whose sum fits in one reduction chunk sums in torch's order: its
 *    norm kernel (a contiguous last dim: ||p||, ||u||, row norms, and column norms of
 *    a one-column matrix) keeps 8 lanes, acc + x*x rounded twice, folds the lanes
 *    0..7 in order, then adds the last n % 8 squares: the first (n % 8) & ~3 of them
 *    rounded twice, the rest with fmaf (GCC's code for its scalar loop); a column norm
 *    (over dim -2) is one sequential acc + x*x per column; a reduction over a dim of
 *    size 1 is |x|. The mean of row_var is torch's cascade sum (SumKernel.cpp: 4 x 4
 *    accumulators over 8-lane vectors), then / rows. The results are the same bits.
 *  - a sum over more than one chunk (RCHUNK_ELEMS in _engine.py) folds the chunks'
 *    partials in chunk order: deterministic, a few ulps from torch's one long chain.
 *  - elementwise: lerp as torch's vector kernel, fmaf(w, end - start, start) for
 *    |w| < 0.5, else fmaf(w - 1, end - start, end); rsqrt as 1 / sqrtf; row_var @
 *    col_var as one product r*c; p.add_(u, alpha) as fmaf((float)alpha, u, p).
 * Built with -ffp-contract=off: every fused multiply-add is an explicit fmaf().
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rules.h"
#include "runner.h"
#include "adafactor.h"

/* State slots in rp_tensor.state, in the order of Adafactor._param_state_keys */
enum { ROW_VAR = 0, COL_VAR = 1, VARIANCE = 0 };
/* Each reduction chunk's partials (Adafactor._REDUCE_SCALARS), then one per column */
enum { P_NORM = 0, U_NORM = 1, N_PARTS = 2 };

typedef struct {
    double lr, eps2, d;
    int lr_tensor;          /* lr is a 0-dim float32 Tensor (torch's _to_scalar keeps it one) */
    float eps1, eps1_sq;    /* (float)eps1 for the mean's clamp, (float)(eps1*eps1) for v's */
    float decay;            /* (float)(1 - lr*wd) */
    int decays;             /* wd != 0 */
    int maximize;
    int unscale;            /* GradScaler: g * inv_scale, as GradScaler.unscale_ would */
    float inv_scale;        /* (float)(1 / (double)scale), GradScaler's reciprocal */
} af_ctx;

/* ---- sums of squares in torch's order ------------------------------------------ */

typedef float v8f __attribute__((vector_size(32)));

/* The sum of squares of a stream of n floats, as torch's norm kernel over a
   contiguous last dim adds them (see the file comment); fed in pieces. */
typedef struct {
    float lane[8];
    float tail[8];
    float first;            /* the first element: a norm over one element is |x| */
    int64_t pos, n, body;   /* body = n - n % 8 elements go to the lanes */
} af_sumsq;

static inline void sumsq_init(af_sumsq *s, int64_t n)
{
    memset(s, 0, sizeof *s);
    s->n = n;
    s->body = n - n % 8;
}

static inline void sumsq_add(af_sumsq *s, const float *x, int64_t len)
{
    int64_t i = 0, pos = s->pos;
    if (pos == 0 && len > 0) s->first = x[0];
    for (; i < len && pos % 8 != 0 && pos < s->body; i++, pos++)
        s->lane[pos % 8] = s->lane[pos % 8] + x[i] * x[i];
    /* torch's 8 lanes as one 8-float vector (GCC's vector extension: its SLP pass
       built this loop from scalar loads); two accumulators would change the sums */
    v8f acc;
    memcpy(&acc, s->lane, sizeof acc);
    for (; i + 8 <= len && pos + 8 <= s->body; i += 8, pos += 8) {
        v8f v;
        memcpy(&v, x + i, sizeof v);
        acc = acc + v * v;
    }
    memcpy(s->lane, &acc, sizeof acc);
    for (; i < len; i++, pos++) {
        if (pos < s->body) s->lane[pos % 8] = s->lane[pos % 8] + x[i] * x[i];
        else s->tail[pos - s->body] = x[i];
    }
    s->pos = pos;
}

/* sumsq_add(a, x, len) and sumsq_add(b, y, len) with their two 8-lane chains in one loop
   where both streams start a vector (the same sums: each chain keeps its own order) */
static inline void sumsq_add2(af_sumsq *a, const float *x, af_sumsq *b, const float *y, int64_t len)
{
    int64_t i = 0;
    if (a->pos % 8 == 0 && b->pos % 8 == 0 && len >= 8) {
        if (a->pos == 0) a->first = x[0];
        if (b->pos == 0) b->first = y[0];
        int64_t m = len - len % 8;
        if (a->body - a->pos < m) m = a->body - a->pos;
        if (b->body - b->pos < m) m = b->body - b->pos;
        v8f acc_a, acc_b;
        memcpy(&acc_a, a->lane, sizeof acc_a);
        memcpy(&acc_b, b->lane, sizeof acc_b);
        for (; i < m; i += 8) {
            v8f u, v;
            memcpy(&u, x + i, sizeof u);
            memcpy(&v, y + i, sizeof v);
            acc_a = acc_a + u * u;
            acc_b = acc_b + v * v;
        }
        memcpy(a->lane, &acc_a, sizeof acc_a);
        memcpy(b->lane, &acc_b, sizeof acc_b);
        a->pos += i;
        b->pos += i;
    }
    sumsq_add(a, x + i, len - i);
    sumsq_add(b, y + i, len - i);
}

static inline float sumsq_total(const af_sumsq *s)
{
    float b = s->lane[0];
    for (int l = 1; l < 8; l++) b = b + s->lane[l];
    const int64_t r = s->n - s->body, q = r & ~(int64_t)3;
    for (int64_t k = 0; k < q; k++) b = b + s->tail[k] * s->tail[k];
    for (int64_t k = q; k < r; k++) b = fmaf(s->tail[k], s->tail[k], b);
    return b;
}

/* torch.norm of the stream: |x| over one element (torch copies abs there), else sqrt */
static inline float sumsq_norm(const af_sumsq *s)
{
    return s->n == 1 ? fabsf(s->first) : sqrtf(sumsq_total(s));
}

/* ---- state of any dtype, one element at a time (row_var, col_var: O(rows + cols)) -- */

static inline float st_get(const void *b, int dt, int64_t i)
{
    if (dt == RP_F32) return ((const float *)b)[i];
    if (dt == RP_BF16) return float_from_bits((uint32_t)((const uint16_t *)b)[i] << 16);
    return half_to_float(((const uint16_t *)b)[i]);
}

static inline void st_set(void *b, int dt, int64_t i, float x)
{
    if (dt == RP_F32) ((float *)b)[i] = x;
    else if (dt == RP_BF16) ((uint16_t *)b)[i] = bf16_from_float(x, RP_BF16_NAN_VEC);
    else ((uint16_t *)b)[i] = float_to_half(x);
}

/* torch's lerp_(end, w) as its vector kernel computes it */
static inline float af_lerp(float start, float end, float w)
{
    const float diff = end - start;
    return fabsf(w) < 0.5f ? fmaf(w, diff, start) : fmaf(w - 1.0f, diff, end);
}

/* clamp_min(x, lo) as torch: a NaN stays NaN */
static inline float af_clamp_min(float x, float lo) { return x < lo ? lo : x; }

/* ---- torch's cascade sum (mean of row_var over its rows) --------------------- */

static inline int64_t ceil_log2(int64_t x)
{
    int64_t r = 0;
    while (((int64_t)1 << r) < x) r++;
    return r;
}

/* torch's multi_row_sum: 4 interleaved accumulators (item 4i+k goes to k) in 4
   cascade levels over `size` rows of items; an item is L consecutive floats (L = 8:
   one Vectorized<float>; L = 1: a float) of x (dtype dt) from element off. */
static void cascade_rows(const void *x, int dt, int64_t off, int L, int64_t size, float out[4][8])
{
    const int64_t lp = ceil_log2(size) / 4 > 4 ? ceil_log2(size) / 4 : 4;
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    float acc[4][4][8];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < L; l++) acc[0][k][l] = acc[0][k][l] + st_get(x, dt, off + (4 * i + k) * L + l);
        for (int lev = 1; lev < 4; lev++) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < L; l++) {
                    acc[lev][k][l] = acc[lev][k][l] + acc[lev - 1][k][l];
                    acc[lev - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (lev * lp))) != 0) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < L; l++) acc[0][k][l] = acc[0][k][l] + st_get(x, dt, off + (4 * i + k) * L + l);
    for (int lev = 1; lev < 4; lev++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < L; l++) acc[0][k][l] = acc[0][k][l] + acc[lev][k][l];
    memcpy(out, acc[0], sizeof(float) * 4 * 8);
}

/* torch's row_sum over n items of L floats: the result's L lanes in out */
static void cascade_row_sum(const void *x, int dt, int64_t off, int L, int64_t n, float out[8])
{
    float ps[4][8];
    const int64_t size_ilp = n / 4;
    cascade_rows(x, dt, off, L, size_ilp, ps);
    for (int64_t i = size_ilp * 4; i < n; i++)
        for (int l = 0; l < L; l++) ps[0][l] = ps[0][l] + st_get(x, dt, off + i * L + l);
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < L; l++) ps[0][l] = ps[0][l] + ps[k][l];
    memcpy(out, ps[0], sizeof(float) * 8);
}

/* row_var[b].mean(dim=-2).clamp_(min=eps1): torch's cascade sum of the rows floats,
   stored as 0 + sum (its output starts at 0), divided by rows */
static float row_var_mean(const rp_tensor *t, int64_t b, float eps1)
{
    const int64_t R = t->rows, off = b * R;
    const void *x = t->state[ROW_VAR];
    const int dt = t->state_dtype[ROW_VAR];
    float sum, v[8];
    if (R >= 8) {
        const int64_t nv = R / 8;
        cascade_row_sum(x, dt, off, 8, nv, v);
        sum = 0.0f;
        for (int64_t k = nv * 8; k < R; k++) sum = sum + st_get(x, dt, off + k);
        for (int l = 0; l < 8; l++) sum = sum + v[l];
    } else {
        cascade_row_sum(x, dt, off, 1, R, v);
        sum = v[0];
    }
    sum = 0.0f + sum;
    return af_clamp_min(sum / (float)R, eps1);
}

/* ---- element access ------------------------------------------------------------ */

/* fp32 values of elements [i, i+n) of the param (its master if any), a pointer into
   the array itself when it is fp32, else converted into buf */
static inline float *param_f32(const rp_tensor *t, int64_t i, int64_t n, float *buf)
{
    if (t->master) return t->master + i;
    if (t->param_dtype == RP_F32) return (float *)t->param + i;
    load_block(buf, (char *)t->param + i * 2, t->param_dtype, n);
    return buf;
}

/* the grad's values, unscaled with GradScaler (into buf: the grad is read again) */
static inline float *grad_f32(const rp_tensor *t, int64_t i, int64_t n, float *buf, const af_ctx *k)
{
    float *g;
    if (t->param_dtype == RP_F32) g = (float *)t->grad + i;
    else { load_block(buf, (char *)t->grad + i * 2, t->param_dtype, n); g = buf; }
    if (k->unscale) {
        const float inv = k->inv_scale;
        for (int64_t j = 0; j < n; j++) buf[j] = g[j] * inv;
        g = buf;
    }
    return g;
}

static inline float *state_f32(const rp_tensor *t, int s, int64_t i, int64_t n, float *buf)
{
    const int dt = t->state_dtype[s];
    if (dt == RP_F32) return (float *)t->state[s] + i;
    load_block(buf, (char *)t->state[s] + i * 2, dt, n);
    return buf;
}

/* ---- pass 1: ||p||, row and column sums of squares, the variance of vectors ---- */

/* the column norms of matrix b (squares summed in acc, or |g| for one row) into col_var */
static void finish_cols(const rp_tensor *t, int64_t b, const float *acc, float w)
{
    const int64_t R = t->rows, C = t->cols;
    for (int64_t j = 0; j < C; j++) {
        const float n = R == 1 ? acc[j] : sqrtf(acc[j]);
        const float mean = (n * n) / (float)R; /* norm(dim=-2).square_().div_(rows) */
        const int64_t o = b * C + j;
        st_set(t->state[COL_VAR], t->state_dtype[COL_VAR], o,
               af_lerp(st_get(t->state[COL_VAR], t->state_dtype[COL_VAR], o), mean, w));
    }
}

static void af_pass1(const rp_tensor *t, const rp_rchunk *ch, float *part, const void *ctx)
{
    const af_ctx *k = ctx;
    const float w = t->scalar[0];
    float pb[RP_BLOCK] __attribute__((aligned(64)));
    float gb[RP_BLOCK] __attribute__((aligned(64)));
    float sb[RP_BLOCK] __attribute__((aligned(64)));
    af_sumsq ps;
    sumsq_init(&ps, ch->end - ch->begin);
    if (!t->state[COL_VAR]) { /* a vector: variance.lerp_(g*g, w) */
        const int small = fabsf(w) < 0.5f;
        const float coeff = small ? w : w - 1.0f;
        for (int64_t i = ch->begin; i < ch->end; i += RP_BLOCK) {
            const int64_t n = ch->end - i < RP_BLOCK ? ch->end - i : RP_BLOCK;
            sumsq_add(&ps, param_f32(t, i, n, pb), n);
            const float *g = grad_f32(t, i, n, gb, k);
            float *v = state_f32(t, VARIANCE, i, n, sb);
            for (int64_t j = 0; j < n; j++) { /* af_lerp with w's branch hoisted */
                const float g2 = g[j] * g[j];
                v[j] = fmaf(coeff, g2 - v[j], small ? v[j] : g2);
            }
            if (t->state_dtype[VARIANCE] != RP_F32)
                store_block((char *)t->state[VARIANCE] + i * 2, t->state_dtype[VARIANCE], v, n, RP_BF16_NAN_VEC);
        }
        part[P_NORM] = t->n_rchunks == 1 ? sumsq_norm(&ps) : sumsq_total(&ps);
        return;
    }
    const int64_t R = t->rows, C = t->cols, M = R * C;
    float *col = part + N_PARTS; /* this chunk's column sums, C floats */
    for (int64_t m0 = ch->begin; m0 < ch->end;) { /* the part of one matrix in the chunk */
        const int64_t b = m0 / M;
        const int64_t m1 = (b + 1) * M < ch->end ? (b + 1) * M : ch->end;
        const int whole = m0 == b * M && m1 == (b + 1) * M;
        af_sumsq cs; /* a one-column matrix: its column is a contiguous stream */
        sumsq_init(&cs, whole ? R : (m1 - m0));
        for (int64_t j = 0; j < C; j++) col[j] = 0.0f;
        for (int64_t row = m0; row < m1; row += C) {
            af_sumsq rs;
            sumsq_init(&rs, C);
            for (int64_t s = 0; s < C; s += RP_BLOCK) {
                const int64_t n = C - s < RP_BLOCK ? C - s : RP_BLOCK;
                const float *g = grad_f32(t, row + s, n, gb, k);
                sumsq_add2(&ps, param_f32(t, row + s, n, pb), &rs, g, n);
                if (C == 1) sumsq_add(&cs, g, 1);
                else if (R == 1) for (int64_t j = 0; j < n; j++) col[s + j] = fabsf(g[j]);
                else for (int64_t j = 0; j < n; j++) col[s + j] = col[s + j] + g[j] * g[j];
            }
            const float rn = sumsq_norm(&rs);
            const float mean = (rn * rn) / (float)C; /* norm(dim=-1).square_().div_(cols) */
            const int64_t i = row / C;
            st_set(t->state[ROW_VAR], t->state_dtype[ROW_VAR], i,
                   af_lerp(st_get(t->state[ROW_VAR], t->state_dtype[ROW_VAR], i), mean, w));
        }
        if (whole && C == 1) { /* the column is the matrix: its norm in the stream's order */
            const float n = sumsq_norm(&cs);
            st_set(t->state[COL_VAR], t->state_dtype[COL_VAR], b,
                   af_lerp(st_get(t->state[COL_VAR], t->state_dtype[COL_VAR], b), (n * n) / (float)R, w));
        } else if (whole) {
            finish_cols(t, b, col, w);
        } else if (C == 1) {
            col[0] = sumsq_total(&cs); /* a partial sum, folded by af_combine1 */
        }
        m0 = m1;
    }
    part[P_NORM] = t->n_rchunks == 1 ? sumsq_norm(&ps) : sumsq_total(&ps);
}

/* Fold the column sums of matrices split over chunks, in chunk order; the mean of
   row_var of a one-matrix param, used by every chunk of passes 2 and 3. */
static void af_combine1(rp_tensor *t, const rp_run_opts *run, const void *ctx)
{
    const af_ctx *k = ctx;
    if (t->numel == 0 || !t->state[COL_VAR]) return;
    const int64_t R = t->rows, C = t->cols, M = R * C;
    const rp_rchunk *ch = run->rchunks + t->first_rchunk;
    for (int64_t c = 0; c < t->n_rchunks;) {
        if (ch[c].end - ch[c].begin >= M) { c++; continue; } /* whole matrices: done in pass 1 */
        const int64_t b = ch[c].begin / M;
        float *acc = run->scratch + ch[c].part + N_PARTS;
        int64_t e = c + 1;
        for (; e < t->n_rchunks && ch[e].begin / M == b; e++) {
            const float *more = run->scratch + ch[e].part + N_PARTS;
            for (int64_t j = 0; j < C; j++) acc[j] = acc[j] + more[j];
        }
        finish_cols(t, b, acc, t->scalar[0]);
        c = e;
    }
    if (t->numel == M) t->scalar[1] = row_var_mean(t, 0, k->eps1);
}

/* ---- passes 2 and 3: the update u, its norm, the param ---------------------------- */

/* u = rsqrt(clamp_min(v, eps1^2)) * g over one segment of a row: v = (r * c_j) / mean
   (factored) or the variance (vectors, c = v, r and mean unused). maximize negates g. */
static inline __attribute__((always_inline)) void update_elems(
    int64_t n, float *restrict u, const float *restrict g, float r, const float *restrict c, float mean,
    const af_ctx *k, const int factored, const int maximize)
{
    const float e2 = k->eps1_sq;
    for (int64_t j = 0; j < n; j++) {
        float v = factored ? (r * c[j]) / mean : c[j];
        v = af_clamp_min(v, e2);
        const float q = 1.0f / sqrtf(v);
        u[j] = q * (maximize ? rp_flip_sign(g[j]) : g[j]);
    }
}

static inline void update_seg(int64_t n, float *u, const float *g, float r, const float *c, float mean,
                              const af_ctx *k, int factored)
{
    if (factored) {
        if (k->maximize) update_elems(n, u, g, r, c, mean, k, 1, 1);
        else update_elems(n, u, g, r, c, mean, k, 1, 0);
    } else {
        if (k->maximize) update_elems(n, u, g, r, c, mean, k, 0, 1);
        else update_elems(n, u, g, r, c, mean, k, 0, 0);
    }
}

/* p = fmaf(-alpha/denom, u, p * decay): param.mul_(1 - lr*wd), then param.add_(u, alpha) */
static inline void apply_seg(const rp_tensor *t, int64_t i, int64_t n, const float *u, float *pbuf,
                             const float *g, const af_ctx *k)
{
    const float a = t->scalar[0], decay = k->decay;
    float *p = param_f32(t, i, n, pbuf);
    if (k->decays) for (int64_t j = 0; j < n; j++) p[j] = fmaf(a, u[j], p[j] * decay);
    else for (int64_t j = 0; j < n; j++) p[j] = fmaf(a, u[j], p[j]);
    if (t->param_dtype != RP_F32) store_block((char *)t->param + i * 2, t->param_dtype, p, n, RP_BF16_NAN_VEC);
    if (k->unscale) { /* GradScaler leaves the grad unscaled */
        if (t->param_dtype == RP_F32) memcpy((float *)t->grad + i, g, (size_t)n * sizeof(float));
        else store_block((char *)t->grad + i * 2, t->param_dtype, g, n, RP_BF16_NAN_VEC);
    }
}

/* Walk elements [begin, end) of t segment by segment (never across a row), computing
   u; pass 2 sums its squares (into *norm_out), pass 3 applies it. */
static inline __attribute__((always_inline)) void walk_update(const rp_tensor *t, int64_t begin, int64_t end,
                                                              float *norm_out, const af_ctx *k, const int apply)
{
    float pb[RP_BLOCK] __attribute__((aligned(64)));
    float gb[RP_BLOCK] __attribute__((aligned(64)));
    float cb[RP_BLOCK] __attribute__((aligned(64)));
    float ub[RP_BLOCK] __attribute__((aligned(64)));
    af_sumsq us;
    sumsq_init(&us, end - begin);
    if (!t->state[COL_VAR]) {
        for (int64_t i = begin; i < end; i += RP_BLOCK) {
            const int64_t n = end - i < RP_BLOCK ? end - i : RP_BLOCK;
            const float *g = grad_f32(t, i, n, gb, k);
            update_seg(n, ub, g, 0.0f, state_f32(t, VARIANCE, i, n, cb), 1.0f, k, 0);
            if (apply) apply_seg(t, i, n, ub, pb, g, k);
            else sumsq_add(&us, ub, n);
        }
    } else {
        const int64_t C = t->cols, M = t->rows * C;
        int64_t b = -1;
        float mean = 0.0f;
        for (int64_t i = begin; i < end;) {
            if (i / M != b) { /* a new matrix: its row_var mean */
                b = i / M;
                mean = t->numel == M ? t->scalar[1] : row_var_mean(t, b, k->eps1);
            }
            const int64_t j = i % C, left = C - j < end - i ? C - j : end - i;
            const int64_t n = left < RP_BLOCK ? left : RP_BLOCK;
            const float r = st_get(t->state[ROW_VAR], t->state_dtype[ROW_VAR], i / C);
            const float *g = grad_f32(t, i, n, gb, k);
            update_seg(n, ub, g, r, state_f32(t, COL_VAR, b * C + j, n, cb), mean, k, 1);
            if (apply) apply_seg(t, i, n, ub, pb, g, k);
            else sumsq_add(&us, ub, n);
            i += n;
        }
    }
    if (!apply) *norm_out = t->n_rchunks == 1 ? sumsq_norm(&us) : sumsq_total(&us);
}

static void af_pass2(const rp_tensor *t, const rp_rchunk *ch, float *part, const void *ctx)
{
    walk_update(t, ch->begin, ch->end, &part[U_NORM], ctx, 0);
}

/* the element pass: the engine's element chunks, in parallel within tensors too */
static void af_pass3(const rp_tensor *t, int64_t begin, int64_t end, const void *ctx)
{
    walk_update(t, begin, end, NULL, ctx, 1);
}

/* A norm from the tensor's chunk partials: the chunk's own norm when it is the only
   one (torch's order), else the chunks' sums folded in order, then sqrt. */
static float fold_norm(const rp_tensor *t, const rp_run_opts *run, int which)
{
    const rp_rchunk *ch = run->rchunks + t->first_rchunk;
    float s = run->scratch[ch[0].part + which];
    if (t->n_rchunks == 1) return s;
    for (int64_t c = 1; c < t->n_rchunks; c++) s = s + run->scratch[ch[c].part + which];
    return sqrtf(s);
}

/* alpha and denom, in Python doubles as torch computes them: scalar[0] = -alpha/denom */
static void af_combine2(rp_tensor *t, const rp_run_opts *run, const void *ctx)
{
    const af_ctx *k = ctx;
    if (t->numel == 0) return;
    const double step = (double)*t->step;
    const double inv_sqrt_step = 1.0 / pow(step, 0.5);
    const double rho = inv_sqrt_step < k->lr ? inv_sqrt_step : k->lr;   /* min(lr, 1/step**0.5) */
    const double root_n = pow((double)t->numel, 0.5);                   /* numel ** 0.5 */
    const double rms = (double)fold_norm(t, run, P_NORM) / root_n;
    const double alpha = (rms > k->eps2 ? rms : k->eps2) * rho;         /* max(eps2, rms): NaN gives eps2 */
    const double ratio = (double)fold_norm(t, run, U_NORM) / (root_n * k->d);
    const double denom = ratio > 1.0 ? ratio : 1.0;                     /* max(1.0, ratio) */
    /* A Tensor lr wins min(lr, 1/sqrt(step)) unless lr > 1/sqrt(step) compared in float32;
       then alpha and -alpha / denom are float32 tensor ops, each rounded */
    if (k->lr_tensor && !((float)k->lr > (float)inv_sqrt_step)) {
        const float lr_f = (float)k->lr;
        const float alpha_f = (float)(rms > k->eps2 ? rms : k->eps2) * lr_f;
        t->scalar[0] = -alpha_f / (float)denom;
        return;
    }
    t->scalar[0] = (float)(-alpha / denom);
}

/* ---- the step ---------------------------------------------------------------------- */

int rp_adafactor_step(const rp_run_opts *run, const rp_adafactor_hyper *h, rp_tensor *tensors,
                      int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks)
{
    if (rp_skipped(run)) return 0;
    af_ctx k;
    k.lr = h->lr;
    k.eps2 = h->eps2;
    k.d = h->d;
    k.eps1 = (float)h->eps1;
    k.eps1_sq = (float)(h->eps1 * h->eps1);
    k.lr_tensor = h->lr_tensor != 0;
    k.decay = (float)(1.0 - h->lr * h->weight_decay);
    if (k.lr_tensor) /* 1 - lr * wd as float32 tensor ops */
        k.decay = 1.0f - (float)h->lr * (float)h->weight_decay;
    k.decays = h->weight_decay != 0.0;
    k.maximize = h->maximize != 0;
    k.unscale = run->grad_scale != NULL;
    k.inv_scale = rp_inv_scale(run->grad_scale);
    for (int64_t i = 0; i < n_tensors; i++) { /* step_t += 1; 1 - beta2_t = step ** beta2_decay */
        rp_tensor *t = &tensors[i];
        *t->step += 1.0f;
        t->scalar[0] = (float)pow((double)*t->step, h->beta2_decay);
    }
    rp_reduce(run, tensors, n_tensors, af_pass1, af_combine1, &k);
    rp_reduce(run, tensors, n_tensors, af_pass2, af_combine2, &k);
    rp_run(run, tensors, n_tensors, chunks, n_chunks, af_pass3, &k);
    return 1;
}
