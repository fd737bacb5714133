// elementwise.cu: dtype conversion, RMSNorm and SwiGLU on the GPU (fp32 for now; bf16 variants come with the
// CUDA training backend).
#include "common.cuh"
#include "qlora_cuda_ops.h"

// ------------------------------------------------------------------
// CUDA kernels

__global__ void bf16_to_f32_kernel(float* out, const uint16_t* inp, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __uint_as_float((uint32_t)inp[i] << 16);
}

// one warp per row: sum of squares with a warp reduction, then the scaled write
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                                       int64_t C, float eps) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const float* x = inp + row * C;
    float ss = 0.0f;
    for (int64_t c = lane; c < C; c += 32) ss += x[c] * x[c];
    for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffff, ss, offset);
    float r = rsqrtf(ss / (float)C + eps);
    if (lane == 0 && rstd) rstd[row] = r;
    float* y = out + row * C;
    for (int64_t c = lane; c < C; c += 32) y[c] = weight[c] * (x[c] * r);
}

__global__ void swiglu_forward_kernel(float* out, const float* gate, const float* up, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// ------------------------------------------------------------------
// kernel launchers

extern "C" cudaError_t qlora_cuda_bf16_to_f32(float* out, const uint16_t* inp, int64_t n, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    const int block = 256;
    bf16_to_f32_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(out, inp, n);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight,
                                                  int64_t N, int64_t C, float eps, cudaStream_t stream) {
    if (N == 0) return cudaSuccess;
    const int block = 256, rows_per_block = block / 32;
    rmsnorm_forward_kernel<<<CEIL_DIV(N, rows_per_block), block, 0, stream>>>(out, rstd, inp, weight, N, C, eps);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_swiglu_forward(float* out, const float* gate, const float* up, int64_t n,
                                                 cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    const int block = 256;
    swiglu_forward_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(out, gate, up, n);
    return cudaGetLastError();
}
