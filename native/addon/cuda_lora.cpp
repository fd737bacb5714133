// cuda_lora.cpp: bindings of the projection layers' small kernels (LoRA, DoRA, trained biases)
// (native/cuda/lora_extras.h, native/cuda/lora_down.h).
#include <cmath>
#include <string>
#include "cuda_bindings.h"
#include "napi_util.h"
#include "../cuda/lora_down.h"
#include "../cuda/lora_extras.h"
#include "../cuda/runtime.h"

using namespace qlora_napi;

// addBiasBf16(y, bias, N, C)
static Napi::Value AddBiasBf16(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* y = (uint16_t*)device_ptr_arg(info, 0);
    auto* bias = (const uint16_t*)device_ptr_arg(info, 1);
    int64_t N = int_arg(info, 2), C = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda_add_bias_bf16(y, bias, N, C, qlora_cuda::stream()), "addBiasBf16");
    return env.Undefined();
}

// dropoutBf16(out, inp, seed, p, n, first) / dropoutAddBf16(y, x, seed, p, n, first); seed < 2^53
template <cudaError_t (*FN)(uint16_t*, const uint16_t*, uint64_t, float, int64_t, int64_t, cudaStream_t)>
static Napi::Value Dropout(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* out = (uint16_t*)device_ptr_arg(info, 0);
    auto* inp = (const uint16_t*)device_ptr_arg(info, 1);
    int64_t seed = int_arg(info, 2);
    float p = (float)num_arg(info, 3);
    int64_t n = int_arg(info, 4);
    int64_t first = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, FN(out, inp, (uint64_t)seed, p, n, first, qlora_cuda::stream()), "dropout");
    return env.Undefined();
}

// scaleColumnsBf16(out, x, k, offset, M, N, accumulate)
static Napi::Value ScaleColumnsBf16(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* out = (uint16_t*)device_ptr_arg(info, 0);
    auto* x = (const uint16_t*)device_ptr_arg(info, 1);
    auto* k = (const float*)device_ptr_arg(info, 2);
    float offset = (float)num_arg(info, 3);
    int64_t M = int_arg(info, 4), N = int_arg(info, 5);
    bool accumulate = bool_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda_scale_columns_bf16(out, x, k, offset, M, N, accumulate ? 1 : 0, qlora_cuda::stream()),
               "scaleColumnsBf16");
    return env.Undefined();
}

// columnSumsBf16(dst, a, b | null, div | null, M, N)
static Napi::Value ColumnSumsBf16(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* dst = (float*)device_ptr_arg(info, 0);
    auto* a = (const uint16_t*)device_ptr_arg(info, 1);
    auto* b = (const uint16_t*)device_ptr_arg(info, 2, true);
    auto* div = (const float*)device_ptr_arg(info, 3, true);
    int64_t M = int_arg(info, 4), N = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda_column_sums_bf16(dst, a, b, div, M, N, qlora_cuda::stream()), "columnSumsBf16");
    return env.Undefined();
}

// rowNormsF32(out, W, R, C)
static Napi::Value RowNormsF32(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* out = (float*)device_ptr_arg(info, 0);
    auto* W = (const float*)device_ptr_arg(info, 1);
    int64_t R = int_arg(info, 2), C = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda_row_norms_f32(out, W, R, C, qlora_cuda::stream()), "rowNormsF32");
    return env.Undefined();
}

// divideF32(out, a, b, n)
static Napi::Value DivideF32(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* out = (float*)device_ptr_arg(info, 0);
    auto* a = (const float*)device_ptr_arg(info, 1);
    auto* b = (const float*)device_ptr_arg(info, 2);
    int64_t n = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda_divide_f32(out, a, b, n, qlora_cuda::stream()), "divideF32");
    return env.Undefined();
}

// scaleRowsRatioF32(W, num, den, R, C): W[r, c] = fl32(W[r, c] * (num[r] / den[r])), ratio and product in float64
static Napi::Value ScaleRowsRatioF32(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* W = (float*)device_ptr_arg(info, 0);
    auto* num = (const float*)device_ptr_arg(info, 1);
    auto* den = (const float*)device_ptr_arg(info, 2);
    int64_t R = int_arg(info, 3), C = int_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda_scale_rows_ratio_f32(W, num, den, R, C, qlora_cuda::stream()), "scaleRowsRatioF32");
    return env.Undefined();
}

// parts[i].<key> of loraDown as a number; NaN with a pending TypeError when it is not one (or, for an address, when
// it is not positive)
static double lora_part_field(Napi::Env env, Napi::Object part, size_t i, const char* key, bool address) {
    Napi::Value v = part.Get(key);
    const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : 0.0;
    if (!v.IsNumber() || (address && !(d > 0))) {
        Napi::TypeError::New(env, "loraDown: parts[" + std::to_string(i) + "]." + key + ": expected " +
                                      (address ? "a device buffer address" : "a number"))
            .ThrowAsJavaScriptException();
        return NAN;
    }
    return d;
}

