/* roundpipe's engine: what every rule shares that is not inline (runner.h):
 * chunk planning, grad repointing, fork detection and the roofline probes.
 * Rules of this file as in runner.h: plain C loops, int64_t indices.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "runner.h"

/* ---- planning ------------------------------------------------------------ */

int64_t rp_plan_chunks(const rp_tensor *tensors, int64_t n_tensors,
                       int64_t chunk_elems, rp_chunk *out, int64_t capacity)
{
    /* Round the chunk to whole cache lines (16 fp32 or 32 half elements are
       both <= 64 bytes): chunks after the first start 64-byte aligned when the
       tensor does, so two threads never write the same cache line. */
    if (chunk_elems < 32) chunk_elems = 32;
    chunk_elems -= chunk_elems % 32;
    int64_t count = 0;
    for (int64_t i = 0; i < n_tensors; i++) {
        const int64_t numel = tensors[i].numel;
        for (int64_t b = 0; b < numel; b += chunk_elems) {
            if (count < capacity) {
                out[count].tensor = i;
                out[count].begin = b;
                out[count].end = numel - b > chunk_elems ? b + chunk_elems : numel;
            }
            count++;
        }
    }
    return count;
}

int64_t rp_plan_rchunks(rp_tensor *tensors, int64_t n_tensors, int64_t rchunk_elems,
                        int64_t n_scalars, rp_rchunk *out, int64_t capacity, int64_t *n_scratch)
{
    int64_t count = 0, part = 0;
    if (rchunk_elems < 1) rchunk_elems = 1;
    for (int64_t i = 0; i < n_tensors; i++) {
        rp_tensor *t = &tensors[i];
        const int64_t cols = t->cols > 0 ? t->cols : 1;
        const int64_t rows = t->rows > 0 ? t->rows : 1;
        const int64_t mat = rows * cols;
        t->first_rchunk = count;
        /* whole matrices per chunk, or rows of one matrix per chunk */
        const int64_t mats_per = mat <= rchunk_elems ? rchunk_elems / mat : 0;
        const int64_t rows_per = rchunk_elems / cols > 0 ? rchunk_elems / cols : 1;
        for (int64_t m0 = 0; m0 < t->numel; m0 += mat) {
            const int64_t step = mats_per ? mats_per * mat : rows_per * cols;
            const int64_t stop = mats_per ? t->numel : m0 + mat; /* whole matrices: one run to the end */
            for (int64_t b = m0; b < stop; b += step) {
                const int64_t e = stop - b > step ? b + step : stop;
                if (count < capacity) {
                    out[count].tensor = i;
                    out[count].begin = b;
                    out[count].end = e;
                    out[count].part = part;
                }
                part += n_scalars + cols; /* its scalars, then one float per column */
                count++;
            }
            if (mats_per) break;
        }
        t->n_rchunks = count - t->first_rchunk;
    }
    *n_scratch = part;
    return count;
}

void rp_set_grads(rp_tensor *tensors, const uintptr_t *ptrs, int64_t n)
{
    for (int64_t i = 0; i < n; i++) tensors[i].grad = (void *)ptrs[i];
}

/* ---- the per-step check of torch's tensor metadata (see engine.h) ---------- */

/* The word at byte offset `off` of a struct. */
static inline uint64_t word_at(uintptr_t base, int64_t off)
{
    uint64_t w;
    memcpy(&w, (const void *)(base + (uintptr_t)off), sizeof w);
    return w;
}

/* The masked words of a TensorImpl's block equal rec's (or, with rec NULL, copied into out). */
static inline int block_matches(const rp_meta_layout *layout, uintptr_t impl, const uint64_t *rec, uint64_t *out)
{
    uint64_t diff = 0;
    for (int64_t j = 0; j < layout->words; j++) {
        const uint64_t w = word_at(impl, layout->lo + 8 * j) & layout->mask[j];
        if (out) out[j] = w;
        else diff |= w ^ rec[j];
    }
    return diff == 0;
}

