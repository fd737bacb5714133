// cuda_kernels.cpp: bindings of the CUDA kernels (native/cuda/kernels.h) and of the device optimizer
// (native/cuda/optim.h). Buffers are device addresses (numbers); sizes are element counts; outputs first, sizes
// last. Every op is queued on qlora_cuda::stream() and returns at once; a launch error throws, naming the op.
// The TypeScript mirror is src/backend/cuda-kernels-types.ts.
#include <limits.h>
#include <string>
#include <vector>
#include "cuda_bindings.h"
#include "napi_util.h"
#include "../cuda/kernels.h"
#include "../cuda/optim.h"
#include "../cuda/runtime.h"

using namespace qlora_napi;

namespace {

inline cudaStream_t S() { return qlora_cuda::stream(); }

template <typename T>
inline T* dev(const Napi::CallbackInfo& info, size_t i, bool nullable = false) {
    return static_cast<T*>(device_ptr_arg(info, i, nullable));
}

inline float f32_arg(const Napi::CallbackInfo& info, size_t i) { return (float)num_arg(info, i); }

// an optional trailing argument: absent or undefined gives `fallback`
inline bool has_arg(const Napi::CallbackInfo& info, size_t i) {
    return info.Length() > i && !info[i].IsUndefined() && !info[i].IsNull();
}

// throws a RangeError naming the op when a size is negative
inline bool check_sizes(Napi::Env env, const char* op, std::initializer_list<int64_t> sizes) {
    for (int64_t s : sizes)
        if (s < 0) {
            Napi::RangeError::New(env, std::string(op) + ": sizes must be >= 0").ThrowAsJavaScriptException();
            return false;
        }
    return true;
}

// throws a RangeError naming the op unless the optimizer step counts from 1
inline bool check_step(Napi::Env env, const char* op, int64_t step) {
    if (step >= 1) return true;
    Napi::RangeError::New(env, std::string(op) + ": step counts from 1, got " + std::to_string(step))
        .ThrowAsJavaScriptException();
    return false;
}

// runs a launcher's error through cuda_throw; returns undefined
inline Napi::Value done(Napi::Env env, cudaError_t err, const char* op) {
    cuda_throw(env, err, op);
    return env.Undefined();
}

// ------------------------------------------------------------------
// conversions and elementwise: (out, inp, n)

template <typename O, typename I, cudaError_t (*F)(O*, const I*, int64_t, cudaStream_t)>
Napi::Value Unary(const Napi::CallbackInfo& info, const char* op) {
    Napi::Env env = info.Env();
    O* out = dev<O>(info, 0);
    const I* inp = dev<const I>(info, 1);
    int64_t n = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, op, {n})) return env.Undefined();
    return done(env, F(out, inp, n, S()), op);
}

Napi::Value Bf16ToF32(const Napi::CallbackInfo& info) {
    return Unary<float, uint16_t, qlora_cuda_bf16_to_f32>(info, "bf16ToF32");
}
Napi::Value F16ToF32(const Napi::CallbackInfo& info) {
    return Unary<float, uint16_t, qlora_cuda_f16_to_f32>(info, "f16ToF32");
}
Napi::Value F32ToBf16(const Napi::CallbackInfo& info) {
    return Unary<uint16_t, float, qlora_cuda_f32_to_bf16>(info, "f32ToBf16");
}
Napi::Value F32ToF16(const Napi::CallbackInfo& info) {
    return Unary<uint16_t, float, qlora_cuda_f32_to_f16>(info, "f32ToF16");
}
Napi::Value AddInplace(const Napi::CallbackInfo& info) {
    return Unary<float, float, qlora_cuda_add_f32>(info, "addInplace");
}
Napi::Value AddInplaceBf16(const Napi::CallbackInfo& info) {
    return Unary<uint16_t, uint16_t, qlora_cuda_add_bf16>(info, "addInplaceBf16");
}

// (x, scalar, n)
template <typename T, cudaError_t (*F)(T*, float, int64_t, cudaStream_t)>
Napi::Value WithScalar(const Napi::CallbackInfo& info, const char* op) {
    Napi::Env env = info.Env();
    T* x = dev<T>(info, 0);
    float s = f32_arg(info, 1);
    int64_t n = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, op, {n})) return env.Undefined();
    return done(env, F(x, s, n, S()), op);
}

