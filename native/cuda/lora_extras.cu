// lora_extras.cu: bias add and hash-based dropout for the LoRA step (see lora_extras.h).
#include "kernel_utils.cuh"
#include "lora_extras.h"
#include "qlora_dropout.h"

// ------------------------------------------------------------------
// CUDA kernels (the mask: qlora_dropout_keep, shared with the CPU's qlora_cpu_dropout_mask)

__global__ void add_bias_bf16_kernel(uint16_t* y, const uint16_t* bias, int64_t N, int64_t C) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C) return;
    float v = qk::bf16_to_f32(y[i]) + qk::bf16_to_f32(bias[i % C]);
    y[i] = qk::f32_to_bf16(v);
}

__global__ void dropout_bf16_kernel(uint16_t* out, const uint16_t* inp, uint64_t seed, float p, float scale,
                                    int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = qlora_dropout_keep(seed, (uint64_t)i, p) ? qk::bf16_to_f32(inp[i]) * scale : 0.0f;
    out[i] = qk::f32_to_bf16(v);
}

__global__ void dropout_add_bf16_kernel(uint16_t* y, const uint16_t* x, uint64_t seed, float p, float scale,
                                        int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (!qlora_dropout_keep(seed, (uint64_t)i, p)) return;
    y[i] = qk::f32_to_bf16(qk::bf16_to_f32(y[i]) + qk::bf16_to_f32(x[i]) * scale);
}

// ------------------------------------------------------------------
// kernel launchers

extern "C" cudaError_t qlora_cuda_add_bias_bf16(uint16_t* y, const uint16_t* bias, int64_t N, int64_t C,
                                                cudaStream_t stream) {
    if (N * C == 0) return cudaSuccess;
    const int block = 256;
    add_bias_bf16_kernel<<<CEIL_DIV(N * C, block), block, 0, stream>>>(y, bias, N, C);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_dropout_bf16(uint16_t* out, const uint16_t* inp, uint64_t seed, float p, int64_t n,
                                               cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (!(p >= 0.0f && p < 1.0f)) return cudaErrorInvalidValue;
    const int block = 256;
    dropout_bf16_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(out, inp, seed, p, 1.0f / (1.0f - p), n);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_dropout_add_bf16(uint16_t* y, const uint16_t* x, uint64_t seed, float p, int64_t n,
                                                   cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (!(p >= 0.0f && p < 1.0f)) return cudaErrorInvalidValue;
    const int block = 256;
    dropout_add_bf16_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(y, x, seed, p, 1.0f / (1.0f - p), n);
    return cudaGetLastError();
}