int64_t rp_meta_record(const rp_meta_layout *layout, const uintptr_t *impls, const uintptr_t *ptrs,
                       const int64_t *spans, int32_t exact, rp_meta *meta, int64_t n)
{
    int64_t failed = 0;
    for (int64_t i = 0; i < n; i++) {
        rp_meta *m = &meta[i];
        memset(m, 0, sizeof *m);
        const uintptr_t impl = impls[i];
        const uintptr_t storage = impl ? (uintptr_t)word_at(impl, layout->storage) : 0;
        /* More dims than fit inline: the block holds a pointer to the sizes, whose
           contents could change under it, so such a tensor is never recorded. */
        if (!storage || (int64_t)word_at(impl, layout->dim) > layout->inline_dims || layout->words > 16) {
            failed++;
            continue;
        }
        const uintptr_t data = (uintptr_t)word_at(storage, layout->data);
        const int64_t nbytes = (int64_t)word_at(storage, layout->nbytes);
        /* torch's own data_ptr() must agree with what was read: a cross-check of the layout. */
        const int64_t offset = (int64_t)(ptrs[i] - data);
        if (spans[i] > 0 && (!data || ptrs[i] < data || offset > nbytes || spans[i] > nbytes - offset)) {
            failed++;
            continue;
        }
        block_matches(layout, impl, NULL, m->block);
        m->data = data;
        m->nbytes = nbytes;
        m->offset = offset;
        m->need = offset + spans[i];
        m->exact = exact;
        m->valid = 1;
    }
    return failed;
}

/* The TensorImpl of tensor i. */
static inline uintptr_t impl_of(const rp_meta_layout *layout, const uintptr_t *addrs, int32_t via_object, int64_t i)
{
    return via_object ? (uintptr_t)word_at(addrs[i], layout->object) : addrs[i];
}

int64_t rp_meta_check(const rp_meta_layout *layout, const uintptr_t *addrs, int32_t via_object,
                      const rp_meta *meta, int64_t n, uintptr_t *ptrs, uint8_t *bad)
{
    int64_t n_bad = 0;
    /* Prefetching the next tensors' structs ahead (object, TensorImpl, StorageImpl) was
       measured and did not pay: 1.8 ms for 4096 x 5 tensors after an Adam step either way. */
    for (int64_t i = 0; i < n; i++) {
        const rp_meta *m = &meta[i];
        const uintptr_t impl = impl_of(layout, addrs, via_object, i);
        /* The same block: the same sizes, strides, storage offset, dtype, device and keys. */
        int ok = m->valid && impl && block_matches(layout, impl, m->block, NULL);
        if (ok) {
            const uintptr_t storage = (uintptr_t)word_at(impl, layout->storage);
            ok = storage != 0;
            if (ok) {
                const uintptr_t data = (uintptr_t)word_at(storage, layout->data);
                const int64_t nbytes = (int64_t)word_at(storage, layout->nbytes);
                /* A storage freed (resize_(0): NULL) or shrunk in place (resize_(0) then resize_(m),
                   perhaps at the same address) fails both tests; a symbolic size is negative. */
                ok = m->exact ? data == m->data && nbytes == m->nbytes
                              : m->need == 0 || (data != 0 && nbytes >= m->need);
                ptrs[i] = data + (uintptr_t)m->offset;
            }
        }
        bad[i] = (uint8_t)!ok;
        n_bad += !ok;
    }
    return n_bad;
}

/* ---- fork safety ---------------------------------------------------------- */

/* GNU libgomp keeps its worker threads in a pool that fork() does not copy; a
   child that enters a parallel region waits forever for them. torch has the
   same problem (its DataLoader workers set one thread for this reason). After
   fork we never enter an OpenMP region again: the child steps on one thread
   and gets the same bits (results do not depend on the thread count).
   This holds for every child, even of a parent that never ran one of our
   parallel regions: torch's own ops share this libgomp pool, and a child of
   a parent whose torch ops ran threaded hangs in its first parallel region
   (measured: torch 2.13, (x*3).sum() in the child never returns). Nothing
   tells from outside libgomp whether its pool exists (thread counts don't:
   importing torch starts a thread of its own), so one thread is the only
   safe choice. */
volatile int rp_forked_child_flag = 0;
static void mark_forked_child(void) { rp_forked_child_flag = 1; }
__attribute__((constructor)) static void register_fork_handler(void)
{
    pthread_atfork(NULL, NULL, mark_forked_child);
}
int rp_in_forked_child(void) { return rp_forked_child_flag; }

/* ---- roofline probes -------------------------------------------------------- */

/* Each probe is a step's memory traffic with no arithmetic worth the name,
   scheduled like rp_run (chunks of CHUNK_ELEMS from a shared counter), so it
   measures memory, not a difference in scheduling. b is read only; a, c and
   d (when not NULL) are read and written: 28 bytes per element with d (fp32
   Adam), 20 without (fp32 SGD with momentum, Adagrad, Lion). */
#define RP_PROBE_CHUNK 16384 /* elements per chunk, as CHUNK_ELEMS in optim/_engine.py */

static void probe4(float *restrict a, const float *restrict b, float *restrict c, float *restrict d, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        const float x = b[i];
        a[i] += x;
        c[i] += x;
        d[i] += x;
    }
}

static void probe3(float *restrict a, const float *restrict b, float *restrict c, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        const float x = b[i];
        a[i] += x;
        c[i] += x;
    }
}

