/* roundpipe's Rprop rule: its C interface, read by rprop.c and by cffi's cdef()
 * after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Rprop: prev, step_size; step counts steps. lr only sets the
 * initial step_size (in Python, as torch does), so it is not here.
 */

/* The hyperparameters of one param group, as torch.optim.Rprop takes them. */
typedef struct {
    double etaminus;
    double etaplus;
    double step_size_min;
    double step_size_max;
    int32_t maximize;
    int32_t reserved;
} rp_rprop_hyper;

/* One Rprop step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_rprop_step(const rp_run_opts *run, const rp_rprop_hyper *hyper, rp_tensor *tensors,
                  int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);
