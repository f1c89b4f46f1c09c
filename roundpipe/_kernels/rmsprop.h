/* roundpipe's RMSprop rule: its C interface, read by rmsprop.c and by cffi's cdef()
 * after engine.h (plain declarations only, see there).
 *
 * rp_tensor.state for RMSprop, in this order: square_avg, then momentum_buffer when
 * momentum > 0, then grad_avg when centered (RMSprop._state_keys); step counts steps.
 */

/* The hyperparameters of one param group, as torch.optim.RMSprop takes them. */
typedef struct {
    double lr;
    double alpha;
    double eps;
    double weight_decay;
    double momentum;
    int32_t centered;
    int32_t maximize;
    int32_t lr_f32;      /* lr is a float32 Tensor (ForLoopRule fills it; unused here) */
    int32_t sqrt_how;    /* which sqrt torch's is (rules.h, rp_torch_sqrt) */
    void *vml_sqrt;      /* MKL's vmsSqrt where torch's sqrt is it, else NULL */
} rp_rmsprop_hyper;

/* One RMSprop step over a whole param group. Returns 1 if the step ran, 0 if it
   was skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_rmsprop_step(const rp_run_opts *run, const rp_rmsprop_hyper *hyper, rp_tensor *tensors,
                    int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* torch's float sqrt as the rule computes it (rules.h, rp_torch_sqrt), for
   roundpipe/optim/_for_loop.py to check `how` against torch.sqrt once. */
void rp_rmsprop_torch_sqrt(int32_t how, void *vml_sqrt, const float *a, float *r, int64_t n);