Napi::Value FillF32(const Napi::CallbackInfo& info) { return WithScalar<float, qlora_cuda_fill_f32>(info, "fillF32"); }
Napi::Value FillBf16(const Napi::CallbackInfo& info) {
    return WithScalar<uint16_t, qlora_cuda_fill_bf16>(info, "fillBf16");
}
Napi::Value ScaleF32(const Napi::CallbackInfo& info) {
    return WithScalar<float, qlora_cuda_scale_f32>(info, "scaleF32");
}
Napi::Value ScaleBf16(const Napi::CallbackInfo& info) {
    return WithScalar<uint16_t, qlora_cuda_scale_bf16>(info, "scaleBf16");
}
Napi::Value SoftcapF32(const Napi::CallbackInfo& info) {
    return WithScalar<float, qlora_cuda_softcap_f32>(info, "softcapF32");
}
Napi::Value SoftcapBf16(const Napi::CallbackInfo& info) {
    return WithScalar<uint16_t, qlora_cuda_softcap_bf16>(info, "softcapBf16");
}
Napi::Value OptimScale(const Napi::CallbackInfo& info) {
    return WithScalar<float, qlora_cuda_optim_scale>(info, "optimScale");
}

// axpy(y, alpha, x, n)
Napi::Value Axpy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* y = dev<float>(info, 0);
    float alpha = f32_arg(info, 1);
    const float* x = dev<const float>(info, 2);
    int64_t n = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "axpy", {n})) return env.Undefined();
    return done(env, qlora_cuda_axpy_f32(y, alpha, x, n, S()), "axpy");
}

// castAdd(y: f32, x: bf16, alpha, n)
Napi::Value CastAdd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* y = dev<float>(info, 0);
    const uint16_t* x = dev<const uint16_t>(info, 1);
    float alpha = f32_arg(info, 2);
    int64_t n = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "castAdd", {n})) return env.Undefined();
    return done(env, qlora_cuda_cast_add_bf16_f32(y, x, alpha, n, S()), "castAdd");
}

// ------------------------------------------------------------------
// embedding

// embeddingForward(out, bad|null, ids, table, N, V, C)
Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* out = dev<uint16_t>(info, 0);
    int32_t* bad = dev<int32_t>(info, 1, true);
    const int32_t* ids = dev<const int32_t>(info, 2);
    const uint16_t* table = dev<const uint16_t>(info, 3);
    int64_t N = int_arg(info, 4), V = int_arg(info, 5), C = int_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "embeddingForward", {N, V, C})) return env.Undefined();
    return done(env, qlora_cuda_embedding_forward(out, bad, ids, table, N, V, C, S()), "embeddingForward");
}

// cacheWrite(cache, x, pasts, B, T, capacity, rowElems[, table|0, tableStride, block]): bf16 cache rows at
// device-held lengths, contiguous or paged
Napi::Value CacheWrite(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* cache = dev<uint16_t>(info, 0);
    const uint16_t* x = dev<const uint16_t>(info, 1);
    const int32_t* pasts = dev<const int32_t>(info, 2);
    int64_t B = int_arg(info, 3), T = int_arg(info, 4), capacity = int_arg(info, 5), rowElems = int_arg(info, 6);
    const int32_t* table = info.Length() > 7 ? dev<const int32_t>(info, 7, true) : nullptr;
    const int64_t tableStride = table && info.Length() > 8 ? int_arg(info, 8) : 0;
    const int64_t block = table && info.Length() > 9 ? int_arg(info, 9) : 0;
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "cacheWrite", {B, T, capacity, rowElems, tableStride, block})) return env.Undefined();
    return done(env, qlora_cuda_cache_write(cache, x, pasts, table, tableStride, block, B, T, capacity, rowElems, S()),
                "cacheWrite");
}

// embeddingBackward(dtable, dout, ids, N, V, C)
Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* dtable = dev<float>(info, 0);
    const uint16_t* dout = dev<const uint16_t>(info, 1);
    const int32_t* ids = dev<const int32_t>(info, 2);
    int64_t N = int_arg(info, 3), V = int_arg(info, 4), C = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "embeddingBackward", {N, V, C})) return env.Undefined();
    return done(env, qlora_cuda_embedding_backward(dtable, dout, ids, N, V, C, S()), "embeddingBackward");
}

// ------------------------------------------------------------------
// RMSNorm

