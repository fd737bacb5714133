// kernels.h: the CUDA backend's elementwise and row-wise kernels, as a plain C ABI (launchers).
//
// The CUDA counterparts of the CPU ops in native/include/qlora_ops.h, for the training step on the GPU:
// activations are bf16 in device memory (uint16_t bits), math is fp32, statistics (rstd, lse, loss) are fp32 and
// parameter gradients fp32. Every launcher queues its work on `stream` and returns the launch error (or
// cudaErrorInvalidValue for bad sizes); nothing synchronizes. Outputs first, then inputs, sizes last, then the
// stream; shapes in the comments. All pointers are device pointers.
//
// Gradient rule as on the CPU: parameter gradients accumulate (+=), activation gradients overwrite (=).
// Any alignment works; 16-byte aligned buffers (what the allocator hands out) with row lengths that are multiples
// of 8 elements take the vectorized paths.
//
// Sources: elementwise.cu (conversions, fill, scale, add, axpy, cast-add, gated activation), embedding.cu, norm.cu
// (RMSNorm, residual + RMSNorm), rope.cu, cross_entropy.cu.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ------------------------------------------------------------------
// conversions (round to nearest even; bit-identical to the CPU backend's for finite values)

cudaError_t qlora_cuda_bf16_to_f32(float* out, const uint16_t* inp, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_f16_to_f32(float* out, const uint16_t* inp, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_f32_to_bf16(uint16_t* out, const float* inp, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_f32_to_f16(uint16_t* out, const float* inp, int64_t n, cudaStream_t stream);

// ------------------------------------------------------------------
// elementwise

// x[n] = value (bf16: value rounded to bf16)
cudaError_t qlora_cuda_fill_f32(float* x, float value, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_fill_bf16(uint16_t* x, float value, int64_t n, cudaStream_t stream);
// x[n] *= s
cudaError_t qlora_cuda_scale_f32(float* x, float s, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_scale_bf16(uint16_t* x, float s, int64_t n, cudaStream_t stream);
// y[n] += x[n] (bf16: fp32 sum rounded to bf16; f32: bit-identical to the CPU's add_inplace)
cudaError_t qlora_cuda_add_f32(float* y, const float* x, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_add_bf16(uint16_t* y, const uint16_t* x, int64_t n, cudaStream_t stream);
// y[n] = fmaf(alpha, x[n], y[n])   (f32)
cudaError_t qlora_cuda_axpy_f32(float* y, float alpha, const float* x, int64_t n, cudaStream_t stream);
// y[n] (f32) = fmaf(alpha, x[n] (bf16), y[n]): accumulates a bf16 gradient into an fp32 one
cudaError_t qlora_cuda_cast_add_bf16_f32(float* y, const uint16_t* x, float alpha, int64_t n, cudaStream_t stream);
// KV cache write (bf16): cache[b, pasts[b] + t, :] = x[b, t, :] for cache [B, capacity, row_elems] and x
// [B, T, row_elems]; pasts[B] (int32) in device memory; positions outside [0, capacity) are skipped. With a block
// table (table[B, table_stride], may be NULL) the cache is paged: [blocks, block, row_elems], position j of row b
// in block table[b, j / block] (entries < 0: skipped)
cudaError_t qlora_cuda_cache_write(uint16_t* cache, const uint16_t* x, const int32_t* pasts, const int32_t* table,
                                   int64_t table_stride, int64_t block, int64_t B, int64_t T, int64_t capacity,
                                   int64_t row_elems, cudaStream_t stream);
// dst[m, dst_offset + j] = src[m, src_offset + j] (bf16) for m < M, j < n, rows of dst_cols and src_cols values:
// the parts of a fused projection's output (Phi-3's qkv_proj, gate_up_proj) and the joining of their gradients
cudaError_t qlora_cuda_copy_columns(uint16_t* dst, int64_t dst_cols, int64_t dst_offset, const uint16_t* src,
                                    int64_t src_cols, int64_t src_offset, int64_t M, int64_t n, cudaStream_t stream);

// ------------------------------------------------------------------
// embedding

// out[N,C] (bf16) = table[ids[n], :] (bf16 [V,C]). Rows whose id is outside [0, V) are written as zeros and
// reported through `bad` (nullable, 2 int32 on the device, reset by this call): bad[0] = how many ids were out of
// range, bad[1] = the first such row (INT32_MAX when none). Download `bad` when convenient; nothing syncs here.
cudaError_t qlora_cuda_embedding_forward(uint16_t* out, int32_t* bad, const int32_t* ids, const uint16_t* table,
                                         int64_t N, int64_t V, int64_t C, cudaStream_t stream);
// dtable[ids[n], :] (f32 [V,C]) += dout[n, :] (bf16 [N,C]); float atomics (order-dependent in the last bit when
// an id repeats); ids outside [0, V) are skipped
cudaError_t qlora_cuda_embedding_backward(float* dtable, const uint16_t* dout, const int32_t* ids, int64_t N, int64_t V,
                                          int64_t C, cudaStream_t stream);

// ------------------------------------------------------------------
// RMSNorm: out = inp * rstd * weight, rstd = 1/sqrt(mean(inp^2) + eps), fp32 accumulation

// out[N,C] (bf16), rstd[N] (f32, nullable), inp[N,C] (bf16), weight[C] (bf16). out may alias inp.
cudaError_t qlora_cuda_rmsnorm_forward(uint16_t* out, float* rstd, const uint16_t* inp, const uint16_t* weight,
                                       int64_t N, int64_t C, float eps, cudaStream_t stream);
// h = x + y (rounded to bf16, the residual stream), out = rmsnorm(h): h[N,C], out[N,C] (bf16), rstd[N] (f32,
// nullable), x[N,C], y[N,C], weight[C] (bf16). h may alias x or y (the in-place residual add); out may not alias
// x or y.
cudaError_t qlora_cuda_residual_rmsnorm_forward(uint16_t* h, uint16_t* out, float* rstd, const uint16_t* x,
                                                const uint16_t* y, const uint16_t* weight, int64_t N, int64_t C,
                                                float eps, cudaStream_t stream);
// dinp[N,C] (bf16; = , or += when accumulate != 0, e.g. into the residual gradient), dweight[C] (f32, +=, nullable
// for a frozen norm; float atomics), dout[N,C] (bf16), inp[N,C] (bf16), weight[C] (bf16), rstd[N] (f32).
// dinp may alias dout.
cudaError_t qlora_cuda_rmsnorm_backward(uint16_t* dinp, float* dweight, const uint16_t* dout, const uint16_t* inp,
                                        const uint16_t* weight, const float* rstd, int64_t N, int64_t C, int accumulate,
                                        cudaStream_t stream);

// ------------------------------------------------------------------
// RoPE, rotate-half layout (pairs (i, i + R/2) in each head, R = rotary); angle = f32(pos * inv_freq[i]), precise
// cos/sin (the CPU's cosf/sinf to within an ulp), times attention_scaling. Only the first R (even, <= D; <= 0: D)
// dimensions of each head rotate; the others pass through (partial rotary, Phi-3).

// out[N,H,D] (bf16, in place allowed), inp[N,H,D] (bf16), pos[N] (i32), inv_freq[R/2] (f32). Consecutive tokens
// are row_stride elements apart in both inp and out (row_stride >= H*D, or <= 0 for packed rows: H*D; more for
// the q or k part of a fused qkv buffer). D even, D <= 2048.
cudaError_t qlora_cuda_rope_forward(uint16_t* out, const uint16_t* inp, const int32_t* pos, const float* inv_freq,
                                    float attention_scaling, int64_t N, int64_t H, int64_t D, int64_t row_stride,
                                    int64_t rotary, cudaStream_t stream);
// the transposed rotation: dinp = R(pos)^T dout (in place allowed)
cudaError_t qlora_cuda_rope_backward(uint16_t* dinp, const uint16_t* dout, const int32_t* pos, const float* inv_freq,
                                     float attention_scaling, int64_t N, int64_t H, int64_t D, int64_t row_stride,
                                     int64_t rotary, cudaStream_t stream);
// a decoding step's RoPE and KV cache write in one launch, bit-identical to qlora_cuda_rope_forward of q and of k
// (in place, packed rows) followed by qlora_cuda_cache_write of k and of v: q[B*T, Hq, D] and k[B*T, Hkv, D] rotated
// in place at positions pos[B*T]; the rotated k rows and the v rows [B*T, Hkv, D] written to cache_k and cache_v
// at each row's pasts[b] + t, contiguous or paged through table, with qlora_cuda_cache_write's rules (positions
// outside [0, capacity) and table entries < 0 are skipped; those tokens are still rotated). D even, D <= 2048.
cudaError_t qlora_cuda_rope_cache_write(uint16_t* q, uint16_t* k, uint16_t* cache_k, uint16_t* cache_v,
                                        const uint16_t* v, const int32_t* pos, const float* inv_freq,
                                        float attention_scaling, const int32_t* pasts, const int32_t* table,
                                        int64_t table_stride, int64_t block, int64_t B, int64_t T, int64_t Hq,
                                        int64_t Hkv, int64_t D, int64_t capacity, int64_t rotary, cudaStream_t stream);

// ------------------------------------------------------------------
// the gated MLP's activation: out = act(gate) * up (bf16), act a qlora_gated_act of native/include/qlora_act.h
// (QLORA_ACT_SILU: SwiGLU; QLORA_ACT_GELU_TANH: Gemma's gelu_pytorch_tanh); another act: cudaErrorInvalidValue

// out[n], gate[n], up[n]; out may alias gate or up
cudaError_t qlora_cuda_gated_act_forward(uint16_t* out, const uint16_t* gate, const uint16_t* up, int64_t n, int act,
                                         cudaStream_t stream);
// dgate[n] (=), dup[n] (=); dgate may alias gate, dup may alias up, either may alias dout
cudaError_t qlora_cuda_gated_act_backward(uint16_t* dgate, uint16_t* dup, const uint16_t* dout, const uint16_t* gate,
                                          const uint16_t* up, int64_t n, int act, cudaStream_t stream);

// ------------------------------------------------------------------
// logit soft-capping in place: x = cap tanh(x / cap), cap > 0 (Gemma's final_logit_softcapping)
cudaError_t qlora_cuda_softcap_bf16(uint16_t* x, float cap, int64_t n, cudaStream_t stream);
cudaError_t qlora_cuda_softcap_f32(float* x, float cap, int64_t n, cudaStream_t stream);

// ------------------------------------------------------------------
// choosing the next token of each row of f32 logits x[R, V] (sampling.cu; the CPU reference is
// src/backend/sampling.ts): params[r * 5 + 0..4] = temperature (f32 bits; 0: greedy, the first index of the largest
// value), top_k (0: off), top_p (f32 bits; 1: off), the draw u (a uniform uint32), repetition_penalty (f32 bits).
// entries[0..E) the rows and entries[E..2E) the tokens the penalty applies to (distinct per row; nullable when
// E = 0): x is penalized in place. out[r] (i32) the token; *bad (one int32, +=; zero it first) the number of NaN or
// infinite logits (a row with any is answered greedily).
cudaError_t qlora_cuda_pick_tokens_f32(float* x, int64_t R, int64_t V, const int32_t* params, const int32_t* entries,
                                       int64_t E, int32_t* out, int32_t* bad, cudaStream_t stream);

// softmax cross-entropy over a chunk of rows of bf16 logits (the lm_head output), one block per row, fp32 online
// max/sum. targets < 0 (or >= V) are ignored: loss 0, not counted, zero gradient row.

// loss[N] (f32), lse[N] (f32, nullable), count (one int32 on the device, nullable: += the number of counted rows,
// so chunks add up; zero it first), logits[N,V] (bf16), targets[N] (i32)
cudaError_t qlora_cuda_cross_entropy_forward(float* loss, float* lse, int32_t* count, const uint16_t* logits,
                                             const int32_t* targets, int64_t N, int64_t V, cudaStream_t stream);
// dlogits[N,V] (bf16, =) = (softmax(logits) - onehot(target)) * dloss_scale; dlogits may alias logits (in place).
// lse[N] from the forward. softcap > 0: the logits are soft-capped values y = cap tanh(z / cap)
// (qlora_cuda_softcap_bf16) and the gradient is taken to z: times 1 - (y / cap)^2
cudaError_t qlora_cuda_cross_entropy_backward(uint16_t* dlogits, const uint16_t* logits, const float* lse,
                                              const int32_t* targets, float dloss_scale, int64_t N, int64_t V,
                                              float softcap, cudaStream_t stream);
// forward and backward in one pass per row: loss, lse, count as the forward, then the logits are overwritten
// in place by their gradient (the row is re-read from L2 rather than from device memory); softcap as the backward's
cudaError_t qlora_cuda_cross_entropy_fused(float* loss, float* lse, int32_t* count, uint16_t* logits,
                                           const int32_t* targets, float dloss_scale, int64_t N, int64_t V,
                                           float softcap, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
