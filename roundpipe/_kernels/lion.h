/* roundpipe's Lion rule: its C interface, read by lion.c and by cffi's cdef()
 * after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Lion: exp_avg; no step.
 */

/* The hyperparameters of one param group, as lion-pytorch's Lion takes them. */
typedef struct {
    double lr;
    double beta1;
    double beta2;
    double weight_decay;
    double init_lr;                   /* the constructor's lr: decoupled decay divides by it */
    int32_t decoupled_weight_decay;
    int32_t maximize;
} rp_lion_hyper;

/* One Lion step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_lion_step(const rp_run_opts *run, const rp_lion_hyper *hyper, rp_tensor *tensors,
                 int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);