static void probe2(float *restrict a, const float *restrict b, int64_t n)
{
    for (int64_t i = 0; i < n; i++) a[i] += b[i];
}

static void probe_span(float *a, const float *b, float *c, float *d, int64_t n)
{
    if (d) probe4(a, b, c, d, n);
    else if (c) probe3(a, b, c, n);
    else probe2(a, b, n);
}

static void probe_run(float *a, const float *b, float *c, float *d, int64_t n, int32_t num_threads)
{
    const int64_t n_chunks = (n + RP_PROBE_CHUNK - 1) / RP_PROBE_CHUNK;
    if (num_threads < 1 || rp_forked_child_flag) num_threads = 1;
    if (num_threads == 1 || n_chunks < 2) {
        probe_span(a, b, c, d, n);
        return;
    }
    int64_t next = 0;
#pragma omp parallel num_threads(num_threads)
    {
        for (;;) {
            const int64_t k = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (k >= n_chunks) break;
            const int64_t b0 = k * RP_PROBE_CHUNK;
            const int64_t len = n - b0 < RP_PROBE_CHUNK ? n - b0 : RP_PROBE_CHUNK;
            probe_span(a + b0, b + b0, c + b0, d ? d + b0 : NULL, len);
        }
    }
}

void rp_roofline_probe(float *a, const float *b, float *c, float *d, int64_t n, int32_t num_threads)
{
    probe_run(a, b, c, d, n, num_threads);
}

void rp_roofline_probe3(float *a, const float *b, float *c, int64_t n, int32_t num_threads)
{
    probe_run(a, b, c, NULL, n, num_threads);
}

/* ASGD's pattern: a and b read, a and c written, c never read. */
static void probe_copy(float *restrict a, const float *restrict b, float *restrict c, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        const float x = a[i] + b[i];
        a[i] = x;
        c[i] = x;
    }
}

void rp_roofline_probe16(float *a, const float *b, float *c, int64_t n, int32_t num_threads)
{
    const int64_t n_chunks = (n + RP_PROBE_CHUNK - 1) / RP_PROBE_CHUNK;
    if (num_threads < 1 || rp_forked_child_flag || n_chunks < 2) num_threads = 1;
    int64_t next = 0;
    /* Chunks handed out from a shared counter, as in probe_run. */
#pragma omp parallel num_threads(num_threads)
    for (;;) {
        const int64_t k = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
        if (k >= n_chunks) break;
        const int64_t b0 = k * RP_PROBE_CHUNK;
        probe_copy(a + b0, b + b0, c + b0, n - b0 < RP_PROBE_CHUNK ? n - b0 : RP_PROBE_CHUNK);
    }
}

/* Adafactor's three passes (adafactor.c): read a and b, read b, read b and a and
   write a: 24 bytes per element, each pass scheduled as rp_for_each schedules a
   step. Each chunk's sum goes to sums[chunk] so that no read can be left out. */
typedef struct {
    float *a;
    const float *b;
    float *sums;
    int64_t n;
    int pass;
} probe_af_args;

static void probe_af_item(int64_t k, const void *arg_)
{
    const probe_af_args *arg = arg_;
    const int64_t b0 = k * RP_PROBE_CHUNK;
    const int64_t len = arg->n - b0 < RP_PROBE_CHUNK ? arg->n - b0 : RP_PROBE_CHUNK;
    float *restrict a = arg->a + b0;
    const float *restrict b = arg->b + b0;
    float acc[32] = {0}; /* 32 lanes: the sums are not latency-bound (len % 32 == 0 but the last) */
    int64_t i = 0;
    if (arg->pass == 0)
        for (; i + 32 <= len; i += 32)
            for (int l = 0; l < 32; l++) acc[l] += a[i + l] * b[i + l];
    else if (arg->pass == 1)
        for (; i + 32 <= len; i += 32)
            for (int l = 0; l < 32; l++) acc[l] += b[i + l];
    else
        for (; i < len; i++) a[i] += b[i];
    for (; i < len; i++) acc[0] += b[i];
    float s = 0.0f;
    for (int l = 0; l < 32; l++) s += acc[l];
    arg->sums[k] = s;
}

void rp_roofline_probe_adafactor(float *a, const float *b, float *sums, int64_t n, int32_t num_threads)
{
    rp_run_opts run;
    memset(&run, 0, sizeof run);
    run.num_threads = num_threads;
    const int64_t n_chunks = (n + RP_PROBE_CHUNK - 1) / RP_PROBE_CHUNK;
    for (int pass = 0; pass < 3; pass++) {
        const probe_af_args arg = {a, b, sums, n, pass};
        rp_for_each(&run, n, n_chunks, probe_af_item, &arg);
    }
}
