// qlora_gguf.h: the ggml tensor encodings a GGUF export writes (docs: SPEC-gguf.md §2, §3), byte-identical to
// ggml's portable reference quantizers (quantize_row_*_ref in ggml-quants.c, without FMA contraction) and their
// dequantizers. Plain C ABI, outputs first, sizes last.
//
// A tensor is `nrows` rows of `n_per_row` f32 values (row-major, ggml's ne[0] = n_per_row); blocks run along a
// row, so n_per_row must be a multiple of the type's block size. Rows are encoded one after the other.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ggml type ids (GGMLQuantizationType)
#define QLORA_GGML_F32 0
#define QLORA_GGML_F16 1
#define QLORA_GGML_Q5_0 6
#define QLORA_GGML_Q8_0 8
#define QLORA_GGML_Q4_K 12
#define QLORA_GGML_Q6_K 14

// bytes of one row of n_per_row values, or -1 when the type is not supported here or n_per_row is not a
// multiple of its block size
int64_t qlora_gguf_row_bytes(int type, int64_t n_per_row);

// out[nrows * row_bytes] <- x[nrows, n_per_row] (f32). Returns 0, or -1 for a bad type or row length.
int qlora_gguf_quantize(int type, uint8_t* out, const float* x, int64_t nrows, int64_t n_per_row);

// out[nrows, n_per_row] (f32) <- in[nrows * row_bytes] (ggml's dequantize_row_*). Returns 0, or -1 as above.
int qlora_gguf_dequantize(int type, float* out, const uint8_t* in, int64_t nrows, int64_t n_per_row);

#ifdef __cplusplus
}
#endif
