// addon_cpu.cpp: the Node-API binding of the CPU op table (native/include/qlora_ops.h).
// Mirrored by hand in src/backend/native-types.ts. Ops run synchronously on the calling thread and fan out to
// the op's worker threads; the TypeScript layer calls them from a training loop, not from a server.
#include <napi.h>
#include "../include/qlora_ops.h"
#include "cpu_bindings.h"
#include "napi_util.h"

using namespace qlora_napi;

// sgemm(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
static Napi::Value Sgemm(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    bool ta = bool_arg(info, 0), tb = bool_arg(info, 1);
    int64_t M = int_arg(info, 2), N = int_arg(info, 3), K = int_arg(info, 4);
    float alpha = (float)num_arg(info, 5);
    int64_t lda = int_arg(info, 7), ldb = int_arg(info, 9);
    float beta = (float)num_arg(info, 10);
    int64_t ldc = int_arg(info, 12);
    QLORA_CHECK_ARGS(env);
    int64_t arows = ta ? K : M, acols = ta ? M : K, brows = tb ? N : K, bcols = tb ? K : N;
    if (M < 0 || N < 0 || K < 0 || lda < acols || ldb < bcols || ldc < N) {
        Napi::RangeError::New(env, "sgemm: bad sizes or leading dimensions").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const float* A = array_arg<float>(info, 6, arows > 0 ? (arows - 1) * lda + acols : 0);
    const float* B = array_arg<float>(info, 8, brows > 0 ? (brows - 1) * ldb + bcols : 0);
    float* C = array_arg<float>(info, 11, M > 0 ? (M - 1) * ldc + N : 0);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return env.Undefined();
}

static Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_set_num_threads((int)n);
    return env.Undefined();
}

static Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), qlora_cpu_get_num_threads());
}

// bf16ToF32(out, inp, n) and friends
#define CONVERT(NAME, FN, OUT_T, IN_T)                        \
    static Napi::Value NAME(const Napi::CallbackInfo& info) { \
        Napi::Env env = info.Env();                           \
        int64_t n = int_arg(info, 2);                         \
        QLORA_CHECK_ARGS(env);                                \
        OUT_T* out = array_arg<OUT_T>(info, 0, n);            \
        const IN_T* inp = array_arg<IN_T>(info, 1, n);        \
        QLORA_CHECK_ARGS(env);                                \
        FN(out, inp, n);                                      \
        return env.Undefined();                               \
    }
CONVERT(Bf16ToF32, qlora_cpu_bf16_to_f32, float, uint16_t)
CONVERT(F16ToF32, qlora_cpu_f16_to_f32, float, uint16_t)
CONVERT(F32ToBf16, qlora_cpu_f32_to_bf16, uint16_t, float)
CONVERT(F32ToF16, qlora_cpu_f32_to_f16, uint16_t, float)
CONVERT(AddInplace, qlora_cpu_add_inplace, float, float)

// addBias(out, inp, bias, N, C)
static Napi::Value AddBias(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t N = int_arg(info, 3), C = int_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, N * C);
    const float* inp = array_arg<float>(info, 1, N * C);
    const float* bias = array_arg<float>(info, 2, C);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_add_bias(out, inp, bias, N, C);
    return env.Undefined();
}

// embeddingForward(out, ids, table, N, V, C) -> index of the first bad id, or -1
static Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t N = int_arg(info, 3), V = int_arg(info, 4), C = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, N * C);
    const int32_t* ids = array_arg<int32_t>(info, 1, N);
    const float* table = array_arg<float>(info, 2, V * C);
    QLORA_CHECK_ARGS(env);
    int64_t r = qlora_cpu_embedding_forward(out, ids, table, N, V, C);
    return Napi::Number::New(env, (double)(r < 0 ? -1 - r : -1));
}

