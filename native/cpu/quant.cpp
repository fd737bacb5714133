// quant.cpp: NF4/FP4 4-bit and 8-bit blockwise quantization, bit-identical to bitsandbytes' CUDA kernels
// (kQuantizeBlockwise, dQuantizeNF4, dQuantizeFP4, dQuantize, kDequantizeBlockwise). See SPEC-quant.md §2-§6.
//
// Bit-exactness needs every product and sum rounded to f32 on its own: a fused multiply-add in
// `code * absmax + offset` would change the last bit, so contraction is off for this file.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <immintrin.h>
#include <math.h>
#include "../include/qlora_bnb.h"
#include "../include/qlora_float.h"
#include "../include/qlora_quant.h"
#include "parallel.h"

namespace {

// bnb's dQuantizeNF4 decision tree, flattened: the code is the number of thresholds u strictly exceeds
// (a NaN exceeds none and gets code 0, as in the tree). The literals are bnb's, and the compiler rounds them
// straight from decimal to f32 as nvcc does: 4 of them (t0, t8, t12, t14) are 1 ulp away from the f32
// midpoints of the code table that bnb's pure-torch backend compares against.
const float kNf4Thresholds[15] = {
    -0.8480964004993439f,  -0.6106329262256622f,   -0.4599952697753906f, -0.33967943489551544f, -0.23460740596055984f,
    -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,   0.2035212516784668f,
    0.2920137718319893f,   0.3893125355243683f,    0.5016634166240692f,  0.6427869200706482f,   0.8614784181118011f};

inline uint8_t quantize_nf4(float u) {
    int c = 0;
    for (int k = 0; k < 15; k++) c += u > kNf4Thresholds[k];
    return (uint8_t)c;
}

// bnb's dQuantizeFP4: sign bit from u < 0, magnitude by the thresholds between the sorted FP4 magnitudes
const float kFp4Thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
// low 3 bits of the code of the k-th smallest magnitude: 0, 0.0052, 0.1667, 0.25, 0.333, 0.5, 0.667, 1
const uint8_t kFp4CodeByRank[8] = {0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011};

inline uint8_t quantize_fp4(float u) {
    uint8_t sign = u < 0 ? 0b1000 : 0;
    float a = fabsf(u);
    int r = 0;
    for (int k = 0; k < 7; k++) r += a > kFp4Thresholds[k];
    return (uint8_t)(kFp4CodeByRank[r] + sign);
}

inline float round_f16(float f) { return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }

inline float round_to(float f, int round_dtype) {
    if (round_dtype == QLORA_ROUND_BF16) return qlora::round_bf16(f);
    if (round_dtype == QLORA_ROUND_F16) return round_f16(f);
    return f;
}

template <typename T>
inline float load_f32(const T* p, int64_t i);
template <>
inline float load_f32<float>(const float* p, int64_t i) {
    return p[i];
}
template <>
inline float load_f32<uint16_t>(const uint16_t* p, int64_t i) {
    return qlora::bf16_to_f32(p[i]);
}

// blocks are processed independently; a byte never straddles two blocks because blocksize is even
template <typename T>
void quantize_4bit(uint8_t* packed, float* absmax, const T* inp, int quant_type, int64_t bs, int64_t n) {
    const int64_t nblocks = (n + bs - 1) / bs;
    const uint8_t zero_code = quant_type == QLORA_QUANT_NF4 ? 7 : 0;
    qlora::parallel_for(nblocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {
            const int64_t begin = b * bs, end = std::min(n, begin + bs);
            float amax = 0.0f;
            for (int64_t i = begin; i < end; i++) amax = fmaxf(amax, fabsf(load_f32(inp, i)));
            absmax[b] = amax;
            // an odd n pads the last byte's low nibble with the code of 0, as the CUDA kernel's zero-filled load
            const int64_t pend = begin + ((end - begin + 1) & ~(int64_t)1);
            if (amax == 0.0f) {
                // CUDA would compute 0 * inf = NaN and emit code 0; the exact-zero code decodes to 0 under any scale
                for (int64_t i = begin; i < pend; i += 2) packed[i >> 1] = (uint8_t)(zero_code << 4 | zero_code);
                continue;
            }
            const float r = 1.0f / amax;
            for (int64_t i = begin; i < pend; i += 2) {
                float u0 = load_f32(inp, i) * r;
                float u1 = i + 1 < end ? load_f32(inp, i + 1) * r : 0.0f;
                uint8_t q0, q1;
                if (quant_type == QLORA_QUANT_NF4) {
                    q0 = quantize_nf4(u0);
                    q1 = quantize_nf4(u1);
                } else {
                    q0 = quantize_fp4(u0);
                    q1 = quantize_fp4(u1);
                }
                packed[i >> 1] = (uint8_t)(q0 << 4 | q1);
            }
        }
    });
}

}  // namespace

