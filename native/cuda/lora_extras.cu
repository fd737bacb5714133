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

__global__ void dropout_bf16_kernel(uint16_t* out, const uint16_t* inp, uint64_t seed, float p, float scale, int64_t n,
                                    int64_t first) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = qlora_dropout_keep(seed, (uint64_t)(first + i), p) ? qk::bf16_to_f32(inp[i]) * scale : 0.0f;
    out[i] = qk::f32_to_bf16(v);
}

__global__ void dropout_add_bf16_kernel(uint16_t* y, const uint16_t* x, uint64_t seed, float p, float scale, int64_t n,
                                        int64_t first) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (!qlora_dropout_keep(seed, (uint64_t)(first + i), p)) return;
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
                                               int64_t first, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (!(p >= 0.0f && p < 1.0f) || first < 0) return cudaErrorInvalidValue;
    const int block = 256;
    dropout_bf16_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(out, inp, seed, p, 1.0f / (1.0f - p), n, first);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_dropout_add_bf16(uint16_t* y, const uint16_t* x, uint64_t seed, float p, int64_t n,
                                                   int64_t first, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (!(p >= 0.0f && p < 1.0f) || first < 0) return cudaErrorInvalidValue;
    const int block = 256;
    dropout_add_bf16_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(y, x, seed, p, 1.0f / (1.0f - p), n, first);
    return cudaGetLastError();
}

// ------------------------------------------------------------------
// DoRA and trained-bias kernels

__global__ void scale_columns_bf16_kernel(uint16_t* out, const uint16_t* x, const float* k, float offset, int64_t M,
                                          int64_t N, int accumulate) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    float v = qk::ieee::mul(qk::bf16_to_f32(x[i]), qk::ieee::add(k[i % N], offset));
    if (accumulate) v = qk::ieee::add(qk::bf16_to_f32(out[i]), v);
    out[i] = qk::f32_to_bf16(v);
}

// one thread per column, rows in order: consecutive threads read consecutive columns of a row (coalesced)
__global__ void column_sums_bf16_kernel(float* dst, const uint16_t* a, const uint16_t* b, const float* div, int64_t M,
                                        int64_t N) {
    int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    double s = 0;
    for (int64_t m = 0; m < M; m++) {
        double v = qk::bf16_to_f32(a[m * N + n]);
        if (b) v *= qk::bf16_to_f32(b[m * N + n]);
        s += v;
    }
    if (div) s /= div[n];
    dst[n] = qk::ieee::add(dst[n], (float)s);
}

// one block per row
__global__ void row_norms_f32_kernel(float* out, const float* W, int64_t C) {
    __shared__ double scratch[32];
    const float* row = W + (int64_t)blockIdx.x * C;
    double s = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += (double)row[c] * (double)row[c];
    s = qk::block_sum(s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)sqrt(s);
}

__global__ void divide_f32_kernel(float* out, const float* a, const float* b, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = qk::ieee::div(a[i], b[i]);
}

extern "C" cudaError_t qlora_cuda_scale_columns_bf16(uint16_t* out, const uint16_t* x, const float* k, float offset,
                                                     int64_t M, int64_t N, int accumulate, cudaStream_t stream) {
    if (M * N == 0) return cudaSuccess;
    const int block = 256;
    scale_columns_bf16_kernel<<<CEIL_DIV(M * N, block), block, 0, stream>>>(out, x, k, offset, M, N, accumulate);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_column_sums_bf16(float* dst, const uint16_t* a, const uint16_t* b, const float* div,
                                                   int64_t M, int64_t N, cudaStream_t stream) {
    if (N == 0) return cudaSuccess;
    const int block = 256;
    column_sums_bf16_kernel<<<CEIL_DIV(N, block), block, 0, stream>>>(dst, a, b, div, M, N);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_row_norms_f32(float* out, const float* W, int64_t R, int64_t C, cudaStream_t stream) {
    if (R == 0) return cudaSuccess;
    if (R > INT32_MAX) return cudaErrorInvalidValue;
    row_norms_f32_kernel<<<(unsigned)R, 256, 0, stream>>>(out, W, C);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_divide_f32(float* out, const float* a, const float* b, int64_t n,
                                             cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    const int block = 256;
    divide_f32_kernel<<<CEIL_DIV(n, block), block, 0, stream>>>(out, a, b, n);
    return cudaGetLastError();
}
