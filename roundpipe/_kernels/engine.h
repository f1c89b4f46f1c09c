/* roundpipe's engine: the C interface that every update rule shares.
 *
 * cffi's cdef() reads this file, then each rule's header (adam.h, sgd.h,
 * adagrad.h, lion.h), so it holds plain declarations only: no preprocessor
 * lines, no include guards, no inline code. The shared C code is runner.h
 * (inline, included by each rule's .c file) and engine.c.
 */

/* Element types of the arrays behind the void pointers below. */
enum { RP_F32 = 0, RP_BF16 = 1, RP_F16 = 2, RP_U8 = 3 /* 8-bit codes (adam8bit.c) */ };

/* One parameter tensor and its optimizer state, flattened. */
typedef struct {
    void *param;            /* the parameter (param_dtype), updated in place             */
    void *grad;             /* its gradient (param_dtype); unscaled in place when a grad
                               scale is given, as torch's fused optimizers do             */
    void *state[4];         /* the rule's state tensors (state_dtype[i]), in the order of
                               its Python class's state keys; NULL where unused           */
    float *master;          /* fp32 master copy of param, or NULL                         */
    float *step;            /* the 0-dim float32 `step` state tensor, or NULL             */
    int64_t numel;
    int32_t param_dtype;
    int32_t state_dtype[4];
    const int64_t *seed;    /* the `sr_seed` state tensor with stochastic rounding, or NULL */
    int64_t *sr_step;       /* its `sr_step` state tensor: the steps taken with stochastic
                               rounding, counted by the C code (unlike the float32 `step`,
                               which stops counting at 2^24), with seed, or NULL            */
    uint64_t sr_key;        /* this step's key for the random bits, from seed and sr_step  */
    int32_t fresh;          /* 1 on the first step of state the engine just created       */
    int32_t reserved;
    /* Per-tensor scalars, written by the rule's entry point once per step,
       before any thread starts (Adam: they depend on this tensor's step). */
    float scalar[4];
    /* The rule's 1-element extra state tensors (_extra_state, in its order;
       dtype from _EXTRA_STATE_DTYPES), or NULL: per-param scalar state such
       as NAdam's mu_product, updated by the rule's entry point before rp_run. */
    void *aux[2];
    /* The reduction phase (rules that reduce before their element pass, runner.h
       rp_reduce). Filled by the engine for every rule from the param's shape: the
       param is a stack of numel / (rows * cols) matrices of rows x cols, its last
       two dims (a vector is numel x 1; a 0-dim or 1-element param 1 x 1). */
    int64_t rows, cols;
    int64_t first_rchunk, n_rchunks;  /* its chunks in rp_run_opts.rchunks          */
} rp_tensor;

/* A chunk of the reduction phase: elements [begin, end) of one tensor, whole
   rows of its matrices (rp_tensor.rows, cols). Its bounds follow from the
   tensor's shape alone, never from the thread count: whole matrices (as many as
   fit in rchunk_elems elements, at least one) where a matrix fits, else rows of
   one matrix. Its partial results live at rp_run_opts.scratch + part: first the
   rule's n_scalars, then `cols` floats (per-column partials where the chunk holds
   part of a matrix, end - begin < rows * cols; else room for one matrix's). */
typedef struct {
    int64_t tensor;
    int64_t begin;
    int64_t end;
    int64_t part;
} rp_rchunk;

/* How one call runs: threads and GradScaler, the same for every rule. */
typedef struct {
    int32_t num_threads;              /* <= 1: run on the calling thread */
    int32_t reserved;
    int64_t serial_below;             /* groups with fewer elements run on one thread */
    int64_t torch_vec;                /* torch's SIMD width in fp32 elements (8): the last
                                         numel % torch_vec elements of each tensor are
                                         rounded as torch's scalar tail loop rounds them */
    const float *grad_scale;          /* GradScaler's scale, or NULL */
    const float *found_inf;           /* GradScaler's found_inf, or NULL */
    /* The reduction phase's plan (rp_plan_rchunks) and its scratch, for rules that
       declare one; NULL and 0 otherwise. */
    const rp_rchunk *rchunks;
    int64_t n_rchunks;
    float *scratch;                   /* n_scratch floats: each rchunk's partials */
    int64_t n_scratch;
} rp_run_opts;

/* A span [begin, end) of one tensor: the unit of work one thread takes. */
typedef struct {
    int64_t tensor;
    int64_t begin;
    int64_t end;
} rp_chunk;

/* Plan the reduction chunks of every tensor (fills tensors[i].first_rchunk and
   n_rchunks): at most rchunk_elems elements each, or one row where a row is
   longer. Writes at most `capacity` chunks to `out`, returns how many the
   plan needs; *n_scratch gets the floats of scratch they need. */
int64_t rp_plan_rchunks(rp_tensor *tensors, int64_t n_tensors, int64_t rchunk_elems,
                        int64_t n_scalars, rp_rchunk *out, int64_t capacity, int64_t *n_scratch);

/* Split every tensor into chunks of at most chunk_elems elements (a multiple
   of 32, so chunks start on 64-byte boundaries). Writes at most `capacity`
   chunks to `out` and returns how many the plan needs. */
