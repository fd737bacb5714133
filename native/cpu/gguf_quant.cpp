// gguf_quant.cpp: ggml's block encodings for GGUF export: F16, Q8_0, Q5_0, Q4_K, Q6_K (SPEC-gguf §3).
//
// The quantizers follow ggml-quants.c's portable references (quantize_row_q8_0_ref, _q5_0_ref, _q4_K_ref with
// make_qkx2_quants, _q6_K_ref with make_qx_quants) statement by statement, so the bytes are the ones
// `llama-quantize` writes without an importance matrix. That needs every product and sum rounded to f32 on its
// own, in the order written: a fused multiply-add changes a few bytes of a Q4_K tensor, so contraction is off
// for this file (the build compiles the CPU ops with -mfma).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <string.h>
#include "../include/qlora_gguf.h"
#include "parallel.h"

namespace {

constexpr int QK8_0 = 32, QK5_0 = 32, QK_K = 256, K_SCALE_SIZE = 12;
constexpr float GROUP_MAX_EPS = 1e-15f;

// block layouts (ggml-common.h); all byte arrays, so no padding
struct block_q8_0 {
    uint16_t d;
    int8_t qs[QK8_0];
};
struct block_q5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[QK5_0 / 2];
};
struct block_q4_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
};
struct block_q6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");

// ------------------------------------------------------------------
// f16 <-> f32, ggml_compute_fp32_to_fp16 / ggml_compute_fp16_to_fp32 (round to nearest even, overflow -> inf)

inline float from_bits(uint32_t w) {
    float f;
    memcpy(&f, &w, 4);
    return f;
}
inline uint32_t to_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, 4);
    return w;
}

inline uint16_t fp32_to_fp16(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
    base = from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

inline float fp16_to_fp32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = UINT32_C(0xE0) << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized_value = from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = UINT32_C(126) << 23;
    const float magic_bias = 0.5f;
    const float denormalized_value = from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? to_bits(denormalized_value) : to_bits(normalized_value));
    return from_bits(result);
}

// round half to even through the f32 mantissa (valid for |fval| <= 4194303)
inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

template <typename T>
inline T min_(T a, T b) {
    return a < b ? a : b;
}
template <typename T>
inline T max_(T a, T b) {
    return a > b ? a : b;
}

// ------------------------------------------------------------------
// Q8_0

void quantize_block_q8_0(const float* x, block_q8_0* y) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; j++) amax = max_(amax, fabsf(x[j]));
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    y->d = fp32_to_fp16(d);
    for (int j = 0; j < QK8_0; ++j) {
        const float x0 = x[j] * id;
        y->qs[j] = (int8_t)roundf(x0);
    }
}

void dequantize_block_q8_0(const block_q8_0* x, float* y) {
    const float d = fp16_to_fp32(x->d);
    for (int j = 0; j < QK8_0; ++j) y[j] = x->qs[j] * d;
}

// ------------------------------------------------------------------
// Q5_0

