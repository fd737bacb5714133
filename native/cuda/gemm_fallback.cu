// gemm_fallback.cu: a plain tiled GEMM (fp32 accumulation) for the problems cuBLASLt has no algorithm for
// (odd alignments on some versions) and for K == 0. Correct, not fast: the hot GEMMs go through cuBLASLt.
// Column-major, as cuBLAS sees the problem (gemm.cpp swaps the operands of the row-major call).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "gemm.h"

namespace {

constexpr int TILE = 16;

template <typename T>
__device__ __forceinline__ float load_f32(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_f32<float>(const float* p, int64_t i) {
    return p[i];
}
template <>
__device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ float load_f32<__half>(const __half* p, int64_t i) {
    return __half2float(p[i]);
}

template <typename T>
__device__ __forceinline__ void store_f32(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void store_f32<float>(float* p, int64_t i, float v) {
    p[i] = v;
}
template <>
__device__ __forceinline__ void store_f32<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
    p[i] = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store_f32<__half>(__half* p, int64_t i, float v) {
    p[i] = __float2half_rn(v);
}

// C[m,n] = alpha * opA(A)[m,k] @ opB(B)[k,n] + beta * C; block (TILE, TILE), grid (ceil(m/TILE), ceil(n/TILE), batches)
template <typename TI, typename TO>
__global__ void gemm_fallback_kernel(int opA, int opB, int64_t m, int64_t n, int64_t k, float alpha, const TI* A,
                                     int64_t lda, int64_t strideA, const TI* B, int64_t ldb, int64_t strideB,
                                     float beta, TO* C, int64_t ldc, int64_t strideC, int64_t batch) {
    __shared__ float As[TILE][TILE + 1];  // As[l][i] = opA(A)(i0 + i, l0 + l)
    __shared__ float Bs[TILE][TILE + 1];  // Bs[j][l] = opB(B)(l0 + l, j0 + j)
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t i = (int64_t)blockIdx.x * TILE + tx;  // row of C
    const int64_t j = (int64_t)blockIdx.y * TILE + ty;  // column of C
    for (int64_t z = blockIdx.z; z < batch; z += gridDim.z) {
        const TI* a = A + z * strideA;
        const TI* b = B + z * strideB;
        TO* c = C + z * strideC;
        float acc = 0.0f;
        for (int64_t l0 = 0; l0 < k; l0 += TILE) {
            // A tile: thread (tx, ty) loads opA(A)(i0 + tx, l0 + ty)
            {
                const int64_t r = (int64_t)blockIdx.x * TILE + tx, l = l0 + ty;
                float v = 0.0f;
                if (r < m && l < k) v = load_f32(a, opA ? l + r * lda : r + l * lda);
                As[ty][tx] = v;
            }
            // B tile: thread (tx, ty) loads opB(B)(l0 + tx, j0 + ty)
            {
                const int64_t l = l0 + tx, col = (int64_t)blockIdx.y * TILE + ty;
                float v = 0.0f;
                if (l < k && col < n) v = load_f32(b, opB ? col + l * ldb : l + col * ldb);
                Bs[ty][tx] = v;
            }
            __syncthreads();
#pragma unroll
            for (int l = 0; l < TILE; l++) acc = fmaf(As[l][tx], Bs[ty][l], acc);
            __syncthreads();
        }
        if (i < m && j < n) {
            const int64_t idx = i + j * ldc;
            float v = alpha * acc;
            if (beta != 0.0f) v = fmaf(beta, load_f32(c, idx), v);
            store_f32(c, idx, v);
        }
    }
}

template <typename TI, typename TO>
cudaError_t launch(int opA, int opB, int64_t m, int64_t n, int64_t k, float alpha, const void* A, int64_t lda,
                   int64_t strideA, const void* B, int64_t ldb, int64_t strideB, float beta, void* C, int64_t ldc,
                   int64_t strideC, int64_t batch, cudaStream_t stream) {
    const int64_t gx = CEIL_DIV(m, TILE), gy = CEIL_DIV(n, TILE);
    if (gx > INT32_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
    dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)(batch < 65535 ? batch : 65535));
    dim3 block(TILE, TILE);
    gemm_fallback_kernel<TI, TO><<<grid, block, 0, stream>>>(opA, opB, m, n, k, alpha, (const TI*)A, lda, strideA,
                                                             (const TI*)B, ldb, strideB, beta, (TO*)C, ldc, strideC,
                                                             batch);
    return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t qlora_cuda_gemm_fallback_colmajor(int opA, int opB, int64_t m, int64_t n, int64_t k, float alpha,
                                                         const void* A, int64_t lda, int64_t strideA, const void* B,
                                                         int64_t ldb, int64_t strideB, int dtypeAB, float beta, void* C,
                                                         int64_t ldc, int64_t strideC, int dtypeC, int64_t batch,
                                                         cudaStream_t stream) {
    if (m <= 0 || n <= 0 || batch <= 0) return cudaSuccess;
#define QLORA_FALLBACK(TI, TO) \
    launch<TI, TO>(opA, opB, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc, strideC, batch, stream)
    if (dtypeAB == QLORA_CUDA_F32 && dtypeC == QLORA_CUDA_F32) return QLORA_FALLBACK(float, float);
    if (dtypeAB == QLORA_CUDA_BF16 && dtypeC == QLORA_CUDA_F32) return QLORA_FALLBACK(__nv_bfloat16, float);
    if (dtypeAB == QLORA_CUDA_BF16 && dtypeC == QLORA_CUDA_BF16) return QLORA_FALLBACK(__nv_bfloat16, __nv_bfloat16);
    if (dtypeAB == QLORA_CUDA_F16 && dtypeC == QLORA_CUDA_F32) return QLORA_FALLBACK(__half, float);
    if (dtypeAB == QLORA_CUDA_F16 && dtypeC == QLORA_CUDA_F16) return QLORA_FALLBACK(__half, __half);
#undef QLORA_FALLBACK
    return cudaErrorInvalidValue;
}
