/* roundpipe's Adam rule: its C interface, read by adam.c and by cffi's cdef()
 * after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Adam: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad);
 * step is the `step` state tensor; scalar[0] = -(lr / bias_correction1),
 * scalar[1] = sqrt(bias_correction2), written by rp_adam_step.
 */

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
    int32_t reserved;
} rp_adam_hyper;

/* One Adam step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_adam_step(const rp_run_opts *run, const rp_adam_hyper *hyper, rp_tensor *tensors,
                 int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);