// rmsnormForward(out, rstd|null, inp, weight, N, C, eps)
Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* out = dev<uint16_t>(info, 0);
    float* rstd = dev<float>(info, 1, true);
    const uint16_t* inp = dev<const uint16_t>(info, 2);
    const uint16_t* weight = dev<const uint16_t>(info, 3);
    int64_t N = int_arg(info, 4), C = int_arg(info, 5);
    float eps = f32_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "rmsnormForward", {N, C})) return env.Undefined();
    return done(env, qlora_cuda_rmsnorm_forward(out, rstd, inp, weight, N, C, eps, S()), "rmsnormForward");
}

// residualRmsnormForward(h, out, rstd|null, x, y, weight, N, C, eps)
Napi::Value ResidualRmsnormForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* h = dev<uint16_t>(info, 0);
    uint16_t* out = dev<uint16_t>(info, 1);
    float* rstd = dev<float>(info, 2, true);
    const uint16_t* x = dev<const uint16_t>(info, 3);
    const uint16_t* y = dev<const uint16_t>(info, 4);
    const uint16_t* weight = dev<const uint16_t>(info, 5);
    int64_t N = int_arg(info, 6), C = int_arg(info, 7);
    float eps = f32_arg(info, 8);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "residualRmsnormForward", {N, C})) return env.Undefined();
    return done(env, qlora_cuda_residual_rmsnorm_forward(h, out, rstd, x, y, weight, N, C, eps, S()),
                "residualRmsnormForward");
}

// rmsnormBackward(dinp, dweight|null, dout, inp, weight, rstd, N, C, accumulate = false)
Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* dinp = dev<uint16_t>(info, 0);
    float* dweight = dev<float>(info, 1, true);
    const uint16_t* dout = dev<const uint16_t>(info, 2);
    const uint16_t* inp = dev<const uint16_t>(info, 3);
    const uint16_t* weight = dev<const uint16_t>(info, 4);
    const float* rstd = dev<const float>(info, 5);
    int64_t N = int_arg(info, 6), C = int_arg(info, 7);
    bool accumulate = has_arg(info, 8) && bool_arg(info, 8);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "rmsnormBackward", {N, C})) return env.Undefined();
    return done(env, qlora_cuda_rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C, accumulate ? 1 : 0, S()),
                "rmsnormBackward");
}

// ------------------------------------------------------------------
// RoPE: (out, inp, pos, invFreq, attentionScaling, N, H, D, rowStride = H*D, rotary = D)

template <cudaError_t (*F)(uint16_t*, const uint16_t*, const int32_t*, const float*, float, int64_t, int64_t, int64_t,
                           int64_t, int64_t, cudaStream_t)>
Napi::Value Rope(const Napi::CallbackInfo& info, const char* op) {
    Napi::Env env = info.Env();
    uint16_t* out = dev<uint16_t>(info, 0);
    const uint16_t* inp = dev<const uint16_t>(info, 1);
    const int32_t* pos = dev<const int32_t>(info, 2);
    const float* inv_freq = dev<const float>(info, 3);
    float scaling = f32_arg(info, 4);
    int64_t N = int_arg(info, 5), H = int_arg(info, 6), D = int_arg(info, 7);
    int64_t stride = has_arg(info, 8) ? int_arg(info, 8) : H * D;
    int64_t rotary = has_arg(info, 9) ? int_arg(info, 9) : D;
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, op, {N, H, D})) return env.Undefined();
    if (D % 2 != 0 || D > 2048 || (N > 0 && stride < H * D) || rotary % 2 != 0 || rotary < 2 || rotary > D) {
        Napi::RangeError::New(env,
                              std::string(op) + ": D must be even and <= 2048, rowStride >= H*D, rotary even in [2, D]")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    return done(env, F(out, inp, pos, inv_freq, scaling, N, H, D, stride, rotary, S()), op);
}

Napi::Value RopeForward(const Napi::CallbackInfo& info) { return Rope<qlora_cuda_rope_forward>(info, "ropeForward"); }
Napi::Value RopeBackward(const Napi::CallbackInfo& info) {
    return Rope<qlora_cuda_rope_backward>(info, "ropeBackward");
}

