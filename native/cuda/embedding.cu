// embedding.cu: token embedding lookup (bf16 table) and its gradient (fp32 table gradient, atomics) (kernels.h).
#include <limits.h>
#include "kernels.h"
#include "kernel_utils.cuh"

using namespace qk;

namespace {

constexpr int kThreads = 128;

__global__ void reset_bad_kernel(int32_t* bad) {
    bad[0] = 0;
    bad[1] = INT_MAX;
}

// one block per row; vectorized copy when rows are 16-byte aligned (C % 8 == 0, aligned buffers)
__global__ void __launch_bounds__(kThreads)
    embedding_forward_kernel(uint16_t* out, int32_t* bad, const int32_t* ids, const uint16_t* table, int64_t V,
                             int64_t C, bool vec) {
    const int64_t n = blockIdx.x;
    const int32_t id = ids[n];
    uint16_t* dst = out + n * C;
    const bool ok = id >= 0 && id < V;
    if (!ok && threadIdx.x == 0 && bad) {
        atomicAdd(&bad[0], 1);
        atomicMin(&bad[1], (int32_t)(n < INT_MAX ? n : INT_MAX));
    }
    if (vec) {
        uint4* d = reinterpret_cast<uint4*>(dst);
        const uint4* s = reinterpret_cast<const uint4*>(table + (ok ? (int64_t)id * C : 0));
        for (int64_t j = threadIdx.x; j < C / 8; j += blockDim.x) d[j] = ok ? s[j] : make_uint4(0, 0, 0, 0);
    } else {
        const uint16_t* s = table + (ok ? (int64_t)id * C : 0);
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) dst[j] = ok ? s[j] : (uint16_t)0;
    }
}

__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(float* dtable, const uint16_t* dout, const int32_t* ids, int64_t V, int64_t C, bool vec) {
    const int64_t n = blockIdx.x;
    const int32_t id = ids[n];
    if (id < 0 || id >= V) return;
    float* d = dtable + (int64_t)id * C;
    const uint16_t* g = dout + n * C;
    if (vec) {
        for (int64_t j = threadIdx.x; j < C / 8; j += blockDim.x) {
            float f[8];
            unpack_bf16x8(reinterpret_cast<const uint4*>(g)[j], f);
#pragma unroll
            for (int k = 0; k < 8; k++) atomicAdd(d + 8 * j + k, f[k]);
        }
    } else {
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) atomicAdd(d + j, bf16_to_f32(g[j]));
    }
}

}  // namespace

extern "C" cudaError_t qlora_cuda_embedding_forward(uint16_t* out, int32_t* bad, const int32_t* ids,
                                                    const uint16_t* table, int64_t N, int64_t V, int64_t C,
                                                    cudaStream_t stream) {
    if (N < 0 || V < 0 || C < 0 || N > INT_MAX) return cudaErrorInvalidValue;
    if (bad) {
        reset_bad_kernel<<<1, 1, 0, stream>>>(bad);
        QLORA_CUDA_TRY(cudaGetLastError());
    }
    if (N == 0 || C == 0) return cudaSuccess;
    const bool vec = C % 8 == 0 && aligned16(out) && aligned16(table);
    embedding_forward_kernel<<<(unsigned)N, kThreads, 0, stream>>>(out, bad, ids, table, V, C, vec);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_embedding_backward(float* dtable, const uint16_t* dout, const int32_t* ids, int64_t N,
                                                     int64_t V, int64_t C, cudaStream_t stream) {
    if (N < 0 || V < 0 || C < 0 || N > INT_MAX) return cudaErrorInvalidValue;
    if (N == 0 || C == 0) return cudaSuccess;
    const bool vec = C % 8 == 0 && aligned16(dout);
    embedding_backward_kernel<<<(unsigned)N, kThreads, 0, stream>>>(dtable, dout, ids, V, C, vec);
    return cudaGetLastError();
}