int64_t rp_plan_chunks(const rp_tensor *tensors, int64_t n_tensors,
                       int64_t chunk_elems, rp_chunk *out, int64_t capacity);

/* Point tensors[i].grad at ptrs[i] for i < n: new grad tensors, one call per
   step instead of one per tensor from Python. */
void rp_set_grads(rp_tensor *tensors, const uintptr_t *ptrs, int64_t n);

/* Memory roofline probes: read `n_read` arrays and write back `n_write` of
   them in place, with no arithmetic worth the name, scheduled like a step.
   rp_roofline_probe: a, b, c, d read, a, c, d written: 28 bytes per element,
   an fp32 Adam step. rp_roofline_probe3: a, b, c read, a, c written: 20
   bytes, an fp32 SGD-with-momentum, Adagrad or Lion step. scripts/bench.py. */
void rp_roofline_probe(float *a, const float *b, float *c, float *d,
                       int64_t n, int32_t num_threads);
void rp_roofline_probe3(float *a, const float *b, float *c, int64_t n, int32_t num_threads);
/* 16 bytes per element in one pass: a and b read, a and c written (c is not
   read): ASGD before averaging starts, which writes ax = param. roundpipe/bench. */
void rp_roofline_probe16(float *a, const float *b, float *c, int64_t n, int32_t num_threads);
/* rp_roofline_probe_adafactor: Adafactor's three passes, a and b read, b read, a and b
   read and a written: 24 bytes per element (sums: one float per 16 Ki elements). */
void rp_roofline_probe_adafactor(float *a, const float *b, float *sums, int64_t n, int32_t num_threads);

/* ---- the per-step check of the tensors behind the C arrays ----------------------------

   A step re-checks every tensor the C arrays point into: its memory and its layout must
   be what the last full check in Python saw. Reading that through torch's Python API costs
   a dozen attribute calls per tensor, each a pass over cold metadata after the kernel has
   streamed the params through the caches. Instead the engine reads torch's own structs
   (c10::TensorImpl and c10::StorageImpl) at byte offsets found and validated by
   roundpipe/optim/_plan.py at first use; where that validation fails, steps use the
   Python checks. Only reads: nothing here writes torch's memory. */

/* Where the checked fields are, in bytes from the start of each struct. */
typedef struct {
    int64_t object;       /* the Python tensor object: its TensorImpl * (Tensor._cdata)          */
    int64_t storage;      /* TensorImpl: its StorageImpl * (NULL for tensors without storage)  */
    int64_t dim;          /* TensorImpl: the number of dimensions (SizesAndStrides::size_)      */
    int64_t inline_dims;  /* sizes and strides are stored in the TensorImpl up to this many dims */
    int64_t lo;           /* TensorImpl: the words [lo, lo + 8 * words) hold sizes, strides,
                             storage offset, numel, dtype, device and dispatch keys (conjugate,
                             negative, sparse, meta, ...), mixed with bits the check ignores  */
    int64_t words;        /* <= 16 */
    uint64_t mask[16];    /* the bits of each word that are compared (padding is not)          */
    int64_t data;         /* StorageImpl: the data pointer                                       */
    int64_t nbytes;       /* StorageImpl: the size in bytes                                       */
} rp_meta_layout;

/* One tensor as the last full check saw it. */
typedef struct {
    uint64_t block[16];        /* the TensorImpl's words [lo, lo + 8 * words), masked          */
    uintptr_t data;            /* its storage's data pointer and size ...                      */
    int64_t nbytes;
    int64_t offset;            /* ... the tensor's first byte - data, and offset + its bytes   */
    int64_t need;
    int32_t exact;             /* 1: the same allocation (params and state, whose addresses are in
                                  the C arrays); 0: any allocation that holds `need` bytes (grads) */
    int32_t valid;             /* 0: never passes (not recordable: > inline_dims dims, no storage) */
} rp_meta;

/* Record tensors impls[i] (TensorImpl addresses, torch's Tensor._cdata) into meta[i]:
   ptrs[i] and spans[i] are their data_ptr() and numel * element size as torch reports
   them. Returns how many could not be recorded (their meta[i].valid is 0). */
int64_t rp_meta_record(const rp_meta_layout *layout, const uintptr_t *impls, const uintptr_t *ptrs,
                       const int64_t *spans, int32_t exact, rp_meta *meta, int64_t n);

/* Check tensors against meta[i]: bad[i] = 1 where a tensor's layout bytes differ, or its
   storage is not the recorded allocation (exact) or cannot hold it; else bad[i] = 0 and
   ptrs[i] = its data pointer. The tensors are TensorImpls at addrs[i], or with via_object
   the Python tensor objects at addrs[i] (id(t)), whose TensorImpl is read each time (it is
   not cached: torch.utils.swap_tensors gives an object another). Returns how many are bad. */
int64_t rp_meta_check(const rp_meta_layout *layout, const uintptr_t *addrs, int32_t via_object,
                      const rp_meta *meta, int64_t n, uintptr_t *ptrs, uint8_t *bad);

/* 1 when this process is a fork() child: steps then run on one thread (see engine.c). */
int rp_in_forked_child(void);