void quantize_block_q5_0(const float* x, block_q5_0* y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK5_0; j++) {
        const float v = x[j];
        if (amax < fabsf(v)) {
            amax = fabsf(v);
            max = v;
        }
    }
    const float d = max / -16;
    const float id = d ? 1.0f / d : 0.0f;
    y->d = fp32_to_fp16(d);
    uint32_t qh = 0;
    for (int j = 0; j < QK5_0 / 2; ++j) {
        const float x0 = x[0 + j] * id;
        const float x1 = x[QK5_0 / 2 + j] * id;
        const uint8_t xi0 = (uint8_t)min_<int>(31, (int8_t)(x0 + 16.5f));
        const uint8_t xi1 = (uint8_t)min_<int>(31, (int8_t)(x1 + 16.5f));
        y->qs[j] = (uint8_t)((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
        qh |= ((xi0 & 0x10u) >> 4) << (j + 0);
        qh |= ((xi1 & 0x10u) >> 4) << (j + QK5_0 / 2);
    }
    memcpy(y->qh, &qh, sizeof(qh));
}

void dequantize_block_q5_0(const block_q5_0* x, float* y) {
    const float d = fp16_to_fp32(x->d);
    uint32_t qh;
    memcpy(&qh, x->qh, sizeof(qh));
    for (int j = 0; j < QK5_0 / 2; ++j) {
        const uint8_t xh_0 = ((qh >> (j + 0)) << 4) & 0x10;
        const uint8_t xh_1 = ((qh >> (j + 12))) & 0x10;
        const int32_t x0 = ((x->qs[j] & 0x0F) | xh_0) - 16;
        const int32_t x1 = ((x->qs[j] >> 4) | xh_1) - 16;
        y[j + 0] = x0 * d;
        y[j + QK5_0 / 2] = x1 * d;
    }
}

// ------------------------------------------------------------------
// K-quant helpers

// scale and -min of an affine code with weights (ggml's make_qkx2_quants, use_mad = false)
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min, uint8_t* Laux,
                       float rmin, float rdelta, int nstep) {
    float min = x[0];
    float max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)max_(0, min_(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = diff * diff;
        float w = weights[i];
        best_error += w * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = max_(0, min_(nmax, l));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = diff * diff;
                float w = weights[i];
                cur_error += w * diff;
            }
            if (cur_error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = Laux[i];
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// symmetric code with x^2 weights (ggml's make_qx_quants with rmse_type 1 and no importance weights)
float make_qx_quants(int n, int nmax, const float* x, int8_t* L) {
    float max = 0;
    float amax = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0;
    float suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = max_(-nmax, min_(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = max_(-nmax, min_(nmax - 1, l));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + max_(-nmax, min_(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

// ------------------------------------------------------------------
// Q4_K

void quantize_block_q4_K(const float* x, block_q4_K* y) {
    uint8_t L[QK_K];
    uint8_t Laux[32];
    float weights[32];
    float mins[QK_K / 32];
    float scales[QK_K / 32];

    float max_scale = 0;  // as we are deducting the min, scales are always positive
    float max_min = 0;
    for (int j = 0; j < QK_K / 32; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20);
        float scale = scales[j];
        if (scale > max_scale) max_scale = scale;
        float min = mins[j];
        if (min > max_min) max_min = min;
    }

    memset(y->scales, 0, sizeof(y->scales));
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = min_<uint8_t>(63, ls);
        lm = min_<uint8_t>(63, lm);
        if (j < 4) {
            y->scales[j] = ls;
            y->scales[j + 4] = lm;
        } else {
            y->scales[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            y->scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
            y->scales[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    y->d = fp32_to_fp16(max_scale / 63.f);
    y->dmin = fp32_to_fp16(max_min / 63.f);

    uint8_t sc, m;
    for (int j = 0; j < QK_K / 32; ++j) {
        get_scale_min_k4(j, y->scales, &sc, &m);
        const float d = fp16_to_fp32(y->d) * sc;
        if (!d) continue;
        const float dm = fp16_to_fp32(y->dmin) * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            l = max_(0, min_(15, l));
            L[32 * j + ii] = (uint8_t)l;
        }
    }

    uint8_t* q = y->qs;
    for (int j = 0; j < QK_K; j += 64) {
        for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        q += 32;
    }
}

void dequantize_block_q4_K(const block_q4_K* x, float* y) {
    const uint8_t* q = x->qs;
    const float d = fp16_to_fp32(x->d);
    const float min = fp16_to_fp32(x->dmin);
    int is = 0;
    uint8_t sc, m;
    for (int j = 0; j < QK_K; j += 64) {
        get_scale_min_k4(is + 0, x->scales, &sc, &m);
        const float d1 = d * sc;
        const float m1 = min * m;
        get_scale_min_k4(is + 1, x->scales, &sc, &m);
        const float d2 = d * sc;
        const float m2 = min * m;
        for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
        q += 32;
        is += 2;
    }
}

// ------------------------------------------------------------------
// Q6_K

void quantize_block_q6_K(const float* x, block_q6_K* y) {
    int8_t L[QK_K];
    float scales[QK_K / 16];

    float max_scale = 0;
    float max_abs_scale = 0;
    for (int ib = 0; ib < QK_K / 16; ++ib) {
        const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
        scales[ib] = scale;
        const float abs_scale = fabsf(scale);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }

    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, sizeof(block_q6_K));
        y->d = fp32_to_fp16(0.f);
        return;
    }

    float iscale = -128.f / max_scale;
    y->d = fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) y->scales[ib] = (int8_t)min_(127, nearest_int(iscale * scales[ib]));

    for (int j = 0; j < QK_K / 16; ++j) {
        float d = fp16_to_fp32(y->d) * y->scales[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = max_(-32, min_(31, l));
            L[16 * j + ii] = (int8_t)(l + 32);
        }
    }

    uint8_t* ql = y->ql;
    uint8_t* qh = y->qh;
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF;
            const uint8_t q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF;
            const uint8_t q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                              ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

void dequantize_block_q6_K(const block_q6_K* x, float* y) {
    const float d = fp16_to_fp32(x->d);
    const uint8_t* ql = x->ql;
    const uint8_t* qh = x->qh;
    const int8_t* sc = x->scales;
    for (int n = 0; n < QK_K; n += 128) {
        for (int l = 0; l < 32; ++l) {
            int is = l / 16;
            const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l + 0] = d * sc[is + 0] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// ------------------------------------------------------------------
// dispatch: every block is independent, so the whole tensor is one flat range of blocks

struct TypeInfo {
    int block;      // values per block
    int bytes;      // bytes per block
    int64_t grain;  // blocks per task
};

bool type_info(int type, TypeInfo& t) {
    switch (type) {
        case QLORA_GGML_F32:
            t = {1, 4, 1 << 16};
            return true;
        case QLORA_GGML_F16:
            t = {1, 2, 1 << 16};
            return true;
        case QLORA_GGML_Q8_0:
            t = {QK8_0, (int)sizeof(block_q8_0), 1024};
            return true;
        case QLORA_GGML_Q5_0:
            t = {QK5_0, (int)sizeof(block_q5_0), 1024};
            return true;
        case QLORA_GGML_Q4_K:
            t = {QK_K, (int)sizeof(block_q4_K), 16};
            return true;
        case QLORA_GGML_Q6_K:
            t = {QK_K, (int)sizeof(block_q6_K), 16};
            return true;
        default:
            return false;
    }
}

}  // namespace

extern "C" int64_t qlora_gguf_row_bytes(int type, int64_t n_per_row) {
    TypeInfo t;
    if (!type_info(type, t) || n_per_row < 0 || n_per_row % t.block != 0) return -1;
    return n_per_row / t.block * t.bytes;
}

extern "C" int qlora_gguf_quantize(int type, uint8_t* out, const float* x, int64_t nrows, int64_t n_per_row) {
    TypeInfo t;
    if (nrows < 0 || qlora_gguf_row_bytes(type, n_per_row) < 0 || !type_info(type, t)) return -1;
    const int64_t nblocks = nrows * (n_per_row / t.block);
    qlora::parallel_for(nblocks, t.grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) {
            const float* xb = x + i * t.block;
            uint8_t* yb = out + i * t.bytes;
            switch (type) {
                case QLORA_GGML_F32:
                    memcpy(yb, xb, 4);
                    break;
                case QLORA_GGML_F16: {
                    uint16_t h = fp32_to_fp16(*xb);
                    memcpy(yb, &h, 2);
                    break;
                }
                case QLORA_GGML_Q8_0:
                    quantize_block_q8_0(xb, (block_q8_0*)yb);
                    break;
                case QLORA_GGML_Q5_0:
                    quantize_block_q5_0(xb, (block_q5_0*)yb);
                    break;
                case QLORA_GGML_Q4_K:
                    quantize_block_q4_K(xb, (block_q4_K*)yb);
                    break;
                case QLORA_GGML_Q6_K:
                    quantize_block_q6_K(xb, (block_q6_K*)yb);
                    break;
            }
        }
    });
    return 0;
}

extern "C" int qlora_gguf_dequantize(int type, float* out, const uint8_t* in, int64_t nrows, int64_t n_per_row) {
    TypeInfo t;
    if (nrows < 0 || qlora_gguf_row_bytes(type, n_per_row) < 0 || !type_info(type, t)) return -1;
    const int64_t nblocks = nrows * (n_per_row / t.block);
    qlora::parallel_for(nblocks, t.grain * 4, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) {
            const uint8_t* xb = in + i * t.bytes;
            float* yb = out + i * t.block;
            switch (type) {
                case QLORA_GGML_F32:
                    memcpy(yb, xb, 4);
                    break;
                case QLORA_GGML_F16: {
                    uint16_t h;
                    memcpy(&h, xb, 2);
                    *yb = fp16_to_fp32(h);
                    break;
                }
                case QLORA_GGML_Q8_0:
                    dequantize_block_q8_0((const block_q8_0*)xb, yb);
                    break;
                case QLORA_GGML_Q5_0:
                    dequantize_block_q5_0((const block_q5_0*)xb, yb);
                    break;
                case QLORA_GGML_Q4_K:
                    dequantize_block_q4_K((const block_q4_K*)xb, yb);
                    break;
                case QLORA_GGML_Q6_K:
                    dequantize_block_q6_K((const block_q6_K*)xb, yb);
                    break;
            }
        }
    });
    return 0;
}
