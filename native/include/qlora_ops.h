// qlora_ops.h: the op table, as a plain C ABI.
//
// Every op is a plain function: outputs first, then inputs, then sizes last; shapes in the comments.
// The CPU backend (native/cpu/*.cpp) implements all of them in fp32 and is the reference that the CUDA
// backend (native/cuda/*.cu) is tested against.
//
// Gradient rule (as in llm.c): parameter gradients always accumulate (+=) so that gradient accumulation
// works across micro-batches; activation gradients overwrite (=), except the residual stream, which
// accumulates (+=). Each forward says what it saves for its backward.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ------------------------------------------------------------------
// threading

// number of worker threads the CPU ops use (defaults to the number of online cores, or QLORA_NUM_THREADS)
void qlora_cpu_set_num_threads(int n);
int qlora_cpu_get_num_threads(void);

// ------------------------------------------------------------------
// matmul

// row-major single-precision GEMM, the same contract as cblas_sgemm(CblasRowMajor, ...):
//   C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C
// op(A) = A (A is [M, lda>=K]) or A^T (A is [K, lda>=M]) when transA != 0; likewise for B.
// beta == 0 means C is write-only (NaNs in C are not propagated).
void qlora_cpu_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                     const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// ------------------------------------------------------------------
// dtype conversion

void qlora_cpu_bf16_to_f32(float* out, const uint16_t* inp, int64_t n);
void qlora_cpu_f16_to_f32(float* out, const uint16_t* inp, int64_t n);
void qlora_cpu_f32_to_bf16(uint16_t* out, const float* inp, int64_t n);  // round to nearest even
void qlora_cpu_f32_to_f16(uint16_t* out, const float* inp, int64_t n);   // round to nearest even

// ------------------------------------------------------------------
// checks

// dtype argument of qlora_cpu_count_nonfinite
#define QLORA_DTYPE_F32 0
#define QLORA_DTYPE_BF16 1
#define QLORA_DTYPE_F16 2

// counts the NaN and the infinite values among n values of `dtype` (f32, or bf16/f16 bits), from the bit
// patterns alone; weights are checked with it as they load, so it runs at memory speed
void qlora_cpu_count_nonfinite(int dtype, const void* data, int64_t n, int64_t* nan_count, int64_t* inf_count);

// ------------------------------------------------------------------
// elementwise

// y[n] += x[n]
void qlora_cpu_add_inplace(float* y, const float* x, int64_t n);
// out[N,C] = inp[N,C] + bias[C] (in place allowed)
void qlora_cpu_add_bias(float* out, const float* inp, const float* bias, int64_t N, int64_t C);

// ------------------------------------------------------------------
// embedding

// out[N,C] = table[ids[n], :]; ids outside [0, V) are an error reported through the return value (-1 - n)
int64_t qlora_cpu_embedding_forward(float* out, const int32_t* ids, const float* table, int64_t N, int64_t V,
                                    int64_t C);
// dtable[ids[n], :] += dout[n, :]   (parameter gradient: accumulates)
void qlora_cpu_embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N, int64_t C);

// ------------------------------------------------------------------
// RMSNorm: out = inp * rstd * weight, rstd = 1/sqrt(mean(inp^2) + eps)

// out[N,C], rstd[N] (saved for backward, may be NULL), inp[N,C], weight[C]
void qlora_cpu_rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                               float eps);
// dinp[N,C] (=), dweight[C] (+=, may be NULL for a frozen norm), dout[N,C], inp[N,C], weight[C], rstd[N]
void qlora_cpu_rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                                const float* rstd, int64_t N, int64_t C);

// ------------------------------------------------------------------
// RoPE, "rotate half" layout as in transformers (pairs (i, i + D/2) within each head)
//   x' = x * cos(pos * inv_freq) + rotate_half(x) * sin(pos * inv_freq), times attention_scaling