extern "C" void qlora_cpu_quantize_4bit_f32(uint8_t* packed, float* absmax, const float* inp, int quant_type,
                                            int64_t blocksize, int64_t n) {
    quantize_4bit<float>(packed, absmax, inp, quant_type, blocksize, n);
}

extern "C" void qlora_cpu_quantize_4bit_bf16(uint8_t* packed, float* absmax, const uint16_t* inp, int quant_type,
                                             int64_t blocksize, int64_t n) {
    quantize_4bit<uint16_t>(packed, absmax, inp, quant_type, blocksize, n);
}

extern "C" void qlora_cpu_dequantize_4bit(float* out, const uint8_t* packed, const float* absmax, const float* code,
                                          int64_t blocksize, int round_dtype, int64_t n) {
    qlora_cpu_dequantize_4bit_rows(out, packed, nullptr, absmax, nullptr, 0.0f, code, blocksize, 1, round_dtype, 0, 1,
                                   n);
}

extern "C" void qlora_cpu_quantize_blockwise_8bit(uint8_t* q, float* absmax, const float* inp, const float* code,
                                                  int64_t blocksize, int64_t n) {
    const int64_t bs = blocksize, nblocks = (n + bs - 1) / bs;
    const uint8_t zero_code = qlora::bnb::dquantize(code, 0.0f);
    qlora::parallel_for(nblocks, std::max<int64_t>(1, 8192 / bs), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {
            const int64_t begin = b * bs, end = std::min(n, begin + bs);
            float amax = 0.0f;
            for (int64_t i = begin; i < end; i++) amax = fmaxf(amax, fabsf(inp[i]));
            absmax[b] = amax;
            if (amax == 0.0f) {
                for (int64_t i = begin; i < end; i++) q[i] = zero_code;
                continue;
            }
            const float r = 1.0f / amax;
            for (int64_t i = begin; i < end; i++) q[i] = qlora::bnb::dquantize(code, inp[i] * r);
        }
    });
}

extern "C" void qlora_cpu_dequantize_blockwise_8bit(float* out, const uint8_t* q, const float* absmax,
                                                    const float* code, float offset, int64_t blocksize, int64_t n) {
    const int64_t bs = blocksize, nblocks = (n + bs - 1) / bs;
    qlora::parallel_for(nblocks, std::max<int64_t>(1, 8192 / bs), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {
            const int64_t begin = b * bs, end = std::min(n, begin + bs);
            const float a = absmax[b];
            for (int64_t i = begin; i < end; i++) {
                float v = code[q[i]] * a;
                if (offset != 0.0f) v = v + offset;
                out[i] = v;
            }
        }
    });
}

extern "C" void qlora_cpu_dequantize_4bit_rows(float* out, const uint8_t* packed, const uint8_t* absmax_q,
                                               const float* nested_absmax, const float* nested_code, float offset,
                                               const float* code, int64_t blocksize, int64_t nested_blocksize,
                                               int round_dtype, int64_t row_begin, int64_t rows, int64_t cols) {
    const int64_t start = row_begin * cols, end = start + rows * cols;
    if (end <= start) return;
    const int64_t bs = blocksize;
    const int64_t b_first = start / bs, b_last = (end - 1) / bs;
    qlora::parallel_for(b_last - b_first + 1, std::max<int64_t>(1, 16384 / bs), [&](int64_t c0, int64_t c1) {
        for (int64_t b = b_first + c0; b < b_first + c1; b++) {
            float scale;
            if (absmax_q) {
                scale = qlora::bnb::nested_block_absmax(nested_code[absmax_q[b]], nested_absmax[b / nested_blocksize],
                                                        offset);
            } else {
                scale = nested_absmax[b];
            }
            float lut[16];
            for (int k = 0; k < 16; k++) lut[k] = round_to(code[k] * scale, round_dtype);
            const int64_t i0 = std::max(start, b * bs), i1 = std::min(end, (b + 1) * bs);
            float* o = out - start;
            int64_t i = i0;
            if (i & 1) {
                o[i] = lut[packed[i >> 1] & 0xF];
                i++;
            }
            for (; i + 1 < i1; i += 2) {
                const uint8_t byte = packed[i >> 1];
                o[i] = lut[byte >> 4];
                o[i + 1] = lut[byte & 0xF];
            }
            if (i < i1) o[i] = lut[packed[i >> 1] >> 4];
        }
    });
}
