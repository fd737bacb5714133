// gemm.h: dense GEMM on the GPU through cuBLASLt, loaded at run time with dlopen (no cuBLAS headers or
// libraries at build time), plus the matrix dtype codes the CUDA ops share.
//
// Row-major semantics, exactly the contract of qlora_cpu_sgemm (native/include/qlora_ops.h):
//   C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C
// op(A) = A (A is [M, lda>=K]) or A^T (A is [K, lda>=M]) when transA != 0; likewise for B.
// beta == 0 means C is write-only (NaNs in C are not propagated). K == 0 gives C = beta * C.
// A and B have the same dtype; C is f32 or the input dtype. Compute is fp32 (CUBLAS_COMPUTE_32F: f32 inputs
// use no TF32), alpha/beta are f32. Every call is queued on qlora_cuda::stream().
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of device matrices (shared by the CUDA ops that take a dtype argument)
#define QLORA_CUDA_F32 0
#define QLORA_CUDA_BF16 1
#define QLORA_CUDA_F16 2

// status of the gemm functions: 0 on success, else an error whose text qlora_cuda_gemm_last_error() returns
#define QLORA_GEMM_OK 0
#define QLORA_GEMM_ERR_ARG 1      // bad sizes, leading dimensions or dtype combination
#define QLORA_GEMM_ERR_LIBRARY 2  // libcublasLt could not be loaded
#define QLORA_GEMM_ERR_CUBLAS 3   // a cuBLASLt call failed (the message names the status)
#define QLORA_GEMM_ERR_CUDA 4     // a CUDA runtime call failed (allocation, launch)

int qlora_cuda_gemm(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
                    int dtypeA, const void* B, int64_t ldb, int dtypeB, float beta, void* C, int64_t ldc, int dtypeC,
                    cudaStream_t stream);

// `batch` independent GEMMs of the same shape; matrix i of A starts at A + i * strideA elements (likewise B, C).
// A stride of 0 reuses one matrix for the whole batch (allowed for A and B).
int qlora_cuda_gemm_strided_batched(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                                    int64_t lda, int64_t strideA, int dtypeA, const void* B, int64_t ldb,
                                    int64_t strideB, int dtypeB, float beta, void* C, int64_t ldc, int64_t strideC,
                                    int dtypeC, int64_t batch, cudaStream_t stream);

// the message of the last failed gemm call on this thread ("" when none)
const char* qlora_cuda_gemm_last_error(void);

// loads cuBLASLt (if not yet loaded); 0 on success. *library = the soname that loaded, *version =
// cublasLtGetVersion() (major * 10000 + minor * 100 + patch)
int qlora_cuda_gemm_library(const char** library, size_t* version);

struct QloraGemmStats {
    int64_t calls;           // gemm calls since load
    int64_t heuristic_runs;  // cache misses (each ran cublasLtMatmulAlgoGetHeuristic)
    int64_t cached_plans;    // plans in the cache now
    int64_t fallback_calls;  // calls served by the built-in SIMT kernel (no cuBLASLt algorithm fitted)
};
struct QloraGemmStats qlora_cuda_gemm_stats(void);

// drops every cached plan (descriptors and algorithms); the workspace stays
void qlora_cuda_gemm_clear_cache(void);

// The built-in fallback (native/cuda/gemm_fallback.cu): a plain tiled fp32-accumulating kernel used when
// cuBLASLt has no algorithm for a shape/alignment, and for K == 0. Column-major arguments as cuBLAS sees them:
//   C[m,n] (ldc) = alpha * opA(A) @ opB(B) + beta * C, with opA(A)[m,k], opB(B)[k,n]; strides in elements.
cudaError_t qlora_cuda_gemm_fallback_colmajor(int opA, int opB, int64_t m, int64_t n, int64_t k, float alpha,
                                              const void* A, int64_t lda, int64_t strideA, const void* B, int64_t ldb,
                                              int64_t strideB, int dtypeAB, float beta, void* C, int64_t ldc,
                                              int64_t strideC, int dtypeC, int64_t batch, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
