// qlora_cuda_ops.h: launchers of the CUDA kernels (device pointers, outputs first, sizes last, a stream).
// Each returns cudaSuccess or the launch error. The CPU op of the same name (native/include/qlora_ops.h) is
// the reference each one is tested against.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
cudaError_t qlora_cuda_bf16_to_f32(float* out, const uint16_t* inp, int64_t n, cudaStream_t stream);
// out[N,C], rstd[N] (may be NULL), inp[N,C], weight[C]
cudaError_t qlora_cuda_rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                                       int64_t C, float eps, cudaStream_t stream);
// out[n] = silu(gate[n]) * up[n]
cudaError_t qlora_cuda_swiglu_forward(float* out, const float* gate, const float* up, int64_t n,
                                      cudaStream_t stream);
}
