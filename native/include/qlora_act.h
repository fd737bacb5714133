// qlora_act.h: the element-wise activations, written once for the CPU ops (g++) and the CUDA kernels (nvcc): the
// gated MLP's activations, out = act(gate) * up with their gradients (SwiGLU's silu; Gemma's GELU with the tanh
// approximation, transformers' gelu_pytorch_tanh, torch's gelu(approximate="tanh"), with its derivative as torch's
// backward computes it), and tanh soft-capping of logits (Gemma's final_logit_softcapping).
// fp32 in and out. The kernels build with --use_fast_math, so on the device expf is __expf and tanhf and divisions
// are approximations: well inside bf16's rounding.
#pragma once
#include <math.h>
#include "qlora_float.h"

// the gated MLP's activation: the `act` argument of qlora_cpu_gated_act_* (qlora_ops.h) and qlora_cuda_gated_act_*
// (native/cuda/kernels.h); the addons take its name (src/backend/backend.ts's GatedAct)
enum qlora_gated_act { QLORA_ACT_SILU = 0, QLORA_ACT_GELU_TANH = 1 };

namespace qlora_act {

// sigmoid(x) = 1 / (1 + e^-x)
QLORA_HD QLORA_INLINE float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// silu(x) = x sigmoid(x). The CPU divides by 1 + e^-x (its AVX loop in native/cpu/ops.cpp makes the same
// operations); the kernels multiply by the sigmoid. Each keeps the rounding it has always had.
QLORA_HD QLORA_INLINE float silu(float x) {
#if defined(__CUDA_ARCH__)
    return x * sigmoid(x);
#else
    return x / (1.0f + expf(-x));
#endif
}

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

// the gated activation's forward: act(g) u
template <int Act>
QLORA_HD QLORA_INLINE float gated_forward(float g, float u) {
    if constexpr (Act == QLORA_ACT_SILU)
        return silu(g) * u;
    else
        return gelu_tanh(g) * u;
}

// its gradients for dout d: du = d act(g), dg = d u act'(g), each in the order it has always been computed
// (silu: act'(g) = s (1 + g (1 - s)), s = sigmoid(g), folded into the products)
template <int Act>
QLORA_HD QLORA_INLINE void gated_backward(float d, float g, float u, float& dg, float& du) {
    if constexpr (Act == QLORA_ACT_SILU) {
        const float s = sigmoid(g);
        du = d * g * s;
        dg = d * u * s * (1.0f + g * (1.0f - s));
    } else {
        du = d * gelu_tanh(g);
        dg = d * u * gelu_tanh_grad(g);
    }
}

// soft-capping: cap tanh(z / cap) (Gemma2/3ForCausalLM: logits / cap, tanh, * cap)
QLORA_HD QLORA_INLINE float softcap(float z, float cap) { return tanhf(z / cap) * cap; }

// its derivative from the capped value y: 1 - tanh^2 = 1 - (y / cap)^2
QLORA_HD QLORA_INLINE float softcap_grad(float y, float cap) {
    const float t = y / cap;
    return 1.0f - t * t;
}

}  // namespace qlora_act
