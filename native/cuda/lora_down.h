// lora_down.h: the LoRA "A" products of a decoding step in one launch. Each LoRA projection first computes
// xa = x A^T with A = PEFT's lora_A.weight [r, K]; the projections that read the same x (q, k, v; gate, up) share
// one launch, and all the rows of x (M <= 8) are done in the same pass, so each A is read once.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QLORA_LORA_DOWN_MAX_M 8
#define QLORA_LORA_DOWN_MAX_R 64
#define QLORA_LORA_DOWN_MAX_PARTS 4

// one projection: out [M, r] (bf16, row-major) = x A^T with A [r, K] (bf16, row-major)
typedef struct QloraLoraDownPart {
    uint16_t* out;
    const uint16_t* A;
    int64_t r;
} QloraLoraDownPart;

// For each of the num_parts parts: out[m, j] = bf16(sum_k x[m, k] A[j, k]), x [M, K] bf16 row-major, the sum
// accumulated in fp32 and rounded once (what gemm(false, true, M, r, K, 1, x, A, 0, out) computes, up to the fp32
// summation order). The order is fixed by the shapes and the device, so a call gives the same bits every time. No
// host synchronization, no allocation: capturable in a CUDA graph.
// 1 <= M <= QLORA_LORA_DOWN_MAX_M, K >= 1, 1 <= num_parts <= QLORA_LORA_DOWN_MAX_PARTS,
// 1 <= r <= QLORA_LORA_DOWN_MAX_R and non-NULL pointers: cudaErrorInvalidValue otherwise. Needs K % 8 == 0 and
// 16-byte aligned x and A (16-byte loads): cudaErrorNotSupported otherwise (then use the GEMM). Nothing is queued
// when an error is returned before the launch.
// On GPUs with thread block clusters (compute capability 9.0+) K is split over up to 8 blocks of a cluster whose
// partial sums meet in distributed shared memory; elsewhere one block takes the whole of K.
cudaError_t qlora_cuda_lora_down_bf16(const uint16_t* x, int64_t M, int64_t K, const QloraLoraDownPart* parts,
                                      int64_t num_parts, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
