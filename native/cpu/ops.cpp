// ops.cpp: the elementwise and row-wise CPU ops: dtype conversion, embedding, RMSNorm, RoPE, SwiGLU and
// softmax cross-entropy, forward and backward. fp32 compute; each loop is threaded with parallel_for and
// written so the compiler vectorizes it (omp simd on reductions).
#include <math.h>
#include <string.h>
#include <immintrin.h>
#include "../include/qlora_float.h"
#include "../include/qlora_dropout.h"
#include "../include/qlora_ops.h"
#include "parallel.h"

using qlora::parallel_for;

// ------------------------------------------------------------------
// dtype conversion

using qlora::bf16_to_f32;
using qlora::f32_to_bf16;

extern "C" void qlora_cpu_bf16_to_f32(float* out, const uint16_t* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) out[i] = bf16_to_f32(inp[i]);
    });
}

extern "C" void qlora_cpu_f32_to_bf16(uint16_t* out, const float* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) out[i] = f32_to_bf16(inp[i]);
    });
}

extern "C" void qlora_cpu_f16_to_f32(float* out, const uint16_t* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            __m128i h = _mm_loadu_si128((const __m128i*)(inp + i));
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
        }
        for (; i < e; i++) out[i] = _cvtsh_ss(inp[i]);
    });
}

extern "C" void qlora_cpu_f32_to_f16(uint16_t* out, const float* inp, int64_t n) {
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(inp + i), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i*)(out + i), h);
        }
        for (; i < e; i++) out[i] = _cvtss_sh(inp[i], _MM_FROUND_TO_NEAREST_INT);
    });
}

// ------------------------------------------------------------------
// elementwise

extern "C" void qlora_cpu_add_inplace(float* y, const float* x, int64_t n) {
    parallel_for(n, 1 << 15, [&](int64_t b, int64_t e) {
#pragma omp simd
        for (int64_t i = b; i < e; i++) y[i] += x[i];
    });
}

extern "C" void qlora_cpu_add_bias(float* out, const float* inp, const float* bias, int64_t N, int64_t C) {
    parallel_for(N, (1 << 15) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = inp + n * C;
            float* y = out + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) y[c] = x[c] + bias[c];
        }
    });
}

// ------------------------------------------------------------------
// embedding

extern "C" int64_t qlora_cpu_embedding_forward(float* out, const int32_t* ids, const float* table, int64_t N, int64_t V,
                                               int64_t C) {
    for (int64_t n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V) return -1 - n;
    parallel_for(N, (1 << 14) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) memcpy(out + n * C, table + (int64_t)ids[n] * C, C * sizeof(float));
    });
    return 0;
}

extern "C" void qlora_cpu_embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N,
                                             int64_t C) {
    // threads own column ranges, so rows that repeat an id never race
    parallel_for(C, 64, [&](int64_t cb, int64_t ce) {
        for (int64_t n = 0; n < N; n++) {
            float* d = dtable + (int64_t)ids[n] * C;
            const float* g = dout + n * C;
#pragma omp simd
            for (int64_t c = cb; c < ce; c++) d[c] += g[c];
        }
    });
}

// ------------------------------------------------------------------
// RMSNorm

extern "C" void qlora_cpu_rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N,
                                          int64_t C, float eps) {
    parallel_for(N, (1 << 14) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = inp + n * C;
            float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
            for (int64_t c = 0; c < C; c++) ss += x[c] * x[c];
            float r = 1.0f / sqrtf(ss / (float)C + eps);
            if (rstd) rstd[n] = r;
            float* y = out + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) y[c] = weight[c] * (x[c] * r);
        }
    });
}

extern "C" void qlora_cpu_rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                                           const float* weight, const float* rstd, int64_t N, int64_t C) {
    // y = w * x * r, r = (mean(x^2) + eps)^-1/2
    // dx = r * w * g - x * r^3 / C * sum_j(w_j g_j x_j);  dw += g * x * r
    parallel_for(N, (1 << 14) / (C + 1) + 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = inp + n * C;
            const float* g = dout + n * C;
            float r = rstd[n];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < C; c++) dot += weight[c] * g[c] * x[c];
            float k = dot * r * r * r / (float)C;
            float* dx = dinp + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) dx[c] = r * weight[c] * g[c] - x[c] * k;
        }
    });
    if (dweight) {
        // column-parallel so threads never write the same dweight element
        parallel_for(C, 64, [&](int64_t cb, int64_t ce) {
            for (int64_t n = 0; n < N; n++) {
                const float* x = inp + n * C;
                const float* g = dout + n * C;
                float r = rstd[n];
#pragma omp simd
                for (int64_t c = cb; c < ce; c++) dweight[c] += g[c] * x[c] * r;
            }
        });
    }
}

