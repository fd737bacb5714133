// cuda_memory.cpp: device buffers for JavaScript: alloc/free through the caching allocator, copies to and
// from typed arrays, memset, synchronize, and the allocator's statistics.
#include "cuda_bindings.h"
#include "napi_util.h"
#include "../cuda/optim.h"
#include "../cuda/runtime.h"

using namespace qlora_napi;

// alloc(bytes) -> address
static Napi::Value Alloc(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t bytes = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    cudaError_t err;
    void* p = qlora_cuda::device_alloc((size_t)bytes, &err);
    if (!p) {
        auto s = qlora_cuda::memory_stats();
        Napi::Error::New(env, "out of GPU memory allocating " + std::to_string(bytes) + " bytes (" +
                                  std::to_string(s.allocated >> 20) + " MiB allocated, " +
                                  std::to_string(s.reserved >> 20) + " MiB reserved): " + cudaGetErrorString(err))
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    return Napi::Number::New(env, (double)reinterpret_cast<uintptr_t>(p));
}

static Napi::Value Free(const Napi::CallbackInfo& info) {
    void* p = device_ptr_arg(info, 0, true);
    qlora_cuda::device_free(p);
    return info.Env().Undefined();
}

// hostAlloc(bytes) -> address: pinned host memory the device reads over PCIe (qlora_cuda::host_resident_alloc)
static Napi::Value HostAlloc(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t bytes = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    cudaError_t err;
    void* p = qlora_cuda::host_resident_alloc((size_t)bytes, &err);
    if (!p) {
        Napi::Error::New(env, "could not allocate " + std::to_string(bytes) +
                                  " bytes of pinned host memory mapped for the GPU: " + cudaGetErrorString(err))
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    return Napi::Number::New(env, (double)reinterpret_cast<uintptr_t>(p));
}

static Napi::Value HostFree(const Napi::CallbackInfo& info) {
    void* p = device_ptr_arg(info, 0, true);
    qlora_cuda::host_resident_free(p);
    return info.Env().Undefined();
}

// upload(dst, src: TypedArray, dstOffsetBytes = 0): async copy on the stream (src must stay alive until the
// next synchronize; the TS wrapper keeps a reference)
static Napi::Value Upload(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    char* dst = (char*)device_ptr_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    if (!info[1].IsTypedArray()) {
        Napi::TypeError::New(env, "upload: expected a typed array").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    auto arr = info[1].As<Napi::TypedArray>();
    int64_t offset = info.Length() > 2 && info[2].IsNumber() ? int_arg(info, 2) : 0;
    const char* src = (const char*)arr.ArrayBuffer().Data() + arr.ByteOffset();
    // cudaMemcpyDefault: dst may be a host-resident buffer (unified addressing tells the direction).
    // A synchronous copy: pageable host memory would be staged anyway, and the array may be collected after
    cuda_throw(env, cudaMemcpyAsync(dst + offset, src, arr.ByteLength(), cudaMemcpyDefault, qlora_cuda::stream()),
               "upload");
    cuda_throw(env, cudaStreamSynchronize(qlora_cuda::stream()), "upload");
    return env.Undefined();
}

// download(dst: TypedArray, src, srcOffsetBytes = 0): waits for the stream, then copies
static Napi::Value Download(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray()) {
        Napi::TypeError::New(env, "download: expected a typed array").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    auto arr = info[0].As<Napi::TypedArray>();
    const char* src = (const char*)device_ptr_arg(info, 1);
    QLORA_CHECK_ARGS(env);
    int64_t offset = info.Length() > 2 && info[2].IsNumber() ? int_arg(info, 2) : 0;
    char* dst = (char*)arr.ArrayBuffer().Data() + arr.ByteOffset();
    if (cuda_throw(env, cudaMemcpyAsync(dst, src + offset, arr.ByteLength(), cudaMemcpyDefault, qlora_cuda::stream()),
                   "download"))
        return env.Undefined();
    cuda_throw(env, cudaStreamSynchronize(qlora_cuda::stream()), "download");
    return env.Undefined();
}

// memset(dst, byte, bytes)
static Napi::Value Memset(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    void* dst = device_ptr_arg(info, 0);
    int64_t value = int_arg(info, 1), bytes = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, cudaMemsetAsync(dst, (int)value, (size_t)bytes, qlora_cuda::stream()), "memset");
    return env.Undefined();
}

// copy(dst, src, bytes): device to device
static Napi::Value Copy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    void* dst = device_ptr_arg(info, 0);
    void* src = device_ptr_arg(info, 1);
    int64_t bytes = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToDevice, qlora_cuda::stream()), "copy");
    return env.Undefined();
}

