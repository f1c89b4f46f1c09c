/* roundpipe's 8-bit Adam rule (Adam8bit, AdamW8bit): its C interface, read by
 * adam8bit.c and by cffi's cdef() after engine.h (plain declarations only).
 *
 * rp_tensor.state, by the tensor's size (roundpipe/optim/adam8bit.py):
 *  - 8-bit (state_dtype[0] == RP_U8): exp_avg_code (uint8, numel), exp_avg_absmax
 *    (fp32, one per block), exp_avg_sq_code, exp_avg_sq_absmax; the format is
 *    quant8.h's;
 *  - under min_8bit_size elements: exp_avg and exp_avg_sq in fp32, stepped as
 *    roundpipe's Adam steps them (bit-identical to torch's fused fp32 step).
 * step is the `step` state tensor; scalar[0], scalar[1] as in adam.h.
 */

typedef struct {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    int64_t block_size;               /* elements per absmax: a multiple of 16 dividing
                                         the engine's chunk (16384), so chunks hold whole blocks */
    int32_t maximize;
    int32_t decoupled_weight_decay;   /* AdamW8bit */
} rp_adam8bit_hyper;

/* One step over a whole param group. Returns 1 if the step ran, 0 if it was
   skipped because *run->found_inf is non-zero (nothing is touched then). */
int rp_adam8bit_step(const rp_run_opts *run, const rp_adam8bit_hyper *hyper, rp_tensor *tensors,
                     int64_t n_tensors, const rp_chunk *chunks, int64_t n_chunks);

/* The codec alone, for the torch fallback's tests and scripts/q8_bench.py:
   encode x[0..n) in blocks of block_size into codes and absmax (sq: exp_avg_sq's
   code), or decode them into x. */
void rp_q8_encode_blocks(const float *x, int64_t n, int64_t block_size, int32_t sq,
                         uint8_t *codes, float *absmax);
void rp_q8_decode_blocks(float *x, int64_t n, int64_t block_size, int32_t sq,
                         const uint8_t *codes, const float *absmax);
