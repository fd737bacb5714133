// napi_util.h: argument checking shared by the addons. Every buffer argument is a typed array of the exact
// element type, checked against the number of elements the op will touch, so a bug in the TypeScript layer
// raises a JS exception instead of corrupting memory.
#pragma once
#include <napi.h>
#include <stdint.h>
#include <string>
#include "../include/qlora_act.h"

namespace qlora_napi {

template <typename T>
struct TypedArrayKind;
template <>
struct TypedArrayKind<float> {
    static constexpr napi_typedarray_type type = napi_float32_array;
    static constexpr const char* name = "Float32Array";
};
template <>
struct TypedArrayKind<int32_t> {
    static constexpr napi_typedarray_type type = napi_int32_array;
    static constexpr const char* name = "Int32Array";
};
template <>
struct TypedArrayKind<uint8_t> {
    static constexpr napi_typedarray_type type = napi_uint8_array;
    static constexpr const char* name = "Uint8Array";
};
template <>
struct TypedArrayKind<uint16_t> {
    static constexpr napi_typedarray_type type = napi_uint16_array;
    static constexpr const char* name = "Uint16Array";
};

// throws (returns nullptr with a pending exception) unless info[i] is a T typed array of >= need elements;
// `nullable` accepts null/undefined as nullptr
template <typename T>
inline T* array_arg(const Napi::CallbackInfo& info, size_t i, int64_t need, bool nullable = false) {
    Napi::Env env = info.Env();
    Napi::Value v = info[i];
    if (nullable && (v.IsNull() || v.IsUndefined())) return nullptr;
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != TypedArrayKind<T>::type) {
        Napi::TypeError::New(env, "argument " + std::to_string(i) + ": expected a " + TypedArrayKind<T>::name)
            .ThrowAsJavaScriptException();
        return nullptr;
    }
    auto arr = v.As<Napi::TypedArrayOf<T>>();
    if ((int64_t)arr.ElementLength() < need) {
        Napi::RangeError::New(env, "argument " + std::to_string(i) + ": " + TypedArrayKind<T>::name + " has " +
                                       std::to_string(arr.ElementLength()) + " elements, the op needs " +
                                       std::to_string(need))
            .ThrowAsJavaScriptException();
        return nullptr;
    }
    return arr.Data();
}

inline int64_t int_arg(const Napi::CallbackInfo& info, size_t i) {
    if (!info[i].IsNumber()) {
        Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + ": expected a number")
            .ThrowAsJavaScriptException();
        return 0;
    }
    return info[i].As<Napi::Number>().Int64Value();
}

inline double num_arg(const Napi::CallbackInfo& info, size_t i) {
    if (!info[i].IsNumber()) {
        Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + ": expected a number")
            .ThrowAsJavaScriptException();
        return 0;
    }
    return info[i].As<Napi::Number>().DoubleValue();
}

inline bool bool_arg(const Napi::CallbackInfo& info, size_t i) { return info[i].ToBoolean().Value(); }

// the gated MLP's activation named by info[i] (src/backend/backend.ts's GatedAct) as its qlora_gated_act
// (native/include/qlora_act.h); throws unless it is "silu" or "gelu_tanh"
inline int gated_act_arg(const Napi::CallbackInfo& info, size_t i) {
    if (info[i].IsString()) {
        const std::string name = info[i].As<Napi::String>().Utf8Value();
        if (name == "silu") return QLORA_ACT_SILU;
        if (name == "gelu_tanh") return QLORA_ACT_GELU_TANH;
    }
    Napi::TypeError::New(info.Env(),
                         "argument " + std::to_string(i) + ": expected the activation \"silu\" or \"gelu_tanh\"")
        .ThrowAsJavaScriptException();
    return QLORA_ACT_SILU;
}

}  // namespace qlora_napi

// return early when an argument check left a pending exception
#define QLORA_CHECK_ARGS(env) \
    if ((env).IsExceptionPending()) return (env).Undefined()
