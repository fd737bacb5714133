// lora_down.cu: x A^T for up to four LoRA "A" matrices in one launch (see lora_down.h).
//
// The work is tiny (A is r x K bf16: 115 KB at r = 16, K = 3584) and latency-bound, so it is spread thin: a block
// computes G rows of one A (output columns) for all M rows of x over a slice of K. Its threads take the slice's
// 16-byte chunks (8 bf16) in turn, each thread issuing the loads of kUnroll chunks (of A and of every row of x,
// through the read-only cache) before using them, and sum in fp32 in a fixed order: the thread's chunks in turn,
// then its warp by a shuffle butterfly, then the warps in order through shared memory. On GPUs with thread block
// clusters K is split over the `split` blocks of a cluster (grid x) and the first block adds the others' sums, in
// block order, from their shared memory. Every order depends only on the shapes and the device: the same bits
// every run. Grid y walks the parts' column groups (part 0's first).
#include <cooperative_groups.h>
#include "kernel_utils.cuh"
#include "lora_down.h"

namespace cg = cooperative_groups;

namespace {

constexpr int kMaxThreads = 256;
constexpr int kUnroll = 2;           // chunks whose loads a thread issues before using them
constexpr int kMaxSplit = 8;         // the blocks of a cluster: the largest portable cluster size
constexpr int kMinSliceChunks = 32;  // a shorter K slice would leave most of a warp idle
constexpr int kBlocksPerSm = 2;      // the grid size aimed at: enough loads in flight to cover the memory latency

// output columns per block: from M = 4 on, the M chunks of x a thread loads per chunk of A outnumber it, and two
// columns share each x load
template <int M>
__host__ __device__ constexpr int cols_per_block() {
    return M >= 4 ? 2 : 1;
}

struct PartTable {
    const uint4* A[QLORA_LORA_DOWN_MAX_PARTS];
    uint16_t* out[QLORA_LORA_DOWN_MAX_PARTS];
    int r[QLORA_LORA_DOWN_MAX_PARTS];
    int first_group[QLORA_LORA_DOWN_MAX_PARTS];  // the blockIdx.y of the part's first column group
    int count;
};

// acc + the dot product of two vectors of 8 bf16, element by element in order
__device__ __forceinline__ float dot_bf16x8(const uint4& a, const uint4& b, float acc) {
    acc = fmaf(__uint_as_float(a.x << 16), __uint_as_float(b.x << 16), acc);
    acc = fmaf(__uint_as_float(a.x & 0xffff0000u), __uint_as_float(b.x & 0xffff0000u), acc);
    acc = fmaf(__uint_as_float(a.y << 16), __uint_as_float(b.y << 16), acc);
    acc = fmaf(__uint_as_float(a.y & 0xffff0000u), __uint_as_float(b.y & 0xffff0000u), acc);
    acc = fmaf(__uint_as_float(a.z << 16), __uint_as_float(b.z << 16), acc);
    acc = fmaf(__uint_as_float(a.z & 0xffff0000u), __uint_as_float(b.z & 0xffff0000u), acc);
    acc = fmaf(__uint_as_float(a.w << 16), __uint_as_float(b.w << 16), acc);
    acc = fmaf(__uint_as_float(a.w & 0xffff0000u), __uint_as_float(b.w & 0xffff0000u), acc);
    return acc;
}

// x [M, chunks] and each A [r, chunks] in 16-byte chunks; grid (split, column groups), blockDim a multiple of 32
template <int M>
__global__ void __launch_bounds__(kMaxThreads)
    lora_down_kernel(const uint4* __restrict__ x, int64_t chunks, PartTable parts, int split) {
    constexpr int G = cols_per_block<M>();
    constexpr int kSums = G * M;  // the block's outputs, <= 16 < 32 <= blockDim.x
    __shared__ float s_warp[kMaxThreads / 32][kSums];

    // this block's part and its columns j0 .. j0 + G - 1 (block-uniform); selects instead of indexing the
    // parameter arrays, which would copy them to local memory
    const int group = (int)blockIdx.y;
    int p = 0;
#pragma unroll
    for (int q = 1; q < QLORA_LORA_DOWN_MAX_PARTS; q++)
        if (q < parts.count && group >= parts.first_group[q]) p = q;
    const uint4* A = parts.A[0];
    uint16_t* out = parts.out[0];
    int r = parts.r[0], first = parts.first_group[0];
#pragma unroll
    for (int q = 1; q < QLORA_LORA_DOWN_MAX_PARTS; q++) {
        if (q == p) {
            A = parts.A[q];
            out = parts.out[q];
            r = parts.r[q];
            first = parts.first_group[q];
        }
    }
    const int j0 = (group - first) * G;
    const uint4* rows[G];
#pragma unroll
    for (int g = 0; g < G; g++) rows[g] = A + (int64_t)min(j0 + g, r - 1) * chunks;  // past r: not stored

    // this block's slice of K
    const int64_t per = (chunks + split - 1) / split;
    const int64_t c0 = (int64_t)blockIdx.x * per, c1 = min(chunks, c0 + per);

    float acc[G][M];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int m = 0; m < M; m++) acc[g][m] = 0.0f;
    const int64_t stride = blockDim.x;
    for (int64_t c = c0 + threadIdx.x; c < c1; c += kUnroll * stride) {
        uint4 a[kUnroll][G], xv[kUnroll][M];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const int64_t cu = c + u * stride;
            const bool ok = cu < c1;  // zeros past the slice: they add +0
#pragma unroll
            for (int g = 0; g < G; g++) a[u][g] = ok ? __ldg(rows[g] + cu) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int m = 0; m < M; m++) xv[u][m] = ok ? __ldg(x + m * chunks + cu) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int m = 0; m < M; m++) acc[g][m] = dot_bf16x8(a[u][g], xv[u][m], acc[g][m]);
    }

    // the block's sums: each warp's, then the warps' in order
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int m = 0; m < M; m++) {
            const float v = qk::warp_sum(acc[g][m]);
            if (lane == 0) s_warp[warp][g * M + m] = v;
        }
    }
    __syncthreads();
    float sum = 0.0f;
    if (t < kSums)
        for (int w = 0; w < nwarps; w++) sum += s_warp[w][t];

    if (split > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // the cluster's blocks are its slices of K: block 0 adds their sums in block order
        __shared__ float s_block[kSums];
        if (t < kSums) s_block[t] = sum;
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();  // every block's sums are in its shared memory
        if (blockIdx.x == 0 && t < kSums) {
            sum = 0.0f;
            for (int b = 0; b < split; b++) sum += *cluster.map_shared_rank(&s_block[t], b);
        }
        cluster.sync();  // the other blocks (and their shared memory) stay until block 0 has read them
#else
        __trap();  // unreachable: the launcher splits K only where the kernel was compiled for clusters
#endif
    }
    if (blockIdx.x != 0 || t >= kSums) return;
    const int g = t / M, m = t % M, j = j0 + g;
    if (j < r) out[(int64_t)m * r + j] = qk::f32_to_bf16(sum);
}

