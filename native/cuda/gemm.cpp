// gemm.cpp: row-major GEMM through cuBLASLt, loaded at run time (dlopen), with a cache of matmul plans.
//
// No cuBLAS header exists at build time, so the few types, enums and functions used are declared below. Their
// values are those of cublasLt.h / cublas_api.h of the CUDA 12.x and 13.0 toolkits (identical in both; the
// enum values are ABI and have not changed since CUDA 11). cudaDataType_t comes from library_types.h, which
// ships with the CUDA runtime headers.
//
// Row-major through column-major: a row-major X[r, c] with leading dimension ld is the column-major X^T[c, r]
// with the same ld. So C = op(A) op(B) (row-major) is computed as the column-major C^T = op(B)^T op(A)^T,
// i.e. cuBLAS's "A" operand is our B and its "B" operand is our A, with m = N, n = M, k = K.
#include "gemm.h"
#include <dlfcn.h>
#include <library_types.h>
#include <stdio.h>
#include <string.h>
#include <mutex>
#include <string>
#include <unordered_map>
#include "runtime.h"

namespace {

// ------------------------------------------------------------------
// the cuBLASLt API subset (cublasLt.h, cublas_api.h)

typedef int cublasStatus_t;  // cublas_api.h: typedef enum {...} cublasStatus_t (an int-sized enum)
// cublas_api.h cublasStatus_t
constexpr cublasStatus_t CUBLAS_STATUS_SUCCESS = 0;
constexpr cublasStatus_t CUBLAS_STATUS_NOT_INITIALIZED = 1;
constexpr cublasStatus_t CUBLAS_STATUS_ALLOC_FAILED = 3;
constexpr cublasStatus_t CUBLAS_STATUS_INVALID_VALUE = 7;
constexpr cublasStatus_t CUBLAS_STATUS_ARCH_MISMATCH = 8;
constexpr cublasStatus_t CUBLAS_STATUS_MAPPING_ERROR = 11;
constexpr cublasStatus_t CUBLAS_STATUS_EXECUTION_FAILED = 13;
constexpr cublasStatus_t CUBLAS_STATUS_INTERNAL_ERROR = 14;
constexpr cublasStatus_t CUBLAS_STATUS_NOT_SUPPORTED = 15;
constexpr cublasStatus_t CUBLAS_STATUS_LICENSE_ERROR = 16;

// cublas_api.h cublasOperation_t (int32_t when set as CUBLASLT_MATMUL_DESC_TRANSA/B)
constexpr int32_t CUBLAS_OP_N = 0;
constexpr int32_t CUBLAS_OP_T = 1;

// cublas_api.h cublasComputeType_t: CUBLAS_COMPUTE_32F = 68 ("float - default"; no TF32 down-conversion,
// that is CUBLAS_COMPUTE_32F_FAST_TF32 = 77)
typedef int cublasComputeType_t;
constexpr cublasComputeType_t CUBLAS_COMPUTE_32F = 68;

// cublasLt.h cublasLtMatmulDescAttributes_t: CUBLASLT_MATMUL_DESC_TRANSA = 3, CUBLASLT_MATMUL_DESC_TRANSB = 4
// (COMPUTE_TYPE = 0, SCALE_TYPE = 1, POINTER_MODE = 2 come first; EPILOGUE = 7 is not used here)
typedef int cublasLtMatmulDescAttributes_t;
constexpr cublasLtMatmulDescAttributes_t CUBLASLT_MATMUL_DESC_TRANSA = 3;
constexpr cublasLtMatmulDescAttributes_t CUBLASLT_MATMUL_DESC_TRANSB = 4;

// cublasLt.h cublasLtMatrixLayoutAttribute_t: BATCH_COUNT = 5 (int32_t), STRIDED_BATCH_OFFSET = 6 (int64_t)
typedef int cublasLtMatrixLayoutAttribute_t;
constexpr cublasLtMatrixLayoutAttribute_t CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5;
constexpr cublasLtMatrixLayoutAttribute_t CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6;

// cublasLt.h cublasLtMatmulPreferenceAttributes_t: MAX_WORKSPACE_BYTES = 1 (uint64_t),
// REDUCTION_SCHEME_MASK = 3 (uint32_t), MIN_ALIGNMENT_A/B/C/D_BYTES = 5/6/7/8 (uint32_t, default 256)
typedef int cublasLtMatmulPreferenceAttributes_t;
constexpr cublasLtMatmulPreferenceAttributes_t CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1;
constexpr cublasLtMatmulPreferenceAttributes_t CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3;
constexpr cublasLtMatmulPreferenceAttributes_t CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5;
constexpr cublasLtMatmulPreferenceAttributes_t CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6;
constexpr cublasLtMatmulPreferenceAttributes_t CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7;
constexpr cublasLtMatmulPreferenceAttributes_t CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8;

// cublasLt.h cublasLtReductionScheme_t: NONE = 0, INPLACE = 1, COMPUTE_TYPE = 2, OUTPUT_TYPE = 4, MASK = 7.
// INPLACE and OUTPUT_TYPE sum split-K partials in the output dtype; for a 16-bit C only COMPUTE_TYPE is allowed.
constexpr uint32_t CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE = 2;

typedef struct cublasLtContext* cublasLtHandle_t;
typedef struct cublasLtMatmulDescOpaque* cublasLtMatmulDesc_t;      // cublasLtMatmulDescOpaque_t* (data[32])
typedef struct cublasLtMatrixLayoutOpaque* cublasLtMatrixLayout_t;  // cublasLtMatrixLayoutOpaque_t* (data[14])
typedef struct cublasLtMatmulPreferenceOpaque* cublasLtMatmulPreference_t;

// cublasLt.h: typedef struct { uint64_t data[8]; } cublasLtMatmulAlgo_t;
struct cublasLtMatmulAlgo_t {
    uint64_t data[8];
};

// cublasLt.h: typedef struct { cublasLtMatmulAlgo_t algo; size_t workspaceSize; cublasStatus_t state;
//                              float wavesCount; int reserved[4]; } cublasLtMatmulHeuristicResult_t;
struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};
static_assert(sizeof(cublasLtMatmulAlgo_t) == 64, "cublasLtMatmulAlgo_t is 64 bytes");
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "cublasLtMatmulHeuristicResult_t is 96 bytes");

