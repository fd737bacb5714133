// cuda_gemm.cpp: bindings of the CUDA gemm ops: cuBLASLt GEMM (row-major, the CPU sgemm contract), the NF4/FP4
// dequantization and the fused 4-bit GEMV (one weight, or a group of weights on one x). Device buffers are addresses
// (numbers); dtypes are "f32" | "bf16" | "f16".
#include <string>
#include "cuda_bindings.h"
#include "napi_util.h"
#include "../cuda/gemm.h"
#include "../cuda/nf4.h"
#include "../cuda/runtime.h"

using namespace qlora_napi;

namespace {

// "f32" | "bf16" | "f16" -> QLORA_CUDA_*; -1 with a pending TypeError otherwise
int dtype_arg(const Napi::CallbackInfo& info, size_t i) {
    if (info[i].IsString()) {
        std::string s = info[i].As<Napi::String>().Utf8Value();
        if (s == "f32") return QLORA_CUDA_F32;
        if (s == "bf16") return QLORA_CUDA_BF16;
        if (s == "f16") return QLORA_CUDA_F16;
    }
    Napi::TypeError::New(info.Env(),
                         "argument " + std::to_string(i) + ": expected a dtype \"f32\", \"bf16\" or \"f16\"")
        .ThrowAsJavaScriptException();
    return -1;
}

void gemm_throw(Napi::Env env, int status) {
    const char* msg = qlora_cuda_gemm_last_error();
    std::string text = std::string("gemm: ") + (msg && *msg ? msg : "failed (status " + std::to_string(status) + ")");
    if (status == QLORA_GEMM_ERR_ARG)
        Napi::RangeError::New(env, text).ThrowAsJavaScriptException();
    else
        Napi::Error::New(env, text).ThrowAsJavaScriptException();
}

// gemm(transA, transB, M, N, K, alpha, A, lda, dtypeA, B, ldb, dtypeB, beta, C, ldc, dtypeC)
// row-major C[M,N] = alpha * op(A) @ op(B) + beta * C
Napi::Value Gemm(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 16) {
        Napi::TypeError::New(env, "gemm: expected 16 arguments").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const bool ta = bool_arg(info, 0), tb = bool_arg(info, 1);
    const int64_t M = int_arg(info, 2), N = int_arg(info, 3), K = int_arg(info, 4);
    const double alpha = num_arg(info, 5);
    const void* A = device_ptr_arg(info, 6, true);
    const int64_t lda = int_arg(info, 7);
    const int dA = dtype_arg(info, 8);
    const void* B = device_ptr_arg(info, 9, true);
    const int64_t ldb = int_arg(info, 10);
    const int dB = dtype_arg(info, 11);
    const double beta = num_arg(info, 12);
    void* C = device_ptr_arg(info, 13);
    const int64_t ldc = int_arg(info, 14);
    const int dC = dtype_arg(info, 15);
    QLORA_CHECK_ARGS(env);
    int st = qlora_cuda_gemm(ta, tb, M, N, K, (float)alpha, A, lda, dA, B, ldb, dB, (float)beta, C, ldc, dC,
                             qlora_cuda::stream());
    if (st != QLORA_GEMM_OK) gemm_throw(env, st);
    return env.Undefined();
}

// gemmStridedBatched(transA, transB, M, N, K, alpha, A, lda, strideA, dtypeA, B, ldb, strideB, dtypeB,
//                    beta, C, ldc, strideC, dtypeC, batch); strides in elements
Napi::Value GemmStridedBatched(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 20) {
        Napi::TypeError::New(env, "gemmStridedBatched: expected 20 arguments").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const bool ta = bool_arg(info, 0), tb = bool_arg(info, 1);
    const int64_t M = int_arg(info, 2), N = int_arg(info, 3), K = int_arg(info, 4);
    const double alpha = num_arg(info, 5);
    const void* A = device_ptr_arg(info, 6, true);
    const int64_t lda = int_arg(info, 7), strideA = int_arg(info, 8);
    const int dA = dtype_arg(info, 9);
    const void* B = device_ptr_arg(info, 10, true);
    const int64_t ldb = int_arg(info, 11), strideB = int_arg(info, 12);
    const int dB = dtype_arg(info, 13);
    const double beta = num_arg(info, 14);
    void* C = device_ptr_arg(info, 15);
    const int64_t ldc = int_arg(info, 16), strideC = int_arg(info, 17);
    const int dC = dtype_arg(info, 18);
    const int64_t batch = int_arg(info, 19);
    QLORA_CHECK_ARGS(env);
    int st = qlora_cuda_gemm_strided_batched(ta, tb, M, N, K, (float)alpha, A, lda, strideA, dA, B, ldb, strideB, dB,
                                             (float)beta, C, ldc, strideC, dC, batch, qlora_cuda::stream());
    if (st != QLORA_GEMM_OK) gemm_throw(env, st);
    return env.Undefined();
}

// dequantize4bit(out, outDtype, packed, absmax|0, absmaxQ|0, nestedAbsmax|0, nestedCode|0, offset, code,
//                blocksize, nestedBlocksize, n)
Napi::Value Dequantize4bit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 12) {
        Napi::TypeError::New(env, "dequantize4bit: expected 12 arguments").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    void* out = device_ptr_arg(info, 0);
    const int outDtype = dtype_arg(info, 1);
    const uint8_t* packed = (const uint8_t*)device_ptr_arg(info, 2);
    const float* absmax = (const float*)device_ptr_arg(info, 3, true);
    const uint8_t* absmaxQ = (const uint8_t*)device_ptr_arg(info, 4, true);
    const float* nestedAbsmax = (const float*)device_ptr_arg(info, 5, true);
    const float* nestedCode = (const float*)device_ptr_arg(info, 6, true);
    const double offset = num_arg(info, 7);
    const float* code = (const float*)device_ptr_arg(info, 8);
    const int64_t blocksize = int_arg(info, 9), nestedBlocksize = int_arg(info, 10), n = int_arg(info, 11);
    QLORA_CHECK_ARGS(env);
    if (n < 0 || blocksize < 1 || (absmaxQ && (!nestedAbsmax || !nestedCode || nestedBlocksize < 1)) ||
        (!absmaxQ && !absmax)) {
        Napi::RangeError::New(env,
                              "dequantize4bit: needs n >= 0, blocksize >= 1 and either absmax, or absmaxQ with "
                              "nestedAbsmax, nestedCode and nestedBlocksize >= 1")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cuda_throw(env,
               qlora_cuda_dequantize_4bit(out, outDtype, packed, absmax, absmaxQ, nestedAbsmax, nestedCode,
                                          (float)offset, code, blocksize, nestedBlocksize, n, qlora_cuda::stream()),
               "dequantize4bit");
    return env.Undefined();
}

// quantize4bitBf16(packed, absmax, inp, quantType, blocksize, n): packed[ceil(n/2)] (u8), absmax[ceil(n/blocksize)]
// (f32) <- inp[n] (bf16), quantType 0 (NF4) or 1 (FP4)
Napi::Value Quantize4bitBf16(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto* packed = (uint8_t*)device_ptr_arg(info, 0);
    auto* absmax = (float*)device_ptr_arg(info, 1);
    const auto* inp = (const uint16_t*)device_ptr_arg(info, 2);
    const int64_t quantType = int_arg(info, 3), blocksize = int_arg(info, 4), n = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    if (n < 0 || blocksize < 2 || blocksize % 2 != 0 || (quantType != 0 && quantType != 1)) {
        Napi::RangeError::New(env,
                              "quantize4bitBf16: needs n >= 0, an even blocksize >= 2 and quantType 0 (nf4) or 1 (fp4)")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cuda_throw(env,
               qlora_cuda_quantize_4bit_bf16(packed, absmax, inp, (int)quantType, blocksize, n, qlora_cuda::stream()),
               "quantize4bitBf16");
    return env.Undefined();
}

// why gemv4bit / gemv4bitGroup refuses a part ("" when it takes it); `what` starts the message
std::string gemv_part_problem(const std::string& what, const QloraGemv4bitPart& p, int xDtype, int64_t M, int64_t K) {
    if (M < 1 || M > QLORA_GEMV_4BIT_MAX_M || p.N < 0 || K < 0 ||
        (p.y_dtype != QLORA_CUDA_F32 && p.y_dtype != xDtype) || (p.absmax_q && (!p.nested_absmax || !p.nested_code)) ||
        (!p.absmax_q && !p.absmax))
        return what + "needs 1 <= M <= " + std::to_string(QLORA_GEMV_4BIT_MAX_M) +
               ", y in f32 or x's dtype, and either absmax or absmaxQ with nestedAbsmax and nestedCode";
    if (p.lora_r < 0 || p.lora_r > QLORA_GEMV_4BIT_MAX_LORA_R)
        return what + "loraR = " + std::to_string(p.lora_r) + " is outside 0.." +
               std::to_string(QLORA_GEMV_4BIT_MAX_LORA_R) +
               ", the ranks the fused LoRA term takes: add the LoRA branch with gemm instead";
    if (p.lora_r > 0 && (!p.lora_xa || !p.lora_b))
        return what + "loraR > 0 needs the device buffers loraXa [M, r] and loraB [N, r]";
    return "";
}

// gemv4bit(y, yDtype, x, xDtype, packed, absmax|0, absmaxQ|0, nestedAbsmax|0, nestedCode|0, offset, code,
//          blocksize, nestedBlocksize, M, N, K[, loraXa, loraB, loraR, loraScale]):
// y[M, N] = x[M, K] @ W^T (+ loraScale * loraXa[M, r] @ loraB[N, r]^T, rounded once) for M <= 8, W[N, K] 4-bit.
// The LoRA arguments are optional: loraR absent, undefined or 0 means no LoRA term.
Napi::Value Gemv4bit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 16) {
        Napi::TypeError::New(env, "gemv4bit: expected 16 arguments (20 with the LoRA term)")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    QloraGemv4bitPart p = {};
    p.y = device_ptr_arg(info, 0);
    p.y_dtype = dtype_arg(info, 1);
    const void* x = device_ptr_arg(info, 2);
    const int xDtype = dtype_arg(info, 3);
    p.packed = (const uint8_t*)device_ptr_arg(info, 4);
    p.absmax = (const float*)device_ptr_arg(info, 5, true);
    p.absmax_q = (const uint8_t*)device_ptr_arg(info, 6, true);
    p.nested_absmax = (const float*)device_ptr_arg(info, 7, true);
    p.nested_code = (const float*)device_ptr_arg(info, 8, true);
    p.offset = (float)num_arg(info, 9);
    p.code = (const float*)device_ptr_arg(info, 10);
    p.blocksize = int_arg(info, 11);
    p.nested_blocksize = int_arg(info, 12);
    const int64_t M = int_arg(info, 13), K = int_arg(info, 15);
    p.N = int_arg(info, 14);
    // the LoRA term's arguments are optional (absent, undefined or null: none)
    p.lora_r = info.Length() > 18 && !info[18].IsUndefined() && !info[18].IsNull() ? int_arg(info, 18) : 0;
    p.lora_xa = p.lora_r != 0 && info.Length() > 16 ? device_ptr_arg(info, 16, true) : nullptr;
    p.lora_b = p.lora_r != 0 && info.Length() > 17 ? device_ptr_arg(info, 17, true) : nullptr;
    const bool hasScale = info.Length() > 19 && !info[19].IsUndefined();
    p.lora_scale = p.lora_r != 0 && hasScale ? (float)num_arg(info, 19) : 0.0f;
    QLORA_CHECK_ARGS(env);
    if (p.lora_r != 0 && !hasScale) {
        Napi::TypeError::New(env, "gemv4bit: loraR > 0 needs loraScale (argument 20)").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const std::string problem = gemv_part_problem("gemv4bit: ", p, xDtype, M, K);
    if (!problem.empty()) {
        Napi::RangeError::New(env, problem).ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cudaError_t err = qlora_cuda_gemv_4bit(p.y, p.y_dtype, x, xDtype, p.packed, p.absmax, p.absmax_q, p.nested_absmax,
                                           p.nested_code, p.offset, p.code, p.blocksize, p.nested_blocksize, M, p.N, K,
                                           p.lora_xa, p.lora_b, p.lora_r, p.lora_scale, qlora_cuda::stream());
    if (err == cudaErrorNotSupported) {
        Napi::RangeError::New(env,
                              "gemv4bit: unsupported layout (needs K % 8 == 0, power-of-two block sizes >= 8, "
                              "16-byte aligned x, 4-byte aligned packed): dequantize4bit + gemm instead")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cuda_throw(env, err, "gemv4bit");
    return env.Undefined();
}

// the fields of one part object of gemv4bitGroup; a bad field leaves a pending TypeError naming it
class PartFields {
  public:
    PartFields(Napi::Env env, Napi::Object part, uint32_t i)
        : env_(env), part_(part), where_("gemv4bitGroup: parts[" + std::to_string(i) + "].") {}

    bool present(const char* key) {
        if (env_.IsExceptionPending()) return false;
        const Napi::Value v = part_.Get(key);
        return !v.IsUndefined() && !v.IsNull();
    }
    double number(const char* key) {
        if (env_.IsExceptionPending()) return 0;
        const Napi::Value v = part_.Get(key);
        if (v.IsNumber()) return v.As<Napi::Number>().DoubleValue();
        fail(key, "expected a number");
        return 0;
    }
    int64_t integer(const char* key) {
        if (env_.IsExceptionPending()) return 0;
        const Napi::Value v = part_.Get(key);
        if (v.IsNumber()) return v.As<Napi::Number>().Int64Value();
        fail(key, "expected a number");
        return 0;
    }
    // a device address; with `nullable`, 0, null or absent mean none
    void* device_ptr(const char* key, bool nullable = false) {
        if (env_.IsExceptionPending()) return nullptr;
        const Napi::Value v = part_.Get(key);
        if (nullable && (v.IsUndefined() || v.IsNull())) return nullptr;
        const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (d == 0 && nullable) return nullptr;
        if (d <= 0) {
            fail(key, "expected a device buffer address");
            return nullptr;
        }
        return reinterpret_cast<void*>(static_cast<uintptr_t>(d));
    }
    int dtype(const char* key) {
        if (env_.IsExceptionPending()) return -1;
        const Napi::Value v = part_.Get(key);
        if (v.IsString()) {
            const std::string s = v.As<Napi::String>().Utf8Value();
            if (s == "f32") return QLORA_CUDA_F32;
            if (s == "bf16") return QLORA_CUDA_BF16;
            if (s == "f16") return QLORA_CUDA_F16;
        }
        fail(key, "expected a dtype \"f32\", \"bf16\" or \"f16\"");
        return -1;
    }
    // the message prefix naming the part
    std::string where() const { return where_.substr(0, where_.size() - 1) + ": "; }

  private:
    void fail(const char* key, const char* what) {
        Napi::TypeError::New(env_, where_ + key + ": " + what).ThrowAsJavaScriptException();
    }
    Napi::Env env_;
    Napi::Object part_;
    std::string where_;
};

// gemv4bitGroup(x, xDtype, M, K, parts): parts is an array of 1..4 objects {y, yDtype, packed, absmax, absmaxQ,
// nestedAbsmax, nestedCode, offset, code, blocksize, nestedBlocksize, N[, loraXa, loraB, loraR, loraScale, bias]},
// each gemv4bit's arguments of one weight (and its bias [N], added before the one rounding): every part's y in one
// launch of the tensor-core kernel, each bit for bit what gemv4bit gives for that part alone (without a bias). A
// RangeError for layouts that kernel does not take (then gemv4bit per part).
Napi::Value Gemv4bitGroup(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 5) {
        Napi::TypeError::New(env, "gemv4bitGroup: expected 5 arguments (x, xDtype, M, K, parts)")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const void* x = device_ptr_arg(info, 0);
    const int xDtype = dtype_arg(info, 1);
    const int64_t M = int_arg(info, 2), K = int_arg(info, 3);
    QLORA_CHECK_ARGS(env);
    if (!info[4].IsArray()) {
        Napi::TypeError::New(env, "gemv4bitGroup: argument 4: expected an array of parts").ThrowAsJavaScriptException();
        return env.Undefined();
    }
    const Napi::Array list = info[4].As<Napi::Array>();
    const uint32_t count = list.Length();
    if (count < 1 || count > QLORA_GEMV_4BIT_MAX_PARTS) {
        Napi::RangeError::New(env, "gemv4bitGroup: takes 1.." + std::to_string(QLORA_GEMV_4BIT_MAX_PARTS) +
                                       " parts, got " + std::to_string(count))
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    QloraGemv4bitPart parts[QLORA_GEMV_4BIT_MAX_PARTS] = {};
    for (uint32_t i = 0; i < count; i++) {
        const Napi::Value v = list.Get(i);
        if (!v.IsObject()) {
            Napi::TypeError::New(env, "gemv4bitGroup: parts[" + std::to_string(i) + "]: expected an object")
                .ThrowAsJavaScriptException();
            return env.Undefined();
        }
        PartFields f(env, v.As<Napi::Object>(), i);
        QloraGemv4bitPart& p = parts[i];
        p.y = f.device_ptr("y");
        p.y_dtype = f.dtype("yDtype");
        p.packed = (const uint8_t*)f.device_ptr("packed");
        p.absmax = (const float*)f.device_ptr("absmax", true);
        p.absmax_q = (const uint8_t*)f.device_ptr("absmaxQ", true);
        p.nested_absmax = (const float*)f.device_ptr("nestedAbsmax", true);
        p.nested_code = (const float*)f.device_ptr("nestedCode", true);
        p.offset = (float)f.number("offset");
        p.code = (const float*)f.device_ptr("code");
        p.blocksize = f.integer("blocksize");
        p.nested_blocksize = f.integer("nestedBlocksize");
        p.N = f.integer("N");
        // the LoRA term is optional (loraR absent, null or 0: none)
        p.lora_r = f.present("loraR") ? f.integer("loraR") : 0;
        if (p.lora_r != 0) {
            p.lora_xa = f.device_ptr("loraXa", true);
            p.lora_b = f.device_ptr("loraB", true);
            if (!f.present("loraScale")) {
                QLORA_CHECK_ARGS(env);
                Napi::TypeError::New(env, f.where() + "loraR > 0 needs loraScale").ThrowAsJavaScriptException();
                return env.Undefined();
            }
            p.lora_scale = (float)f.number("loraScale");
        }
        // the bias is optional too (absent, null or 0: none): [N] in xDtype, added before the one rounding
        p.bias = f.present("bias") ? f.device_ptr("bias", true) : nullptr;
        QLORA_CHECK_ARGS(env);
        const std::string problem = gemv_part_problem(f.where(), p, xDtype, M, K);
        if (!problem.empty()) {
            Napi::RangeError::New(env, problem).ThrowAsJavaScriptException();
            return env.Undefined();
        }
    }
    const cudaError_t err = qlora_cuda_gemv_4bit_group(x, xDtype, M, K, parts, count, qlora_cuda::stream());
    if (err == cudaErrorNotSupported) {
        Napi::RangeError::New(env,
                              "gemv4bitGroup: unsupported layout (needs bf16 or f16 x, K % 32 == 0, power-of-two block "
                              "sizes >= 32, 16-byte aligned x and packed): call gemv4bit for each part instead")
            .ThrowAsJavaScriptException();
        return env.Undefined();
    }
    cuda_throw(env, err, "gemv4bitGroup");
    return env.Undefined();
}

// gemmInfo() -> {library, version, calls, heuristicRuns, cachedPlans, fallbackCalls}; throws when cuBLASLt
// cannot be loaded
Napi::Value GemmInfo(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const char* lib = nullptr;
    size_t version = 0;
    int st = qlora_cuda_gemm_library(&lib, &version);
    if (st != QLORA_GEMM_OK) {
        Napi::Error::New(env, qlora_cuda_gemm_last_error()).ThrowAsJavaScriptException();
        return env.Undefined();
    }
    QloraGemmStats s = qlora_cuda_gemm_stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("library", lib);
    o.Set("version", (double)version);
    o.Set("calls", (double)s.calls);
    o.Set("heuristicRuns", (double)s.heuristic_runs);
    o.Set("cachedPlans", (double)s.cached_plans);
    o.Set("fallbackCalls", (double)s.fallback_calls);
    return o;
}

Napi::Value GemmClearCache(const Napi::CallbackInfo& info) {
    qlora_cuda_gemm_clear_cache();
    return info.Env().Undefined();
}

}  // namespace

void register_cuda_gemm(Napi::Env env, Napi::Object exports) {
    exports.Set("gemm", Napi::Function::New(env, Gemm, "gemm"));
    exports.Set("gemmStridedBatched", Napi::Function::New(env, GemmStridedBatched, "gemmStridedBatched"));
    exports.Set("dequantize4bit", Napi::Function::New(env, Dequantize4bit, "dequantize4bit"));
    exports.Set("quantize4bitBf16", Napi::Function::New(env, Quantize4bitBf16, "quantize4bitBf16"));
    exports.Set("gemv4bit", Napi::Function::New(env, Gemv4bit, "gemv4bit"));
    exports.Set("gemv4bitGroup", Napi::Function::New(env, Gemv4bitGroup, "gemv4bitGroup"));
    exports.Set("gemmInfo", Napi::Function::New(env, GemmInfo, "gemmInfo"));
    exports.Set("gemmClearCache", Napi::Function::New(env, GemmClearCache, "gemmClearCache"));
}
