/* roundpipe's SGD rule: its C interface, read by sgd.c and by cffi's cdef()
 * after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for SGD: momentum_buffer (when momentum != 0); no step.
 * rp_tensor.fresh: the buffer was just created, so this step copies the grad
 * into it (torch's first step); rp_sgd_step clears it after the step.
 */

/* The hyperparameters of one param group, as torch's fused SGD takes them. */
typedef struct {
    double lr;
    double momentum;
    double dampening;
    double weight_decay;
    int32_t nesterov;
    int32_t maximize;
} rp_sgd_hyper;

/* One SGD step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_sgd_step(const rp_run_opts *run, const rp_sgd_hyper *hyper, rp_tensor *tensors,
                int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);