// ropeCacheWrite(q, k, cacheK, cacheV, v, pos, invFreq, attentionScaling, pasts, B, T, Hq, Hkv, D, capacity
// [, table|0, tableStride, block, rotary = D]): ropeForward of q and k in place, then cacheWrite of k and v, in one
// launch
Napi::Value RopeCacheWrite(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* q = dev<uint16_t>(info, 0);
    uint16_t* k = dev<uint16_t>(info, 1);
    uint16_t* cacheK = dev<uint16_t>(info, 2);
    uint16_t* cacheV = dev<uint16_t>(info, 3);
    const uint16_t* v = dev<const uint16_t>(info, 4);
    const int32_t* pos = dev<const int32_t>(info, 5);
    const float* inv_freq = dev<const float>(info, 6);
    float scaling = f32_arg(info, 7);
    const int32_t* pasts = dev<const int32_t>(info, 8);
    int64_t B = int_arg(info, 9), T = int_arg(info, 10), Hq = int_arg(info, 11), Hkv = int_arg(info, 12),
            D = int_arg(info, 13), capacity = int_arg(info, 14);
    const int32_t* table = info.Length() > 15 ? dev<const int32_t>(info, 15, true) : nullptr;
    const int64_t tableStride = table && info.Length() > 16 ? int_arg(info, 16) : 0;
    const int64_t block = table && info.Length() > 17 ? int_arg(info, 17) : 0;
    const int64_t rotary = has_arg(info, 18) ? int_arg(info, 18) : D;
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "ropeCacheWrite", {B, T, Hq, Hkv, D, capacity, tableStride, block})) return env.Undefined();
    if (D % 2 != 0 || D > 2048 || rotary % 2 != 0 || rotary < 2 || rotary > D) {
        Napi::RangeError::New(env, "ropeCacheWrite: D must be even and <= 2048, rotary even in [2, D]")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    return done(env,
                qlora_cuda_rope_cache_write(q, k, cacheK, cacheV, v, pos, inv_freq, scaling, pasts, table, tableStride,
                                            block, B, T, Hq, Hkv, D, capacity, rotary, S()),
                "ropeCacheWrite");
}

// copyColumns(dst, dstCols, dstOffset, src, srcCols, srcOffset, M, n)
Napi::Value CopyColumns(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* dst = dev<uint16_t>(info, 0);
    int64_t dstCols = int_arg(info, 1), dstOffset = int_arg(info, 2);
    const uint16_t* src = dev<const uint16_t>(info, 3);
    int64_t srcCols = int_arg(info, 4), srcOffset = int_arg(info, 5), M = int_arg(info, 6), n = int_arg(info, 7);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "copyColumns", {dstCols, dstOffset, srcCols, srcOffset, M, n})) return env.Undefined();
    return done(env, qlora_cuda_copy_columns(dst, dstCols, dstOffset, src, srcCols, srcOffset, M, n, S()),
                "copyColumns");
}

// ------------------------------------------------------------------
// the gated MLP's activation

// gatedActForward(out, gate, up, n, act): out = act(gate) * up
Napi::Value GatedActForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* out = dev<uint16_t>(info, 0);
    const uint16_t* gate = dev<const uint16_t>(info, 1);
    const uint16_t* up = dev<const uint16_t>(info, 2);
    int64_t n = int_arg(info, 3);
    int act = gated_act_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "gatedActForward", {n})) return env.Undefined();
    return done(env, qlora_cuda_gated_act_forward(out, gate, up, n, act, S()), "gatedActForward");
}

// gatedActBackward(dgate, dup, dout, gate, up, n, act)
Napi::Value GatedActBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* dgate = dev<uint16_t>(info, 0);
    uint16_t* dup = dev<uint16_t>(info, 1);
    const uint16_t* dout = dev<const uint16_t>(info, 2);
    const uint16_t* gate = dev<const uint16_t>(info, 3);
    const uint16_t* up = dev<const uint16_t>(info, 4);
    int64_t n = int_arg(info, 5);
    int act = gated_act_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "gatedActBackward", {n})) return env.Undefined();
    return done(env, qlora_cuda_gated_act_backward(dgate, dup, dout, gate, up, n, act, S()), "gatedActBackward");
}

// an optional trailing soft cap (0 when absent: none); written as `Length() > i` so test/helpers/native-ops.ts reads
// the argument as optional
float softcap_arg(const Napi::CallbackInfo& info, size_t i) {
    if (!(info.Length() > i) || info[i].IsUndefined()) return 0.0f;
    const float cap = f32_arg(info, i);
    if (!info.Env().IsExceptionPending() && !(cap >= 0.0f))
        Napi::RangeError::New(info.Env(), "crossEntropy: softcap must be >= 0 (0: none)").ThrowAsJavaScriptException();
    return cap;
}