struct LtApi {
    cublasStatus_t (*Create)(cublasLtHandle_t*);
    size_t (*GetVersion)(void);
    cublasStatus_t (*MatmulDescCreate)(cublasLtMatmulDesc_t*, cublasComputeType_t, cudaDataType_t);
    cublasStatus_t (*MatmulDescDestroy)(cublasLtMatmulDesc_t);
    cublasStatus_t (*MatmulDescSetAttribute)(cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t, const void*, size_t);
    cublasStatus_t (*MatrixLayoutCreate)(cublasLtMatrixLayout_t*, cudaDataType_t, uint64_t, uint64_t, int64_t);
    cublasStatus_t (*MatrixLayoutDestroy)(cublasLtMatrixLayout_t);
    cublasStatus_t (*MatrixLayoutSetAttribute)(cublasLtMatrixLayout_t, cublasLtMatrixLayoutAttribute_t, const void*,
                                               size_t);
    cublasStatus_t (*MatmulPreferenceCreate)(cublasLtMatmulPreference_t*);
    cublasStatus_t (*MatmulPreferenceDestroy)(cublasLtMatmulPreference_t);
    cublasStatus_t (*MatmulPreferenceSetAttribute)(cublasLtMatmulPreference_t, cublasLtMatmulPreferenceAttributes_t,
                                                   const void*, size_t);
    cublasStatus_t (*MatmulAlgoGetHeuristic)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                             cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                             cublasLtMatmulPreference_t, int, cublasLtMatmulHeuristicResult_t*, int*);
    cublasStatus_t (*Matmul)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void*, const void*, cublasLtMatrixLayout_t,
                             const void*, cublasLtMatrixLayout_t, const void*, const void*, cublasLtMatrixLayout_t,
                             void*, cublasLtMatrixLayout_t, const cublasLtMatmulAlgo_t*, void*, size_t, cudaStream_t);
};