// the parts argument of loraDown, an array of 1..QLORA_LORA_DOWN_MAX_PARTS {out, A, r}, into `parts`; returns
// their number (0 with a pending exception)
static int64_t lora_down_parts(Napi::Env env, Napi::Value v, QloraLoraDownPart* parts) {
    if (!v.IsArray()) {
        Napi::TypeError::New(env, "loraDown: argument 3: expected an array of parts {out, A, r}")
            .ThrowAsJavaScriptException();
        return 0;
    }
    auto arr = v.As<Napi::Array>();
    const uint32_t n = arr.Length();
    if (n < 1 || n > QLORA_LORA_DOWN_MAX_PARTS) {
        Napi::RangeError::New(env, "loraDown: " + std::to_string(n) + " parts, it takes 1.." +
                                       std::to_string(QLORA_LORA_DOWN_MAX_PARTS) + ": split the projections over calls")
            .ThrowAsJavaScriptException();
        return 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        Napi::Value e = arr.Get(i);
        if (!e.IsObject()) {
            Napi::TypeError::New(env, "loraDown: parts[" + std::to_string(i) + "]: expected an object {out, A, r}")
                .ThrowAsJavaScriptException();
            return 0;
        }
        auto part = e.As<Napi::Object>();
        const double out = lora_part_field(env, part, i, "out", true);
        if (env.IsExceptionPending()) return 0;
        const double A = lora_part_field(env, part, i, "A", true);
        if (env.IsExceptionPending()) return 0;
        const double r = lora_part_field(env, part, i, "r", false);
        if (env.IsExceptionPending()) return 0;
        if (!(r >= 1 && r <= QLORA_LORA_DOWN_MAX_R && r == std::floor(r))) {
            Napi::RangeError::New(env, "loraDown: parts[" + std::to_string(i) + "].r = " +
                                           Napi::Number::New(env, r).ToString().Utf8Value() + " is not a rank in 1.." +
                                           std::to_string(QLORA_LORA_DOWN_MAX_R) + ": use gemm for this projection")
                .ThrowAsJavaScriptException();
            return 0;
        }
        parts[i] = {reinterpret_cast<uint16_t*>(static_cast<uintptr_t>(out)),
                    reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(A)), (int64_t)r};
    }
    return n;
}

// loraDown(x, M, K, parts): for each part {out, A, r}, out[M, r] = x[M, K] @ A[r, K]^T (bf16, fp32 sums rounded
// once), all parts in one launch
static Napi::Value LoraDown(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const auto* x = (const uint16_t*)device_ptr_arg(info, 0);
    const int64_t M = int_arg(info, 1), K = int_arg(info, 2);
    QloraLoraDownPart parts[QLORA_LORA_DOWN_MAX_PARTS];
    const int64_t n = env.IsExceptionPending() ? 0 : lora_down_parts(env, info[3], parts);
    QLORA_CHECK_ARGS(env);
    if (M < 1 || M > QLORA_LORA_DOWN_MAX_M || K < 1) {
        Napi::RangeError::New(env, "loraDown: M = " + std::to_string(M) + ", K = " + std::to_string(K) +
                                       "; needs 1 <= M <= " + std::to_string(QLORA_LORA_DOWN_MAX_M) +
                                       " and K >= 1: use gemm for these shapes")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const cudaError_t err = qlora_cuda_lora_down_bf16(x, M, K, parts, n, qlora_cuda::stream());
    if (err == cudaErrorNotSupported) {
        // name what does not fit the 16-byte loads (nothing was queued)
        std::string why = K % 8 != 0 ? "K = " + std::to_string(K) + " is not a multiple of 8" : "";
        auto add = [&why](const std::string& what) { why += (why.empty() ? "" : ", ") + what; };
        if (((uintptr_t)x & 15) != 0) add("x is not 16-byte aligned");
        for (int64_t i = 0; i < n; i++)
            if (((uintptr_t)parts[i].A & 15) != 0) add("parts[" + std::to_string(i) + "].A is not 16-byte aligned");
        Napi::RangeError::New(env, "loraDown: unsupported layout (" + why +
                                       "; it needs K % 8 == 0 and 16-byte aligned x and A): use gemm instead")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cuda_throw(env, err, "loraDown");
    return env.Undefined();
}

void register_cuda_lora(Napi::Env env, Napi::Object exports) {
    exports.Set("scaleColumnsBf16", Napi::Function::New(env, ScaleColumnsBf16, "scaleColumnsBf16"));
    exports.Set("columnSumsBf16", Napi::Function::New(env, ColumnSumsBf16, "columnSumsBf16"));
    exports.Set("rowNormsF32", Napi::Function::New(env, RowNormsF32, "rowNormsF32"));
    exports.Set("divideF32", Napi::Function::New(env, DivideF32, "divideF32"));
    exports.Set("scaleRowsRatioF32", Napi::Function::New(env, ScaleRowsRatioF32, "scaleRowsRatioF32"));
    exports.Set("addBiasBf16", Napi::Function::New(env, AddBiasBf16, "addBiasBf16"));
    exports.Set("dropoutBf16", Napi::Function::New(env, Dropout<qlora_cuda_dropout_bf16>, "dropoutBf16"));
    exports.Set("dropoutAddBf16", Napi::Function::New(env, Dropout<qlora_cuda_dropout_add_bf16>, "dropoutAddBf16"));
    exports.Set("loraDown", Napi::Function::New(env, LoraDown, "loraDown"));
}
