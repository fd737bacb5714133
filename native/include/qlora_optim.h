// qlora_optim.h: the optimizer ops: AdamW steps (torch semantics, bitsandbytes 32-bit, bitsandbytes 8-bit
// blockwise), the dynamic 8-bit maps of the 8-bit states, and the reductions of gradient clipping.
// Plain C ABI, outputs (updated in place) first, sizes last, shapes in the comments (docs: SPEC-quant.md §4, §9,
// SPEC-training.md §11).
//
// Arithmetic is float32 with the roundings of the reference spelled out (no contraction into FMA except where
// the reference's compiler fuses, written as an explicit fmaf), so the states are reproducible bit for bit
// across thread counts and machines, and the bnb 8-bit codes and scales equal those of bnb's CUDA kernel.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// torch.optim.AdamW, single-tensor CPU path (transformers `adamw_torch`), one step; `step` counts from 1:
//   p *= fl32(1 - lr*wd)                           (decoupled weight decay FIRST)
//   m = fmaf(fl32(1-beta1), g - m, m)             (exp_avg.lerp_)
//   v = v*fl32(beta2) + (fl32(1-beta2)*g)*g       (exp_avg_sq.mul_().addcmul_())
//   p = p + (fl32(-lr/bc1) * m) / (sqrt(v)/fl32(sqrt(bc2)) + eps)   (addcdiv_)
// with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step in double (Python floats). Scalars are doubles as torch's
// Python scalars are; they are rounded to float32 where torch rounds them.
// param[n], exp_avg[n], exp_avg_sq[n] updated; grad[n]
void qlora_cpu_adamw_torch_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, double lr,
                                double beta1, double beta2, double eps, double weight_decay, int64_t step, int64_t n);

// bitsandbytes 32-bit AdamW (kOptimizer32bit2State, ADAM): the path of `optim_bits=32` and of parameters
// below min_8bit_size. In float32: c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t), step_size = -lr*c2/c1;
//   m = fmaf(m, beta1, (1-beta1)*g);  v = fmaf(v, beta2, (1-beta2)*(g*g))
//   p = fmaf(step_size, m / fmaf(eps, c2, sqrt(v)), p);  then if wd > 0: p *= fmaf(-lr, wd, 1)  (decay AFTER)
// Non-finite gradients propagate (as in bnb's kernel). param[n], state1[n], state2[n] updated; grad[n]
void qlora_cpu_adamw_bnb32_step(float* param, float* state1, float* state2, const float* grad, float lr, float beta1,
                                float beta2, float eps, float weight_decay, int64_t step, int64_t n);

// bitsandbytes 8-bit blockwise AdamW (kOptimizerStatic8bit2StateBlockwise), one step. Per block of
// `blocksize` elements: decode m = qmap1[state1]*absmax1, v = qmap2[state2]*absmax2; update
//   m = fmaf(1-beta1, g, m*beta1);  v = fmaf((1-beta2)*g, g, v*beta2)     (m = v = 0 where g is not finite)
// new absmax = max |m|, max |v| over the block (replacing the stored scales); p = fmaf(step_size,
// m / fmaf(c2, eps, sqrt(v)), p), then if wd > 0: p *= fmaf(-lr, wd, 1) (decay AFTER; skipped where g is not
// finite); re-quantize m/absmax1, v/absmax2 with bnb's binary search (quantize_2D) and its sign fix for m.
// param[n], state1[n] (u8), state2[n] (u8), absmax1[ceil(n/blocksize)], absmax2[ceil(n/blocksize)] updated;
// grad[n], qmap1[256] (signed dynamic map), qmap2[256] (unsigned dynamic map)
void qlora_cpu_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1, float* absmax2,
                               const float* grad, const float* qmap1, const float* qmap2, float lr, float beta1,
                               float beta2, float eps, float weight_decay, int64_t step, int64_t blocksize, int64_t n);

// bnb create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), bit-identical to the float32 map bnb
// builds with torch (torch's CPU linspace computes start + step*i (first half) and end - step*(steps-1-i)
// (second half) with fused multiply-adds). out[256]
void qlora_cpu_optim_dynamic_map(float* out, int is_signed);

// sum of x[i]^2 accumulated in double, in a fixed order that does not depend on the thread count. x[n]
double qlora_cpu_optim_sum_squares(const float* x, int64_t n);

// x[n] *= s (float32), the gradient scaling of clipping
void qlora_cpu_optim_scale(float* x, float s, int64_t n);

#ifdef __cplusplus
}
#endif
