// attention.cu: flash-style attention (the FlashAttention-2 algorithm) with bf16 q/k/v/out in HBM and fp32
// accumulation on the tensor cores (mma.sync.m16n8k16 bf16, fragments loaded with ldmatrix, tiles staged through
// shared memory with cp.async). Semantics and layout: attention.h and the CPU op in native/cpu/attention.cpp.
//
// Forward: one block (4 warps) per 64-query tile of one (b, h); each warp owns 16 query rows and keeps its Q
// fragments, the running max / sum and its O accumulator in registers. Key/value tiles of 64 rows stream through a
// double-buffered cp.async pipeline; the scores of a tile live only in registers (online softmax in the exp2
// domain), so the T x S matrix is never materialized. Key tiles past the tile's last causal key are never visited;
// the mask (causal, key_valid, seg, partial tiles) is applied only on tiles that need it.
//
// Decode (T = 1 without lse, i.e. inference; flash-decoding): a 64-query tile would waste 63/64 of its work and
// the grid would have only B * Hq blocks, so instead one block takes all G query heads of a kv head (the rows of
// one mma tile: each K/V tile is read once per group) over one chunk of the row's keys. The chunks of a row
// (whole 64-key tiles, as many as fill the GPU) write f32 partials (max, sum, unnormalized O) to a workspace and a
// second kernel combines them in a fixed order (deterministic; no host sync, so a captured step replays).
//
// Backward: a pre-kernel computes D_i = rowsum(dO * O) (f32). Then one block per 64-key tile of one (b, kv head)
// and a group of its query heads; each warp owns 16 keys and keeps their dK, dV accumulators in registers while
// the block walks the query tiles of each head in the group (starting at the first tile a causal query can see
// the keys from): S^T = K Q^T, P^T = exp2(S^T * scale * log2e - lse * log2e) (recomputed), dV += P^T dO,
// dP^T = V dO^T, dS^T = P^T (dP^T - D_i), dK += dS^T Q, and dQ += scale * dS K through f32 atomics (dS passes
// through shared memory). Grouped-query heads: the G query heads of a kv head share its dK/dV. A block loops over
// `heads_per_block` of them (reusing its K/V tile and registers), and the groups' partial dK/dV are added into an
// f32 accumulator with atomics (one add per element per block, at the end), so that the grid can be split over
// the heads when the kv tiles alone would leave the GPU idle. A last kernel casts the f32 dq/dk/dv to bf16.
#include "attention.h"

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "runtime.h"

namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;                  // 4 warps per block in both kernels
constexpr int kKvBlock = QLORA_CUDA_KV_BLOCK;  // positions per block of a paged KV cache: one forward key tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
    const bf16* q;
    const bf16* k;
    const bf16* v;
    const bf16* out;   // backward: the forward's output (for D_i)
    const bf16* dout;  // backward
    bf16* o;           // forward: output
    float* lse_out;    // forward: lse (may be null)
    const float* lse;  // backward
    const float* di;   // backward: rowsum(dO * O), [B,Hq,T]
    float* di_out;
    float* dq_acc;  // [B,T,Hq,D] f32
    float* dk_acc;  // [B,S,Hkv,D] f32
    float* dv_acc;
    const uint8_t* key_valid;
    const int32_t* seg;
    const int32_t* q_offsets;  // forward: per-row query offsets [B] (device), replacing q_offset when not null
    // forward: a paged KV cache: key tile i of row b (keys 64 i .. 64 i + 63) is block block_table[b * table_stride
    // + i] of k/v, which are [blocks, 64, Hkv, D]; S is the rows' logical length (<= 64 * table_stride)
    const int32_t* block_table;
    int table_stride;
    // decode: each chunk's unnormalized O [B,Hq,n_splits,D] and (running max in the log2 domain, sum)
    // [B,Hq,n_splits]; n_splits: the most chunks a row is split into
    float* part_o;
    float2* part_ml;
    int n_splits;
    // a sliding window: key j is visible to the query at key position i only when j > i - window (0: none)
    int window;
    int B, T, S, Hq, Hkv, G, D, q_offset, heads_per_block;
    float scale, scale_log2;
};

// ------------------------------------------------------------------
// PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-fills the destination when !pred
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] * b[16x8], bf16 inputs, f32 accumulators
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two floats -> bf16x2 (lo in the low half, as the fragments want)
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// the A operand of the next mma from two accumulator tiles (columns 16kk .. 16kk + 15)
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}

