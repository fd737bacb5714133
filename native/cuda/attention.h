// attention.h: flash-style attention on the GPU (FlashAttention-2 forward and backward), bf16 in HBM with fp32
// accumulation on the tensor cores (mma.sync m16n8k16). Same layout and semantics as the CPU op
// (native/include/qlora_ops.h, qlora_cpu_attention_*):
//
//   q[B,T,Hq,D], k/v[B,S,Hkv,D], out[B,T,Hq,D] (bf16), lse[B,Hq,T] (f32, natural log, -inf for a query with no
//   visible key, whose out row is zeros). Query t sits at key position q_offset + t; key j is visible to it when
//   j <= q_offset + t, key_valid[b,j] != 0 (NULL: all valid), seg[b,j] == seg[b,q_offset+t] (NULL: one segment)
//   and, with a sliding window (window > 0; 0: none), j > q_offset + t - window (transformers'
//   sliding_window_overlay; flash-attn's window_size = (window - 1, 0)). Key tiles wholly outside a query tile's
//   window are never read: a paged cache may have freed their blocks.
//   Grouped-query heads: Hq = G * Hkv, query head h reads kv head h / G.
//
// Head dims 64, 96 and 128 (qlora_cuda_attention_supports_head_dim); other D return cudaErrorInvalidValue. All bf16
// pointers must be 16-byte aligned (the caching allocator's buffers are). Every launcher queues its work on `stream`
// and returns the launch status (cudaErrorInvalidValue for bad sizes, see qlora_cuda_attention_check).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// 1 when D has a kernel (64, 128), else 0
int qlora_cuda_attention_supports_head_dim(int64_t D);

// NULL when the sizes and pointers are acceptable, else a sentence saying what is wrong (a static string).
// `seg_given`: whether seg will be passed (it requires q_offset + T <= S, so that seg[b, q_offset + t] exists).
const char* qlora_cuda_attention_check(const void* const* bf16_ptrs, int n_ptrs, int seg_given, int64_t B, int64_t T,
                                       int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset);

// positions per block of a paged KV cache (the forward kernel's key tile)
#define QLORA_CUDA_KV_BLOCK 64

// out[B,T,Hq,D] (=), lse[B,Hq,T] (= ; may be NULL). q_offsets (may be NULL; not with seg): per-row query offsets
// [B] in device memory, used instead of q_offset (rows of a KV cache at their own lengths; a captured decoding
// step replays at any lengths); each is clamped to [0, S]. block_table (may be NULL; not with seg): a paged KV
// cache, k/v [blocks, QLORA_CUDA_KV_BLOCK, Hkv, D] and block_table[B, table_stride] (device) naming the block of
// each row's positions 64 i .. 64 i + 63; S (<= 64 * table_stride) is then the rows' logical length.
// T == 1 with lse == NULL and seg == NULL (a decoding step) takes a split-KV kernel (flash-decoding): it reads only
// the keys a row can see (a paged row's blocks past its length need not exist) and uses an f32 workspace from the
// caching allocator, B * Hq * n * (D + 2) floats for n = min(ceil(S / 64), ceil(2 * SMs / (B * Hkv * ceil(G / 16))))
// chunks per row (none when n = 1), returned once the work is queued as in the backward. Its output is
// deterministic, as the other kernels'; passing an lse selects the general kernel.
cudaError_t qlora_cuda_attention_forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                         const __nv_bfloat16* v, const uint8_t* key_valid, const int32_t* seg,
                                         const int32_t* q_offsets, const int32_t* block_table, int64_t table_stride,
                                         int64_t B, int64_t T, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                                         int64_t q_offset, float scale, int64_t window, cudaStream_t stream);

// dq[B,T,Hq,D] (=), dk/dv[B,S,Hkv,D] (=), all bf16; recomputes the probabilities from q, k and the forward's lse.
// Uses an f32 workspace from the caching allocator (qlora_cuda::device_alloc): D_i[B,Hq,T], and dq/dk/dv
// accumulators (B*T*Hq*D + 2*B*S*Hkv*D floats), returned to the cache once the work is queued (stream-ordered on
// qlora_cuda::stream(); on any other stream the launcher waits for its work before returning the workspace).
cudaError_t qlora_cuda_attention_backward(__nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv,
                                          const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k,
                                          const __nv_bfloat16* v, const __nv_bfloat16* out, const float* lse,
                                          const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T, int64_t S,
                                          int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset, float scale,
                                          int64_t window, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