// ------------------------------------------------------------------
// cross-entropy

// pickTokensF32(x, R, V, params, entries|null, E, out, bad)
Napi::Value PickTokensF32(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* x = dev<float>(info, 0);
    int64_t R = int_arg(info, 1), V = int_arg(info, 2);
    const int32_t* params = dev<const int32_t>(info, 3);
    const int32_t* entries = dev<const int32_t>(info, 4, true);
    int64_t E = int_arg(info, 5);
    int32_t* out = dev<int32_t>(info, 6);
    int32_t* bad = dev<int32_t>(info, 7);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "pickTokensF32", {R, V, E})) return env.Undefined();
    return done(env, qlora_cuda_pick_tokens_f32(x, R, V, params, entries, E, out, bad, S()), "pickTokensF32");
}

// crossEntropyForward(loss, lse|null, count|null, logits, targets, N, V)
Napi::Value CrossEntropyForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* loss = dev<float>(info, 0);
    float* lse = dev<float>(info, 1, true);
    int32_t* count = dev<int32_t>(info, 2, true);
    const uint16_t* logits = dev<const uint16_t>(info, 3);
    const int32_t* targets = dev<const int32_t>(info, 4);
    int64_t N = int_arg(info, 5), V = int_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "crossEntropyForward", {N, V})) return env.Undefined();
    return done(env, qlora_cuda_cross_entropy_forward(loss, lse, count, logits, targets, N, V, S()),
                "crossEntropyForward");
}

// crossEntropyBackward(dlogits, logits, lse, targets, dlossScale, N, V, softcap?)
Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint16_t* dlogits = dev<uint16_t>(info, 0);
    const uint16_t* logits = dev<const uint16_t>(info, 1);
    const float* lse = dev<const float>(info, 2);
    const int32_t* targets = dev<const int32_t>(info, 3);
    float scale = f32_arg(info, 4);
    int64_t N = int_arg(info, 5), V = int_arg(info, 6);
    const float softcap = softcap_arg(info, 7);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "crossEntropyBackward", {N, V})) return env.Undefined();
    return done(env, qlora_cuda_cross_entropy_backward(dlogits, logits, lse, targets, scale, N, V, softcap, S()),
                "crossEntropyBackward");
}

// crossEntropyFused(loss, lse|null, count|null, logits (in: logits, out: dlogits), targets, dlossScale, N, V, softcap?)
Napi::Value CrossEntropyFused(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* loss = dev<float>(info, 0);
    float* lse = dev<float>(info, 1, true);
    int32_t* count = dev<int32_t>(info, 2, true);
    uint16_t* logits = dev<uint16_t>(info, 3);
    const int32_t* targets = dev<const int32_t>(info, 4);
    float scale = f32_arg(info, 5);
    int64_t N = int_arg(info, 6), V = int_arg(info, 7);
    const float softcap = softcap_arg(info, 8);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "crossEntropyFused", {N, V})) return env.Undefined();
    return done(env, qlora_cuda_cross_entropy_fused(loss, lse, count, logits, targets, scale, N, V, softcap, S()),
                "crossEntropyFused");
}

// ------------------------------------------------------------------
// optimizer

// adamwTorchStep(param, expAvg, expAvgSq, grad, lr, beta1, beta2, eps, weightDecay, step, n)
Napi::Value AdamwTorchStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* param = dev<float>(info, 0);
    float* m = dev<float>(info, 1);
    float* v = dev<float>(info, 2);
    const float* grad = dev<const float>(info, 3);
    double lr = num_arg(info, 4), beta1 = num_arg(info, 5), beta2 = num_arg(info, 6), eps = num_arg(info, 7);
    double wd = num_arg(info, 8);
    int64_t step = int_arg(info, 9), n = int_arg(info, 10);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "adamwTorchStep", {n}) || !check_step(env, "adamwTorchStep", step)) return env.Undefined();
    return done(env, qlora_cuda_adamw_torch_step(param, m, v, grad, lr, beta1, beta2, eps, wd, step, n, S()),
                "adamwTorchStep");
}