// Shared-memory tiles are row-major with rows padded by 8 bf16 (16 bytes), so the 8 row addresses of an ldmatrix
// fall in 8 different 16-byte bank groups. Lane offsets of the ldmatrix.x4 addresses (in a tile of stride ld):
//   A [m][k], 16x16 at (m0, k0):          row m0 + (lane & 15),                         col k0 + (lane >> 4) * 8
//   A stored transposed [k][m] (.trans):  row k0 + (lane & 7) + (lane >> 4) * 8,        col m0 + ((lane >> 3) & 1) * 8
//   B pair stored [n][k] (two n8 tiles):  row n0 + (lane & 7) + (lane >> 4) * 8,        col k0 + ((lane >> 3) & 1) * 8
//   B pair stored [k][n] (.trans):        row k0 + (lane & 7) + ((lane >> 3) & 1) * 8,  col n0 + (lane >> 4) * 8
// For the B pairs, r[0], r[1] are the fragment of the n8 tile n0 and r[2], r[3] that of n0 + 8.
__device__ __forceinline__ const bf16* a_addr(const bf16* s, int ld, int m0, int k0, int lane) {
    return s + (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8;
}
__device__ __forceinline__ const bf16* at_addr(const bf16* s, int ld, int m0, int k0, int lane) {
    return s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
}
__device__ __forceinline__ const bf16* bnk_addr(const bf16* s, int ld, int n0, int k0, int lane) {
    return s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
__device__ __forceinline__ const bf16* bkn_addr(const bf16* s, int ld, int n0, int k0, int lane) {
    return s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

// ROWS rows of D bf16 from global (row r at g + (row0 + r) * row_stride) into a padded shared tile; rows at or
// past `limit`, and before `lo`, are zero-filled (never read: a masked key's V row must be finite, as 0 * NaN in
// P V is NaN)
template <int ROWS, int D>
__device__ __forceinline__ void load_rows(bf16* s, const bf16* g, int64_t row_stride, int row0, int limit, int tid,
                                          int lo = 0) {
    constexpr int kChunks = D / 8, kLd = D + 8, kN = ROWS * kChunks;
    // a tile that is not a whole number of the block's copies (decode's 16 query rows of D = 96) has a last,
    // partial round; for the others the guard compiles away
#pragma unroll
    for (int i = 0; i < (kN + kThreads - 1) / kThreads; i++) {
        int c = tid + i * kThreads;
        if (kN % kThreads != 0 && c >= kN) break;
        int r = c / kChunks, cc = c % kChunks;
        bool ok = row0 + r < limit && row0 + r >= lo;
        const bf16* src = ok ? g + (int64_t)(row0 + r) * row_stride + cc * 8 : g;
        cp_async16(s + r * kLd + cc * 8, src, ok);
    }
}

// ------------------------------------------------------------------
// forward

template <int D>
struct FwdTraits {
    static constexpr int BM = 64;        // queries per block (16 per warp)
    static constexpr int BN = kKvBlock;  // keys per tile: one block of a paged KV cache
    static constexpr int LD = D + 8;
    static constexpr size_t smem_bytes = (size_t)(BM + 4 * BN) * LD * sizeof(bf16) + 2 * BN * sizeof(int);
};

template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const Params p) {
    using Tr = FwdTraits<D>;
    constexpr int BM = Tr::BM, BN = Tr::BN, LD = Tr::LD;
    static_assert(D % 16 == 0 && BN <= kThreads, "bad tile shape");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);            // [BM][LD], reused to stage O
    bf16* sK = sQ + BM * LD;                                 // [2][BN][LD]
    bf16* sV = sK + 2 * BN * LD;                             // [2][BN][LD]
    int* sValid = reinterpret_cast<int*>(sV + 2 * BN * LD);  // [BN]: key j < S and key_valid
    int* sSeg = sValid + BN;                                 // [BN]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest (causal) query tiles start first
    const int b = blockIdx.y / p.Hq, h = blockIdx.y % p.Hq, hk = h / p.G;
    const int T = p.T, S = p.S, m0 = m_block * BM;
    const int64_t q_stride = (int64_t)p.Hq * D, kv_stride = (int64_t)p.Hkv * D;
    const bf16* qg = p.q + ((int64_t)b * T * p.Hq + h) * D;
    const uint8_t* kvalid = p.key_valid ? p.key_valid + (int64_t)b * S : nullptr;
    const int32_t* segb = p.seg ? p.seg + (int64_t)b * S : nullptr;
    const int q_offset = p.q_offsets ? max(0, min(p.q_offsets[b], S)) : p.q_offset;
    // key row n0 (a multiple of BN) of this (b, kv head): contiguous rows, or the block the table names
    const int32_t* btab = p.block_table ? p.block_table + (int64_t)b * p.table_stride : nullptr;
    auto kv_rows = [&](const bf16* base, int n0) -> const bf16* {
        if (!btab) return base + (((int64_t)b * S + n0) * p.Hkv + hk) * D;
        return base + ((int64_t)max(btab[n0 / BN], 0) * BN * p.Hkv + hk) * D;
    };

    // keys [kbeg, kend) can be visible to some query of this tile: later tiles are skipped (causality), and so are
    // earlier ones wholly behind the window of the tile's first query (a KV cache may have freed their blocks)
    const int kend = min(S, q_offset + min(m0 + BM, T));
    const int kbeg = p.window > 0 ? max(0, q_offset + m0 - p.window + 1) : 0;
    const int tile0 = kbeg / BN;
    const int n_tiles = kend > tile0 * BN ? (kend + BN - 1) / BN - tile0 : 0;

    // this thread's two query rows: accumulator rows lane/4 and lane/4 + 8 of the warp's 16
    int qpos[2], qseg[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = m0 + warp * 16 + (lane >> 2) + 8 * r;
        qpos[r] = q_offset + t;
        qseg[r] = (segb && t < T) ? segb[qpos[r]] : 0;
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
    uint32_t qf[D / 16][4];

    // the key mask of the tile's key tid, fetched one tile ahead
    int nxt_valid = 0, nxt_seg = 0;
    auto fetch_mask = [&](int n0) {
        if (tid < BN) {
            int j = n0 + tid;
            nxt_valid = j < S && (!kvalid || kvalid[j]);
            nxt_seg = (segb && j < S) ? segb[j] : 0;
        }
    };

    if (n_tiles > 0) {
        load_rows<BM, D>(sQ, qg, q_stride, m0, T, tid);
        // keys outside [kbeg, kend) are hidden from every query of the tile: zero-filled, not read
        load_rows<BN, D>(sK, kv_rows(p.k, tile0 * BN), kv_stride, 0, kend - tile0 * BN, tid, kbeg - tile0 * BN);
        load_rows<BN, D>(sV, kv_rows(p.v, tile0 * BN), kv_stride, 0, kend - tile0 * BN, tid, kbeg - tile0 * BN);
        cp_async_commit();
        fetch_mask(tile0 * BN);
    }

    for (int it = 0; it < n_tiles; it++) {
        const int n0 = (tile0 + it) * BN, buf = it & 1;
        if (tid < BN) {
            sValid[tid] = nxt_valid;
            sSeg[tid] = nxt_seg;
        }
        if (it + 1 < n_tiles) {
            load_rows<BN, D>(sK + (buf ^ 1) * BN * LD, kv_rows(p.k, n0 + BN), kv_stride, 0, kend - n0 - BN, tid);
            load_rows<BN, D>(sV + (buf ^ 1) * BN * LD, kv_rows(p.v, n0 + BN), kv_stride, 0, kend - n0 - BN, tid);
            cp_async_commit();
            fetch_mask(n0 + BN);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) ldsm_x4(qf[kk], a_addr(sQ, LD, warp * 16, kk * 16, lane));
        }
        const bf16* ks = sK + buf * BN * LD;
        const bf16* vs = sV + buf * BN * LD;

        // S = Q K^T (16 x BN per warp)
        float s[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                uint32_t bfr[4];
                ldsm_x4(bfr, bnk_addr(ks, LD, np * 16, kk * 16, lane));
                mma16816(s[2 * np], qf[kk], bfr[0], bfr[1]);
                mma16816(s[2 * np + 1], qf[kk], bfr[2], bfr[3]);
            }
        }

        // scale into the log2 domain, mask, online softmax
        // the window hides key n0 from the tile's last query when n0 <= its position - window
        const bool need_mask = n0 + BN > S || n0 + BN - 1 > q_offset + m0 || kvalid != nullptr || segb != nullptr ||
                               (p.window > 0 && n0 <= q_offset + m0 + BM - 1 - p.window);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1;
                float x = s[nt][e] * p.scale_log2;
                if (need_mask) {
                    const int jl = nt * 8 + (lane & 3) * 2 + (e & 1), j = n0 + jl;
                    const bool vis = sValid[jl] && j <= qpos[r] && (!segb || sSeg[jl] == qseg[r]) &&
                                     (p.window <= 0 || j > qpos[r] - p.window);
                    x = vis ? x : -INFINITY;
                }
                s[nt][e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
        }
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m_i[r], mx[r]);
            base[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays at zero
            const float alpha = exp2f(m_i[r] - base[r]);
            m_i[r] = m_new;
            l_i[r] *= alpha;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float pe = exp2f(s[nt][e] - base[e >> 1]);
                s[nt][e] = pe;
                l_i[e >> 1] += pe;
            }
        }

        // O += P V
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t bfr[4];
                ldsm_x4_t(bfr, bkn_addr(vs, LD, dp * 16, kk * 16, lane));
                mma16816(o[2 * dp], a, bfr[0], bfr[1]);
                mma16816(o[2 * dp + 1], a, bfr[2], bfr[3]);
            }
        }
        __syncthreads();  // the next iteration refills this buffer and the mask
    }

    // epilogue: O / l through shared memory (the warp's own rows of sQ) to 16-byte stores; lse
    float inv[2], lse_r[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const bool any = l > 0.0f;
        inv[r] = any ? 1.0f / l : 0.0f;
        lse_r[r] = any ? (m_i[r] + log2f(l)) * kLn2 : -INFINITY;
    }
    bf16* so = sQ + warp * 16 * LD;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            *reinterpret_cast<uint32_t*>(so + ((lane >> 2) + 8 * r) * LD + dt * 8 + (lane & 3) * 2) =
                pack_bf16(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
        }
    }
    __syncwarp();
    bf16* og = p.o + ((int64_t)b * T * p.Hq + h) * D;
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int i = 0; i < 16 * kChunks / 32; i++) {
        const int c = lane + i * 32, r = c / kChunks, cc = c % kChunks;
        const int t = m0 + warp * 16 + r;
        if (t < T)
            *reinterpret_cast<uint4*>(og + t * q_stride + cc * 8) =
                *reinterpret_cast<const uint4*>(so + r * LD + cc * 8);
    }
    if (p.lse_out && (lane & 3) == 0) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int t = m0 + warp * 16 + (lane >> 2) + 8 * r;
            if (t < T) p.lse_out[((int64_t)b * p.Hq + h) * T + t] = lse_r[r];
        }
    }
}

