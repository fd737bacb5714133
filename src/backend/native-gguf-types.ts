// native-gguf-types.ts: a hand-written mirror of the GGUF block-encoding ops that native/addon/cpu_gguf.cpp binds
// into the CPU addon (C declarations: native/include/qlora_gguf.h). Outputs first, sizes last.
import {loadNative} from "./native.js";

export interface GgufAddon {
    /** bytes of one row of nPerRow values of a ggml type, or -1 (type not supported, or not a whole number of blocks) */
    ggufRowBytes(type: number, nPerRow: number): number;
    /** out[nrows * rowBytes] <- x[nrows, nPerRow]: ggml's reference encoders (quantize_row_*_ref), byte for byte */
    ggufQuantize(out: Uint8Array, x: Float32Array, type: number, nrows: number, nPerRow: number): void;
    /** out[nrows, nPerRow] <- inp[nrows * rowBytes]: ggml's dequantize_row_* */
    ggufDequantize(out: Float32Array, inp: Uint8Array, type: number, nrows: number, nPerRow: number): void;
}

/** the CPU addon seen through its GGUF ops */
export function loadGgufOps(): GgufAddon {
    return loadNative() as unknown as GgufAddon;
}
