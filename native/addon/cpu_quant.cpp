// cpu_quant.cpp: bindings of the NF4/FP4 and 8-bit blockwise quantization ops (native/include/qlora_quant.h).
// Mirrored by hand in src/backend/native-quant-types.ts.
#include "../include/qlora_quant.h"
#include "cpu_bindings.h"
#include "napi_util.h"

using namespace qlora_napi;

static bool check(Napi::Env env, bool ok, const char* message) {
    if (!ok) Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
    return ok;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// quantize4bitF32 / quantize4bitBf16(packed, absmax, inp, quantType, blocksize, n)
template <typename T, void (*FN)(uint8_t*, float*, const T*, int, int64_t, int64_t)>
static Napi::Value Quantize4bit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t qt = int_arg(info, 3), bs = int_arg(info, 4), n = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    if (!check(env, qt == QLORA_QUANT_NF4 || qt == QLORA_QUANT_FP4,
               "quantize4bit: quantType must be 0 (nf4) or 1 (fp4)") ||
        !check(env, bs >= 2 && bs % 2 == 0, "quantize4bit: blocksize must be a positive even number") ||
        !check(env, n >= 0, "quantize4bit: n must be >= 0"))
        return env.Undefined();
    uint8_t* packed = array_arg<uint8_t>(info, 0, ceil_div(n, 2));
    float* absmax = array_arg<float>(info, 1, ceil_div(n, bs));
    const T* inp = array_arg<T>(info, 2, n);
    QLORA_CHECK_ARGS(env);
    FN(packed, absmax, inp, (int)qt, bs, n);
    return env.Undefined();
}

static bool round_dtype_ok(Napi::Env env, int64_t rd) {
    return check(env, rd == QLORA_ROUND_F32 || rd == QLORA_ROUND_BF16 || rd == QLORA_ROUND_F16,
                 "dequantize: roundDtype must be 0 (f32), 1 (bf16) or 2 (f16)");
}

// dequantize4bit(out, packed, absmax, code, blocksize, roundDtype, n)
static Napi::Value Dequantize4bit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t bs = int_arg(info, 4), rd = int_arg(info, 5), n = int_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    if (!check(env, bs >= 2 && bs % 2 == 0, "dequantize4bit: blocksize must be a positive even number") ||
        !check(env, n >= 0, "dequantize4bit: n must be >= 0") || !round_dtype_ok(env, rd))
        return env.Undefined();
    float* out = array_arg<float>(info, 0, n);
    const uint8_t* packed = array_arg<uint8_t>(info, 1, ceil_div(n, 2));
    const float* absmax = array_arg<float>(info, 2, ceil_div(n, bs));
    const float* code = array_arg<float>(info, 3, 16);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_dequantize_4bit(out, packed, absmax, code, bs, (int)rd, n);
    return env.Undefined();
}

// quantizeBlockwise8bit(q, absmax, inp, code, blocksize, n)
static Napi::Value QuantizeBlockwise8bit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t bs = int_arg(info, 4), n = int_arg(info, 5);
    QLORA_CHECK_ARGS(env);
    if (!check(env, bs >= 1, "quantizeBlockwise8bit: blocksize must be positive") ||
        !check(env, n >= 0, "quantizeBlockwise8bit: n must be >= 0"))
        return env.Undefined();
    uint8_t* q = array_arg<uint8_t>(info, 0, n);
    float* absmax = array_arg<float>(info, 1, ceil_div(n, bs));
    const float* inp = array_arg<float>(info, 2, n);
    const float* code = array_arg<float>(info, 3, 256);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_quantize_blockwise_8bit(q, absmax, inp, code, bs, n);
    return env.Undefined();
}

// dequantizeBlockwise8bit(out, q, absmax, code, offset, blocksize, n)
static Napi::Value DequantizeBlockwise8bit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float offset = (float)num_arg(info, 4);
    int64_t bs = int_arg(info, 5), n = int_arg(info, 6);
    QLORA_CHECK_ARGS(env);
    if (!check(env, bs >= 1, "dequantizeBlockwise8bit: blocksize must be positive") ||
        !check(env, n >= 0, "dequantizeBlockwise8bit: n must be >= 0"))
        return env.Undefined();
    float* out = array_arg<float>(info, 0, n);
    const uint8_t* q = array_arg<uint8_t>(info, 1, n);
    const float* absmax = array_arg<float>(info, 2, ceil_div(n, bs));
    const float* code = array_arg<float>(info, 3, 256);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_dequantize_blockwise_8bit(out, q, absmax, code, offset, bs, n);
    return env.Undefined();
}

// dequantize4bitRows(out, packed, absmaxQ|null, nestedAbsmax, nestedCode|null, offset, code, blocksize,
//                    nestedBlocksize, roundDtype, rowBegin, rows, cols)
static Napi::Value Dequantize4bitRows(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    float offset = (float)num_arg(info, 5);
    int64_t bs = int_arg(info, 7), nbs = int_arg(info, 8), rd = int_arg(info, 9);
    int64_t row0 = int_arg(info, 10), rows = int_arg(info, 11), cols = int_arg(info, 12);
    QLORA_CHECK_ARGS(env);
    if (!check(env, bs >= 2 && bs % 2 == 0, "dequantize4bitRows: blocksize must be a positive even number") ||
        !check(env, nbs >= 1, "dequantize4bitRows: nestedBlocksize must be positive") ||
        !check(env, row0 >= 0 && rows >= 0 && cols >= 0, "dequantize4bitRows: negative size") ||
        !round_dtype_ok(env, rd))
        return env.Undefined();
    const int64_t end = (row0 + rows) * cols;
    const int64_t nblocks = ceil_div(end, bs);  // blocks the rows touch, counted from the start
    const bool nested = !(info[2].IsNull() || info[2].IsUndefined());
    float* out = array_arg<float>(info, 0, rows * cols);
    const uint8_t* packed = array_arg<uint8_t>(info, 1, ceil_div(end, 2));
    const uint8_t* absmax_q = array_arg<uint8_t>(info, 2, nblocks, true);
    const float* nested_absmax = array_arg<float>(info, 3, nested ? ceil_div(nblocks, nbs) : nblocks);
    const float* nested_code = array_arg<float>(info, 4, nested ? 256 : 0, !nested);
    const float* code = array_arg<float>(info, 6, 16);
    QLORA_CHECK_ARGS(env);
    qlora_cpu_dequantize_4bit_rows(out, packed, absmax_q, nested_absmax, nested_code, offset, code, bs, nbs, (int)rd,
                                   row0, rows, cols);
    return env.Undefined();
}

void register_quant_ops(Napi::Env env, Napi::Object exports) {
    auto add = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
        exports.Set(name, Napi::Function::New(env, f, name));
    };
    add("quantize4bitF32", Quantize4bit<float, qlora_cpu_quantize_4bit_f32>);
    add("quantize4bitBf16", Quantize4bit<uint16_t, qlora_cpu_quantize_4bit_bf16>);
    add("dequantize4bit", Dequantize4bit);
    add("quantizeBlockwise8bit", QuantizeBlockwise8bit);
    add("dequantizeBlockwise8bit", DequantizeBlockwise8bit);
    add("dequantize4bitRows", Dequantize4bitRows);
}