const char* const kLibNames[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
constexpr size_t kWorkspaceBytes = 32u << 20;  // 32 MiB, what NVIDIA recommends for Hopper
constexpr size_t kMaxPlans = 4096;             // the cache is emptied when it grows past this

const char* status_name(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS:
            return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED:
            return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED:
            return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE:
            return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH:
            return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_MAPPING_ERROR:
            return "CUBLAS_STATUS_MAPPING_ERROR";
        case CUBLAS_STATUS_EXECUTION_FAILED:
            return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR:
            return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED:
            return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_LICENSE_ERROR:
            return "CUBLAS_STATUS_LICENSE_ERROR";
        default:
            return "unknown cuBLAS status";
    }
}

const char* dtype_name(int d) {
    return d == QLORA_CUDA_F32 ? "f32" : d == QLORA_CUDA_BF16 ? "bf16" : d == QLORA_CUDA_F16 ? "f16" : "?";
}

bool to_cuda_dtype(int d, cudaDataType_t* out) {
    switch (d) {
        case QLORA_CUDA_F32:
            *out = CUDA_R_32F;
            return true;  // library_types.h: 0
        case QLORA_CUDA_BF16:
            *out = CUDA_R_16BF;
            return true;  // 14
        case QLORA_CUDA_F16:
            *out = CUDA_R_16F;
            return true;  // 2
        default:
            return false;
    }
}

size_t dtype_bytes(int d) { return d == QLORA_CUDA_F32 ? 4 : 2; }

thread_local std::string t_last_error;

int fail(int code, const std::string& msg) {
    t_last_error = msg;
    return code;
}

// ------------------------------------------------------------------
// library state (guarded by g_mutex)

std::mutex g_mutex;
void* g_lib = nullptr;
const char* g_lib_name = nullptr;
std::string g_load_error;
bool g_load_tried = false;
LtApi g_api;
cublasLtHandle_t g_handle = nullptr;
void* g_workspace = nullptr;
QloraGemmStats g_stats = {0, 0, 0, 0};

struct PlanKey {
    int32_t transA, transB, dtypeAB, dtypeC;
    int64_t M, N, K, lda, ldb, ldc, strideA, strideB, strideC, batch;
    uint32_t alignA, alignB, alignC;
    bool operator==(const PlanKey& o) const { return memcmp(this, &o, sizeof(PlanKey)) == 0; }
};

struct PlanKeyHash {
    size_t operator()(const PlanKey& k) const {
        // FNV-1a over the bytes (the key is zero-initialized, so padding is deterministic)
        const unsigned char* p = reinterpret_cast<const unsigned char*>(&k);
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < sizeof(PlanKey); i++) h = (h ^ p[i]) * 1099511628211ull;
        return (size_t)h;
    }
};

struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // cuBLAS's A (= our B), B (= our A), C
    cublasLtMatmulAlgo_t algo;
    size_t workspace = 0;
    bool fallback = false;  // no cuBLASLt algorithm: use the built-in kernel
};

std::unordered_map<PlanKey, Plan, PlanKeyHash> g_plans;

void destroy_plan(Plan& p) {
    if (p.desc) g_api.MatmulDescDestroy(p.desc);
    if (p.a) g_api.MatrixLayoutDestroy(p.a);
    if (p.b) g_api.MatrixLayoutDestroy(p.b);
    if (p.c) g_api.MatrixLayoutDestroy(p.c);
    p.desc = nullptr;
    p.a = p.b = p.c = nullptr;
}

void clear_plans_locked() {
    for (auto& kv : g_plans) destroy_plan(kv.second);
    g_plans.clear();
}

template <typename F>
bool load_sym(F*& fn, const char* name) {
    fn = reinterpret_cast<F*>(dlsym(g_lib, name));
    if (!fn) g_load_error = std::string(g_lib_name) + " has no symbol " + name;
    return fn != nullptr;
}

