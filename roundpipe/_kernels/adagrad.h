/* roundpipe's Adagrad rule: its C interface, read by adagrad.c and by cffi's
 * cdef() after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Adagrad: sum; step is the `step` state tensor;
 * scalar[0] = the decayed rate lr / (1 + (step-1) lr_decay), written by
 * rp_adagrad_step once per tensor per step.
 */

/* The hyperparameters of one param group, as torch's fused Adagrad takes them. */
typedef struct {
    double lr;
    double lr_decay;
    double weight_decay;
    double eps;
    int32_t maximize;
    int32_t reserved;
} rp_adagrad_hyper;

/* One Adagrad step over a whole param group. Returns 1 if the step ran, 0 if
   it was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_adagrad_step(const rp_run_opts *run, const rp_adagrad_hyper *hyper, rp_tensor *tensors,
                    int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);