// out[N,H,D] (in place allowed), inp[N,H,D], pos[N], inv_freq[R/2]: the first R (even, <= D) dimensions of each
// head rotate, pairs (i, i + R/2); the others are copied (partial rotary embedding: Phi-3)
void qlora_cpu_rope_forward(float* out, const float* inp, const int32_t* pos, const float* inv_freq,
                            float attention_scaling, int64_t N, int64_t H, int64_t D, int64_t R);
// the inverse rotation: dinp = R(pos)^T dout (in place allowed)
void qlora_cpu_rope_backward(float* dinp, const float* dout, const int32_t* pos, const float* inv_freq,
                             float attention_scaling, int64_t N, int64_t H, int64_t D, int64_t R);

// ------------------------------------------------------------------
// attention: softmax(q k^T * scale + mask) v, causal, grouped-query (Hq = G * Hkv)
//
// q[B,T,Hq,D], k/v[B,S,Hkv,D] with S >= T: query t sits at key position q_offset + t (q_offset = S - T
// for a KV cache, 0 for training). Key j is visible to query t when j <= q_offset + t, key_valid[b,j] != 0
// (NULL: all valid; the padding mask), seg[b,j] == seg[b,q_offset+t] (NULL: one segment; packing) and, with a
// sliding window (window > 0; 0: none), j > q_offset + t - window: W keys counting its own, transformers'
// sliding_window_overlay (kv_idx > q_idx - sliding_window) and flash-attn's window_size = (W - 1, 0).
// A query with no visible key gets zeros. out[B,T,Hq,D]; lse[B,Hq,T] is the log-sum-exp of the scaled
// scores, saved for backward (may be NULL).
void qlora_cpu_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                 const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T, int64_t S,
                                 int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset, float scale, int64_t window);
// dq (=), dk (=), dv (=); recomputes the probabilities from q, k and lse
void qlora_cpu_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                                  const float* v, const float* out, const float* lse, const uint8_t* key_valid,
                                  const int32_t* seg, int64_t B, int64_t T, int64_t S, int64_t Hq, int64_t Hkv,
                                  int64_t D, int64_t q_offset, float scale, int64_t window);

// ------------------------------------------------------------------
// LoRA dropout: mask[i] = 1 / (1 - p) where element first + i is kept (qlora_dropout.h), else 0; 0 <= p < 1
// (first: the rows of a tensor processed in parts draw the masks of the whole)
void qlora_cpu_dropout_mask(float* mask, uint64_t seed, float p, int64_t n, int64_t first);

// ------------------------------------------------------------------
// the gated MLP's activation: out = act(gate) * up, act a qlora_gated_act of qlora_act.h (QLORA_ACT_SILU: SwiGLU;
// QLORA_ACT_GELU_TANH: Gemma's gelu_pytorch_tanh)

// out[n], gate[n], up[n]
void qlora_cpu_gated_act_forward(float* out, const float* gate, const float* up, int64_t n, int act);
// dgate (=), dup (=); dgate may alias gate, dup may alias up
void qlora_cpu_gated_act_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                                  int64_t n, int act);

// logit soft-capping (Gemma's final_logit_softcapping), in place: x = cap tanh(x / cap); cap > 0
void qlora_cpu_softcap_forward(float* x, int64_t n, float cap);
// dx *= 1 - (y / cap)^2, y the capped values
void qlora_cpu_softcap_backward(float* dx, const float* y, int64_t n, float cap);

// ------------------------------------------------------------------
// softmax cross-entropy over rows of logits
//
// logits[N,V], targets[N] (-100 or any negative: ignored). loss[N] (0 for ignored rows), lse[N] saved.
// Returns the number of counted rows.
int64_t qlora_cpu_cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t N,
                                        int64_t V);
// dlogits[N,V] (=) = (softmax(logits) - onehot(target)) * dloss_scale; zero rows for ignored targets.
// dlogits may alias logits (in-place, so the full fp32 logits are never held twice)
void qlora_cpu_cross_entropy_backward(float* dlogits, const float* logits, const float* lse, const int32_t* targets,
                                      float dloss_scale, int64_t N, int64_t V);

#ifdef __cplusplus
}
#endif