// ------------------------------------------------------------------
// decode (flash-decoding): T = 1, no lse

// how row b's keys are split: keys [kbeg, kend) are visible by position (causality and the window); their tiles
// of BN, from tile `first`, are cut into chunks of `per` tiles, `used` of them non-empty. Both decode kernels derive
// it from the row's offset on the device, so a captured step replays at any lengths with the grid (p.n_splits
// chunks at most) fixed at capture.
struct DecodeRow {
    int kbeg, kend, first, per, used;
};

__device__ __forceinline__ DecodeRow decode_row(const Params& p, int b) {
    const int q_offset = p.q_offsets ? max(0, min(p.q_offsets[b], p.S)) : p.q_offset;
    DecodeRow r;
    r.kend = min(p.S, q_offset + 1);
    r.kbeg = p.window > 0 ? max(0, q_offset - p.window + 1) : 0;
    r.first = r.kbeg / kKvBlock;
    const int tiles = max(0, (r.kend + kKvBlock - 1) / kKvBlock - r.first);
    r.per = max(1, (tiles + p.n_splits - 1) / p.n_splits);
    r.used = (tiles + r.per - 1) / r.per;
    return r;
}

template <int D>
struct DecTraits {
    static constexpr int BN = kKvBlock;  // keys per tile (one block of a paged KV cache), 16 per warp
    static constexpr int HM = 16;        // query heads per block: the 16 rows of the mma tile (G may be fewer)
    static constexpr int LD = D + 8;
    static constexpr int LDO = D + 8;  // row stride (floats) of the warps' partial O in the merge
    static constexpr size_t smem_bytes = (size_t)(HM + 4 * BN) * LD * sizeof(bf16) + BN * sizeof(int);
    // the merge reuses the K/V tiles for each warp's O, max and sum
    static constexpr size_t merge_bytes = (size_t)4 * HM * (LDO + 2) * sizeof(float);
    static_assert(merge_bytes <= (size_t)4 * BN * LD * sizeof(bf16), "the merge must fit in the K/V tiles");
};

