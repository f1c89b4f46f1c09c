/* roundpipe's Adafactor rule: its C interface, read by adafactor.c and by cffi's
 * cdef() after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Adafactor, per param: row_var, col_var (params of 2+ dims,
 * factoring the last two: shapes (..., rows, 1) and (..., 1, cols)), or variance
 * (vectors and 0-dim params: the param's shape; state[1] is NULL). step is the
 * `step` state tensor. The reduction phase's scratch holds 2 floats per chunk
 * (the chunk's sums of squares of the param and of the update) and one per column.
 * scalar[0]: this step's 1 - beta2_t (pass 1), then -alpha / denom (the element
 * pass); scalar[1]: the clamped mean of row_var for a param with one matrix.
 */

/* The hyperparameters of one param group, as torch.optim.Adafactor takes them. */
typedef struct {
    double lr;
    double beta2_decay;
    double eps1;            /* eps[0]; None resolved as torch does (finfo(dtype).eps) */
    double eps2;
    double d;
    double weight_decay;
    int32_t maximize;
    int32_t lr_tensor;      /* lr is a Tensor: torch then computes rho, alpha and the decay in float32 */
} rp_adafactor_hyper;

/* One Adafactor step over a whole param group. Returns 1 if the step ran, 0 if
   it was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_adafactor_step(const rp_run_opts *run, const rp_adafactor_hyper *hyper, rp_tensor *tensors,
                      int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);
