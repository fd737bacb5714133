// cuda_lora.cpp: bindings of the projection layers' small kernels (LoRA, DoRA, trained biases)
// (native/cuda/lora_extras.h).
#include "cuda_bindings.h"
#include "napi_util.h"
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

// dropoutBf16(out, inp, seed, p, n) / dropoutAddBf16(y, x, seed, p, n); seed < 2^53
template <cudaError_t (*FN)(uint16_t*, const uint16_t*, uint64_t, float, int64_t, cudaStream_t)>
static Napi::Value Dropout(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* out = (uint16_t*)device_ptr_arg(info, 0);
    auto* inp = (const uint16_t*)device_ptr_arg(info, 1);
    int64_t seed = int_arg(info, 2);
    float p = (float)num_arg(info, 3);
    int64_t n = int_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, FN(out, inp, (uint64_t)seed, p, n, qlora_cuda::stream()), "dropout");
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

void register_cuda_lora(Napi::Env env, Napi::Object exports) {
    exports.Set("scaleColumnsBf16", Napi::Function::New(env, ScaleColumnsBf16, "scaleColumnsBf16"));
    exports.Set("columnSumsBf16", Napi::Function::New(env, ColumnSumsBf16, "columnSumsBf16"));
    exports.Set("rowNormsF32", Napi::Function::New(env, RowNormsF32, "rowNormsF32"));
    exports.Set("divideF32", Napi::Function::New(env, DivideF32, "divideF32"));
    exports.Set("addBiasBf16", Napi::Function::New(env, AddBiasBf16, "addBiasBf16"));
    exports.Set("dropoutBf16", Napi::Function::New(env, Dropout<qlora_cuda_dropout_bf16>, "dropoutBf16"));
    exports.Set("dropoutAddBf16", Napi::Function::New(env, Dropout<qlora_cuda_dropout_add_bf16>, "dropoutAddBf16"));
}
