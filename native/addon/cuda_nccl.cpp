// cuda_nccl.cpp: NCCL for JavaScript (src/parallel/nccl.ts): the unique id, joining the communicator, and
// all-reduce / broadcast of device buffers on the addon's stream. Errors are JS exceptions with NCCL's message.
#include "cuda_bindings.h"
#include "napi_util.h"
#include "../cuda/nccl.h"

using namespace qlora_napi;

static Napi::Value fail(Napi::Env env, const std::string& error) {
    Napi::Error::New(env, error).ThrowAsJavaScriptException();
    return env.Undefined();
}

// ncclVersion() -> NCCL's version code; throws when libnccl.so.2 cannot be loaded
static Napi::Value NcclVersion(const Napi::CallbackInfo& info) {
    std::string error;
    if (!qlora_nccl::load(&error)) return fail(info.Env(), error);
    return Napi::Number::New(info.Env(), qlora_nccl::version());
}

// ncclGetUniqueId() -> Uint8Array(128)
static Napi::Value NcclGetUniqueId(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto out = Napi::Uint8Array::New(env, qlora_nccl::kUniqueIdBytes);
    std::string error;
    if (!qlora_nccl::get_unique_id(out.Data(), &error)) return fail(env, error);
    return out;
}

// ncclInitRank(id: Uint8Array(128), nranks, rank)
static Napi::Value NcclInitRank(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray() || info[0].As<Napi::Uint8Array>().ByteLength() != qlora_nccl::kUniqueIdBytes)
        return fail(env, "ncclInitRank: argument 0 must be the 128-byte unique id");
    int64_t nranks = int_arg(info, 1);
    int64_t rank = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    std::string error;
    if (!qlora_nccl::init_rank(info[0].As<Napi::Uint8Array>().Data(), (int)nranks, (int)rank, &error))
        return fail(env, error);
    return env.Undefined();
}

// a collective over one device buffer, (buf, size, k) handed to Collective(buf, size, k):
// ncclAllReduceSum(buf, count, dtype: 0 f32 | 1 f64) and ncclBroadcast(buf, bytes, root)
template <bool (*Collective)(void*, size_t, int, std::string*)>
static Napi::Value BufferCollective(const Napi::CallbackInfo& info, const char* op) {
    Napi::Env env = info.Env();
    void* buf = device_ptr_arg(info, 0);
    int64_t size = int_arg(info, 1);
    int64_t k = int_arg(info, 2);
    QLORA_CHECK_ARGS(env);
    if (size < 0) return fail(env, std::string(op) + ": the size must be >= 0, got " + std::to_string(size));
    std::string error;
    if (!Collective(buf, (size_t)size, (int)k, &error)) return fail(env, error);
    return env.Undefined();
}

static Napi::Value NcclAllReduceSum(const Napi::CallbackInfo& info) {
    return BufferCollective<qlora_nccl::all_reduce_sum>(info, "ncclAllReduceSum");
}

static Napi::Value NcclBroadcast(const Napi::CallbackInfo& info) {
    return BufferCollective<qlora_nccl::broadcast>(info, "ncclBroadcast");
}

static Napi::Value NcclDestroy(const Napi::CallbackInfo& info) {
    qlora_nccl::destroy();
    return info.Env().Undefined();
}

void register_cuda_nccl(Napi::Env env, Napi::Object exports) {
    exports.Set("ncclVersion", Napi::Function::New(env, NcclVersion, "ncclVersion"));
    exports.Set("ncclGetUniqueId", Napi::Function::New(env, NcclGetUniqueId, "ncclGetUniqueId"));
    exports.Set("ncclInitRank", Napi::Function::New(env, NcclInitRank, "ncclInitRank"));
    exports.Set("ncclAllReduceSum", Napi::Function::New(env, NcclAllReduceSum, "ncclAllReduceSum"));
    exports.Set("ncclBroadcast", Napi::Function::New(env, NcclBroadcast, "ncclBroadcast"));
    exports.Set("ncclDestroy", Napi::Function::New(env, NcclDestroy, "ncclDestroy"));
}
