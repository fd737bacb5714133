// nccl.h: NCCL, loaded at run time with dlopen (as cuBLASLt is in gemm.cpp): building needs no NCCL headers
// or library, and a machine without libnccl.so.2 gets a clear error only when a data-parallel GPU run asks for it.
// One communicator per process (one GPU per rank); every collective is queued on qlora_cuda::stream().
#pragma once
#include <stddef.h>
#include <string>

namespace qlora_nccl {

constexpr int kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES

// opens libnccl.so.2 and resolves the functions; false with `error` set (the library missing, a symbol missing)
bool load(std::string* error);
// NCCL's version code (e.g. 22304 for 2.23.4), after load()
int version();
// rank 0 makes the id; the ranks share it (over the TCP bootstrap) and each joins with it
bool get_unique_id(unsigned char out[kUniqueIdBytes], std::string* error);
bool init_rank(const unsigned char id[kUniqueIdBytes], int nranks, int rank, std::string* error);
// dtype: 0 float32, 1 float64; sums in place over the ranks
bool all_reduce_sum(void* buf, size_t count, int dtype, std::string* error);
bool broadcast(void* buf, size_t bytes, int root, std::string* error);
void destroy();

}  // namespace qlora_nccl
