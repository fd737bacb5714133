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

// one element of each op, shared by the scalar kernels (tails, unaligned buffers) and the 8-wide ones, so both give
// the same bits: the mask of element `i` of the whole tensor
__device__ __forceinline__ float dropped(float x, uint64_t seed, uint64_t i, float p, float scale) {
    return qlora_dropout_keep(seed, i, p) ? x * scale : 0.0f;
}
__device__ __forceinline__ float dropped_add(float y, float x, uint64_t seed, uint64_t i, float p, float scale) {
    return qlora_dropout_keep(seed, i, p) ? fmaf(x, scale, y) : y;  // one rounding, as the CPU's float sum allows
}

__global__ void dropout_bf16_kernel(uint16_t* out, const uint16_t* inp, uint64_t seed, float p, float scale, int64_t n,
                                    int64_t first) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = qk::f32_to_bf16(dropped(qk::bf16_to_f32(inp[i]), seed, (uint64_t)(first + i), p, scale));
}

__global__ void dropout_add_bf16_kernel(uint16_t* y, const uint16_t* x, uint64_t seed, float p, float scale, int64_t n,
                                        int64_t first) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (!qlora_dropout_keep(seed, (uint64_t)(first + i), p)) return;  // dropped: y is not even rewritten
    y[i] = qk::f32_to_bf16(
        dropped_add(qk::bf16_to_f32(y[i]), qk::bf16_to_f32(x[i]), seed, (uint64_t)(first + i), p, scale));
}

// 8 elements a thread through 16-byte loads and stores: the scalar kernels' 2-byte accesses reached about a third
// of the memory bandwidth (bench:gpu --profile: 41 us a call on [2048, 3584] and larger, 14% of a 7B QLoRA step)
__global__ void dropout_bf16x8_kernel(uint4* out, const uint4* inp, uint64_t seed, float p, float scale, int64_t chunks,
                                      int64_t first) {
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    float v[8];
    qk::unpack_bf16x8(inp[c], v);
    const uint64_t i0 = (uint64_t)(first + 8 * c);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = dropped(v[e], seed, i0 + e, p, scale);
    out[c] = qk::pack_bf16x8(v);
}

__global__ void dropout_add_bf16x8_kernel(uint4* y, const uint4* x, uint64_t seed, float p, float scale, int64_t chunks,
                                          int64_t first) {
    int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= chunks) return;
    float yv[8], xv[8];
    qk::unpack_bf16x8(y[c], yv);
    qk::unpack_bf16x8(x[c], xv);
    const uint64_t i0 = (uint64_t)(first + 8 * c);
#pragma unroll
    for (int e = 0; e < 8; e++) yv[e] = dropped_add(yv[e], xv[e], seed, i0 + e, p, scale);
    // a dropped element is written back as it was: bf16 -> f32 -> bf16 is exact for every value but a signalling
    // NaN (quieted), which no arithmetic produces
    y[c] = qk::pack_bf16x8(yv);
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
    const float scale = 1.0f / (1.0f - p);
    // 16-byte aligned buffers: 8-wide chunks, then the tail element by element
    const int64_t chunks = qk::aligned16(out) && qk::aligned16(inp) ? n / 8 : 0;
    if (chunks > 0)
        dropout_bf16x8_kernel<<<CEIL_DIV(chunks, block), block, 0, stream>>>(
            reinterpret_cast<uint4*>(out), reinterpret_cast<const uint4*>(inp), seed, p, scale, chunks, first);
    const int64_t done = 8 * chunks;
    if (done < n)
        dropout_bf16_kernel<<<CEIL_DIV(n - done, block), block, 0, stream>>>(out + done, inp + done, seed, p, scale,
                                                                             n - done, first + done);
    return cudaGetLastError();
}

extern "C" cudaError_t qlora_cuda_dropout_add_bf16(uint16_t* y, const uint16_t* x, uint64_t seed, float p, int64_t n,
                                                   int64_t first, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (!(p >= 0.0f && p < 1.0f) || first < 0) return cudaErrorInvalidValue;
    const int block = 256;
    const float scale = 1.0f / (1.0f - p);
    const int64_t chunks = qk::aligned16(y) && qk::aligned16(x) ? n / 8 : 0;
    if (chunks > 0)
        dropout_add_bf16x8_kernel<<<CEIL_DIV(chunks, block), block, 0, stream>>>(
            reinterpret_cast<uint4*>(y), reinterpret_cast<const uint4*>(x), seed, p, scale, chunks, first);
    const int64_t done = 8 * chunks;
    if (done < n)
        dropout_add_bf16_kernel<<<CEIL_DIV(n - done, block), block, 0, stream>>>(y + done, x + done, seed, p, scale,
                                                                                 n - done, first + done);
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

// W[r, c] = fl32(W[r, c] * (num[r] / den[r])), the ratio and the product in float64 (each rounded to nearest, no
// FMA to contract), then one rounding to f32 without .ftz: what JavaScript's `w[i] *= num[r] / den[r]` over a
// Float32Array computes (lora/layer.ts applyDoraMagnitude)
// f32 -> f64 keeping subnormals (--use_fast_math makes a plain cast cvt.ftz.f64.f32)
__device__ __forceinline__ double widen(float x) {
    double d;
    asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
    return d;
}

__global__ void scale_rows_ratio_f32_kernel(float* W, const float* num, const float* den, int64_t R, int64_t C) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= R * C) return;
    const int64_t r = i / C;
    const double k = __ddiv_rn(widen(num[r]), widen(den[r]));
    const double v = __dmul_rn(widen(W[i]), k);
    float f;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(v));  // no .ftz: a subnormal result stays
    W[i] = f;
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

extern "C" cudaError_t qlora_cuda_scale_rows_ratio_f32(float* W, const float* num, const float* den, int64_t R,
                                                       int64_t C, cudaStream_t stream) {
    if (R < 0 || C < 0) return cudaErrorInvalidValue;
    if (R * C == 0) return cudaSuccess;
    const int block = 256;
    const int64_t grid = CEIL_DIV(R * C, (int64_t)block);
    if (grid > INT32_MAX) return cudaErrorInvalidValue;
    scale_rows_ratio_f32_kernel<<<(unsigned)grid, block, 0, stream>>>(W, num, den, R, C);
    return cudaGetLastError();
}