// One block per (chunk, row b, kv head, group of up to 16 of its query heads): the heads are the rows of one mma
// tile, so each K/V tile is read once for the group. Each warp takes 16 keys of every 64-key tile and keeps its own
// online softmax over them (the forward kernel's, on a 16 x 16 score tile); the 4 warps' partials are merged
// through shared memory in a fixed order. A row with one chunk writes its bf16 out here; otherwise the
// chunk's running max (log2 domain), sum and unnormalized O go to the f32 workspace for the combine kernel.
template <int D>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const Params p) {
    using Tr = DecTraits<D>;
    constexpr int BN = Tr::BN, HM = Tr::HM, LD = Tr::LD, LDO = Tr::LDO;
    static_assert(D % 16 == 0 && BN == 16 * (kThreads / 32), "each warp takes 16 keys of a tile");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);            // [HM][LD]
    bf16* sK = sQ + HM * LD;                                 // [2][BN][LD]
    bf16* sV = sK + 2 * BN * LD;                             // [2][BN][LD]
    int* sValid = reinterpret_cast<int*>(sV + 2 * BN * LD);  // [BN]: key visible (position, key_valid)
    float* sO = reinterpret_cast<float*>(sK);                // merge: [4][HM][LDO]
    float* sM = sO + 4 * HM * LDO;                           // merge: [4][HM]
    float* sL = sM + 4 * HM;                                 // merge: [4][HM]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int split = blockIdx.x;
    const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
    const int h0 = hk * p.G + blockIdx.z * HM, nh = min(HM, p.G - (int)blockIdx.z * HM);
    const DecodeRow row = decode_row(p, b);
    if (split >= max(row.used, 1)) return;  // past the row's keys (split 0 still writes a row with no key)
    const bool direct = row.used <= 1;
    const int kend = row.kend, kbeg = row.kbeg;
    const int tile0 = row.first + split * row.per;
    const int n_tiles = max(0, min(tile0 + row.per, (kend + BN - 1) / BN) - tile0);

    const int64_t kv_stride = (int64_t)p.Hkv * D;
    const uint8_t* kvalid = p.key_valid ? p.key_valid + (int64_t)b * p.S : nullptr;
    const int32_t* btab = p.block_table ? p.block_table + (int64_t)b * p.table_stride : nullptr;
    auto kv_rows = [&](const bf16* base, int n0) -> const bf16* {
        if (!btab) return base + (((int64_t)b * p.S + n0) * p.Hkv + hk) * D;
        return base + ((int64_t)max(btab[n0 / BN], 0) * BN * p.Hkv + hk) * D;
    };
    // rows at or past kend are zero-filled, never read: a paged row's later blocks need not exist; so are those
    // before kbeg in the window's first tile (a cache may hold anything there, NaN included)
    auto load_kv = [&](int n0, int buf) {
        load_rows<BN, D>(sK + buf * BN * LD, kv_rows(p.k, n0), kv_stride, 0, kend - n0, tid, kbeg - n0);
        load_rows<BN, D>(sV + buf * BN * LD, kv_rows(p.v, n0), kv_stride, 0, kend - n0, tid, kbeg - n0);
    };
    int nxt_valid = 0;
    auto fetch_mask = [&](int n0) {
        if (tid < BN) {
            const int j = n0 + tid;
            nxt_valid = j < kend && j >= kbeg && (!kvalid || kvalid[j]);
        }
    };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
    uint32_t qf[D / 16][4];

    if (n_tiles > 0) {
        // q[b, 0, h0 .. h0 + nh) is nh contiguous rows of D; the tile's other rows are zeros
        load_rows<HM, D>(sQ, p.q + ((int64_t)b * p.Hq + h0) * D, D, 0, nh, tid);
        load_kv(tile0 * BN, 0);
        cp_async_commit();
        fetch_mask(tile0 * BN);
    }

    for (int it = 0; it < n_tiles; it++) {
        const int n0 = (tile0 + it) * BN, buf = it & 1;
        if (tid < BN) sValid[tid] = nxt_valid;
        if (it + 1 < n_tiles) {
            load_kv(n0 + BN, buf ^ 1);
            cp_async_commit();
            fetch_mask(n0 + BN);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) ldsm_x4(qf[kk], a_addr(sQ, LD, 0, kk * 16, lane));
        }
        const bf16* ks = sK + buf * BN * LD;
        const bf16* vs = sV + buf * BN * LD;

        // S = Q K^T: the group's heads x this warp's 16 keys
        float s[2][4];
#pragma unroll
        for (int i = 0; i < 2; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t bfr[4];
            ldsm_x4(bfr, bnk_addr(ks, LD, warp * 16, kk * 16, lane));
            mma16816(s[0], qf[kk], bfr[0], bfr[1]);
            mma16816(s[1], qf[kk], bfr[2], bfr[3]);
        }

        // scale into the log2 domain, mask, online softmax (as in the forward kernel)
        const bool need_mask = n0 + BN > kend || n0 < kbeg || kvalid != nullptr;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[nt][e] * p.scale_log2;
                if (need_mask && !sValid[warp * 16 + nt * 8 + (lane & 3) * 2 + (e & 1)]) x = -INFINITY;
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m_i[r], mx[r]);
            base[r] = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: stays at zero
            const float alpha = exp2f(m_i[r] - base[r]);
            m_i[r] = m_new;
            l_i[r] *= alpha;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float pe = exp2f(s[nt][e] - base[e >> 1]);
                s[nt][e] = pe;
                l_i[e >> 1] += pe;
            }
        }

        // O += P V over this warp's 16 keys
        uint32_t a[4];
        acc_to_a(a, s[0], s[1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; dp++) {
            uint32_t bfr[4];
            ldsm_x4_t(bfr, bkn_addr(vs, LD, dp * 16, warp * 16, lane));
            mma16816(o[2 * dp], a, bfr[0], bfr[1]);
            mma16816(o[2 * dp + 1], a, bfr[2], bfr[3]);
        }
        __syncthreads();  // the next iteration refills this buffer and the mask; the merge reuses the tiles
    }

    // merge the 4 warps (fixed order): each warp's rows to shared memory, then one thread per (head, d)
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int hr = (lane >> 2) + 8 * r;
        if ((lane & 3) == 0) {
            sM[warp * HM + hr] = m_i[r];
            sL[warp * HM + hr] = l;
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<float2*>(sO + (warp * HM + hr) * LDO + dt * 8 + (lane & 3) * 2) =
                make_float2(o[dt][2 * r], o[dt][2 * r + 1]);
    }
    __syncthreads();
    for (int i = tid; i < nh * D; i += kThreads) {
        const int hr = i / D, d = i % D;
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < 4; w++) m = fmaxf(m, sM[w * HM + hr]);
        float l = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            const float mw = sM[w * HM + hr];
            const float f = mw == -INFINITY ? 0.0f : exp2f(mw - m);
            l += sL[w * HM + hr] * f;
            acc += sO[(w * HM + hr) * LDO + d] * f;
        }
        const int64_t bh = (int64_t)b * p.Hq + h0 + hr;
        if (direct) {
            p.o[bh * D + d] = __float2bfloat16(l > 0.0f ? acc * (1.0f / l) : 0.0f);
        } else {
            const int64_t part = bh * p.n_splits + split;
            p.part_o[part * D + d] = acc;
            if (d == 0) p.part_ml[part] = make_float2(m, l);
        }
    }
}

// out[b, h] from the chunks of rows with more than one: one block per (b, h); warp w sums chunks w, w + 8, ...
// (lane: d = lane + 32 i), then the 8 warps' sums are added in order, so the result does not depend on timing
constexpr int kCombineWarps = 8;

template <int D>
__global__ void __launch_bounds__(kCombineWarps * 32) attn_decode_combine_kernel(const Params p) {
    constexpr int V = D / 32;
    __shared__ float sAcc[kCombineWarps][D];
    __shared__ float sL[kCombineWarps];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t bh = blockIdx.x;
    const DecodeRow row = decode_row(p, (int)(bh / p.Hq));
    if (row.used <= 1) return;  // the decode kernel wrote it
    const float2* ml = p.part_ml + bh * p.n_splits;
    const float* po = p.part_o + bh * p.n_splits * D;

    float m = -INFINITY;
    for (int c = lane; c < row.used; c += 32) m = fmaxf(m, ml[c].x);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));

    float l = 0.0f, acc[V];
#pragma unroll
    for (int i = 0; i < V; i++) acc[i] = 0.0f;
#pragma unroll 4
    for (int c = warp; c < row.used; c += kCombineWarps) {
        const float2 x = ml[c];
        const float f = x.x == -INFINITY ? 0.0f : exp2f(x.x - m);
        l += x.y * f;
#pragma unroll
        for (int i = 0; i < V; i++) acc[i] += po[(int64_t)c * D + lane + 32 * i] * f;
    }
