// qlora_quant.h: 4-bit (NF4/FP4) and 8-bit blockwise quantization, bit-compatible with bitsandbytes' CUDA
// kernels (docs: SPEC-quant.md). Plain C ABI, outputs first, sizes last, shapes in the comments.
//
// Layout (as bitsandbytes): tensors are flattened row-major and cut into blocks of `blocksize` consecutive
// elements (the last block may be shorter); two 4-bit codes a byte, the first element in the HIGH nibble.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// quant_type of the 4-bit ops
#define QLORA_QUANT_NF4 0
#define QLORA_QUANT_FP4 1

// round_dtype of the dequantize ops: the dtype the result is rounded to (round to nearest even) before being
// stored as f32, as bitsandbytes dequantizes to quant_state.dtype
#define QLORA_ROUND_F32 0
#define QLORA_ROUND_BF16 1
#define QLORA_ROUND_F16 2

// packed[ceil(n/2)], absmax[ceil(n/blocksize)] <- inp[n] (f32).
// u = x * fl32(1/absmax); the code is the number of decision thresholds u strictly exceeds (bnb's
// dQuantizeNF4/dQuantizeFP4 trees). An all-zero block gets code 7 (NF4 exact zero) / 0 (FP4 +0).
void qlora_cpu_quantize_4bit_f32(uint8_t* packed, float* absmax, const float* inp, int quant_type, int64_t blocksize,
                                 int64_t n);
// the same from bf16 bits: inp[n] (bf16)
void qlora_cpu_quantize_4bit_bf16(uint8_t* packed, float* absmax, const uint16_t* inp, int quant_type,
                                  int64_t blocksize, int64_t n);

// out[n] = fl32(code[nibble(i)] * absmax[i / blocksize]), then rounded to round_dtype.
// packed[ceil(n/2)], absmax[ceil(n/blocksize)], code[16]
void qlora_cpu_dequantize_4bit(float* out, const uint8_t* packed, const float* absmax, const float* code,
                               int64_t blocksize, int round_dtype, int64_t n);

// 8-bit blockwise quantization against a sorted 256-entry map (the signed dynamic map for double quant):
// q[n], absmax[ceil(n/blocksize)] <- inp[n]; the nearest entry by bnb's dQuantize (binary search from index
// 127, then the midpoint to the neighbour on the relevant side). An all-zero block gets the code of 0.0.
void qlora_cpu_quantize_blockwise_8bit(uint8_t* q, float* absmax, const float* inp, const float* code,
                                       int64_t blocksize, int64_t n);
// out[n] = fl32(code[q[i]] * absmax[i / blocksize]) (+ offset when offset != 0, as a separate f32 add)
// q[n], absmax[ceil(n/blocksize)], code[256]
void qlora_cpu_dequantize_blockwise_8bit(float* out, const uint8_t* q, const float* absmax, const float* code,
                                         float offset, int64_t blocksize, int64_t n);

// Fused NF4/FP4 dequantization with double-quantized scales, for the 4-bit linear layer: rows
// [row_begin, row_begin + rows) of the weight W[total_rows, cols] into out[rows, cols] (f32), where
//   absmax_j = fl32(fl32(nested_code[absmax_q[j]] * nested_absmax[j / nested_blocksize]) + offset)
//   W[i]     = fl32(code[nibble(i)] * absmax_j(i / blocksize)), rounded to round_dtype.
// packed[ceil(total/2)], absmax_q[nblocks], nested_absmax[ceil(nblocks/nested_blocksize)], nested_code[256],
// code[16]. With absmax_q == NULL, `nested_absmax` is read as the plain f32 absmax[nblocks] (no double quant).
void qlora_cpu_dequantize_4bit_rows(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                                    const float* nested_absmax, const float* nested_code, float offset,
                                    const float* code, int64_t blocksize, int64_t nested_blocksize, int round_dtype,
                                    int64_t row_begin, int64_t rows, int64_t cols);

#ifdef __cplusplus
}
#endif