static Napi::Value Synchronize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    cuda_throw(env, cudaStreamSynchronize(qlora_cuda::stream()), "synchronize");
    return env.Undefined();
}

// memoryStats() -> {allocated, reserved, peakAllocated, peakReserved, numAllocs, pagedBytes, pinnedHostBytes,
// deviceFree, deviceTotal}
static Napi::Value MemoryStats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto s = qlora_cuda::memory_stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("allocated", (double)s.allocated);
    o.Set("reserved", (double)s.reserved);
    o.Set("peakAllocated", (double)s.peak_allocated);
    o.Set("peakReserved", (double)s.peak_reserved);
    o.Set("numAllocs", (double)s.num_allocs);
    o.Set("pagedBytes", (double)qlora_cuda_paged_bytes());
    o.Set("pinnedHostBytes", (double)qlora_cuda::host_pinned_bytes());
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
        o.Set("deviceFree", (double)free_b);
        o.Set("deviceTotal", (double)total_b);
    }
    return o;
}

static Napi::Value ResetPeak(const Napi::CallbackInfo& info) {
    qlora_cuda::reset_peak_stats();
    return info.Env().Undefined();
}

static Napi::Value EmptyCache(const Napi::CallbackInfo& info) {
    qlora_cuda::empty_cache();
    qlora_cuda::host_slots_free();
    return info.Env().Undefined();
}

// hostOffload(src, bytes) -> slot: src copied to pinned host memory on the copy stream, after the queued work
static Napi::Value HostOffload(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    void* src = device_ptr_arg(info, 0);
    int64_t bytes = int_arg(info, 1);
    QLORA_CHECK_ARGS(env);
    cudaError_t err = cudaSuccess;
    int slot = qlora_cuda::host_offload(src, (size_t)bytes, &err);
    if (slot < 0) {
        cuda_throw(env, err == cudaSuccess ? cudaErrorUnknown : err, "hostOffload");
        return env.Undefined();
    }
    return Napi::Number::New(env, slot);
}

// hostFence(slot): the stream waits for the slot's copy to host
static Napi::Value HostFence(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t slot = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda::host_fence((int)slot), "hostFence");
    return env.Undefined();
}

// hostPrefetch(slot, dst): the slot copied back into dst on the copy stream, after the queued work
static Napi::Value HostPrefetch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t slot = int_arg(info, 0);
    void* dst = device_ptr_arg(info, 1);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda::host_prefetch((int)slot, dst), "hostPrefetch");
    return env.Undefined();
}

// hostRestore(slot): the stream waits for the copy back; the slot is free again
static Napi::Value HostRestore(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t slot = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda::host_restore((int)slot), "hostRestore");
    return env.Undefined();
}

// setDevice(index)
static Napi::Value SetDevice(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t i = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, cudaSetDevice((int)i), "setDevice");
    return env.Undefined();
}

// graphBegin(): work queued from now on is recorded into a CUDA graph, not run (runtime.h)
static Napi::Value GraphBegin(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    cuda_throw(env, qlora_cuda::graph_capture_begin(), "graphBegin");
    return env.Undefined();
}

// graphEnd() -> handle of the instantiated graph; throws (the capture is over) when it cannot be captured
static Napi::Value GraphEnd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    cudaGraphExec_t exec = nullptr;
    if (cuda_throw(env, qlora_cuda::graph_capture_end(&exec), "graphEnd")) return env.Undefined();
    return Napi::Number::New(env, (double)reinterpret_cast<uintptr_t>(exec));
}