#pragma unroll
    for (int i = 0; i < V; i++) sAcc[warp][lane + 32 * i] = acc[i];
    if (lane == 0) sL[warp] = l;
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float lt = 0.0f, at = 0.0f;
#pragma unroll
        for (int w = 0; w < kCombineWarps; w++) {
            lt += sL[w];
            at += sAcc[w][d];
        }
        p.o[bh * D + d] = __float2bfloat16(lt > 0.0f ? at * (1.0f / lt) : 0.0f);
    }
}

// ------------------------------------------------------------------
// backward

// di[b,h,t] = sum_d dout[b,t,h,d] * out[b,t,h,d]: one warp per query row
__global__ void attn_bwd_dot_kernel(const Params p) {
    const int64_t rows = (int64_t)p.B * p.T * p.Hq;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const __nv_bfloat162* g = reinterpret_cast<const __nv_bfloat162*>(p.dout + row * p.D);
    const __nv_bfloat162* o = reinterpret_cast<const __nv_bfloat162*>(p.out + row * p.D);
    float acc = 0.0f;
    for (int d = lane; d < p.D / 2; d += 32) {
        const float2 a = __bfloat1622float2(g[d]), c = __bfloat1622float2(o[d]);
        acc += a.x * c.x + a.y * c.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        const int h = (int)(row % p.Hq);
        const int64_t bt = row / p.Hq;
        const int t = (int)(bt % p.T);
        const int64_t b = bt / p.T;
        p.di_out[(b * p.Hq + h) * p.T + t] = acc;
    }
}

__global__ void f32_to_bf16_kernel(bf16* __restrict__ dst, const float* __restrict__ src, int64_t n4) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        const float4 x = reinterpret_cast<const float4*>(src)[i];
        uint2 y;
        y.x = pack_bf16(x.x, x.y);
        y.y = pack_bf16(x.z, x.w);
        reinterpret_cast<uint2*>(dst)[i] = y;
    }
}

template <int D>
struct BwdTraits {
    static constexpr int BN = 64;                 // keys per block (16 per warp)
    static constexpr int BM = D <= 64 ? 64 : 32;  // queries per step (registers: dK, dV of 16 x D per warp)
    static constexpr int LD = D + 8;
    static constexpr int LDS = BM + 8;  // dS^T tile [BN][BM]
    static constexpr size_t smem_bytes =
        (size_t)(2 * BN + 4 * BM) * LD * sizeof(bf16) + (size_t)BN * LDS * sizeof(bf16) + 3 * BM * sizeof(float);
};

template <int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const Params p) {
    using Tr = BwdTraits<D>;
    constexpr int BM = Tr::BM, BN = Tr::BN, LD = Tr::LD, LDS = Tr::LDS;
    static_assert(D % 16 == 0 && BM % 16 == 0 && BM <= kThreads && (kThreads / 32) % (BM / 16) == 0, "bad tiles");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sK = reinterpret_cast<bf16*>(smem_raw);            // [BN][LD]
    bf16* sV = sK + BN * LD;                                 // [BN][LD]
    bf16* sQ = sV + BN * LD;                                 // [2][BM][LD]
    bf16* sdO = sQ + 2 * BM * LD;                            // [2][BM][LD]
    bf16* sdS = sdO + 2 * BM * LD;                           // [BN][LDS]: dS^T
    float* sLse = reinterpret_cast<float*>(sdS + BN * LDS);  // [BM]: lse * log2e (+inf: no probability)
    float* sDi = sLse + BM;                                  // [BM]
    int* sQseg = reinterpret_cast<int*>(sDi + BM);           // [BM]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int n0 = blockIdx.x * BN;
    const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
    const int h_first = hk * p.G + blockIdx.z * p.heads_per_block;
    const int T = p.T, S = p.S, q_offset = p.q_offset;

    // the first query that can see key n0 is t = n0 - q_offset; with a window, the last that can see the tile's last
    // key j is t = j + window - 1 - q_offset (later query tiles are skipped)
    const int t_first = max(0, n0 - q_offset);
    if (t_first >= T) return;  // no query sees these keys: their dK, dV stay zero
    const int m_tiles = (T + BM - 1) / BM;
    const int t_last = p.window > 0 ? min(n0 + BN, S) - 1 + p.window - 1 - q_offset : T - 1;
    if (t_last < 0) return;  // every query is past the window of these keys
    const int m_begin = t_first / BM, nm = min(m_tiles, t_last / BM + 1) - m_begin;
    if (nm <= 0) return;
    const int total = p.heads_per_block * nm;

    const int64_t q_stride = (int64_t)p.Hq * D, kv_stride = (int64_t)p.Hkv * D;
    const bf16* kg = p.k + ((int64_t)b * S * p.Hkv + hk) * D;
    const bf16* vg = p.v + ((int64_t)b * S * p.Hkv + hk) * D;
    const uint8_t* kvalid = p.key_valid ? p.key_valid + (int64_t)b * S : nullptr;
    const int32_t* segb = p.seg ? p.seg + (int64_t)b * S : nullptr;

    // this thread's two keys: accumulator rows lane/4 and lane/4 + 8 of the warp's 16
    int kpos[2], kseg[2];
    bool kvis[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = n0 + warp * 16 + (lane >> 2) + 8 * r;
        kpos[r] = j;
        kvis[r] = j < S && (!kvalid || kvalid[j]);
        kseg[r] = (segb && j < S) ? segb[j] : 0;
    }

    // step `it` = (head h_first + it / nm, query tile m_begin + it % nm)
    auto step_head = [&](int it) { return h_first + it / nm; };
    auto step_m0 = [&](int it) { return (m_begin + it % nm) * BM; };
    auto load_q_do = [&](int it, int buf) {
        const int h = step_head(it), m0 = step_m0(it);
        const int64_t off = ((int64_t)b * T * p.Hq + h) * D;
        load_rows<BM, D>(sQ + buf * BM * LD, p.q + off, q_stride, m0, T, tid);
        load_rows<BM, D>(sdO + buf * BM * LD, p.dout + off, q_stride, m0, T, tid);
    };
    // per-query values of a step, fetched one step ahead into registers
    float nxt_lse = INFINITY, nxt_di = 0.0f;
    int nxt_seg = 0;
    auto fetch_rows = [&](int it) {
        if (tid < BM) {
            const int h = step_head(it), t = step_m0(it) + tid;
            nxt_lse = INFINITY;
            nxt_di = 0.0f;
            nxt_seg = 0;
            if (t < T) {
                const int64_t i = ((int64_t)b * p.Hq + h) * T + t;
                const float l = p.lse[i];
                nxt_lse = l == -INFINITY ? INFINITY : l * kLog2e;
                nxt_di = p.di[i];
                nxt_seg = segb ? segb[q_offset + t] : 0;
            }
        }
    };

    load_rows<BN, D>(sK, kg, kv_stride, n0, S, tid);
    load_rows<BN, D>(sV, vg, kv_stride, n0, S, tid);
    load_q_do(0, 0);
    cp_async_commit();
    fetch_rows(0);

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;
    }

    for (int it = 0; it < total; it++) {
        const int buf = it & 1, h = step_head(it), m0 = step_m0(it);
        if (tid < BM) {
            sLse[tid] = nxt_lse;
            sDi[tid] = nxt_di;
            sQseg[tid] = nxt_seg;
        }
        if (it + 1 < total) {
            load_q_do(it + 1, buf ^ 1);
            cp_async_commit();
            fetch_rows(it + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* qs = sQ + buf * BM * LD;
        const bf16* dos = sdO + buf * BM * LD;

        // S^T = K Q^T (16 keys x BM queries per warp)
        float st[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; i++) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t ka[4];
            ldsm_x4(ka, a_addr(sK, LD, warp * 16, kk * 16, lane));
#pragma unroll
            for (int np = 0; np < BM / 16; np++) {
                uint32_t bfr[4];
                ldsm_x4(bfr, bnk_addr(qs, LD, np * 16, kk * 16, lane));
                mma16816(st[2 * np], ka, bfr[0], bfr[1]);
                mma16816(st[2 * np + 1], ka, bfr[2], bfr[3]);
            }
        }

        // P^T = exp2(S^T * scale * log2e - lse * log2e), masked
        // the window hides key n0 from the step's last query when its position >= n0 + window
        const bool need_mask = n0 + BN > S || n0 + BN - 1 > q_offset + m0 || kvalid != nullptr || segb != nullptr ||
                               (p.window > 0 && q_offset + m0 + BM - 1 >= n0 + p.window);
#pragma unroll
        for (int nt = 0; nt < BM / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int il = nt * 8 + (lane & 3) * 2 + (e & 1), r = e >> 1;
                float pr = exp2f(st[nt][e] * p.scale_log2 - sLse[il]);
                if (need_mask) {
                    const int qpos = q_offset + m0 + il;
                    const bool vis = kvis[r] && kpos[r] <= qpos && (!segb || kseg[r] == sQseg[il]) &&
                                     (p.window <= 0 || kpos[r] > qpos - p.window);
                    pr = vis ? pr : 0.0f;
                }
                st[nt][e] = pr;
            }
        }

        // dV += P^T dO
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            uint32_t a[4];
            acc_to_a(a, st[2 * kk], st[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t bfr[4];
                ldsm_x4_t(bfr, bkn_addr(dos, LD, dp * 16, kk * 16, lane));
                mma16816(dv[2 * dp], a, bfr[0], bfr[1]);
                mma16816(dv[2 * dp + 1], a, bfr[2], bfr[3]);
            }
        }

        // dP^T = V dO^T
        float dpt[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; i++) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t va[4];
            ldsm_x4(va, a_addr(sV, LD, warp * 16, kk * 16, lane));
#pragma unroll
            for (int np = 0; np < BM / 16; np++) {
                uint32_t bfr[4];
                ldsm_x4(bfr, bnk_addr(dos, LD, np * 16, kk * 16, lane));
                mma16816(dpt[2 * np], va, bfr[0], bfr[1]);
                mma16816(dpt[2 * np + 1], va, bfr[2], bfr[3]);
            }
        }

        // dS^T = P^T (dP^T - D_i)
