// kv_cache_row.cuh: where a token's key/value row goes in the KV cache (kernels.h qlora_cuda_cache_write's rules),
// for the kernels that write the cache (elementwise.cu's cache write, rope.cu's fused RoPE + cache write).
#pragma once
#include <stdint.h>

namespace qk {

// the cache row of token t of batch row b: position pasts[b] + t of a [B, capacity] cache, or, with a block table
// (table[B, table_stride], nullable), of a pool of blocks of `block` rows; -1 where nothing is written (a position
// outside [0, capacity): the host checks lengths, the kernel never writes outside the row; or no block reserved)
__device__ __forceinline__ int64_t kv_cache_row(const int32_t* pasts, const int32_t* table, int64_t table_stride,
                                                int64_t block, int64_t capacity, int b, int t) {
    const int64_t pos = (int64_t)pasts[b] + t;
    if (pos < 0 || pos >= capacity) return -1;
    if (!table) return (int64_t)b * capacity + pos;
    const int32_t blk = table[b * table_stride + pos / block];
    return blk < 0 ? -1 : (int64_t)blk * block + pos % block;
}

}  // namespace qk