// whether K may be split over the blocks of a cluster on the current device: the GPU launches clusters and the
// kernel that runs there was compiled for them (PTX 9.0+, not a JIT of older PTX); cached per device
bool clusters_usable() {
    static signed char cached[64] = {0};  // 0: not asked yet, 1: yes, -1: no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
        cudaGetLastError();  // a failed query must not surface as the launch's error
        return false;
    }
    if (cached[dev] == 0) {
        int launch = 0;
        cudaFuncAttributes fa;
        const bool yes = cudaDeviceGetAttribute(&launch, cudaDevAttrClusterLaunch, dev) == cudaSuccess && launch != 0 &&
                         cudaFuncGetAttributes(&fa, lora_down_kernel<1>) == cudaSuccess && fa.ptxVersion >= 90;
        cudaGetLastError();
        cached[dev] = yes ? 1 : -1;
    }
    return cached[dev] > 0;
}

template <int M>
cudaError_t launch(const uint16_t* x, int64_t chunks, const QloraLoraDownPart* parts, int num_parts,
                   cudaStream_t stream) {
    constexpr int G = cols_per_block<M>();
    PartTable table = {};
    int groups = 0;
    for (int p = 0; p < num_parts; p++) {
        table.A[p] = reinterpret_cast<const uint4*>(parts[p].A);
        table.out[p] = parts[p].out;
        table.r[p] = (int)parts[p].r;
        table.first_group[p] = groups;
        groups += (int)CEIL_DIV(parts[p].r, (int64_t)G);
    }
    table.count = num_parts;

    // K split (a power of two) until the grid holds about kBlocksPerSm blocks an SM, keeping slices of at least
    // kMinSliceChunks
    int split = 1;
    if (clusters_usable()) {
        const int64_t want = CEIL_DIV((int64_t)kBlocksPerSm * qk::num_sms(), (int64_t)groups);
        while (split < kMaxSplit && 2 * split <= want && 2 * split * (int64_t)kMinSliceChunks <= chunks) split *= 2;
    }
    const int64_t per_thread = CEIL_DIV(CEIL_DIV(chunks, (int64_t)split), (int64_t)kUnroll);
    const int threads = per_thread >= kMaxThreads ? kMaxThreads : qk::round_up_warp(per_thread);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const dim3 grid((unsigned)split, (unsigned)groups);
    if (split == 1) {
        lora_down_kernel<M><<<grid, threads, 0, stream>>>(x4, chunks, table, 1);
        return cudaGetLastError();
    }
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)split;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3((unsigned)threads);
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, lora_down_kernel<M>, x4, chunks, table, split);
}

}  // namespace

extern "C" cudaError_t qlora_cuda_lora_down_bf16(const uint16_t* x, int64_t M, int64_t K,
                                                 const QloraLoraDownPart* parts, int64_t num_parts,
                                                 cudaStream_t stream) {
    if (M < 1 || M > QLORA_LORA_DOWN_MAX_M || K < 1 || !x || !parts || num_parts < 1 ||
        num_parts > QLORA_LORA_DOWN_MAX_PARTS)
        return cudaErrorInvalidValue;
    for (int64_t p = 0; p < num_parts; p++)
        if (!parts[p].out || !parts[p].A || parts[p].r < 1 || parts[p].r > QLORA_LORA_DOWN_MAX_R)
            return cudaErrorInvalidValue;
    if (K % 8 != 0 || !qk::aligned16(x)) return cudaErrorNotSupported;
    for (int64_t p = 0; p < num_parts; p++)
        if (!qk::aligned16(parts[p].A)) return cudaErrorNotSupported;
    const int64_t chunks = K / 8;
    const int n = (int)num_parts;
    switch (M) {
        case 1:
            return launch<1>(x, chunks, parts, n, stream);
        case 2:
            return launch<2>(x, chunks, parts, n, stream);
        case 3:
            return launch<3>(x, chunks, parts, n, stream);
        case 4:
            return launch<4>(x, chunks, parts, n, stream);
        case 5:
            return launch<5>(x, chunks, parts, n, stream);
        case 6:
            return launch<6>(x, chunks, parts, n, stream);
        case 7:
            return launch<7>(x, chunks, parts, n, stream);
        default:
            return launch<8>(x, chunks, parts, n, stream);
    }
}