#pragma unroll
        for (int nt = 0; nt < BM / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int il = nt * 8 + (lane & 3) * 2 + (e & 1);
                dpt[nt][e] = st[nt][e] * (dpt[nt][e] - sDi[il]);
            }
        }

        // dK += dS^T Q (scaled at the end)
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            uint32_t a[4];
            acc_to_a(a, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t bfr[4];
                ldsm_x4_t(bfr, bkn_addr(qs, LD, dp * 16, kk * 16, lane));
                mma16816(dk[2 * dp], a, bfr[0], bfr[1]);
                mma16816(dk[2 * dp + 1], a, bfr[2], bfr[3]);
            }
        }

        // dS^T (bf16) to shared memory for dQ
#pragma unroll
        for (int nt = 0; nt < BM / 8; nt++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + (lane >> 2) + 8 * r) * LDS + nt * 8 + (lane & 3) * 2) =
                    pack_bf16(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
            }
        }
        __syncthreads();

        // dQ += scale * dS K: warp (wm, wn) owns query rows 16 wm .. 16 wm + 15 and columns wn * NC .. + NC,
        // added to the f32 accumulator in chunks of up to 64 columns
        {
            constexpr int RG = BM / 16, WPR = (kThreads / 32) / RG, NC = D / WPR, CW = NC < 64 ? NC : 64;
            static_assert(NC % CW == 0 && CW % 16 == 0, "bad dQ split");
            const int wm = warp % RG, wn = warp / RG;
            float* dqg = p.dq_acc + ((int64_t)b * T * p.Hq + h) * D;
#pragma unroll
            for (int ch = 0; ch < NC / CW; ch++) {
                const int c0 = wn * NC + ch * CW;
                float dqa[CW / 8][4];
#pragma unroll
                for (int i = 0; i < CW / 8; i++) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < BN / 16; kk++) {
                    uint32_t a[4];
                    ldsm_x4_t(a, at_addr(sdS, LDS, wm * 16, kk * 16, lane));
#pragma unroll
                    for (int np = 0; np < CW / 16; np++) {
                        uint32_t bfr[4];
                        ldsm_x4_t(bfr, bkn_addr(sK, LD, c0 + np * 16, kk * 16, lane));
                        mma16816(dqa[2 * np], a, bfr[0], bfr[1]);
                        mma16816(dqa[2 * np + 1], a, bfr[2], bfr[3]);
                    }
                }
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const int t = m0 + wm * 16 + (lane >> 2) + 8 * r;
                    if (t < T) {
                        float* dst = dqg + t * q_stride + c0 + (lane & 3) * 2;
#pragma unroll
                        for (int nt = 0; nt < CW / 8; nt++)
                            atomic_add2(dst + nt * 8, dqa[nt][2 * r] * p.scale, dqa[nt][2 * r + 1] * p.scale);
                    }
                }
            }
        }
        __syncthreads();  // the next step refills sQ/sdO[buf], sdS and the row values
    }

    // dK (scaled) and dV into the f32 accumulators
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (kpos[r] < S) {
            const int64_t off = (((int64_t)b * S + kpos[r]) * p.Hkv + hk) * D + (lane & 3) * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                atomic_add2(p.dk_acc + off + dt * 8, dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
                atomic_add2(p.dv_acc + off + dt * 8, dv[dt][2 * r], dv[dt][2 * r + 1]);
            }
        }
    }
}