// embeddingBackward(dtable, dout, ids, N, V, C)
static Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t N = int_arg(info, 3), V = int_arg(info, 4), C = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    float* dtable = array_arg<float>(info, 0, V * C);
    const float* dout = array_arg<float>(info, 1, N * C);
    const int32_t* ids = array_arg<int32_t>(info, 2, N);
    QLORA_CHECK_ARGS(env);
    for (int64_t n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V) {
            Napi::RangeError::New(env, "embeddingBackward: token id out of range").ThrowAsJavaScriptException();
            return env.Undefined();
        }
    qlora_cpu_embedding_backward(dtable, dout, ids, N, C);
    return env.Undefined();
}

// rmsnormForward(out, rstd|null, inp, weight, N, C, eps)
static Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t N = int_arg(info, 4), C = int_arg(info, 5);
    float eps = (float)num_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, N * C);
    float* rstd = array_arg<float>(info, 1, N, true);
    const float* inp = array_arg<float>(info, 2, N * C);
    const float* w = array_arg<float>(info, 3, C);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_rmsnorm_forward(out, rstd, inp, w, N, C, eps);
    return env.Undefined();
}

// rmsnormBackward(dinp, dweight|null, dout, inp, weight, rstd, N, C)
static Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t N = int_arg(info, 6), C = int_arg(info, 7);
    QLORA_CHECK_ARGS(env);
    float* dinp = array_arg<float>(info, 0, N * C);
    float* dw = array_arg<float>(info, 1, C, true);
    const float* dout = array_arg<float>(info, 2, N * C);
    const float* inp = array_arg<float>(info, 3, N * C);
    const float* w = array_arg<float>(info, 4, C);
    const float* rstd = array_arg<float>(info, 5, N);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
    return env.Undefined();
}

// ropeForward/ropeBackward(out, inp, pos, invFreq, attentionScaling, N, H, D[, rotary = D])
template <void (*FN)(float*, const float*, const int32_t*, const float*, float, int64_t, int64_t, int64_t, int64_t)>
static Napi::Value Rope(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float scaling = (float)num_arg(info, 4);
    int64_t N = int_arg(info, 5), H = int_arg(info, 6), D = int_arg(info, 7);
    int64_t R = info.Length() > 8 && !info[8].IsUndefined() ? int_arg(info, 8) : D;
    QLORA_CHECK_ARGS(env);
    if (D % 2 != 0 || D > 1024 || R % 2 != 0 || R < 2 || R > D) {
        Napi::RangeError::New(env, "rope: head dim must be even and <= 1024, rotary dims even and in [2, D]")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    float* out = array_arg<float>(info, 0, N * H * D);
    const float* inp = array_arg<float>(info, 1, N * H * D);
    const int32_t* pos = array_arg<int32_t>(info, 2, N);
    const float* inv = array_arg<float>(info, 3, R / 2);
    QLORA_CHECK_ARGS(env);
    FN(out, inp, pos, inv, scaling, N, H, D, R);
    return env.Undefined();
}

struct AttnDims {
    int64_t B, T, S, Hq, Hkv, D, qOffset;
    float scale;
    int64_t window;  // the optional argument after scale (0 or absent: no sliding window)
};

static bool attn_dims(const Napi::CallbackInfo& info, size_t first, AttnDims& d) {
    Napi::Env env = info.Env();
    d.B = int_arg(info, first);
    d.T = int_arg(info, first + 1);
    d.S = int_arg(info, first + 2);
    d.Hq = int_arg(info, first + 3);
    d.Hkv = int_arg(info, first + 4);
    d.D = int_arg(info, first + 5);
    d.qOffset = int_arg(info, first + 6);
    d.scale = (float)num_arg(info, first + 7);
    d.window = info.Length() > first + 8 && !info[first + 8].IsUndefined() ? int_arg(info, first + 8) : 0;
    if (env.IsExceptionPending()) return false;
    if (d.window < 0) {
        Napi::RangeError::New(env, "attention: window must be >= 0 (0: no sliding window)")
            .ThrowAsJavaScriptException();
        return false;
    }
    if (d.Hkv <= 0 || d.Hq % d.Hkv != 0 || d.T > d.S || d.qOffset < 0 || d.qOffset + d.T > d.S) {
        Napi::RangeError::New(env, "attention: bad sizes (need Hq % Hkv == 0, T <= S, q_offset + T <= S)")
            .ThrowAsJavaScriptException();
        return false;
    }
    return true;
}

// attentionForward(out, lse|null, q, k, v, keyValid|null, seg|null, B, T, S, Hq, Hkv, D, qOffset, scale[, window])
static Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    AttnDims d;
    if (!attn_dims(info, 7, d)) return env.Undefined();
    float* out = array_arg<float>(info, 0, d.B * d.T * d.Hq * d.D);
    float* lse = array_arg<float>(info, 1, d.B * d.Hq * d.T, true);
    const float* q = array_arg<float>(info, 2, d.B * d.T * d.Hq * d.D);
    const float* k = array_arg<float>(info, 3, d.B * d.S * d.Hkv * d.D);
    const float* v = array_arg<float>(info, 4, d.B * d.S * d.Hkv * d.D);
    const uint8_t* kv = array_arg<uint8_t>(info, 5, d.B * d.S, true);
    const int32_t* seg = array_arg<int32_t>(info, 6, d.B * d.S, true);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_attention_forward(out, lse, q, k, v, kv, seg, d.B, d.T, d.S, d.Hq, d.Hkv, d.D, d.qOffset, d.scale,
                                d.window);
    return env.Undefined();
}

// attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, keyValid|null, seg|null, B, T, S, Hq, Hkv, D, qOffset, scale
//                   [, window])
static Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    AttnDims d;
    if (!attn_dims(info, 11, d)) return env.Undefined();
    int64_t nq = d.B * d.T * d.Hq * d.D, nk = d.B * d.S * d.Hkv * d.D;
    float* dq = array_arg<float>(info, 0, nq);
    float* dk = array_arg<float>(info, 1, nk);
    float* dv = array_arg<float>(info, 2, nk);
    const float* dout = array_arg<float>(info, 3, nq);
    const float* q = array_arg<float>(info, 4, nq);
    const float* k = array_arg<float>(info, 5, nk);
    const float* v = array_arg<float>(info, 6, nk);
    const float* out = array_arg<float>(info, 7, nq);
    const float* lse = array_arg<float>(info, 8, d.B * d.Hq * d.T);
    const uint8_t* kv = array_arg<uint8_t>(info, 9, d.B * d.S, true);
    const int32_t* seg = array_arg<int32_t>(info, 10, d.B * d.S, true);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, kv, seg, d.B, d.T, d.S, d.Hq, d.Hkv, d.D,
                                 d.qOffset, d.scale, d.window);
    return env.Undefined();
}

// dropoutMask(mask, seed, p, n, first); seed < 2^53, first >= 0
static Napi::Value DropoutMask(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 3);
    int64_t first = int_arg(info, 4);
    int64_t seed = int_arg(info, 1);
    double p = num_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    float* mask = array_arg<float>(info, 0, n);
    QLORA_CHECK_ARGS(env);
    if (seed < 0 || first < 0 || !(p >= 0.0 && p < 1.0)) {
        Napi::RangeError::New(env, "dropoutMask: seed and first must be >= 0 and 0 <= p < 1")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    qlora_cpu_dropout_mask(mask, (uint64_t)seed, (float)p, n, first);
    return env.Undefined();
}

// gatedActForward(out, gate, up, n, act): out = act(gate) * up
static Napi::Value GatedActForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 3);
    int act = gated_act_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, n);
    const float* g = array_arg<float>(info, 1, n);
    const float* u = array_arg<float>(info, 2, n);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_gated_act_forward(out, g, u, n, act);
    return env.Undefined();
}

