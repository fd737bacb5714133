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
#include "../include/qlora_nf4.h"
#include "../include/qlora_quant.h"
#include "parallel.h"

namespace {

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
    const uint8_t zero_code = qlora::q4::zero_code(quant_type);
    qlora::parallel_for(nblocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {
            const int64_t begin = b * bs, end = std::min(n, begin + bs);
            float amax = 0.0f;
            for (int64_t i = begin; i < end; i++) amax = fmaxf(amax, fabsf(load_f32(inp, i)));
            absmax[b] = amax;
            // an odd n pads the last byte's low nibble with the code of 0, as the CUDA kernel's zero-filled load
            const int64_t pend = begin + ((end - begin + 1) & ~(int64_t)1);
            if (qlora::q4::is_zero_absmax(amax)) {
                for (int64_t i = begin; i < pend; i += 2) packed[i >> 1] = (uint8_t)(zero_code << 4 | zero_code);
                continue;
            }
            const float r = 1.0f / amax;
            for (int64_t i = begin; i < pend; i += 2) {
                float u0 = load_f32(inp, i) * r;
                float u1 = i + 1 < end ? load_f32(inp, i + 1) * r : 0.0f;
                packed[i >> 1] = (uint8_t)(qlora::q4::quantize_4bit_value(u0, quant_type) << 4 |
                                           qlora::q4::quantize_4bit_value(u1, quant_type));
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