// ------------------------------------------------------------------
// launchers

template <int D>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
    using Tr = FwdTraits<D>;
    QLORA_CUDA_TRY(
        cudaFuncSetAttribute(attn_fwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::smem_bytes));
    dim3 grid(CEIL_DIV(p.T, Tr::BM), p.B * p.Hq);
    attn_fwd_kernel<D><<<grid, kThreads, Tr::smem_bytes, stream>>>(p);
    return cudaGetLastError();
}

size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

// the kernels' window: positions are < 2^30 (qlora_cuda_attention_check), so a wider window hides nothing and is
// none (0), which keeps position + window in an int
int window_arg(int64_t window) { return window > 0 && window < (1 << 30) ? (int)window : 0; }

// the current device's SM count (132, an H100's, if it cannot be read)
int device_sms() {
    int dev = 0, sms = 132;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        sms = 132;
    return sms;
}

// Decode: n_splits, the most chunks a row is cut into, from the sizes only (the rows' lengths live on the device
// and change between replays of a captured step): enough for 2 blocks per SM, at most one chunk per 64-key tile of
// S. Each row then cuts its own keys into at most n_splits chunks of whole tiles, so a short row of a long cache
// still spreads over many blocks (the blocks past its keys return at once).
template <int D>
cudaError_t launch_decode(Params p, cudaStream_t stream) {
    using Tr = DecTraits<D>;
    const int groups = CEIL_DIV(p.G, Tr::HM);
    const int64_t blocks_per_split = (int64_t)p.B * p.Hkv * groups;
    const int64_t want = CEIL_DIV(2 * (int64_t)device_sms(), blocks_per_split);
    // a row's visible keys span ceil(S / 64) tiles at most, or with a window W the tiles that W keys can touch
    int64_t row_tiles = CEIL_DIV((int64_t)p.S, (int64_t)Tr::BN);
    if (p.window > 0) row_tiles = std::min<int64_t>(row_tiles, CEIL_DIV((int64_t)p.window - 1, (int64_t)Tr::BN) + 1);
    p.n_splits = (int)std::max<int64_t>(1, std::min<int64_t>(want, row_tiles));

    // workspace (only when a row can have several chunks): part_o, then part_ml
    const int64_t parts = (int64_t)p.B * p.Hq * p.n_splits;
    const size_t o_bytes = align256(parts * D * sizeof(float));
    char* ws = nullptr;
    cudaError_t err = cudaSuccess;
    if (p.n_splits > 1) {
        ws = static_cast<char*>(qlora_cuda::device_alloc(o_bytes + parts * sizeof(float2), &err));
        if (!ws) return err;
        p.part_o = reinterpret_cast<float*>(ws);
        p.part_ml = reinterpret_cast<float2*>(ws + o_bytes);
    }
    do {
        err = cudaFuncSetAttribute(attn_decode_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)Tr::smem_bytes);
        if (err != cudaSuccess) break;
        attn_decode_kernel<D><<<dim3(p.n_splits, p.B * p.Hkv, groups), kThreads, Tr::smem_bytes, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess || !ws) break;
        attn_decode_combine_kernel<D><<<(unsigned)(p.B * p.Hq), kCombineWarps * 32, 0, stream>>>(p);
        err = cudaGetLastError();
    } while (false);
    if (ws) {
        // the workspace goes back to the cache now (stream-ordered on qlora_cuda::stream(); else wait first)
        if (stream != qlora_cuda::stream()) {
            cudaError_t e2 = cudaStreamSynchronize(stream);
            if (err == cudaSuccess) err = e2;
        }
        qlora_cuda::device_free(ws);
    }
    return err;
}

// query heads per backward block: all G of a kv head when the kv tiles alone give >= 2 blocks per SM, else
// the fewest that do (a divisor of G), so that small batches still fill the GPU
int bwd_heads_per_block(int64_t kv_blocks, int G) {
    const int sms = device_sms();
    for (int split = 1; split <= G; split++) {
        if (G % split) continue;
        if (kv_blocks * split >= 2 * (int64_t)sms) return G / split;
    }
    return 1;
}

template <int D>
cudaError_t launch_bwd(Params p, cudaStream_t stream) {
    using Tr = BwdTraits<D>;
    QLORA_CUDA_TRY(
        cudaFuncSetAttribute(attn_bwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::smem_bytes));
    const int n_tiles = CEIL_DIV(p.S, Tr::BN);
    p.heads_per_block = bwd_heads_per_block((int64_t)n_tiles * p.B * p.Hkv, p.G);
    dim3 grid(n_tiles, p.B * p.Hkv, p.G / p.heads_per_block);
    attn_bwd_kernel<D><<<grid, kThreads, Tr::smem_bytes, stream>>>(p);
    return cudaGetLastError();
}

// f(std::integral_constant<int, D>) for the head dims the kernels are instantiated for (64: Llama-style small
// models, 96: Phi-3-mini/medium and Phi-3.5-mini, 128: most 7B+ models); D is checked before (supports_head_dim)
template <typename F>
cudaError_t with_head_dim(int64_t D, F&& f) {
    if (D == 64) return f(std::integral_constant<int, 64>{});
    if (D == 96) return f(std::integral_constant<int, 96>{});
    return f(std::integral_constant<int, 128>{});
}

cudaError_t launch_cast(bf16* dst, const float* src, int64_t n, cudaStream_t stream) {
    const int64_t n4 = n / 4;  // n is a multiple of D, itself a multiple of 16
    if (n4 == 0) return cudaSuccess;
    const int64_t blocks = CEIL_DIV(n4, (int64_t)256);
    f32_to_bf16_kernel<<<(unsigned)(blocks < 8192 ? blocks : 8192), 256, 0, stream>>>(dst, src, n4);
    return cudaGetLastError();
}

}  // namespace

extern "C" int qlora_cuda_attention_supports_head_dim(int64_t D) { return D == 64 || D == 96 || D == 128; }

