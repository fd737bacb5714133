// cuda_bindings.h: each op family of the CUDA addon binds its own functions (native/addon/cuda_<family>.cpp).
//
// Device buffers cross into JavaScript as numbers holding the device address (exact: addresses are < 2^53).
// Every op is queued on qlora_cuda::stream(); download() synchronizes. Errors become JS exceptions that say
// which op failed and the CUDA error string.
#pragma once
#include <napi.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string>

void register_cuda_memory(Napi::Env env, Napi::Object exports);     // cuda_memory.cpp
void register_cuda_gemm(Napi::Env env, Napi::Object exports);       // cuda_gemm.cpp
void register_cuda_kernels(Napi::Env env, Napi::Object exports);    // cuda_kernels.cpp
void register_cuda_attention(Napi::Env env, Napi::Object exports);  // cuda_attention.cpp
void register_cuda_lora(Napi::Env env, Napi::Object exports);       // cuda_lora.cpp
void register_cuda_nccl(Napi::Env env, Napi::Object exports);       // cuda_nccl.cpp

namespace qlora_napi {

// a device address passed from JS (0 or null/undefined means nullptr when nullable)
inline void* device_ptr_arg(const Napi::CallbackInfo& info, size_t i, bool nullable = false) {
    Napi::Value v = info[i];
    if (nullable && (v.IsNull() || v.IsUndefined())) return nullptr;
    if (!v.IsNumber()) {
        Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + ": expected a device buffer address")
            .ThrowAsJavaScriptException();
        return nullptr;
    }
    double d = v.As<Napi::Number>().DoubleValue();
    if (d == 0 && nullable) return nullptr;
    if (d <= 0) {
        Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + ": null device buffer")
            .ThrowAsJavaScriptException();
        return nullptr;
    }
    return reinterpret_cast<void*>(static_cast<uintptr_t>(d));
}

// throws a JS error naming the op when err is not cudaSuccess; returns true when it threw
inline bool cuda_throw(Napi::Env env, cudaError_t err, const char* what) {
    if (err == cudaSuccess) return false;
    Napi::Error::New(env, std::string(what) + ": " + cudaGetErrorString(err)).ThrowAsJavaScriptException();
    return true;
}

}  // namespace qlora_napi
