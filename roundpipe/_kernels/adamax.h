/* roundpipe's Adamax rule: its C interface, read by adamax.c and by cffi's
 * cdef() after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for Adamax: exp_avg, exp_inf; step is the `step` state tensor.
 * scalar[0] = -(lr / (1 - beta1^step)) rounded to float, written by rp_adamax_step
 * once per tensor per step; scalar[3] = 1 for a complex param's real view (set
 * when the plan is built: torch negates the grad and adds its weight decay in complex
 * arithmetic, rules.h).
 */

/* The hyperparameters of one param group, as torch's Adamax takes them. */
typedef struct {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    int32_t maximize;
    int32_t lr_f32;     /* lr is a float32 Tensor: torch divides it by the bias correction in float */
    int32_t sqrt_how;   /* Adamax takes no sqrt: ForLoopRule fills these for every for-loop rule */
    void *vml_sqrt;
} rp_adamax_hyper;

/* One Adamax step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_adamax_step(const rp_run_opts *run, const rp_adamax_hyper *hyper, rp_tensor *tensors,
                   int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* rules.h, rp_torch_sqrt: every for-loop rule exports it (roundpipe/optim/_for_loop.py). */
void rp_adamax_torch_sqrt(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n);
