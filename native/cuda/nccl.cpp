// nccl.cpp: the NCCL C API declared here (the few functions and types qlora calls, as nccl.h of NCCL 2.x
// declares them) and resolved from libnccl.so.2 with dlopen.
#include "nccl.h"
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <mutex>
#include "runtime.h"

namespace {

// nccl.h's types, as NCCL 2.x declares them
typedef struct ncclComm* ncclComm_t;
typedef struct {
    char internal[qlora_nccl::kUniqueIdBytes];
} ncclUniqueId;
typedef int ncclResult_t;  // ncclSuccess = 0
enum { ncclSuccess = 0 };
enum { ncclInt8 = 0, ncclFloat32 = 7, ncclFloat64 = 8 };
enum { ncclSum = 0 };

struct Api {
    ncclResult_t (*GetVersion)(int*);
    ncclResult_t (*GetUniqueId)(ncclUniqueId*);
    ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int);
    ncclResult_t (*AllReduce)(const void*, void*, size_t, int, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Broadcast)(const void*, void*, size_t, int, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    const char* (*GetErrorString)(ncclResult_t);
};

const char* kLibNames[] = {"libnccl.so.2", "libnccl.so"};
std::mutex g_mutex;
void* g_lib = nullptr;
bool g_tried = false;
std::string g_load_error;
Api g_api = {};
ncclComm_t g_comm = nullptr;

template <typename F>
bool load_sym(F*& fn, const char* name) {
    fn = reinterpret_cast<F*>(dlsym(g_lib, name));
    if (!fn) g_load_error = std::string("libnccl.so.2 has no symbol ") + name + " (an NCCL older than 2.0?)";
    return fn != nullptr;
}

bool check(ncclResult_t r, const char* what, std::string* error) {
    if (r == ncclSuccess) return true;
    *error = std::string(what) + ": " + (g_api.GetErrorString ? g_api.GetErrorString(r) : "NCCL error") + " (code " +
             std::to_string(r) + ")";
    return false;
}

}  // namespace

namespace qlora_nccl {

bool load(std::string* error) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_lib) return true;
    if (g_tried) {
        *error = g_load_error;
        return false;
    }
    g_tried = true;
    std::string dl_errors;
    for (const char* name : kLibNames) {
        g_lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        if (g_lib) break;
        const char* e = dlerror();
        if (e) dl_errors += std::string("; ") + e;
    }
    if (!g_lib) {
        g_load_error =
            "libnccl.so.2 not found: data-parallel training on GPUs needs NCCL (pip install nvidia-nccl-cu12, " +
            std::string("or the libnccl2 package; or set LD_LIBRARY_PATH to its folder)") + dl_errors;
        *error = g_load_error;
        return false;
    }
    bool ok = load_sym(g_api.GetVersion, "ncclGetVersion") && load_sym(g_api.GetUniqueId, "ncclGetUniqueId") &&
              load_sym(g_api.CommInitRank, "ncclCommInitRank") && load_sym(g_api.AllReduce, "ncclAllReduce") &&
              load_sym(g_api.Broadcast, "ncclBroadcast") && load_sym(g_api.CommDestroy, "ncclCommDestroy") &&
              load_sym(g_api.GetErrorString, "ncclGetErrorString");
    if (!ok) {
        dlclose(g_lib);
        g_lib = nullptr;
        *error = g_load_error;
        return false;
    }
    return true;
}

int version() {
    int v = 0;
    if (g_api.GetVersion) g_api.GetVersion(&v);
    return v;
}

bool get_unique_id(unsigned char out[kUniqueIdBytes], std::string* error) {
    if (!load(error)) return false;
    ncclUniqueId id;
    if (!check(g_api.GetUniqueId(&id), "ncclGetUniqueId", error)) return false;
    for (int i = 0; i < kUniqueIdBytes; i++) out[i] = (unsigned char)id.internal[i];
    return true;
}

bool init_rank(const unsigned char id[kUniqueIdBytes], int nranks, int rank, std::string* error) {
    if (!load(error)) return false;
    if (g_comm) {
        *error = "ncclCommInitRank: this process already has a communicator";
        return false;
    }
    ncclUniqueId uid;
    for (int i = 0; i < kUniqueIdBytes; i++) uid.internal[i] = (char)id[i];
    return check(g_api.CommInitRank(&g_comm, nranks, uid, rank), "ncclCommInitRank", error);
}

bool all_reduce_sum(void* buf, size_t count, int dtype, std::string* error) {
    if (!g_comm) {
        *error = "ncclAllReduce: no communicator (ncclInitRank first)";
        return false;
    }
    return check(
        g_api.AllReduce(buf, buf, count, dtype == 1 ? ncclFloat64 : ncclFloat32, ncclSum, g_comm, qlora_cuda::stream()),
        "ncclAllReduce", error);
}

bool broadcast(void* buf, size_t bytes, int root, std::string* error) {
    if (!g_comm) {
        *error = "ncclBroadcast: no communicator (ncclInitRank first)";
        return false;
    }
    return check(g_api.Broadcast(buf, buf, bytes, ncclInt8, root, g_comm, qlora_cuda::stream()), "ncclBroadcast",
                 error);
}

void destroy() {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_comm && g_api.CommDestroy) g_api.CommDestroy(g_comm);
    g_comm = nullptr;
}

}  // namespace qlora_nccl
