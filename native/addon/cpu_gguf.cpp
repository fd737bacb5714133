// cpu_gguf.cpp: bindings of the GGUF block encodings (native/include/qlora_gguf.h).
// Mirrored by hand in src/backend/native-gguf-types.ts.
#include "../include/qlora_gguf.h"
#include "cpu_bindings.h"
#include "napi_util.h"

using namespace qlora_napi;

// checks the type and row length, and returns the bytes of one row (or -1 with a pending exception)
static int64_t row_bytes_arg(Napi::Env env, int64_t type, int64_t nrows, int64_t n_per_row) {
    int64_t rb = qlora_gguf_row_bytes((int)type, n_per_row);
    if (rb < 0 || nrows < 0) {
        Napi::RangeError::New(env, "gguf: unsupported ggml type " + std::to_string(type) + " or a row length (" +
                                       std::to_string(n_per_row) + ") that is not a multiple of its block size")
            .ThrowAsJavaScriptException();
        return -1;
    }
    return rb;
}

// ggufRowBytes(type, nPerRow) -> bytes of one row, or -1
static Napi::Value GgufRowBytes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t type = int_arg(info, 0), n = int_arg(info, 1);
    QLORA_CHECK_ARGS(env);
    return Napi::Number::New(env, (double)qlora_gguf_row_bytes((int)type, n));
}

// ggufQuantize(out, x, type, nrows, nPerRow)
static Napi::Value GgufQuantize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t type = int_arg(info, 2), nrows = int_arg(info, 3), n = int_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    int64_t rb = row_bytes_arg(env, type, nrows, n);
    QLORA_CHECK_ARGS(env);
    uint8_t* out = array_arg<uint8_t>(info, 0, nrows * rb);
    const float* x = array_arg<float>(info, 1, nrows * n);
    QLORA_CHECK_ARGS(env);
    qlora_gguf_quantize((int)type, out, x, nrows, n);
    return env.Undefined();
}

// ggufDequantize(out, in, type, nrows, nPerRow)
static Napi::Value GgufDequantize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int64_t type = int_arg(info, 2), nrows = int_arg(info, 3), n = int_arg(info, 4);
    QLORA_CHECK_ARGS(env);
    int64_t rb = row_bytes_arg(env, type, nrows, n);
    QLORA_CHECK_ARGS(env);
    float* out = array_arg<float>(info, 0, nrows * n);
    const uint8_t* in = array_arg<uint8_t>(info, 1, nrows * rb);
    QLORA_CHECK_ARGS(env);
    qlora_gguf_dequantize((int)type, out, in, nrows, n);
    return env.Undefined();
}

void register_gguf_ops(Napi::Env env, Napi::Object exports) {
    auto add = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
        exports.Set(name, Napi::Function::New(env, f, name));
    };
    add("ggufRowBytes", GgufRowBytes);
    add("ggufQuantize", GgufQuantize);
    add("ggufDequantize", GgufDequantize);
}
