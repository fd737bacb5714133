// native-quant-types.ts: a hand-written mirror of the quantization ops that native/addon/cpu_quant.cpp binds
// into the CPU addon (C declarations: native/include/qlora_quant.h). Outputs first, sizes last.
import {loadNative} from "./native.js";

/** quantType argument of the 4-bit ops */
export const QUANT_TYPE_CODE = {nf4: 0, fp4: 1} as const;
/** roundDtype argument of the dequantize ops: the dtype the f32 result is rounded to */
export const ROUND_DTYPE_CODE = {float32: 0, bfloat16: 1, float16: 2} as const;

export interface QuantAddon {
    /** packed[ceil(n/2)], absmax[ceil(n/blocksize)] <- inp[n] (f32); two codes a byte, first in the high nibble */
    quantize4bitF32(
        packed: Uint8Array,
        absmax: Float32Array,
        inp: Float32Array,
        quantType: number,
        blocksize: number,
        n: number
    ): void;
    /** the same from bf16 bits */
    quantize4bitBf16(
        packed: Uint8Array,
        absmax: Float32Array,
        inp: Uint16Array,
        quantType: number,
        blocksize: number,
        n: number
    ): void;
    /** out[n] = code[nibble] * absmax[i / blocksize], rounded to roundDtype */
    dequantize4bit(
        out: Float32Array,
        packed: Uint8Array,
        absmax: Float32Array,
        code: Float32Array,
        blocksize: number,
        roundDtype: number,
        n: number
    ): void;
    /** q[n], absmax[ceil(n/blocksize)] <- inp[n] against a sorted 256-entry map (bnb's dQuantize) */
    quantizeBlockwise8bit(
        q: Uint8Array,
        absmax: Float32Array,
        inp: Float32Array,
        code: Float32Array,
        blocksize: number,
        n: number
    ): void;
    /** out[n] = code[q] * absmax[i / blocksize] (+ offset, a separate f32 add) */
    dequantizeBlockwise8bit(
        out: Float32Array,
        q: Uint8Array,
        absmax: Float32Array,
        code: Float32Array,
        offset: number,
        blocksize: number,
        n: number
    ): void;
    /**
     * rows [rowBegin, rowBegin + rows) of W[*, cols] into out[rows, cols]. With absmaxQ the scales are double
     * quantized (nestedAbsmax per nestedBlocksize scales, nestedCode the 8-bit map, offset added); with
     * absmaxQ null, nestedAbsmax is the plain f32 absmax and nestedCode is ignored.
     */
    dequantize4bitRows(
        out: Float32Array,
        packed: Uint8Array,
        absmaxQ: Uint8Array | null,
        nestedAbsmax: Float32Array,
        nestedCode: Float32Array | null,
        offset: number,
        code: Float32Array,
        blocksize: number,
        nestedBlocksize: number,
        roundDtype: number,
        rowBegin: number,
        rows: number,
        cols: number
    ): void;
}

/** the CPU addon seen through its quantization ops */
export function loadQuantOps(): QuantAddon {
    return loadNative() as unknown as QuantAddon;
}