// graphLaunch(handle): queues one replay on the stream
static Napi::Value GraphLaunch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto exec = reinterpret_cast<cudaGraphExec_t>(device_ptr_arg(info, 0));
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda::graph_launch(exec), "graphLaunch");
    return env.Undefined();
}

// graphDestroy(handle)
static Napi::Value GraphDestroy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto exec = reinterpret_cast<cudaGraphExec_t>(device_ptr_arg(info, 0));
    QLORA_CHECK_ARGS(env);
    qlora_cuda::graph_destroy(exec);
    return env.Undefined();
}

// profileHold(us): the stream waits `us` microseconds before the work queued after it (runtime.h)
static Napi::Value ProfileHold(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t us = int_arg(info, 0);
    QLORA_CHECK_ARGS(env);
    cuda_throw(env, qlora_cuda::profile_hold(us), "profileHold");
    return env.Undefined();
}

// profileMark(): a timing event on the stream
static Napi::Value ProfileMark(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    cuda_throw(env, qlora_cuda::profile_mark(), "profileMark");
    return env.Undefined();
}

// profileRead() -> Float64Array of the milliseconds between consecutive marks (waits for the stream)
static Napi::Value ProfileRead(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<double> ms;
    if (cuda_throw(env, qlora_cuda::profile_read(&ms), "profileRead")) return env.Undefined();
    Napi::Float64Array out = Napi::Float64Array::New(env, ms.size());
    for (size_t i = 0; i < ms.size(); i++) out[i] = ms[i];
    return out;
}

void register_cuda_memory(Napi::Env env, Napi::Object exports) {
    exports.Set("alloc", Napi::Function::New(env, Alloc, "alloc"));
    exports.Set("free", Napi::Function::New(env, Free, "free"));
    exports.Set("hostAlloc", Napi::Function::New(env, HostAlloc, "hostAlloc"));
    exports.Set("hostFree", Napi::Function::New(env, HostFree, "hostFree"));
    exports.Set("upload", Napi::Function::New(env, Upload, "upload"));
    exports.Set("download", Napi::Function::New(env, Download, "download"));
    exports.Set("memset", Napi::Function::New(env, Memset, "memset"));
    exports.Set("copy", Napi::Function::New(env, Copy, "copy"));
    exports.Set("synchronize", Napi::Function::New(env, Synchronize, "synchronize"));
    exports.Set("memoryStats", Napi::Function::New(env, MemoryStats, "memoryStats"));
    exports.Set("resetPeakMemoryStats", Napi::Function::New(env, ResetPeak, "resetPeakMemoryStats"));
    exports.Set("emptyCache", Napi::Function::New(env, EmptyCache, "emptyCache"));
    exports.Set("hostOffload", Napi::Function::New(env, HostOffload, "hostOffload"));
    exports.Set("hostFence", Napi::Function::New(env, HostFence, "hostFence"));
    exports.Set("hostPrefetch", Napi::Function::New(env, HostPrefetch, "hostPrefetch"));
    exports.Set("hostRestore", Napi::Function::New(env, HostRestore, "hostRestore"));
    exports.Set("profileHold", Napi::Function::New(env, ProfileHold, "profileHold"));
    exports.Set("profileMark", Napi::Function::New(env, ProfileMark, "profileMark"));
    exports.Set("profileRead", Napi::Function::New(env, ProfileRead, "profileRead"));
    exports.Set("setDevice", Napi::Function::New(env, SetDevice, "setDevice"));
    exports.Set("graphBegin", Napi::Function::New(env, GraphBegin, "graphBegin"));
    exports.Set("graphEnd", Napi::Function::New(env, GraphEnd, "graphEnd"));
    exports.Set("graphLaunch", Napi::Function::New(env, GraphLaunch, "graphLaunch"));
    exports.Set("graphDestroy", Napi::Function::New(env, GraphDestroy, "graphDestroy"));
}
