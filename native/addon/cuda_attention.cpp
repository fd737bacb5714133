// cuda_attention.cpp: bindings of the CUDA attention ops (native/cuda/attention.h). The arguments are those of
// the CPU ops (attentionForward / attentionBackward) in the same order, with device addresses instead of typed
// arrays: bf16 q/k/v/out/dout/dq/dk/dv, f32 lse, u8 keyValid and i32 seg (0 or null: none; lse of the forward
// too).
#include "cuda_bindings.h"
#include "napi_util.h"
#include "../cuda/attention.h"
#include "../cuda/runtime.h"

using namespace qlora_napi;

namespace {

// reads device addresses info[first .. first + n) into out, stopping at the first bad one (one pending exception)
bool device_ptrs(const Napi::CallbackInfo& info, size_t first, size_t n, const bool* nullable, void** out) {
    for (size_t i = 0; i < n; i++) {
        out[i] = device_ptr_arg(info, first + i, nullable[i]);
        if (info.Env().IsExceptionPending()) return false;
    }
    return true;
}

// reads the sizes B, T, S, Hq, Hkv, D, q_offset at info[first ..] and scale after them
bool sizes(const Napi::CallbackInfo& info, size_t first, int64_t* s, float* scale) {
    for (size_t i = 0; i < 7; i++) {
        s[i] = int_arg(info, first + i);
        if (info.Env().IsExceptionPending()) return false;
    }
    *scale = (float)num_arg(info, first + 7);
    return !info.Env().IsExceptionPending();
}

// the optional sliding window at info[i] (absent or undefined: 0, none); a negative one is a RangeError
int64_t window_arg(const Napi::CallbackInfo& info, size_t i) {
    // (written as `Length() > i` so test/helpers/native-ops.ts reads the argument as optional)
    if (!(info.Length() > i) || info[i].IsUndefined()) return 0;
    const int64_t w = int_arg(info, i);
    if (!info.Env().IsExceptionPending() && w < 0)
        Napi::RangeError::New(info.Env(), "attention: window must be >= 0 (0: no sliding window)")
            .ThrowAsJavaScriptException();
    return w;
}

bool check(const Napi::CallbackInfo& info, const char* op, const void* const* ptrs, int n, bool seg, const int64_t* s) {
    const char* why = qlora_cuda_attention_check(ptrs, n, seg ? 1 : 0, s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    if (!why) return true;
    Napi::RangeError::New(info.Env(), std::string(op) + ": " + why).ThrowAsJavaScriptException();
    return false;
}

// attentionForward(out, lse|0, q, k, v, keyValid|0, seg|0, B, T, S, Hq, Hkv, D, qOffset, scale[, qOffsets|0
//                  [, blockTable|0, tableStride[, window]]])
Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    static const bool nullable[7] = {false, true, false, false, false, true, true};
    void* p[7];
    int64_t s[7];
    float scale = 0.0f;
    if (info.Length() < 15) {
        Napi::TypeError::New(env, "attentionForward: expected 15 arguments").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    if (!device_ptrs(info, 0, 7, nullable, p) || !sizes(info, 7, s, &scale)) return env.Undefined();
    const void* bf16_ptrs[4] = {p[0], p[2], p[3], p[4]};
    if (!check(info, "attentionForward", bf16_ptrs, 4, p[6] != nullptr, s)) return env.Undefined();
    const int32_t* qOffsets =
        info.Length() > 15 ? static_cast<const int32_t*>(device_ptr_arg(info, 15, true)) : nullptr;
    const int32_t* blockTable =
        info.Length() > 16 ? static_cast<const int32_t*>(device_ptr_arg(info, 16, true)) : nullptr;
    const int64_t tableStride = blockTable && info.Length() > 17 ? int_arg(info, 17) : 0;
    const int64_t window = window_arg(info, 18);
    QLORA_CHECK_ARGS(env);
    if ((qOffsets || blockTable) && p[6]) {
        Napi::RangeError::New(env, "attentionForward: per-row offsets and block tables cannot be combined with seg")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    if (blockTable && (tableStride < 1 || s[2] > tableStride * QLORA_CUDA_KV_BLOCK)) {
        Napi::RangeError::New(env, "attentionForward: a block table needs 1 <= tableStride and S <= tableStride * " +
                                       std::to_string(QLORA_CUDA_KV_BLOCK))
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cuda_throw(
        env,
        qlora_cuda_attention_forward(static_cast<__nv_bfloat16*>(p[0]), static_cast<float*>(p[1]),
                                     static_cast<const __nv_bfloat16*>(p[2]), static_cast<const __nv_bfloat16*>(p[3]),
                                     static_cast<const __nv_bfloat16*>(p[4]), static_cast<const uint8_t*>(p[5]),
                                     static_cast<const int32_t*>(p[6]), qOffsets, blockTable, tableStride, s[0], s[1],
                                     s[2], s[3], s[4], s[5], s[6], scale, window, qlora_cuda::stream()),
        "attentionForward");
    return env.Undefined();
}

// attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, keyValid|0, seg|0, B, T, S, Hq, Hkv, D, qOffset, scale
//                   [, window])
Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    static const bool nullable[11] = {false, false, false, false, false, false, false, false, false, true, true};
    void* p[11];
    int64_t s[7];
    float scale = 0.0f;
    if (info.Length() < 19) {
        Napi::TypeError::New(env, "attentionBackward: expected 19 arguments").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    if (!device_ptrs(info, 0, 11, nullable, p) || !sizes(info, 11, s, &scale)) return env.Undefined();
    const void* bf16_ptrs[8] = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    if (!check(info, "attentionBackward", bf16_ptrs, 8, p[10] != nullptr, s)) return env.Undefined();
    const int64_t window = window_arg(info, 19);
    QLORA_CHECK_ARGS(env);
    cuda_throw(
        env,
        qlora_cuda_attention_backward(static_cast<__nv_bfloat16*>(p[0]), static_cast<__nv_bfloat16*>(p[1]),
                                      static_cast<__nv_bfloat16*>(p[2]), static_cast<const __nv_bfloat16*>(p[3]),
                                      static_cast<const __nv_bfloat16*>(p[4]), static_cast<const __nv_bfloat16*>(p[5]),
                                      static_cast<const __nv_bfloat16*>(p[6]), static_cast<const __nv_bfloat16*>(p[7]),
                                      static_cast<const float*>(p[8]), static_cast<const uint8_t*>(p[9]),
                                      static_cast<const int32_t*>(p[10]), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                                      scale, window, qlora_cuda::stream()),
        "attentionBackward");
    return env.Undefined();
}

// attentionSupportsHeadDim(D) -> boolean
Napi::Value AttentionSupportsHeadDim(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t D = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    return Napi::Boolean::New(env, qlora_cuda_attention_supports_head_dim(D) != 0);
}

}  // namespace

void register_cuda_attention(Napi::Env env, Napi::Object exports) {
    exports.Set("attentionForward", Napi::Function::New(env, AttentionForward, "attentionForward"));
    exports.Set("attentionBackward", Napi::Function::New(env, AttentionBackward, "attentionBackward"));
    exports.Set("attentionSupportsHeadDim",
                Napi::Function::New(env, AttentionSupportsHeadDim, "attentionSupportsHeadDim"));
}
