/* roundpipe's Adadelta rule: its C interface, read by adadelta.c and by cffi's cdef()
 * after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Adadelta: square_avg, acc_delta; step counts steps.
 */

/* The hyperparameters of one param group, as torch.optim.Adadelta takes them. */
typedef struct {
    double lr;
    double rho;
    double eps;
    double weight_decay;
    int32_t maximize;
    int32_t reserved;
    int32_t lr_f32;      /* lr is a float32 Tensor (ForLoopRule fills it; unused here) */
    int32_t sqrt_how;    /* which sqrt torch's is (rules.h, rp_torch_sqrt) */
    void *vml_sqrt;      /* MKL's vmsSqrt where torch's sqrt is it, else NULL */
} rp_adadelta_hyper;

/* One Adadelta step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_adadelta_step(const rp_run_opts *run, const rp_adadelta_hyper *hyper, rp_tensor *tensors,
                     int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* torch's float sqrt as the rule computes it (rules.h, rp_torch_sqrt), for
   roundpipe/optim/_for_loop.py to check `how` against torch.sqrt once. */
void rp_adadelta_torch_sqrt(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n);
