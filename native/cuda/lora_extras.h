// lora_extras.h: small kernels of the LoRA training step: a broadcast bias add, and dropout whose mask is a
// hash of (seed, element index), so the backward and a checkpoint recomputation regenerate it without storing it.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
// y[N,C] (bf16) += bias[C] (bf16)
cudaError_t qlora_cuda_add_bias_bf16(uint16_t* y, const uint16_t* bias, int64_t N, int64_t C, cudaStream_t stream);
// out[n] = inp[n] * keep(seed, first + i) / (1 - p)   (bf16; in place allowed; first: the element of the whole
// tensor where this part starts)
cudaError_t qlora_cuda_dropout_bf16(uint16_t* out, const uint16_t* inp, uint64_t seed, float p, int64_t n,
                                    int64_t first, cudaStream_t stream);
// y[n] += x[n] * keep(seed, first + i) / (1 - p)   (bf16): the backward of dropout into an input gradient
cudaError_t qlora_cuda_dropout_add_bf16(uint16_t* y, const uint16_t* x, uint64_t seed, float p, int64_t n,
                                        int64_t first, cudaStream_t stream);
}

// DoRA and trained-bias kernels (lora/projection.ts through the Backend):
extern "C" {
// out[m, n] (bf16; = or += when accumulate) x[m, n] * (k[n] + offset)   (k f32 [N]; out may alias x)
cudaError_t qlora_cuda_scale_columns_bf16(uint16_t* out, const uint16_t* x, const float* k, float offset, int64_t M,
                                          int64_t N, int accumulate, cudaStream_t stream);
// dst[n] (f32, +=) sum_m a[m, n] * b[m, n] / div[n]   (a, b bf16 [M, N]; b and div may be NULL: factor 1)
cudaError_t qlora_cuda_column_sums_bf16(float* dst, const uint16_t* a, const uint16_t* b, const float* div, int64_t M,
                                        int64_t N, cudaStream_t stream);
// out[r] = sqrt(sum_c W[r, c]^2)   (f32 W [R, C], float64 sums)
cudaError_t qlora_cuda_row_norms_f32(float* out, const float* W, int64_t R, int64_t C, cudaStream_t stream);
// out[i] = a[i] / b[i]   (f32)
cudaError_t qlora_cuda_divide_f32(float* out, const float* a, const float* b, int64_t n, cudaStream_t stream);
// W[r, c] = fl32(W[r, c] * (num[r] / den[r]))   (f32 W [R, C], num and den f32 [R]; the ratio and the product in
// float64, rounded to f32 once): DoRA's merged rows, m / ||W + s B A|| as the CPU merge scales them
cudaError_t qlora_cuda_scale_rows_ratio_f32(float* W, const float* num, const float* den, int64_t R, int64_t C,
                                            cudaStream_t stream);
}
