// addon_cuda.cpp: the Node-API binding of the CUDA backend.
//
// At this stage it reports the devices and runtime libraries, and runs its kernels on host arrays (copy in,
// launch, copy out) so that each one can be checked against the CPU op of the same name. Device-resident
// tensors, the caching allocator and cuBLASLt GEMMs come with the CUDA training backend. cuBLASLt and NCCL are
// opened with dlopen at run time, so building needs only nvcc and the CUDA runtime.
#include <dlfcn.h>
#include <napi.h>
#include <cuda_runtime.h>
#include <string>
#include <vector>
#include "../cuda/qlora_cuda_ops.h"
#include "napi_util.h"

using namespace qlora_napi;

static const char* kCublasLtNames[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};

static bool throw_if(Napi::Env env, cudaError_t err, const char* what) {
    if (err == cudaSuccess) return false;
    Napi::Error::New(env, std::string(what) + ": " + cudaGetErrorString(err)).ThrowAsJavaScriptException();
    return true;
}

// deviceInfo() -> {runtimeVersion, driverVersion, error|null, devices: [{index, name, major, minor, totalBytes, freeBytes}], cublasLt: string|null}
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

// device buffers freed on scope exit
struct DeviceBuffers {
    std::vector<void*> ptrs;
    ~DeviceBuffers() {
        for (void* p : ptrs) cudaFree(p);
    }
    template <typename T>
    T* upload(Napi::Env env, const T* host, int64_t n) {
        void* d = nullptr;
        if (throw_if(env, cudaMalloc(&d, (size_t)n * sizeof(T) + 1), "cudaMalloc")) return nullptr;
        ptrs.push_back(d);
        if (host && throw_if(env, cudaMemcpy(d, host, n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy"))
            return nullptr;
        return (T*)d;
    }
};

template <typename T>
static bool download(Napi::Env env, T* host, const T* dev, int64_t n) {
    return !throw_if(env, cudaMemcpy(host, dev, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
}

// rmsnormForward(out, rstd|null, inp, weight, N, C, eps) on host arrays
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
    DeviceBuffers bufs;
    float* d_out = bufs.upload<float>(env, nullptr, N * C);
    float* d_rstd = bufs.upload<float>(env, nullptr, N);
    const float* d_inp = bufs.upload(env, inp, N * C);
    const float* d_w = bufs.upload(env, w, C);
    QLORA_CHECK_ARGS(env);
    if (throw_if(env, qlora_cuda_rmsnorm_forward(d_out, d_rstd, d_inp, d_w, N, C, eps, 0), "rmsnorm_forward"))
        return env.Undefined();
    if (!download(env, out, d_out, N * C)) return env.Undefined();
    if (rstd) download(env, rstd, d_rstd, N);
    return env.Undefined();
}

// swigluForward(out, gate, up, n) on host arrays
static Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, n);
    const float* g = array_arg<float>(info, 1, n);
    const float* u = array_arg<float>(info, 2, n);
    QLORA_CHECK_ARGS(env);
    DeviceBuffers bufs;
    float* d_out = bufs.upload<float>(env, nullptr, n);
    const float* d_g = bufs.upload(env, g, n);
    const float* d_u = bufs.upload(env, u, n);
    QLORA_CHECK_ARGS(env);
    if (throw_if(env, qlora_cuda_swiglu_forward(d_out, d_g, d_u, n, 0), "swiglu_forward")) return env.Undefined();
    download(env, out, d_out, n);
    return env.Undefined();
}

// bf16ToF32(out, inp, n) on host arrays
static Napi::Value Bf16ToF32(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t n = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, n);
    const uint16_t* inp = array_arg<uint16_t>(info, 1, n);
    QLORA_CHECK_ARGS(env);
    DeviceBuffers bufs;
    float* d_out = bufs.upload<float>(env, nullptr, n);
    const uint16_t* d_inp = bufs.upload(env, inp, n);
    QLORA_CHECK_ARGS(env);
    if (throw_if(env, qlora_cuda_bf16_to_f32(d_out, d_inp, n, 0), "bf16_to_f32")) return env.Undefined();
    download(env, out, d_out, n);
    return env.Undefined();
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
    exports.Set("deviceInfo", Napi::Function::New(env, DeviceInfo, "deviceInfo"));
    exports.Set("rmsnormForward", Napi::Function::New(env, RmsnormForward, "rmsnormForward"));
    exports.Set("swigluForward", Napi::Function::New(env, SwigluForward, "swigluForward"));
    exports.Set("bf16ToF32", Napi::Function::New(env, Bf16ToF32, "bf16ToF32"));
    return exports;
}

NODE_API_MODULE(qlora_cuda, Init)