// adamwBnb32Step(param, state1, state2, grad, lr, beta1, beta2, eps, weightDecay, step, n)
Napi::Value AdamwBnb32Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* param = dev<float>(info, 0);
    float* s1 = dev<float>(info, 1);
    float* s2 = dev<float>(info, 2);
    const float* grad = dev<const float>(info, 3);
    float lr = f32_arg(info, 4), beta1 = f32_arg(info, 5), beta2 = f32_arg(info, 6);
    float eps = f32_arg(info, 7), wd = f32_arg(info, 8);
    int64_t step = int_arg(info, 9), n = int_arg(info, 10);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "adamwBnb32Step", {n}) || !check_step(env, "adamwBnb32Step", step)) return env.Undefined();
    return done(env, qlora_cuda_adamw_bnb32_step(param, s1, s2, grad, lr, beta1, beta2, eps, wd, step, n, S()),
                "adamwBnb32Step");
}

// adamwBnb8Step(param, state1, state2, absmax1, absmax2, grad, qmap1, qmap2, lr, beta1, beta2, eps, weightDecay,
//               step, blocksize, n)
Napi::Value AdamwBnb8Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float* param = dev<float>(info, 0);
    uint8_t* s1 = dev<uint8_t>(info, 1);
    uint8_t* s2 = dev<uint8_t>(info, 2);
    float* absmax1 = dev<float>(info, 3);
    float* absmax2 = dev<float>(info, 4);
    const float* grad = dev<const float>(info, 5);
    const float* qmap1 = dev<const float>(info, 6);
    const float* qmap2 = dev<const float>(info, 7);
    float lr = f32_arg(info, 8), beta1 = f32_arg(info, 9), beta2 = f32_arg(info, 10);
    float eps = f32_arg(info, 11), wd = f32_arg(info, 12);
    int64_t step = int_arg(info, 13), blocksize = int_arg(info, 14), n = int_arg(info, 15);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "adamwBnb8Step", {n}) || !check_step(env, "adamwBnb8Step", step)) return env.Undefined();
    if (blocksize < 1 || blocksize > 2048) {
        Napi::RangeError::New(env, "adamwBnb8Step: blocksize must be in [1, 2048]").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    return done(env,
                qlora_cuda_adamw_bnb8_step(param, s1, s2, absmax1, absmax2, grad, qmap1, qmap2, lr, beta1, beta2, eps,
                                           wd, step, blocksize, n, S()),
                "adamwBnb8Step");
}

// reads a JS array of device addresses and one of lengths (same length)
bool buffer_lists(const Napi::CallbackInfo& info, size_t i_ptrs, size_t i_lens, const char* op,
                  std::vector<float*>& ptrs, std::vector<int64_t>& lens) {
    Napi::Env env = info.Env();
    if (!info[i_ptrs].IsArray() || !info[i_lens].IsArray()) {
        Napi::TypeError::New(env, std::string(op) + ": expected an array of device buffers and an array of lengths")
            .ThrowAsJavaScriptException();
        return false;
    }
    Napi::Array a = info[i_ptrs].As<Napi::Array>(), l = info[i_lens].As<Napi::Array>();
    if (a.Length() != l.Length() || a.Length() > (uint32_t)INT_MAX) {
        Napi::RangeError::New(env, std::string(op) + ": buffers and lengths differ in length")
            .ThrowAsJavaScriptException();
        return false;
    }
    for (uint32_t k = 0; k < a.Length(); k++) {
        Napi::Value p = a.Get(k), n = l.Get(k);
        if (!p.IsNumber() || !n.IsNumber() || p.As<Napi::Number>().DoubleValue() <= 0 ||
            n.As<Napi::Number>().Int64Value() < 0) {
            Napi::TypeError::New(
                env, std::string(op) + ": entry " + std::to_string(k) + " is not a device buffer with a length >= 0")
                .ThrowAsJavaScriptException();
            return false;
        }
        ptrs.push_back(reinterpret_cast<float*>(static_cast<uintptr_t>(p.As<Napi::Number>().DoubleValue())));
        lens.push_back(n.As<Napi::Number>().Int64Value());
    }
    return true;
}

// optimSumSquares(out: f64 device address, buffers: number[], lengths: number[], accumulate = false)
Napi::Value OptimSumSquares(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    double* out = dev<double>(info, 0);
    QLORA_CHECK_ARGS(env);
    std::vector<float*> ptrs;
    std::vector<int64_t> lens;
    if (!buffer_lists(info, 1, 2, "optimSumSquares", ptrs, lens)) return env.Undefined();
    bool accumulate = has_arg(info, 3) && bool_arg(info, 3);
    return done(env,
                qlora_cuda_optim_sum_squares(out, ptrs.data(), lens.data(), (int)ptrs.size(), accumulate ? 1 : 0, S()),
                "optimSumSquares");
}

