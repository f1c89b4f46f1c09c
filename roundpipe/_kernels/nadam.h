/* roundpipe's NAdam rule: its C interface, read by nadam.c and by cffi's
 * cdef() after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for NAdam: exp_avg, exp_avg_sq; step is the `step` state
 * tensor; aux[0] the float32 `mu_product` state tensor. rp_nadam_step writes,
 * once per tensor per step: scalar[0] = the grad's addcdiv value,
 * scalar[1] = exp_avg's, scalar[2] = (float)bias_correction2; scalar[3] is 1
 * for a complex param (its real view), set once by the Python class.
 */

/* The hyperparameters of one param group, as torch's NAdam takes them. */
typedef struct {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    double momentum_decay;
    int32_t maximize;
    int32_t decoupled_weight_decay;
    int32_t lr_f32;                   /* lr is a float32 Tensor: torch's scalars are then
                                         float32 tensor ops, each rounded to float */
    int32_t sqrt_how;                 /* which sqrt torch's is (rules.h, rp_torch_sqrt) */
    void *vml_sqrt;                   /* MKL's vmsSqrt where torch's sqrt is it, else NULL */
} rp_nadam_hyper;

/* One NAdam step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_nadam_step(const rp_run_opts *run, const rp_nadam_hyper *hyper, rp_tensor *tensors,
                  int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* torch's float sqrt as the rule computes it (rules.h, rp_torch_sqrt), for
   roundpipe/optim/_for_loop.py to check `how` against torch.sqrt once. */
void rp_nadam_torch_sqrt(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n);
