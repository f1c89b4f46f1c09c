/* roundpipe's RAdam rule: its C interface, read by radam.c and by cffi's
 * cdef() after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for RAdam: exp_avg, exp_avg_sq; step is the `step` state
 * tensor. Per-tensor scalars, written by rp_radam_step once per tensor per
 * step (torch's Python scalars, rounded to float): scalar[0] = 1 - beta1^t,
 * scalar[1] = (1 - beta2^t)^0.5, scalar[2] = the rectification term r_t where
 * this step is rectified (rho_t > 5), else 0. scalar[3] = 1 for a complex
 * param's real view (set when the plan is built: torch negates its grad, for
 * maximize, as a complex tensor, rules.h).
 */

/* The hyperparameters of one param group, as torch's RAdam takes them. */
typedef struct {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    int32_t decoupled_weight_decay;
    int32_t maximize;
    int32_t lr_f32;     /* lr is a float32 Tensor: torch computes 1 - lr*wd in float */
    int32_t sqrt_how;   /* which sqrt torch's is (rules.h, rp_torch_sqrt) */
    void *vml_sqrt;     /* MKL's vmsSqrt where torch's sqrt is it, else NULL */
} rp_radam_hyper;

/* One RAdam step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_radam_step(const rp_run_opts *run, const rp_radam_hyper *hyper, rp_tensor *tensors,
                  int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* torch's float sqrt as the rule computes it (rules.h, rp_torch_sqrt), for
   roundpipe/optim/_for_loop.py to check `how` against torch.sqrt once. */
void rp_radam_torch_sqrt(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n);
