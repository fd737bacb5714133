// qlora_act.h: Gemma's element-wise functions, written once for the CPU ops (g++) and the CUDA kernels (nvcc):
// the tanh approximation of GELU (transformers' gelu_pytorch_tanh, torch's gelu(approximate="tanh")) with its
// derivative as torch's backward computes it, and tanh soft-capping of logits (Gemma's final_logit_softcapping).
// fp32 in and out; on the device tanhf is the --use_fast_math approximation, well inside bf16's rounding.
#pragma once
#include <math.h>
#include "qlora_float.h"

namespace qlora_act {

// sqrt(2 / pi) and the cubic coefficient of torch's tanh GELU (kBeta, kKappa)
constexpr float kGeluBeta = 0.7978845608028654f;
constexpr float kGeluKappa = 0.044715f;

// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
QLORA_HD QLORA_INLINE float gelu_tanh(float x) {
    const float inner = kGeluBeta * (x + kGeluKappa * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}

// d gelu_tanh / dx, in the order of torch's GeluBackward (tanh approximation)
QLORA_HD QLORA_INLINE float gelu_tanh_grad(float x) {
    const float x_sq = x * x;
    const float t = tanhf(kGeluBeta * (x + kGeluKappa * x_sq * x));
    const float left_derivative = 0.5f * (1.0f + t);
    const float right_derivative = 0.5f * x * (1.0f - t * t) * kGeluBeta * (1.0f + 3.0f * kGeluKappa * x_sq);
    return left_derivative + right_derivative;
}

// soft-capping: cap tanh(z / cap) (Gemma2/3ForCausalLM: logits / cap, tanh, * cap)
QLORA_HD QLORA_INLINE float softcap(float z, float cap) { return tanhf(z / cap) * cap; }

// its derivative from the capped value y: 1 - tanh^2 = 1 - (y / cap)^2
QLORA_HD QLORA_INLINE float softcap_grad(float y, float cap) {
    const float t = y / cap;
    return 1.0f - t * t;
}

}  // namespace qlora_act
