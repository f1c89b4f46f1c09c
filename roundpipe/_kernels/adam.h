/* roundpipe Adam kernel: the C interface.
 *
 * This header is read twice: by adam.c (#include) and by cffi's cdef() in
 * roundpipe/_build.py. cdef() understands only plain declarations, so this
 * file has no preprocessor lines, no include guards and no inline code.
 */

/* Element types of the arrays behind the void pointers below. */
enum { RP_F32 = 0, RP_BF16 = 1, RP_F16 = 2 };

/* One parameter tensor and its optimizer state, flattened. */
typedef struct {
    void *param;            /* the parameter (param_dtype), updated in place          */
    void *grad;             /* its gradient (param_dtype); unscaled in place when
                               grad_scale is set, as torch's fused Adam does           */
    void *exp_avg;          /* first moment (exp_avg_dtype)                            */
    void *exp_avg_sq;       /* second moment (exp_avg_sq_dtype)                        */
    void *max_exp_avg_sq;   /* amsgrad running max (exp_avg_sq_dtype), or NULL         */
    float *master;          /* fp32 master copy of param, or NULL                      */
    float *step;            /* the 0-dim float32 `step` state tensor                   */
    int64_t numel;
    int32_t param_dtype;
    int32_t exp_avg_dtype;
    int32_t exp_avg_sq_dtype;
    int32_t reserved;
    /* Per-tensor scalars, written by rp_adam_step once per step, before any
       thread starts: they depend on this tensor's own step count. */
    float neg_step_size;    /* -(lr / bias_correction1)                                */
    float bias_correction2_sqrt;
} rp_tensor;

/* The hyperparameters of one param group, as torch's fused Adam takes them. */
typedef struct {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    int32_t amsgrad;
    int32_t maximize;
    int32_t decoupled_weight_decay;   /* AdamW rule */
    int32_t num_threads;              /* <= 1: run on the calling thread */
    int64_t serial_below;             /* groups with fewer elements run on one thread */
    int64_t torch_vec;                /* torch's SIMD width in elements (16 for AVX-512):
                                         the last numel % torch_vec elements of each tensor
                                         are rounded as torch's scalar tail loop rounds them */
    const float *grad_scale;          /* GradScaler's scale, or NULL */
    const float *found_inf;           /* GradScaler's found_inf, or NULL */
} rp_hyper;

/* A span [begin, end) of one tensor: the unit of work one thread takes. */
typedef struct {
    int64_t tensor;
    int64_t begin;
    int64_t end;
} rp_chunk;

/* Split every tensor into chunks of at most chunk_elems elements (a multiple
   of 16, so chunks start on 64-byte boundaries). Writes at most `capacity`
   chunks to `out` and returns how many the plan needs. */
int64_t rp_plan_chunks(const rp_tensor *tensors, int64_t n_tensors,
                       int64_t chunk_elems, rp_chunk *out, int64_t capacity);

/* Point tensors[i].grad at ptrs[i] for i < n: new grad tensors, one call per
   step instead of one per tensor from Python. */
void rp_set_grads(rp_tensor *tensors, const uintptr_t *ptrs, int64_t n);

/* One Adam step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *found_inf is non-zero (nothing is touched then). */
int rp_adam_step(const rp_hyper *hyper, rp_tensor *tensors, int64_t n_tensors,
                 const rp_chunk *chunks, int64_t n_chunks);

/* The memory roofline probe: reads a, b, c, d and writes a, c, d in place,
   the same 28 bytes per element as an fp32 Adam step, with no arithmetic
   worth the name. Used by scripts/bench.py. */
void rp_roofline_probe(float *a, const float *b, float *c, float *d,
                       int64_t n, int32_t num_threads);

/* 1 when this process is a fork() child of a process that had started
   OpenMP threads: steps then run on one thread (see adam.c). */
int rp_in_forked_child(void);
