// cuda_lora.cpp: bindings of the LoRA step's small kernels (native/cuda/lora_extras.h).
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

void register_cuda_lora(Napi::Env env, Napi::Object exports) {
    exports.Set("addBiasBf16", Napi::Function::New(env, AddBiasBf16, "addBiasBf16"));
    exports.Set("dropoutBf16", Napi::Function::New(env, Dropout<qlora_cuda_dropout_bf16>, "dropoutBf16"));
    exports.Set("dropoutAddBf16", Napi::Function::New(env, Dropout<qlora_cuda_dropout_add_bf16>, "dropoutAddBf16"));
}
