// cpu.ts: the CPU backend as the model layer uses it: thin, allocation-aware wrappers over the addon's ops.
// Buffers are Float32Array with explicit sizes (as in llm.c); shapes are written in the comments.
import {loadNative} from "./native.js";
import {CHECK_DTYPE_CODE, loadCheckOps} from "./native-check-types.js";
import type {CpuAddon} from "./native-types.js";

export type {CpuAddon};

export function cpu(): CpuAddon {
    return loadNative();
}

/** a dense linear layer's parameters: weight [outFeatures, inFeatures] (PyTorch's layout), bias [outFeatures] */
export interface DenseWeight {
    outFeatures: number;
    inFeatures: number;
    weight: Float32Array;
    bias: Float32Array | null;
}

/** out[M, N] = x[M, K] @ W[N, K]^T (+ bias), or += when accumulate */
export function linearForward(out: Float32Array, x: Float32Array, M: number, w: DenseWeight, accumulate = false): void {
    const ops = cpu();
    const N = w.outFeatures,
        K = w.inFeatures;
    ops.sgemm(false, true, M, N, K, 1, x, K, w.weight, K, accumulate ? 1 : 0, out, N);
    if (w.bias) ops.addBias(out, out, w.bias, M, N);
}

/** dx[M, K] (= or += when accumulate) = dy[M, N] @ W[N, K] */
export function linearBackwardInput(dx: Float32Array, dy: Float32Array, M: number, w: DenseWeight, accumulate = false): void {
    cpu().sgemm(
        false,
        false,
        M,
        w.inFeatures,
        w.outFeatures,
        1,
        dy,
        w.outFeatures,
        w.weight,
        w.inFeatures,
        accumulate ? 1 : 0,
        dx,
        w.inFeatures
    );
}

/** Float32Array from 16-bit storage (bf16 or f16) through the native converter */
export function halfToF32(bits: Uint16Array, dtype: "BF16" | "F16"): Float32Array {
    const out = new Float32Array(bits.length);
    if (dtype === "BF16") cpu().bf16ToF32(out, bits, bits.length);
    else cpu().f16ToF32(out, bits, bits.length);
    return out;
}

export function f32ToHalf(values: Float32Array, dtype: "BF16" | "F16"): Uint16Array {
    const out = new Uint16Array(values.length);
    if (dtype === "BF16") cpu().f32ToBf16(out, values, values.length);
    else cpu().f32ToF16(out, values, values.length);
    return out;
}

export type FloatDtype = "F32" | "BF16" | "F16";

/** how many values are NaN and how many ±Inf: f32 values, or the bits of bf16/f16 values (native, threaded) */
export function countNonFinite(data: Float32Array | Uint16Array, dtype: FloatDtype = "F32"): {nan: number; inf: number} {
    if ((dtype === "F32") !== data instanceof Float32Array)
        throw new TypeError(
            `countNonFinite: ${dtype} data must be a ${dtype === "F32" ? "Float32Array" : "Uint16Array of bits"}`
        );
    return loadCheckOps().countNonfinite(data, CHECK_DTYPE_CODE[dtype], data.length);
}
