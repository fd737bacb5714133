// addon_cuda.cpp: the Node-API binding of the CUDA backend.
//
// deviceInfo() reports the devices and runtime libraries; each op family binds its functions from its own
// file (cuda_bindings.h). cuBLASLt and NCCL are opened with dlopen at run time, so building needs only nvcc and
// the CUDA runtime.
#include <dlfcn.h>
#include <napi.h>
#include <cuda_runtime.h>
#include <string>
#include <vector>
#include "cuda_bindings.h"
#include "napi_util.h"

using namespace qlora_napi;

static const char* kCublasLtNames[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};

// deviceInfo() -> {runtimeVersion, driverVersion, error|null, devices: [{index, name, major, minor, totalBytes,
// freeBytes}], cublasLt: string|null}
static Napi::Value DeviceInfo(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object res = Napi::Object::New(env);
    int runtime = 0, driver = 0;
    cudaRuntimeGetVersion(&runtime);
    cudaDriverGetVersion(&driver);
    res.Set("runtimeVersion", runtime);
    res.Set("driverVersion", driver);
    Napi::Array devices = Napi::Array::New(env);
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    res.Set("error", err == cudaSuccess ? env.Null() : Napi::String::New(env, cudaGetErrorString(err)));
    // the free-memory query makes each device current in turn: the caller's device is restored afterwards (else a
    // later allocation would land on the last GPU)
    int current = 0;
    const bool restore = err == cudaSuccess && count > 0 && cudaGetDevice(&current) == cudaSuccess;
    for (int i = 0; err == cudaSuccess && i < count; i++) {
        cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
        Napi::Object d = Napi::Object::New(env);
        d.Set("index", i);
        d.Set("name", prop.name);
        d.Set("major", prop.major);
        d.Set("minor", prop.minor);
        d.Set("totalBytes", (double)prop.totalGlobalMem);
        size_t free_b = 0, total_b = 0;
        if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
            d.Set("freeBytes", (double)free_b);
        devices.Set(devices.Length(), d);
    }
    if (restore) cudaSetDevice(current);
    res.Set("devices", devices);
    Napi::Value lt = env.Null();
    for (const char* name : kCublasLtNames) {
        if (void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL)) {
            lt = Napi::String::New(env, name);
            dlclose(h);
            break;
        }
    }
    res.Set("cublasLt", lt);
    return res;
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
    exports.Set("deviceInfo", Napi::Function::New(env, DeviceInfo, "deviceInfo"));
    register_cuda_memory(env, exports);
    register_cuda_gemm(env, exports);
    register_cuda_kernels(env, exports);
    register_cuda_attention(env, exports);
    register_cuda_lora(env, exports);
    register_cuda_nccl(env, exports);
    return exports;
}

NODE_API_MODULE(qlora_cuda, Init)
