// attention.cpp: causal grouped-query attention on the CPU, forward and backward, with a padding mask
// (key_valid), packed segments (seg) and a sliding window (keys q_offset + t - window < j only; 0: none). The scores of
// one query row are materialized (S floats) rather than tiled: on the CPU the S x D dot products dominate, and one row
// fits in L1 for the lengths we train.
#include <math.h>
#include <string.h>
#include <vector>
#include "../include/qlora_ops.h"
#include "parallel.h"

using qlora::parallel_for;

static inline float dot(const float* a, const float* b, int64_t D) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

// is key j (>= first_key(qpos, window)) visible to the query at key position qpos of row b?
static inline bool visible(const uint8_t* key_valid, const int32_t* seg, int64_t b, int64_t S, int64_t j,
                           int64_t qpos) {
    if (j > qpos) return false;
    if (key_valid && !key_valid[b * S + j]) return false;
    if (seg && seg[b * S + j] != seg[b * S + qpos]) return false;
    return true;
}

// the first key the window lets the query at qpos see (keys before it are never visited)
static inline int64_t first_key(int64_t qpos, int64_t window) {
    return window > 0 && qpos - window + 1 > 0 ? qpos - window + 1 : 0;
}

extern "C" void qlora_cpu_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                            const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T,
                                            int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset,
                                            float scale, int64_t window) {
    int64_t G = Hq / Hkv;
    // one task per (b, h, t) query row
    parallel_for(B * Hq * T, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> p(S);
        for (int64_t idx = begin; idx < end; idx++) {
            int64_t t = idx % T, h = (idx / T) % Hq, b = idx / (T * Hq);
            int64_t hk = h / G;
            int64_t qpos = q_offset + t;
            const float* qr = q + ((b * T + t) * Hq + h) * D;
            float* o = out + ((b * T + t) * Hq + h) * D;
            int64_t jmax = qpos < S - 1 ? qpos : S - 1, jmin = first_key(qpos, window);
            float m = -INFINITY;
            for (int64_t j = jmin; j <= jmax; j++) {
                if (!visible(key_valid, seg, b, S, j, qpos)) {
                    p[j] = -INFINITY;
                    continue;
                }
                float s = dot(qr, k + ((b * S + j) * Hkv + hk) * D, D) * scale;
                p[j] = s;
                m = s > m ? s : m;
            }
            memset(o, 0, D * sizeof(float));
            if (m == -INFINITY) {  // no visible key (a fully padded row)
                if (lse) lse[(b * Hq + h) * T + t] = -INFINITY;
                continue;
            }
            float sum = 0.0f;
            for (int64_t j = jmin; j <= jmax; j++) {
                float e = p[j] == -INFINITY ? 0.0f : expf(p[j] - m);
                p[j] = e;
                sum += e;
            }
            float inv = 1.0f / sum;
            for (int64_t j = jmin; j <= jmax; j++) {
                if (p[j] == 0.0f) continue;
                float w = p[j] * inv;
                const float* vr = v + ((b * S + j) * Hkv + hk) * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) o[d] += w * vr[d];
            }
            if (lse) lse[(b * Hq + h) * T + t] = m + logf(sum);
        }
    });
}

extern "C" void qlora_cpu_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                                             const float* k, const float* v, const float* out, const float* lse,
                                             const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T,
                                             int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset,
                                             float scale, int64_t window) {
    int64_t G = Hq / Hkv;
    // P = softmax(s), s = scale q.k ;  dv_j += P_j dout ;  dP_j = dout.v_j ;  ds_j = P_j (dP_j - dout.out)
    // dq = scale sum_j ds_j k_j ;  dk_j += scale ds_j q
    // one task per (b, kv head): it owns dk/dv of that head and dq of its G query heads, so no races
    parallel_for(B * Hkv, 1, [&](int64_t begin, int64_t end) {
        for (int64_t idx = begin; idx < end; idx++) {
            int64_t hk = idx % Hkv, b = idx / Hkv;
            for (int64_t j = 0; j < S; j++) {
                memset(dk + ((b * S + j) * Hkv + hk) * D, 0, D * sizeof(float));
                memset(dv + ((b * S + j) * Hkv + hk) * D, 0, D * sizeof(float));
            }
            for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
                for (int64_t t = 0; t < T; t++) {
                    int64_t qpos = q_offset + t;
                    int64_t row = (b * T + t) * Hq + h;
                    const float* qr = q + row * D;
                    const float* g = dout + row * D;
                    float* dqr = dq + row * D;
                    memset(dqr, 0, D * sizeof(float));
                    float l = lse[(b * Hq + h) * T + t];
                    if (l == -INFINITY) continue;
                    float di = dot(g, out + row * D, D);
                    int64_t jmax = qpos < S - 1 ? qpos : S - 1;
                    for (int64_t j = first_key(qpos, window); j <= jmax; j++) {
                        if (!visible(key_valid, seg, b, S, j, qpos)) continue;
                        const float* kr = k + ((b * S + j) * Hkv + hk) * D;
                        const float* vr = v + ((b * S + j) * Hkv + hk) * D;
                        float pj = expf(dot(qr, kr, D) * scale - l);
                        float dpj = dot(g, vr, D);
                        float ds = pj * (dpj - di) * scale;
                        float* dkr = dk + ((b * S + j) * Hkv + hk) * D;
                        float* dvr = dv + ((b * S + j) * Hkv + hk) * D;
#pragma omp simd
                        for (int64_t d = 0; d < D; d++) {
                            dvr[d] += pj * g[d];
                            dkr[d] += ds * qr[d];
                            dqr[d] += ds * kr[d];
                        }
                    }
                }
            }
        }
    });
}