extern "C" const char* qlora_cuda_attention_check(const void* const* bf16_ptrs, int n_ptrs, int seg_given, int64_t B,
                                                  int64_t T, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                                                  int64_t q_offset) {
    if (!qlora_cuda_attention_supports_head_dim(D)) return "the CUDA attention supports head dims 64, 96 and 128 only";
    if (B < 0 || T < 0 || S < 0) return "B, T and S must be >= 0";
    if (Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0) return "Hq must be a positive multiple of Hkv";
    if (q_offset < 0) return "q_offset must be >= 0";
    if (T >= (1 << 30) || S >= (1 << 30) || q_offset + T >= (1 << 30)) return "T, S and q_offset + T must be < 2^30";
    if (B * Hq > 65535) return "B * Hq must be <= 65535";
    if (seg_given && q_offset + T > S) return "packed segments (seg) need q_offset + T <= S";
    for (int i = 0; i < n_ptrs; i++) {
        if (!bf16_ptrs[i]) return "a required buffer is null";
        if (reinterpret_cast<uintptr_t>(bf16_ptrs[i]) % 16 != 0) return "bf16 buffers must be 16-byte aligned";
    }
    return nullptr;
}

extern "C" cudaError_t qlora_cuda_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                                    const uint8_t* key_valid, const int32_t* seg,
                                                    const int32_t* q_offsets, const int32_t* block_table,
                                                    int64_t table_stride, int64_t B, int64_t T, int64_t S, int64_t Hq,
                                                    int64_t Hkv, int64_t D, int64_t q_offset, float scale,
                                                    int64_t window, cudaStream_t stream) {
    const void* ptrs[] = {out, q, k, v};
    if (qlora_cuda_attention_check(ptrs, 4, seg != nullptr, B, T, S, Hq, Hkv, D, q_offset) || (q_offsets && seg) ||
        window < 0)
        return cudaErrorInvalidValue;
    if (block_table && (seg || table_stride < 1 || table_stride > (1 << 24) || S > table_stride * kKvBlock))
        return cudaErrorInvalidValue;
    if (B == 0 || T == 0) return cudaSuccess;
    Params p = {};
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = out;
    p.lse_out = lse;
    p.key_valid = key_valid;
    p.seg = seg;
    p.q_offsets = q_offsets;
    p.block_table = block_table;
    p.table_stride = (int)table_stride;
    p.B = (int)B;
    p.T = (int)T;
    p.S = (int)S;
    p.Hq = (int)Hq;
    p.Hkv = (int)Hkv;
    p.G = (int)(Hq / Hkv);
    p.D = (int)D;
    p.q_offset = (int)q_offset;
    p.window = window_arg(window);
    p.scale = scale;
    p.scale_log2 = scale * kLog2e;
    // one query per row and no lse (decoding): split the keys across blocks instead of a 64-query tile per head
    if (T == 1 && !lse && !seg)
        return with_head_dim(D, [&](auto d) { return launch_decode<decltype(d)::value>(p, stream); });
    return with_head_dim(D, [&](auto d) { return launch_fwd<decltype(d)::value>(p, stream); });
}

extern "C" cudaError_t qlora_cuda_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                                                     const bf16* k, const bf16* v, const bf16* out, const float* lse,
                                                     const uint8_t* key_valid, const int32_t* seg, int64_t B, int64_t T,
                                                     int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_offset,
                                                     float scale, int64_t window, cudaStream_t stream) {
    const void* ptrs[] = {dq, dk, dv, dout, q, k, v, out};
    if (qlora_cuda_attention_check(ptrs, 8, seg != nullptr, B, T, S, Hq, Hkv, D, q_offset) || !lse || window < 0)
        return cudaErrorInvalidValue;
    const int64_t n_q = B * T * Hq * D, n_kv = B * S * Hkv * D;
    if (n_q == 0) {  // no query: dk = dv = 0
        if (n_kv == 0) return cudaSuccess;
        QLORA_CUDA_TRY(cudaMemsetAsync(dk, 0, n_kv * sizeof(bf16), stream));
        return cudaMemsetAsync(dv, 0, n_kv * sizeof(bf16), stream);
    }

    // workspace: di[B,Hq,T], then the f32 accumulators dq, dk, dv (zeroed together)
    const size_t di_bytes = align256(B * Hq * T * sizeof(float));
    const size_t dq_bytes = align256(n_q * sizeof(float)), kv_bytes = align256(n_kv * sizeof(float));
    cudaError_t err = cudaSuccess;
    char* ws = static_cast<char*>(qlora_cuda::device_alloc(di_bytes + dq_bytes + 2 * kv_bytes, &err));
    if (!ws) return err;
    Params p = {};
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.dout = dout;
    p.lse = lse;
    p.di_out = reinterpret_cast<float*>(ws);
    p.di = p.di_out;
    p.dq_acc = reinterpret_cast<float*>(ws + di_bytes);
    p.dk_acc = reinterpret_cast<float*>(ws + di_bytes + dq_bytes);
    p.dv_acc = reinterpret_cast<float*>(ws + di_bytes + dq_bytes + kv_bytes);
    p.key_valid = key_valid;
    p.seg = seg;
    p.B = (int)B;
    p.T = (int)T;
    p.S = (int)S;
    p.Hq = (int)Hq;
    p.Hkv = (int)Hkv;
    p.G = (int)(Hq / Hkv);
    p.D = (int)D;
    p.q_offset = (int)q_offset;
    p.window = window_arg(window);
    p.scale = scale;
    p.scale_log2 = scale * kLog2e;

    do {
        err = cudaMemsetAsync(ws + di_bytes, 0, dq_bytes + 2 * kv_bytes, stream);
        if (err != cudaSuccess) break;
        const int64_t rows = B * T * Hq;
        attn_bwd_dot_kernel<<<(unsigned)CEIL_DIV(rows, (int64_t)8), 256, 0, stream>>>(p);
        if ((err = cudaGetLastError()) != cudaSuccess) break;
        if (S > 0) {
            err = with_head_dim(D, [&](auto d) { return launch_bwd<decltype(d)::value>(p, stream); });
            if (err != cudaSuccess) break;
        }
        if ((err = launch_cast(dq, p.dq_acc, n_q, stream)) != cudaSuccess) break;
        if ((err = launch_cast(dk, p.dk_acc, n_kv, stream)) != cudaSuccess) break;
        err = launch_cast(dv, p.dv_acc, n_kv, stream);
    } while (false);
    // the workspace goes back to the cache now: later users of the cache queue on qlora_cuda::stream(), after this
    // work; on another stream, wait for it first
    if (stream != qlora_cuda::stream()) {
        cudaError_t e2 = cudaStreamSynchronize(stream);
        if (err == cudaSuccess) err = e2;
    }
    qlora_cuda::device_free(ws);
    return err;
}
