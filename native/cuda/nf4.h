// nf4.h: bitsandbytes-compatible NF4/FP4 dequantization (and quantization of bf16 values) on the GPU
// (SPEC-quant.md §3, §6).
//
// Bit-identical to the CPU reference qlora_cpu_dequantize_4bit_rows (native/cpu/quant.cpp):
//   scale_j = absmax[j]                                                        (plain f32 scales), or
//   scale_j = fl32(fl32(nested_code[absmax_q[j]] * nested_absmax[j / nested_blocksize]) + offset)  (double quant)
//   W[i]    = fl32(code[nibble(i)] * scale_(i / blocksize)), rounded (nearest even) to the output dtype
// nibble(2k) = packed[k] >> 4, nibble(2k+1) = packed[k] & 0xF (the first element in the HIGH nibble).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// out[n] (out_dtype: QLORA_CUDA_F32 / BF16 / F16 of gemm.h) <- packed[ceil(n/2)], code[16] (device).
// Scales: absmax_q == NULL: absmax[ceil(n/blocksize)] f32; else absmax_q[nblocks] u8,
// nested_absmax[ceil(nblocks/nested_blocksize)] f32, nested_code[256] f32 and offset (absmax is ignored).
// blocksize >= 1 (any; the fast path needs a multiple of 8, as every bnb block size is); nested_blocksize >= 1.
// Queued on `stream`; returns launch errors (cudaErrorInvalidValue for bad arguments).
cudaError_t qlora_cuda_dequantize_4bit(void* out, int out_dtype, const uint8_t* packed, const float* absmax,
                                       const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
                                       float offset, const float* code, int64_t blocksize, int64_t nested_blocksize,
                                       int64_t n, cudaStream_t stream);

// packed[ceil(n/2)] (u8) and absmax[ceil(n/blocksize)] (f32) <- inp[n] (bf16 bits), quant_type QLORA_QUANT_NF4 or
// QLORA_QUANT_FP4 (native/include/qlora_quant.h): bit-identical to qlora_cpu_quantize_4bit_bf16, i.e. to bnb's
// kQuantizeBlockwise (absmax of each block, u = x * fl32(1/absmax), the code of u; an all-zero block gets the code
// of 0). blocksize even and >= 2 (every bnb block size is); no double quantization (the caller quantizes the
// absmax, as quantize4bit in src/quant/nf4.ts does). Queued on `stream`; cudaErrorInvalidValue for bad arguments.
cudaError_t qlora_cuda_quantize_4bit_bf16(uint8_t* packed, float* absmax, const uint16_t* inp, int quant_type,
                                          int64_t blocksize, int64_t n, cudaStream_t stream);

// Fused dequantization + GEMV for generation, with an optional LoRA branch in the same pass:
//   y[m, n] = round_y( sum_k x[m, k] W[n, k]  +  lora_scale * sum_j lora_xa[m, j] lora_b[n, j] )
// with W[N, K] the 4-bit weight above (n = N * K; each weight is rounded to x's dtype before the product, as
// dequantize-then-GEMM does), both sums accumulated in fp32 and one rounding to y's dtype at the end.
// 1 <= M <= QLORA_GEMV_4BIT_MAX_M; x (x_dtype) row-major [M, K], 16-byte aligned; y (f32 or x_dtype) row-major
// [M, N]. LoRA: lora_r == 0 (lora_xa, lora_b ignored) or 1 <= lora_r <= QLORA_GEMV_4BIT_MAX_LORA_R with lora_xa
// (x_dtype, row-major [M, lora_r], the LoRA A product x A^T) and lora_b (x_dtype, row-major [N, lora_r], PEFT's
// lora_B.weight); any other lora_r, or a NULL pointer with lora_r > 0, returns cudaErrorInvalidValue.
// Needs K % 8 == 0, a power-of-two blocksize >= 8 (and nested_blocksize) and a 4-byte aligned `packed`: returns
// cudaErrorNotSupported otherwise (then dequantize and use the GEMM).
// Two kernels: bf16/f16 x with K % 32 == 0, blocksize >= 32 and a 16-byte aligned `packed` take the tensor-core
// kernel (16-byte weight loads, mma.sync with fp32 accumulators, K split over warps and, for few rows, blocks,
// added in a fixed order: the same bits on every run); the rest one warp per row on the CUDA cores.
// QLORA_GEMV4BIT_VARIANT (read once) picks the tensor-core kernel's variant: lds2 (default), lds4, pair2, pair4,
// or lut / lut2 (blocksize >= 64, K % 64 == 0: the codes rounded to x's dtype from a register table, each block's
// products scaled once on the fp32 accumulators, so y = sum_b s_b sum_k x_k dtype(code_k): the one rounding of a
// weight falls on the code instead of on code * scale).
#define QLORA_GEMV_4BIT_MAX_M 8
#define QLORA_GEMV_4BIT_MAX_LORA_R 64
cudaError_t qlora_cuda_gemv_4bit(void* y, int y_dtype, const void* x, int x_dtype, const uint8_t* packed,
                                 const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                                 const float* nested_code, float offset, const float* code, int64_t blocksize,
                                 int64_t nested_blocksize, int64_t M, int64_t N, int64_t K, const void* lora_xa,
                                 const void* lora_b, int64_t lora_r, float lora_scale, cudaStream_t stream);

// One weight of a grouped GEMV: qlora_cuda_gemv_4bit's arguments that belong to the weight (W[N, K], its y).
typedef struct QloraGemv4bitPart {
    void* y;
    int y_dtype;
    const uint8_t* packed;
    const float* absmax;
    const uint8_t* absmax_q;
    const float* nested_absmax;
    const float* nested_code;
    float offset;
    const float* code;
    int64_t blocksize;
    int64_t nested_blocksize;
    int64_t N;
    const void* lora_xa;
    const void* lora_b;
    int64_t lora_r;
    float lora_scale;
    // optional (NULL: none; the group's tensor-core kernel only): y += bias[N] (x_dtype) before the one rounding
    const void* bias;
} QloraGemv4bitPart;

// Several weights applied to one x (q, k and v; gate and up) in ONE launch of the tensor-core kernel: part i's
// y is bit for bit what qlora_cuda_gemv_4bit gives for that part alone. 1 <= nparts <= QLORA_GEMV_4BIT_MAX_PARTS;
// M, K and x as for qlora_cuda_gemv_4bit. cudaErrorInvalidValue for bad arguments; cudaErrorNotSupported when
// a part is not for the tensor-core kernel (f32 x, K % 32 != 0, blocksize < 32 or not a power of two, `packed`
// not 16-byte aligned, x not 16-byte aligned): then call qlora_cuda_gemv_4bit per part.
#define QLORA_GEMV_4BIT_MAX_PARTS 4
cudaError_t qlora_cuda_gemv_4bit_group(const void* x, int x_dtype, int64_t M, int64_t K, const QloraGemv4bitPart* parts,
                                       int64_t nparts, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