// gatedActBackward(dgate, dup, dout, gate, up, n, act)
static Napi::Value GatedActBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 5);
    int act = gated_act_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    float* dg = array_arg<float>(info, 0, n);
    float* du = array_arg<float>(info, 1, n);
    const float* dout = array_arg<float>(info, 2, n);
    const float* g = array_arg<float>(info, 3, n);
    const float* u = array_arg<float>(info, 4, n);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_gated_act_backward(dg, du, dout, g, u, n, act);
    return env.Undefined();
}

// softcapForward(x, n, cap): in place
static Napi::Value SoftcapForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 1);
    double cap = num_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    float* x = array_arg<float>(info, 0, n);
    QLORA_CHECK_ARGS(env);
    if (!(cap > 0.0)) {
        Napi::RangeError::New(env, "softcapForward: cap must be > 0").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    qlora_cpu_softcap_forward(x, n, (float)cap);
    return env.Undefined();
}

// softcapBackward(dx, y, n, cap): dx *= 1 - (y / cap)^2
static Napi::Value SoftcapBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 2);
    double cap = num_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    float* dx = array_arg<float>(info, 0, n);
    const float* y = array_arg<float>(info, 1, n);
    QLORA_CHECK_ARGS(env);
    if (!(cap > 0.0)) {
        Napi::RangeError::New(env, "softcapBackward: cap must be > 0").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    qlora_cpu_softcap_backward(dx, y, n, (float)cap);
    return env.Undefined();
}

// crossEntropyForward(loss, lse, logits, targets, N, V) -> number of counted rows
static Napi::Value CrossEntropyForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t N = int_arg(info, 4), V = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    float* loss = array_arg<float>(info, 0, N);
    float* lse = array_arg<float>(info, 1, N, true);
    const float* logits = array_arg<float>(info, 2, N * V);
    const int32_t* targets = array_arg<int32_t>(info, 3, N);
    QLORA_CHECK_ARGS(env);
    return Napi::Number::New(env, (double)qlora_cpu_cross_entropy_forward(loss, lse, logits, targets, N, V));
}

// crossEntropyBackward(dlogits, logits, lse, targets, dlossScale, N, V)
static Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float scale = (float)num_arg(info, 4);
    int64_t N = int_arg(info, 5), V = int_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    float* dlogits = array_arg<float>(info, 0, N * V);
    const float* logits = array_arg<float>(info, 1, N * V);
    const float* lse = array_arg<float>(info, 2, N);
    const int32_t* targets = array_arg<int32_t>(info, 3, N);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_cross_entropy_backward(dlogits, logits, lse, targets, scale, N, V);
    return env.Undefined();
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
    auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
        exports.Set(name, Napi::Function::New(env, f, name));
    };
    fn("sgemm", Sgemm);
    fn("setNumThreads", SetNumThreads);
    fn("getNumThreads", GetNumThreads);
    fn("bf16ToF32", Bf16ToF32);
    fn("f16ToF32", F16ToF32);
    fn("f32ToBf16", F32ToBf16);
    fn("f32ToF16", F32ToF16);
    fn("addInplace", AddInplace);
    fn("addBias", AddBias);
    fn("embeddingForward", EmbeddingForward);
    fn("embeddingBackward", EmbeddingBackward);
    fn("rmsnormForward", RmsnormForward);
    fn("rmsnormBackward", RmsnormBackward);
    fn("ropeForward", Rope<qlora_cpu_rope_forward>);
    fn("ropeBackward", Rope<qlora_cpu_rope_backward>);
    fn("attentionForward", AttentionForward);
    fn("attentionBackward", AttentionBackward);
    fn("dropoutMask", DropoutMask);
    fn("gatedActForward", GatedActForward);
    fn("gatedActBackward", GatedActBackward);
    fn("softcapForward", SoftcapForward);
    fn("softcapBackward", SoftcapBackward);
    fn("crossEntropyForward", CrossEntropyForward);
    fn("crossEntropyBackward", CrossEntropyBackward);
    register_quant_ops(env, exports);
    register_optim_ops(env, exports);
    register_gguf_ops(env, exports);
    register_check_ops(env, exports);
    return exports;
}

NODE_API_MODULE(qlora_cpu, Init)