// opens the library, resolves the functions, creates the handle and the workspace; false with g_load_error
bool ensure_loaded_locked() {
    if (g_handle) return true;
    if (g_load_tried && !g_lib) return false;
    g_load_tried = true;
    std::string dl_errors;
    for (const char* name : kLibNames) {
        g_lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        if (g_lib) {
            g_lib_name = name;
            break;
        }
        const char* e = dlerror();
        if (e) dl_errors += std::string("; ") + e;
    }
    if (!g_lib) {
        g_load_error = "libcublasLt.so.13 not found (install CUDA's cuBLAS or set LD_LIBRARY_PATH)" + dl_errors;
        return false;
    }
    bool ok = load_sym(g_api.Create, "cublasLtCreate") && load_sym(g_api.GetVersion, "cublasLtGetVersion") &&
              load_sym(g_api.MatmulDescCreate, "cublasLtMatmulDescCreate") &&
              load_sym(g_api.MatmulDescDestroy, "cublasLtMatmulDescDestroy") &&
              load_sym(g_api.MatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute") &&
              load_sym(g_api.MatrixLayoutCreate, "cublasLtMatrixLayoutCreate") &&
              load_sym(g_api.MatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy") &&
              load_sym(g_api.MatrixLayoutSetAttribute, "cublasLtMatrixLayoutSetAttribute") &&
              load_sym(g_api.MatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate") &&
              load_sym(g_api.MatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy") &&
              load_sym(g_api.MatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute") &&
              load_sym(g_api.MatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic") &&
              load_sym(g_api.Matmul, "cublasLtMatmul");
    if (!ok) {
        dlclose(g_lib);
        g_lib = nullptr;
        return false;
    }
    // the runtime's primary context must be current before cuBLASLt looks at the device
    cudaStream_t s = qlora_cuda::stream();
    (void)s;
    cudaFree(nullptr);
    cublasStatus_t st = g_api.Create(&g_handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
        g_handle = nullptr;
        g_load_error = std::string("cublasLtCreate failed: ") + status_name(st);
        g_load_tried = false;  // may succeed later (e.g. after the device is set)
        return false;
    }
    return true;
}

bool ensure_workspace_locked(std::string* err) {
    if (g_workspace) return true;
    cudaError_t e;
    g_workspace = qlora_cuda::device_alloc(kWorkspaceBytes, &e);
    if (!g_workspace) {
        *err = std::string("allocating the 32 MiB cuBLASLt workspace: ") + cudaGetErrorString(e);
        return false;
    }
    return true;
}

// the largest power of two (<= 256) that divides the address (and the batch stride in bytes: every matrix
// of a batch must be as aligned as the first)
uint32_t alignment_of(const void* p, int64_t stride_bytes = 0) {
    uintptr_t a = reinterpret_cast<uintptr_t>(p) | (uintptr_t)stride_bytes;
    uint32_t al = 256;
    while (al > 1 && (a % al) != 0) al >>= 1;
    return al;
}

std::string shape_str(const PlanKey& k) {
    char buf[320];
    snprintf(buf, sizeof(buf),
             "transA=%d transB=%d M=%lld N=%lld K=%lld lda=%lld ldb=%lld ldc=%lld %s x %s -> %s batch=%lld", k.transA,
             k.transB, (long long)k.M, (long long)k.N, (long long)k.K, (long long)k.lda, (long long)k.ldb,
             (long long)k.ldc, dtype_name(k.dtypeAB), dtype_name(k.dtypeAB), dtype_name(k.dtypeC), (long long)k.batch);
    return buf;
}

#define LT_TRY(call, what)                                                                     \
    do {                                                                                       \
        cublasStatus_t st__ = (call);                                                          \
        if (st__ != CUBLAS_STATUS_SUCCESS) {                                                   \
            *err = std::string(what) + ": " + status_name(st__) + " (" + shape_str(key) + ")"; \
            return false;                                                                      \
        }                                                                                      \
    } while (0)

bool make_layout(cublasLtMatrixLayout_t* out, cudaDataType_t t, uint64_t rows, uint64_t cols, int64_t ld, int64_t batch,
                 int64_t stride, const PlanKey& key, std::string* err) {
    LT_TRY(g_api.MatrixLayoutCreate(out, t, rows, cols, ld), "cublasLtMatrixLayoutCreate");
    if (batch > 1) {
        int32_t count = (int32_t)batch;
        LT_TRY(g_api.MatrixLayoutSetAttribute(*out, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
               "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
        LT_TRY(
            g_api.MatrixLayoutSetAttribute(*out, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)),
            "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)");
    }
    return true;
}

// fills the descriptors of a plan and runs the heuristic; false with *err on a cuBLASLt error. No algorithm
// found is not an error: the plan is marked fallback.
bool build_plan(const PlanKey& key, Plan& p, std::string* err) {
    cudaDataType_t tab = CUDA_R_32F, tc = CUDA_R_32F;
    to_cuda_dtype(key.dtypeAB, &tab);
    to_cuda_dtype(key.dtypeC, &tc);
    LT_TRY(g_api.MatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
    const int32_t opA = key.transB ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS's A is our B
    const int32_t opB = key.transA ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS's B is our A
    LT_TRY(g_api.MatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof(opA)),
           "cublasLtMatmulDescSetAttribute(TRANSA)");
    LT_TRY(g_api.MatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof(opB)),
           "cublasLtMatmulDescSetAttribute(TRANSB)");
    // cuBLAS A = our B seen column-major: op(B)^T is [N, K]; stored [N rows, K cols] (no transpose) or
    // [K rows, N cols] (transposed)
    if (!make_layout(&p.a, tab, key.transB ? key.K : key.N, key.transB ? key.N : key.K, key.ldb, key.batch, key.strideB,
                     key, err))
        return false;
    // cuBLAS B = our A: op(A)^T is [K, M]; stored [K rows, M cols] or [M rows, K cols]
    if (!make_layout(&p.b, tab, key.transA ? key.M : key.K, key.transA ? key.K : key.M, key.lda, key.batch, key.strideA,
                     key, err))
        return false;
    if (!make_layout(&p.c, tc, key.N, key.M, key.ldc, key.batch, key.strideC, key, err)) return false;

    cublasLtMatmulPreference_t pref = nullptr;
    LT_TRY(g_api.MatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    uint64_t ws = kWorkspaceBytes;
    uint32_t alA = key.alignB, alB = key.alignA, alC = key.alignC;  // cuBLAS's A/B are our B/A
    bool ok = g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)) ==
                  CUBLAS_STATUS_SUCCESS &&
              g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alA, sizeof(alA)) ==
                  CUBLAS_STATUS_SUCCESS &&
              g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alB, sizeof(alB)) ==
                  CUBLAS_STATUS_SUCCESS &&
              g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alC, sizeof(alC)) ==
                  CUBLAS_STATUS_SUCCESS &&
              g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alC, sizeof(alC)) ==
                  CUBLAS_STATUS_SUCCESS;
    if (!ok) {
        g_api.MatmulPreferenceDestroy(pref);
        *err = "cublasLtMatmulPreferenceSetAttribute failed (" + shape_str(key) + ")";
        return false;
    }
    // a 16-bit C: split-K partial sums must be reduced in fp32, not in the output dtype
    const bool narrow_c = key.dtypeC != QLORA_CUDA_F32;
    if (narrow_c) {
        uint32_t mask = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
        g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask));
    }
    g_stats.heuristic_runs++;
    cublasLtMatmulHeuristicResult_t results[4];
    memset(results, 0, sizeof(results));
    int found = 0;
    cublasStatus_t st = g_api.MatmulAlgoGetHeuristic(g_handle, p.desc, p.a, p.b, p.c, p.c, pref, 4, results, &found);
    if (narrow_c && (st != CUBLAS_STATUS_SUCCESS || found == 0)) {
        // nothing with fp32 split-K reduction: let cuBLASLt choose freely
        uint32_t mask = 7;  // CUBLASLT_REDUCTION_SCHEME_MASK: every scheme
        g_api.MatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask));
        found = 0;
        st = g_api.MatmulAlgoGetHeuristic(g_handle, p.desc, p.a, p.b, p.c, p.c, pref, 4, results, &found);
    }
    g_api.MatmulPreferenceDestroy(pref);
    p.fallback = true;
    if (st == CUBLAS_STATUS_SUCCESS) {
        for (int i = 0; i < found; i++) {
            if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize <= kWorkspaceBytes) {
                p.algo = results[i].algo;
                p.workspace = results[i].workspaceSize;
                p.fallback = false;
                break;
            }
        }
    } else if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
        *err = std::string("cublasLtMatmulAlgoGetHeuristic: ") + status_name(st) + " (" + shape_str(key) + ")";
        return false;
    }
    return true;
}

