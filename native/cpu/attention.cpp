// attention.cpp: causal grouped-query attention on the CPU, forward and backward, with a padding mask
// (key_valid), packed segments (seg) and a sliding window (keys q_offset + t - window < j only; 0: none).
//
// Blocked as the GPU kernels are: a task takes 64 query rows of one head and the keys they can see (from the
// window's first key of the block's first query to its last query's position), computes the block's scores with
// the tuned sgemm (matmul.cpp; single-threaded inside a task), masks and exponentiates them a row at a time (the
// eight-lane expf of ops.cpp), and multiplies by V with a second sgemm. The backward recomputes the block's
// probabilities from lse and takes dV, dK and dQ as three more sgemms; one task per (b, kv head) owns dk/dv of that
// head and dq of its query heads, so no two tasks write the same row. A row-at-a-time loop of dot products ran
// at about a tenth of the sgemm rate.
#include <math.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include "../include/qlora_ops.h"
#include "parallel.h"
#include "vexp.h"

using qlora::parallel_for;

namespace {

constexpr int64_t kQueryBlock = 64;

// is key j (>= first_key(qpos, window)) visible to the query at key position qpos of row b?
inline bool visible(const uint8_t* key_valid, const int32_t* seg, int64_t b, int64_t S, int64_t j, int64_t qpos) {
    if (j > qpos) return false;
    if (key_valid && !key_valid[b * S + j]) return false;
    if (seg && seg[b * S + j] != seg[b * S + qpos]) return false;
    return true;
}

// the first key the window lets the query at qpos see (keys before it are never visited)
inline int64_t first_key(int64_t qpos, int64_t window) {
    return window > 0 && qpos - window + 1 > 0 ? qpos - window + 1 : 0;
}

// a block of query rows [t0, t0 + rows) of one (b, h) and the keys [kmin, kmin + L) any of them can see
struct QueryBlock {
    int64_t t0, rows, kmin, L;
};

inline QueryBlock query_block(int64_t qb, int64_t T, int64_t S, int64_t q_offset, int64_t window) {
    QueryBlock blk;
    blk.t0 = qb * kQueryBlock;
    blk.rows = std::min(kQueryBlock, T - blk.t0);
    blk.kmin = first_key(q_offset + blk.t0, window);
    const int64_t kmax = std::min(q_offset + blk.t0 + blk.rows - 1, S - 1);
    blk.L = kmax - blk.kmin + 1;
    return blk;
}

// the scores of a row of the block: -inf where the query at qpos cannot see key kmin + i; the row's maximum
inline float mask_row(float* s, const QueryBlock& blk, const uint8_t* key_valid, const int32_t* seg, int64_t b,
                      int64_t S, int64_t qpos, int64_t window) {
    const int64_t lo = first_key(qpos, window);
    float m = -INFINITY;
    for (int64_t i = 0; i < blk.L; i++) {
        const int64_t j = blk.kmin + i;
        if (j < lo || !visible(key_valid, seg, b, S, j, qpos))
            s[i] = -INFINITY;
        else
            m = s[i] > m ? s[i] : m;
    }
    return m;
}

}  // namespace

extern "C" void qlora_cpu_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                                            const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T,
                                            int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset,
                                            float scale, int64_t window) {
    const int64_t G = Hq / Hkv, blocks = (T + kQueryBlock - 1) / kQueryBlock;
    const int64_t q_stride = Hq * D, kv_stride = Hkv * D;
    // one task per (b, h, block of query rows)
    parallel_for(B * Hq * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p;
        for (int64_t idx = begin; idx < end; idx++) {
            const int64_t qb = idx % blocks, h = (idx / blocks) % Hq, b = idx / (blocks * Hq), hk = h / G;
            const QueryBlock blk = query_block(qb, T, S, q_offset, window);
            const float* kb = k + ((b * S + blk.kmin) * Hkv + hk) * D;
            const float* vb = v + ((b * S + blk.kmin) * Hkv + hk) * D;
            p.resize(blk.rows * blk.L);
            qlora_cpu_sgemm(0, 1, blk.rows, blk.L, D, scale, q + ((b * T + blk.t0) * Hq + h) * D, q_stride, kb,
                            kv_stride, 0.0f, p.data(), blk.L);
            for (int64_t r = 0; r < blk.rows; r++) {
                float* s = p.data() + r * blk.L;
                const int64_t t = blk.t0 + r;
                const float m = mask_row(s, blk, key_valid, seg, b, S, q_offset + t, window);
                if (m == -INFINITY) {  // no visible key (a fully padded row): out 0, lse -inf
                    memset(s, 0, blk.L * sizeof(float));
                    if (lse) lse[(b * Hq + h) * T + t] = -INFINITY;
                    continue;
                }
                for (int64_t i = 0; i < blk.L; i++) s[i] -= m;
                qlora::expf_inplace(s, blk.L);
                float sum = 0.0f;
                for (int64_t i = 0; i < blk.L; i++) sum += s[i];
                const float inv = 1.0f / sum;
                for (int64_t i = 0; i < blk.L; i++) s[i] *= inv;
                if (lse) lse[(b * Hq + h) * T + t] = m + logf(sum);
            }
            qlora_cpu_sgemm(0, 0, blk.rows, D, blk.L, 1.0f, p.data(), blk.L, vb, kv_stride, 0.0f,
                            out + ((b * T + blk.t0) * Hq + h) * D, q_stride);
        }
    });
}

