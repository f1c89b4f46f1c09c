/* roundpipe's ASGD rule: its C interface, read by asgd.c and by cffi's
 * cdef() after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for ASGD: ax; step is the `step` state tensor; aux[0] and
 * aux[1] the float32 `eta` and `mu` state tensors. rp_asgd_step writes, once
 * per tensor per step, before updating eta and mu: scalar[0] = (float)(1 -
 * lambd*eta), scalar[1] = -eta, scalar[2] = mu (1: ax copies the param);
 * scalar[3] is 1 for a complex param (its real view), set once by the Python class.
 */

/* The hyperparameters of one param group, as torch's ASGD takes them. */
typedef struct {
    double lr;
    double lambd;
    double alpha;
    double t0;
    double weight_decay;
    int32_t maximize;
    int32_t lr_f32;                   /* lr is a float32 Tensor: the new eta is then
                                         float32 tensor ops, each rounded to float */
    int32_t sqrt_how;                 /* which sqrt torch's is (rules.h, rp_torch_sqrt): */
    int32_t reserved;                 /* alpha = 0.5 with a Tensor lr takes it             */
    void *vml_sqrt;                   /* MKL's vmsSqrt where torch's sqrt is it, else NULL */
} rp_asgd_hyper;

/* One ASGD step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_asgd_step(const rp_run_opts *run, const rp_asgd_hyper *hyper, rp_tensor *tensors,
                 int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* torch's float sqrt as the rule computes it (rules.h, rp_torch_sqrt), for
   roundpipe/optim/_for_loop.py to check `how` against torch.sqrt once. */
void rp_asgd_torch_sqrt(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n);