int run_fallback(const PlanKey& k, float alpha, const void* A, const void* B, float beta, void* C,
                 cudaStream_t stream) {
    // the same column-major problem cuBLAS would get: C^T[N, M] = op(B)^T [N, K] @ op(A)^T [K, M]
    cudaError_t e =
        qlora_cuda_gemm_fallback_colmajor(k.transB, k.transA, k.N, k.M, k.K, alpha, B, k.ldb, k.strideB, A, k.lda,
                                          k.strideA, k.dtypeAB, beta, C, k.ldc, k.strideC, k.dtypeC, k.batch, stream);
    if (e != cudaSuccess)
        return fail(QLORA_GEMM_ERR_CUDA, std::string("gemm fallback kernel: ") + cudaGetErrorString(e));
    return QLORA_GEMM_OK;
}

int gemm_impl(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const void* A, int64_t lda,
              int64_t strideA, int dtypeA, const void* B, int64_t ldb, int64_t strideB, int dtypeB, float beta, void* C,
              int64_t ldc, int64_t strideC, int dtypeC, int64_t batch, cudaStream_t stream) {
    t_last_error.clear();
    cudaDataType_t tmp;
    if (!to_cuda_dtype(dtypeA, &tmp) || !to_cuda_dtype(dtypeB, &tmp) || !to_cuda_dtype(dtypeC, &tmp))
        return fail(QLORA_GEMM_ERR_ARG, "gemm: unknown dtype code");
    if (dtypeA != dtypeB)
        return fail(QLORA_GEMM_ERR_ARG, std::string("gemm: A is ") + dtype_name(dtypeA) + " but B is " +
                                            dtype_name(dtypeB) + " (A and B must have the same dtype)");
    if (dtypeC != QLORA_CUDA_F32 && dtypeC != dtypeA)
        return fail(QLORA_GEMM_ERR_ARG, std::string("gemm: C must be f32 or the input dtype (") + dtype_name(dtypeA) +
                                            "), got " + dtype_name(dtypeC));
    if (M < 0 || N < 0 || K < 0 || batch < 0) return fail(QLORA_GEMM_ERR_ARG, "gemm: negative size");
    if (M == 0 || N == 0 || batch == 0) return QLORA_GEMM_OK;
    const int64_t colsA = transA ? M : K, colsB = transB ? K : N;
    if (lda < (colsA > 1 ? colsA : 1) || ldb < (colsB > 1 ? colsB : 1) || ldc < N) {
        char buf[200];
        snprintf(buf, sizeof(buf),
                 "gemm: leading dimensions too small (lda=%lld needs >= %lld, ldb=%lld needs >= "
                 "%lld, ldc=%lld needs >= %lld)",
                 (long long)lda, (long long)colsA, (long long)ldb, (long long)colsB, (long long)ldc, (long long)N);
        return fail(QLORA_GEMM_ERR_ARG, buf);
    }
    if (!C || (K > 0 && (!A || !B))) return fail(QLORA_GEMM_ERR_ARG, "gemm: null matrix");
    if (batch > 1 && strideC < (M - 1) * ldc + N)
        return fail(QLORA_GEMM_ERR_ARG, "gemm: strideC smaller than one C matrix (batches would overlap)");
    if (batch > INT32_MAX) return fail(QLORA_GEMM_ERR_ARG, "gemm: batch too large");

    PlanKey key;
    memset(&key, 0, sizeof(key));
    key.transA = transA ? 1 : 0;
    key.transB = transB ? 1 : 0;
    key.dtypeAB = dtypeA;
    key.dtypeC = dtypeC;
    key.M = M;
    key.N = N;
    key.K = K;
    key.lda = lda;
    key.ldb = ldb;
    key.ldc = ldc;
    key.batch = batch;
    key.strideA = batch > 1 ? strideA : 0;
    key.strideB = batch > 1 ? strideB : 0;
    key.strideC = batch > 1 ? strideC : 0;

    std::lock_guard<std::mutex> lock(g_mutex);
    g_stats.calls++;
    if (K == 0) {
        // nothing to multiply: C = beta * C (the fallback kernel handles it without touching A and B)
        g_stats.fallback_calls++;
        return run_fallback(key, alpha, A, B, beta, C, stream);
    }
    if (!ensure_loaded_locked()) return fail(QLORA_GEMM_ERR_LIBRARY, g_load_error);
    std::string err;
    if (!ensure_workspace_locked(&err)) return fail(QLORA_GEMM_ERR_CUDA, err);
    key.alignA = alignment_of(A, key.strideA * (int64_t)dtype_bytes(dtypeA));
    key.alignB = alignment_of(B, key.strideB * (int64_t)dtype_bytes(dtypeB));
    key.alignC = alignment_of(C, key.strideC * (int64_t)dtype_bytes(dtypeC));

    auto it = g_plans.find(key);
    if (it == g_plans.end()) {
        if (g_plans.size() >= kMaxPlans) clear_plans_locked();
        Plan p;
        if (!build_plan(key, p, &err)) {
            destroy_plan(p);
            return fail(QLORA_GEMM_ERR_CUBLAS, err);
        }
        it = g_plans.emplace(key, p).first;
        g_stats.cached_plans = (int64_t)g_plans.size();
    }
    Plan& p = it->second;
    if (!p.fallback) {
        // cuBLAS's A = our B, cuBLAS's B = our A; C is also D (in place)
        cublasStatus_t st = g_api.Matmul(g_handle, p.desc, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo,
                                         g_workspace, p.workspace, stream);
        if (st == CUBLAS_STATUS_SUCCESS) return QLORA_GEMM_OK;
        if (st != CUBLAS_STATUS_NOT_SUPPORTED)
            return fail(QLORA_GEMM_ERR_CUBLAS,
                        std::string("cublasLtMatmul: ") + status_name(st) + " (" + shape_str(key) + ")");
        p.fallback = true;  // the heuristic's algorithm refused the problem: use the built-in kernel from now on
    }
    g_stats.fallback_calls++;
    return run_fallback(key, alpha, A, B, beta, C, stream);
}

}  // namespace

