// optim.h: the optimizer on the device, as a plain C ABI: AdamW steps over fp32 parameters and gradients (the
// LoRA weights) in the three variants of native/include/qlora_optim.h, the gradient-norm reduction and scaling
// of clipping, and the paged (unified-memory) optimizer states.
//
// The arithmetic is that of native/cpu/optim.cpp operation for operation: the per-step scalars (bias corrections,
// step size, decay factor) are computed on the host by the same expressions, and every device operation is an
// explicit IEEE round-to-nearest multiply / add / fma / divide / square root (see kernel_utils.cuh: immune to
// --use_fast_math, subnormals kept). So the states and parameters equal the CPU's bit for bit: the 8-bit codes
// and absmax scales, the 32-bit states and the parameters alike. Every launcher queues on `stream`, returns the
// launch error, and does not synchronize. All arrays are device pointers unless a comment says host.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// torch.optim.AdamW (decay first, then Adam), as qlora_cpu_adamw_torch_step. param[n], exp_avg[n],
// exp_avg_sq[n] updated; grad[n]. Scalars are doubles, as torch's Python floats.
cudaError_t qlora_cuda_adamw_torch_step(float* param, float* exp_avg, float* exp_avg_sq, const float* grad, double lr,
                                        double beta1, double beta2, double eps, double weight_decay, int64_t step,
                                        int64_t n, cudaStream_t stream);

// bitsandbytes 32-bit AdamW (Adam, then decay), as qlora_cpu_adamw_bnb32_step. param[n], state1[n], state2[n]
// updated; grad[n]
cudaError_t qlora_cuda_adamw_bnb32_step(float* param, float* state1, float* state2, const float* grad, float lr,
                                        float beta1, float beta2, float eps, float weight_decay, int64_t step,
                                        int64_t n, cudaStream_t stream);

// bitsandbytes 8-bit blockwise AdamW, as qlora_cpu_adamw_bnb8_step: one thread block per quantization block of
// `blocksize` elements (1..2048; bnb uses 256). param[n], state1[n] (u8 codes, signed map), state2[n] (u8 codes,
// unsigned map), absmax1/absmax2[ceil(n/blocksize)] updated; grad[n], qmap1[256], qmap2[256] (f32, on the device:
// qlora_cpu_optim_dynamic_map's output). Whether a tensor gets 8-bit state (min_8bit_size) is the caller's call.
cudaError_t qlora_cuda_adamw_bnb8_step(float* param, uint8_t* state1, uint8_t* state2, float* absmax1, float* absmax2,
                                       const float* grad, const float* qmap1, const float* qmap2, float lr, float beta1,
                                       float beta2, float eps, float weight_decay, int64_t step, int64_t blocksize,
                                       int64_t n, cudaStream_t stream);

// out[0] (one double on the device) = (accumulate ? out[0] : 0) + sum over the buffers of sum(x[i]^2), in double.
// ptrs[count] and ns[count] are HOST arrays naming device buffers (e.g. every LoRA gradient). The order of the
// sums is fixed by the grid (not by timing), so the result is reproducible run to run on the same GPU; it
// differs from the CPU's qlora_cpu_optim_sum_squares only by double rounding (relative ~1e-16).
cudaError_t qlora_cuda_optim_sum_squares(double* out, const float* const* ptrs, const int64_t* ns, int count,
                                         int accumulate, cudaStream_t stream);

// clip_grad_norm_ without a round trip to the host: reads sumsq[0] (device double, from optim_sum_squares),
// computes, as src/optim/clip.ts does, norm = sqrt(sumsq), coef = f32(max_norm / f32(f32(norm) + 1e-6)), and when
// coef < 1 scales every buffer by it (x *= coef, f32). max_norm <= 0 disables clipping (nothing is queued).
// ptrs/ns are HOST arrays of device buffers. As in clip.ts, a NaN norm leaves the gradients as they are
// (coef < 1 is false) and an infinite one zeroes them (coef 0).
cudaError_t qlora_cuda_optim_clip_scale(float* const* ptrs, const int64_t* ns, int count, const double* sumsq,
                                        double max_norm, cudaStream_t stream);

// x[n] *= s (f32; the same kernel as qlora_cuda_scale_f32, bit-identical to qlora_cpu_optim_scale)
cudaError_t qlora_cuda_optim_scale(float* x, float s, int64_t n, cudaStream_t stream);

// ------------------------------------------------------------------
// paged optimizer states (bitsandbytes' paged optimizers)
//
// bnb allocates the states of large tensors in CUDA unified memory so that, when the GPU runs short, the driver
// evicts their pages to host memory instead of failing, and pages them back in on access. Here:
//   qlora_cuda_alloc_paged: cudaMallocManaged(global) + preferred location = the current device (so the pages
//     live on the GPU until memory pressure evicts them) + accessed-by the device. The advice is skipped where
//     the platform does not support it (e.g. no concurrent managed access); the memory still works.
//   qlora_cuda_prefetch_paged: cudaMemPrefetchAsync to the current device (before the optimizer step) or to the
//     host (to free device memory, e.g. during evaluation); a no-op where prefetching is unsupported.
//   qlora_cuda_free_paged: cudaFree (synchronizes the device, as cudaFree does).
// Paged memory is outside the caching allocator: memory_stats() does not count it. The kernels above work on it
// unchanged.
cudaError_t qlora_cuda_alloc_paged(void** ptr, size_t bytes);
cudaError_t qlora_cuda_free_paged(void* ptr);
// bytes of paged states allocated and not freed
size_t qlora_cuda_paged_bytes();
cudaError_t qlora_cuda_prefetch_paged(const void* ptr, size_t bytes, int to_device, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
