// native-check-types.ts: a hand-written mirror of the weight checks that native/addon/cpu_check.cpp binds into
// the CPU addon (C declaration: qlora_cpu_count_nonfinite in native/include/qlora_ops.h). Outputs first, sizes last.
import {QloraError} from "../errors.js";
import {loadNative} from "./native.js";

/** dtype argument of countNonfinite */
export const CHECK_DTYPE_CODE = {F32: 0, BF16: 1, F16: 2} as const;

export interface CheckAddon {
    /** how many of the first n values are NaN and how many are ±Inf (data: f32 values, or bf16/f16 bits) */
    countNonfinite(data: Float32Array | Uint16Array, dtype: number, n: number): {nan: number; inf: number};
}

/** the CPU addon seen through its checks */
export function loadCheckOps(): CheckAddon {
    const addon = loadNative() as unknown as Partial<CheckAddon>;
    if (typeof addon.countNonfinite !== "function")
        throw new QloraError("the native addon predates the weight checks (no countNonfinite); rebuild it: npm run build:native");
    return addon as CheckAddon;
}