extern "C" int qlora_cuda_gemm(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                               int64_t lda, int dtypeA, const void* B, int64_t ldb, int dtypeB, float beta, void* C,
                               int64_t ldc, int dtypeC, cudaStream_t stream) {
    return gemm_impl(transA, transB, M, N, K, alpha, A, lda, 0, dtypeA, B, ldb, 0, dtypeB, beta, C, ldc, 0, dtypeC, 1,
                     stream);
}

extern "C" int qlora_cuda_gemm_strided_batched(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
                                               const void* A, int64_t lda, int64_t strideA, int dtypeA, const void* B,
                                               int64_t ldb, int64_t strideB, int dtypeB, float beta, void* C,
                                               int64_t ldc, int64_t strideC, int dtypeC, int64_t batch,
                                               cudaStream_t stream) {
    return gemm_impl(transA, transB, M, N, K, alpha, A, lda, strideA, dtypeA, B, ldb, strideB, dtypeB, beta, C, ldc,
                     strideC, dtypeC, batch, stream);
}

extern "C" const char* qlora_cuda_gemm_last_error(void) { return t_last_error.c_str(); }

extern "C" int qlora_cuda_gemm_library(const char** library, size_t* version) {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!ensure_loaded_locked()) return fail(QLORA_GEMM_ERR_LIBRARY, g_load_error);
    *library = g_lib_name;
    *version = g_api.GetVersion();
    return QLORA_GEMM_OK;
}

extern "C" QloraGemmStats qlora_cuda_gemm_stats(void) {
    std::lock_guard<std::mutex> lock(g_mutex);
    QloraGemmStats s = g_stats;
    s.cached_plans = (int64_t)g_plans.size();
    return s;
}

extern "C" void qlora_cuda_gemm_clear_cache(void) {
    std::lock_guard<std::mutex> lock(g_mutex);
    clear_plans_locked();
}
