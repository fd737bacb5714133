// qlora_adamw.h: the arithmetic of the AdamW steps (torch, bitsandbytes 32-bit, bitsandbytes 8-bit blockwise),
// written once for the CPU ops (native/cpu/optim.cpp) and the CUDA kernels (native/cuda/optim.cu), so that both
// give the same bits (C ABI and semantics: qlora_optim.h; docs: SPEC-quant.md §9, SPEC-training.md §11).
//
// Every rounding of the reference is spelled out with qlora_float.h's ieee:: operations, the fused operations of
// the references (nvcc fuses bnb's kernels; torch's vectorized lerp uses fmadd) as explicit ieee::fma and no
// others. The per-step scalars are computed on the host by the functions below, with the host's libm, for both
// backends.
#pragma once
#include <math.h>
#include <stdint.h>
#include "qlora_bnb.h"
#include "qlora_float.h"

namespace qlora {
namespace adamw {

// ------------------------------------------------------------------
// torch AdamW (single-tensor CPU path)

struct TorchScalars {
    float decay, w1, b2, w2, neg_step_size, bc2_sqrt, eps;
    bool decays;
};

// bc1 = 1 - beta1^step, bc2 = 1 - beta2^step in double (Python floats), rounded to float32 where torch rounds them
inline TorchScalars torch_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step) {
    const double bc1 = 1.0 - pow(beta1, (double)step);
    const double bc2 = 1.0 - pow(beta2, (double)step);
    volatile double lr_wd = lr * weight_decay;  // never contracted into an fma with the subtraction
    TorchScalars c;
    c.decay = (float)(1.0 - lr_wd);
    c.w1 = (float)(1.0 - beta1);
    c.b2 = (float)beta2;
    c.w2 = (float)(1.0 - beta2);
    c.neg_step_size = (float)(-(lr / bc1));
    c.bc2_sqrt = (float)pow(bc2, 0.5);
    c.eps = (float)eps;
    c.decays = weight_decay != 0.0;
    return c;
}

QLORA_HD QLORA_INLINE void torch_update(float& p, float& m, float& v, float g, const TorchScalars& c) {
    if (c.decays) p = ieee::mul(p, c.decay);
    m = ieee::fma(c.w1, ieee::sub(g, m), m);             // exp_avg.lerp_(grad, 1 - beta1)
    v = ieee::mul(v, c.b2);                              // exp_avg_sq.mul_(beta2)
    v = ieee::add(v, ieee::mul(ieee::mul(c.w2, g), g));  //   .addcmul_(grad, grad, 1 - beta2)
    const float denom = ieee::add(ieee::div(ieee::sqrt(v), c.bc2_sqrt), c.eps);
    p = ieee::add(p, ieee::div(ieee::mul(c.neg_step_size, m), denom));  // addcdiv_
}

// ------------------------------------------------------------------
// bitsandbytes AdamW, 32-bit and 8-bit blockwise states

struct BnbScalars {
    float step_size, correction2, eps, beta1, beta2, one_minus_beta1, one_minus_beta2, decay;
    bool decays;
};

// in float32, as bnb's host code: c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t), step_size = -lr*c2/c1
inline BnbScalars bnb_scalars(float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step) {
    const float correction1 = 1.0f - powf(beta1, (float)step);
    const float correction2 = sqrtf(1.0f - powf(beta2, (float)step));
    BnbScalars c;
    c.step_size = (-lr * correction2) / correction1;
    c.correction2 = correction2;
    c.eps = eps;
    c.beta1 = beta1;
    c.beta2 = beta2;
    c.one_minus_beta1 = 1.0f - beta1;
    c.one_minus_beta2 = 1.0f - beta2;
    c.decay = fmaf(-lr, weight_decay, 1.0f);
    c.decays = weight_decay > 0.0f;
    return c;
}

// kOptimizer32bit2State (ADAM); non-finite gradients propagate, decay AFTER the update
QLORA_HD QLORA_INLINE void bnb32_update(float& p, float& m, float& v, float g, const BnbScalars& c) {
    m = ieee::fma(m, c.beta1, ieee::mul(c.one_minus_beta1, g));
    v = ieee::fma(v, c.beta2, ieee::mul(c.one_minus_beta2, ieee::mul(g, g)));
    p = ieee::fma(c.step_size, ieee::div(m, ieee::fma(c.eps, c.correction2, ieee::sqrt(v))), p);
    if (c.decays) p = ieee::mul(p, c.decay);
}

// kOptimizerStatic8bit2StateBlockwise, in three parts around the block-wide absmax:
// 1. the moments of a finite gradient g from their decoded values (m_code * m_absmax, v_code * v_absmax; the
//    map entries of the stored codes and the block's old scales); m = v = 0 where g is not finite
QLORA_HD QLORA_INLINE void bnb8_moments(float& m, float& v, float g, float m_code, float m_absmax, float v_code,
                                        float v_absmax, const BnbScalars& c) {
    v = ieee::mul(v_code, v_absmax);
    v = ieee::fma(ieee::mul(c.one_minus_beta2, g), g, ieee::mul(v, c.beta2));
    m = ieee::mul(m_code, m_absmax);
    m = ieee::fma(c.one_minus_beta1, g, ieee::mul(m, c.beta1));
}

// 2. bnb's kernel pads the last block with g = 0 and codes 128 / 0: the padding's m is qmap1[128]*absmax1*beta1
//    (5.5e-7 of the old scale) and takes part in the new absmax (max |m|, max |v| over the block)
QLORA_HD QLORA_INLINE void bnb8_pad_absmax(float& absmax1, float& absmax2, float qmap1_128, float old_absmax1,
                                           const BnbScalars& c) {
    const float pad_m = ieee::mul(ieee::mul(qmap1_128, old_absmax1), c.beta1);
    absmax1 = ieee::max(absmax1, ieee::abs(pad_m));
    absmax2 = ieee::max(absmax2, 0.0f);
}

// 3. the parameter (only where g is finite; decay AFTER the update) ...
QLORA_HD QLORA_INLINE float bnb8_param(float p, float m, float v, const BnbScalars& c) {
    p = ieee::fma(c.step_size, ieee::div(m, ieee::fma(c.correction2, c.eps, ieee::sqrt(v))), p);
    if (c.decays) p = ieee::mul(p, c.decay);
    return p;
}

// ... and the new codes of m and v against the new absmax (bnb's quantize_2D), keeping the sign of m: a small
// negative m that rounds to +0.0 (index 127) is stored as 126
QLORA_HD QLORA_INLINE void bnb8_codes(uint8_t& code1, uint8_t& code2, float m, float v, float absmax1, float absmax2,
                                      const float* qmap1, const float* qmap2) {
    uint8_t c1 = bnb::quantize_2d<true>(qmap1, ieee::div(m, absmax1));
    const uint8_t c2 = bnb::quantize_2d<false>(qmap2, ieee::div(v, absmax2));
    if (ieee::sign_bit(qmap1[c1]) != ieee::sign_bit(m)) c1 = (uint8_t)(ieee::gt(m, 0.0f) ? c1 + 1 : c1 - 1);
    code1 = c1;  // stored last: the stores may alias the maps (uint8_t aliases anything)
    code2 = c2;
}

}  // namespace adamw
}  // namespace qlora