// optimClipScale(buffers: number[], lengths: number[], sumSquares: f64 device address, maxNorm)
Napi::Value OptimClipScale(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<float*> ptrs;
    std::vector<int64_t> lens;
    if (!buffer_lists(info, 0, 1, "optimClipScale", ptrs, lens)) return env.Undefined();
    const double* sumsq = dev<const double>(info, 2);
    double max_norm = num_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    return done(env, qlora_cuda_optim_clip_scale(ptrs.data(), lens.data(), (int)ptrs.size(), sumsq, max_norm, S()),
                "optimClipScale");
}

// allocPagedState(bytes) -> address (unified memory, preferred on the device)
Napi::Value AllocPagedState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t bytes = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "allocPagedState", {bytes})) return env.Undefined();
    void* p = nullptr;
    cudaError_t err = qlora_cuda_alloc_paged(&p, (size_t)bytes);
    if (err != cudaSuccess) {
        cudaGetLastError();
        Napi::Error::New(env, "allocPagedState: could not allocate " + std::to_string(bytes) +
                                  " bytes of unified memory: " + cudaGetErrorString(err))
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    return Napi::Number::New(env, (double)reinterpret_cast<uintptr_t>(p));
}

// freePagedState(address)
Napi::Value FreePagedState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    void* p = device_ptr_arg(info, 0, true);
    QLORA_CHECK_ARGS(env);
    return done(env, qlora_cuda_free_paged(p), "freePagedState");
}

// prefetchState(address, bytes, toDevice)
Napi::Value PrefetchState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    void* p = device_ptr_arg(info, 0);
    int64_t bytes = int_arg(info, 1);
    bool to_device = bool_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    if (!check_sizes(env, "prefetchState", {bytes})) return env.Undefined();
    return done(env, qlora_cuda_prefetch_paged(p, (size_t)bytes, to_device ? 1 : 0, S()), "prefetchState");
}

}  // namespace

void register_cuda_kernels(Napi::Env env, Napi::Object exports) {
    auto fn = [&](const char* name, Napi::Function::Callback cb) {
        exports.Set(name, Napi::Function::New(env, cb, name));
    };
    fn("bf16ToF32", Bf16ToF32);
    fn("f16ToF32", F16ToF32);
    fn("f32ToBf16", F32ToBf16);
    fn("f32ToF16", F32ToF16);
    fn("fillF32", FillF32);
    fn("fillBf16", FillBf16);
    fn("scaleF32", ScaleF32);
    fn("scaleBf16", ScaleBf16);
    fn("addInplace", AddInplace);
    fn("addInplaceBf16", AddInplaceBf16);
    fn("axpy", Axpy);
    fn("castAdd", CastAdd);
    fn("embeddingForward", EmbeddingForward);
    fn("cacheWrite", CacheWrite);
    fn("embeddingBackward", EmbeddingBackward);
    fn("rmsnormForward", RmsnormForward);
    fn("residualRmsnormForward", ResidualRmsnormForward);
    fn("rmsnormBackward", RmsnormBackward);
    fn("ropeForward", RopeForward);
    fn("ropeBackward", RopeBackward);
    fn("ropeCacheWrite", RopeCacheWrite);
    fn("copyColumns", CopyColumns);
    fn("gatedActForward", GatedActForward);
    fn("gatedActBackward", GatedActBackward);
    fn("pickTokensF32", PickTokensF32);
    fn("crossEntropyForward", CrossEntropyForward);
    fn("crossEntropyBackward", CrossEntropyBackward);
    fn("crossEntropyFused", CrossEntropyFused);
    fn("softcapF32", SoftcapF32);
    fn("softcapBf16", SoftcapBf16);
    fn("adamwTorchStep", AdamwTorchStep);
    fn("adamwBnb32Step", AdamwBnb32Step);
    fn("adamwBnb8Step", AdamwBnb8Step);
    fn("optimSumSquares", OptimSumSquares);
    fn("optimClipScale", OptimClipScale);
    fn("optimScale", OptimScale);
    fn("allocPagedState", AllocPagedState);
    fn("freePagedState", FreePagedState);
    fn("prefetchState", PrefetchState);
}
