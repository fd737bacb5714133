// lora_extras.h: small kernels of the LoRA training step: a broadcast bias add, and dropout whose mask is a
// hash of (seed, element index), so the backward and a checkpoint recomputation regenerate it without storing it.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
// y[N,C] (bf16) += bias[C] (bf16)
cudaError_t qlora_cuda_add_bias_bf16(uint16_t* y, const uint16_t* bias, int64_t N, int64_t C, cudaStream_t stream);
// out[n] = inp[n] * keep(seed, i) / (1 - p)   (bf16; in place allowed)
cudaError_t qlora_cuda_dropout_bf16(uint16_t* out, const uint16_t* inp, uint64_t seed, float p, int64_t n,
                                    cudaStream_t stream);
// y[n] += x[n] * keep(seed, i) / (1 - p)   (bf16): the backward of dropout into an input gradient
cudaError_t qlora_cuda_dropout_add_bf16(uint16_t* y, const uint16_t* x, uint64_t seed, float p, int64_t n,
                                        cudaStream_t stream);
}
