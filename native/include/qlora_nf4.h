// qlora_nf4.h: the 4-bit code of one value as bitsandbytes' kQuantizeBlockwise picks it (dQuantizeNF4,
// dQuantizeFP4), written once for the CPU quantizer (native/cpu/quant.cpp) and the CUDA one (native/cuda/nf4.cu)
// so that both give bnb's codes (docs: SPEC-quant.md §2, §3). The comparisons are qlora_float.h's: on the device
// they keep subnormal operands (the CUDA sources build with --use_fast_math). C++ only.
#pragma once
#include <stdint.h>
#include "qlora_float.h"
#include "qlora_quant.h"

namespace qlora {
namespace q4 {

// bnb's dQuantizeNF4 decision tree, flattened: the code is the number of thresholds u strictly exceeds (a NaN
// exceeds none and gets code 0, as in the tree). The literals are bnb's, and the compiler rounds them straight
// from decimal to f32 as nvcc does: 4 of them (the 1st, 9th, 13th and 15th) are 1 ulp away from the f32
// midpoints of the code table that bnb's pure-torch backend compares against.
QLORA_HD QLORA_INLINE uint8_t quantize_nf4(float u) {
    using ieee::gt;
    int c = gt(u, -0.8480964004993439f);
    c += gt(u, -0.6106329262256622f);
    c += gt(u, -0.4599952697753906f);
    c += gt(u, -0.33967943489551544f);
    c += gt(u, -0.23460740596055984f);
    c += gt(u, -0.13791173323988914f);
    c += gt(u, -0.045525018125772476f);
    c += gt(u, 0.03979014977812767f);
    c += gt(u, 0.1202552504837513f);
    c += gt(u, 0.2035212516784668f);
    c += gt(u, 0.2920137718319893f);
    c += gt(u, 0.3893125355243683f);
    c += gt(u, 0.5016634166240692f);
    c += gt(u, 0.6427869200706482f);
    c += gt(u, 0.8614784181118011f);
    return (uint8_t)c;
}

// bnb's dQuantizeFP4: sign bit from u < 0, magnitude by the thresholds between the sorted FP4 magnitudes; the low 3
// bits of the code of the k-th smallest magnitude (0, 0.0052, 0.1667, 0.25, 0.333, 0.5, 0.667, 1) are nibble k of
// 0x32547610 (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
QLORA_HD QLORA_INLINE uint8_t quantize_fp4(float u) {
    using ieee::gt;
    const uint8_t sign = ieee::lt(u, 0.0f) ? 0b1000 : 0;
    const float a = ieee::abs(u);
    int r = gt(a, 0.00260417f);
    r += gt(a, 0.0859375f);
    r += gt(a, 0.20833333f);
    r += gt(a, 0.29166667f);
    r += gt(a, 0.4166667f);
    r += gt(a, 0.583333f);
    r += gt(a, 0.8333333f);
    return (uint8_t)(((0x32547610u >> (4 * r)) & 0x7u) + sign);
}

// the code of u = x * fl32(1 / absmax) in quant_type (QLORA_QUANT_NF4 or QLORA_QUANT_FP4)
QLORA_HD QLORA_INLINE uint8_t quantize_4bit_value(float u, int quant_type) {
    return quant_type == QLORA_QUANT_NF4 ? quantize_nf4(u) : quantize_fp4(u);
}

// the code an all-zero block gets: NF4's exact zero (7) / FP4's +0 (0). CUDA would compute 0 * inf = NaN and emit
// code 0; the exact-zero code decodes to 0 under any scale.
QLORA_HD QLORA_INLINE uint8_t zero_code(int quant_type) { return quant_type == QLORA_QUANT_NF4 ? 7 : 0; }

// an absmax of +0 (the block is all zeros), tested on the bits: a subnormal absmax is not zero, also where the
// device flushes subnormal operands of a float comparison
QLORA_HD QLORA_INLINE bool is_zero_absmax(float amax) { return (float_bits(amax) & 0x7fffffffu) == 0; }

}  // namespace q4
}  // namespace qlora