extern "C" void qlora_cpu_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                                             const float* k, const float* v, const float* out, const float* lse,
                                             const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T,
                                             int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset,
                                             float scale, int64_t window) {
    (void)out;  // rowsum(dO * O) is taken as sum_j P_j dP_j (below)
    const int64_t G = Hq / Hkv, blocks = (T + kQueryBlock - 1) / kQueryBlock;
    const int64_t q_stride = Hq * D, kv_stride = Hkv * D;
    // P = softmax(s), s = scale q.k ;  dV += P^T dO ;  dP = dO V^T ;  dS = P (dP - rowsum(P dP)) scale
    // dQ = dS K ;  dK += dS^T Q
    // one task per (b, kv head): it owns dk/dv of that head and dq of its G query heads, so no races
    parallel_for(B * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> p, ds;
        for (int64_t idx = begin; idx < end; idx++) {
            const int64_t hk = idx % Hkv, b = idx / Hkv;
            for (int64_t j = 0; j < S; j++) {
                memset(dk + ((b * S + j) * Hkv + hk) * D, 0, D * sizeof(float));
                memset(dv + ((b * S + j) * Hkv + hk) * D, 0, D * sizeof(float));
            }
            for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
                for (int64_t qb = 0; qb < blocks; qb++) {
                    const QueryBlock blk = query_block(qb, T, S, q_offset, window);
                    const int64_t row0 = (b * T + blk.t0) * Hq + h, kv0 = (b * S + blk.kmin) * Hkv + hk;
                    p.resize(blk.rows * blk.L);
                    ds.resize(blk.rows * blk.L);
                    qlora_cpu_sgemm(0, 1, blk.rows, blk.L, D, scale, q + row0 * D, q_stride, k + kv0 * D, kv_stride,
                                    0.0f, p.data(), blk.L);
                    qlora_cpu_sgemm(0, 1, blk.rows, blk.L, D, 1.0f, dout + row0 * D, q_stride, v + kv0 * D, kv_stride,
                                    0.0f, ds.data(), blk.L);
                    for (int64_t r = 0; r < blk.rows; r++) {
                        float* pr = p.data() + r * blk.L;
                        float* dsr = ds.data() + r * blk.L;
                        const int64_t t = blk.t0 + r;
                        const float l = lse[(b * Hq + h) * T + t];
                        mask_row(pr, blk, key_valid, seg, b, S, q_offset + t, window);
                        if (l == -INFINITY) {  // the forward saw no key: no gradient
                            memset(pr, 0, blk.L * sizeof(float));
                            memset(dsr, 0, blk.L * sizeof(float));
                            continue;
                        }
                        for (int64_t i = 0; i < blk.L; i++) pr[i] -= l;  // masked keys stay -inf: P 0
                        qlora::expf_inplace(pr, blk.L);
                        // rowsum(dO * O) as sum_j P_j dP_j (equal, as O = sum_j P_j V_j): from the dP the row uses,
                        // so that dS is exactly 0 where one key takes all the weight
                        float di = 0.0f;
                        for (int64_t i = 0; i < blk.L; i++) di += pr[i] * dsr[i];
                        for (int64_t i = 0; i < blk.L; i++) dsr[i] = pr[i] * (dsr[i] - di) * scale;
                    }
                    qlora_cpu_sgemm(1, 0, blk.L, D, blk.rows, 1.0f, p.data(), blk.L, dout + row0 * D, q_stride, 1.0f,
                                    dv + kv0 * D, kv_stride);
                    qlora_cpu_sgemm(1, 0, blk.L, D, blk.rows, 1.0f, ds.data(), blk.L, q + row0 * D, q_stride, 1.0f,
                                    dk + kv0 * D, kv_stride);
                    qlora_cpu_sgemm(0, 0, blk.rows, D, blk.L, 1.0f, ds.data(), blk.L, k + kv0 * D, kv_stride, 0.0f,
                                    dq + row0 * D, q_stride);
                }
            }
        }
    });
}