// ------------------------------------------------------------------
// RoPE (rotate_half)

static void rope_apply(float* out, const float* inp, const int32_t* pos, const float* inv_freq, float scaling,
                       int64_t N, int64_t H, int64_t D, float sign) {
    int64_t half = D / 2;
    parallel_for(N, 8, [&](int64_t b, int64_t e) {
        float cs[512], sn[512];  // D <= 1024
        for (int64_t n = b; n < e; n++) {
            float p = (float)pos[n];
            for (int64_t i = 0; i < half; i++) {
                // f32 angle as transformers computes it (inv_freq @ position_ids in float32)
                float angle = p * inv_freq[i];
                cs[i] = cosf(angle) * scaling;
                sn[i] = sign * sinf(angle) * scaling;
            }
            for (int64_t h = 0; h < H; h++) {
                const float* x = inp + (n * H + h) * D;
                float* y = out + (n * H + h) * D;
                for (int64_t i = 0; i < half; i++) {
                    float x0 = x[i], x1 = x[i + half];
                    y[i] = x0 * cs[i] - x1 * sn[i];
                    y[i + half] = x1 * cs[i] + x0 * sn[i];
                }
            }
        }
    });
}

extern "C" void qlora_cpu_rope_forward(float* out, const float* inp, const int32_t* pos, const float* inv_freq,
                                       float attention_scaling, int64_t N, int64_t H, int64_t D) {
    rope_apply(out, inp, pos, inv_freq, attention_scaling, N, H, D, 1.0f);
}

extern "C" void qlora_cpu_rope_backward(float* dinp, const float* dout, const int32_t* pos, const float* inv_freq,
                                        float attention_scaling, int64_t N, int64_t H, int64_t D) {
    // the rotation is orthogonal (times a scale): its transpose is the rotation by -angle
    rope_apply(dinp, dout, pos, inv_freq, attention_scaling, N, H, D, -1.0f);
}

// ------------------------------------------------------------------
// dropout (the same masks as the CUDA kernels: native/include/qlora_dropout.h)

extern "C" void qlora_cpu_dropout_mask(float* mask, uint64_t seed, float p, int64_t n) {
    const float scale = 1.0f / (1.0f - p);
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) mask[i] = qlora_dropout_keep(seed, (uint64_t)i, p) ? scale : 0.0f;
    });
}

// ------------------------------------------------------------------
// SwiGLU

extern "C" void qlora_cpu_swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) {
            float g = gate[i];
            out[i] = g / (1.0f + expf(-g)) * up[i];
        }
    });
}

extern "C" void qlora_cpu_swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                                          const float* up, int64_t n) {
    parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) {
            float g = gate[i];
            float s = 1.0f / (1.0f + expf(-g));
            float d = dout[i];
            float u = up[i];
            dup[i] = d * g * s;
            dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
        }
    });
}

// ------------------------------------------------------------------
// softmax cross-entropy

extern "C" int64_t qlora_cpu_cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets,
                                                   int64_t N, int64_t V) {
    parallel_for(N, 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = logits + n * V;
            float m = -INFINITY;
            for (int64_t v = 0; v < V; v++) m = x[v] > m ? x[v] : m;
            double s = 0.0;
            for (int64_t v = 0; v < V; v++) s += expf(x[v] - m);
            float l = m + (float)log(s);
            if (lse) lse[n] = l;
            int32_t t = targets[n];
            loss[n] = (t >= 0 && t < V) ? l - x[t] : 0.0f;
        }
    });
    int64_t count = 0;
    for (int64_t n = 0; n < N; n++) count += (targets[n] >= 0 && targets[n] < V);
    return count;
}

extern "C" void qlora_cpu_cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                                 const int32_t* targets, float dloss_scale, int64_t N, int64_t V) {
    parallel_for(N, 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; n++) {
            const float* x = logits + n * V;
            float* d = dlogits + n * V;
            int32_t t = targets[n];
            if (t < 0 || t >= V) {
                memset(d, 0, V * sizeof(float));
                continue;
            }
            float l = lse[n];
            for (int64_t v = 0; v < V; v++) d[v] = expf(x[v] - l) * dloss_scale;
            d[t] -= dloss_scale;
        }
    });
}
