// gguf-quant-data.ts: deterministic f32 inputs for the GGUF quantizer tests. Only exact integer arithmetic and
// correctly rounded IEEE operations are used (no Math.log/cos), so the values are the same on every platform
// and the golden hashes of ggml's reference encoders computed from them stay valid.
import {Rng} from "../../src/backend/rng.js";

export const QUANT_ROW = 512; // two 256-value super-blocks
export const QUANT_ROWS = 24;

/** an approximately Gaussian value (Irwin-Hall of 4 uniforms, variance 1/3), exactly reproducible */
function gauss(rng: Rng): number {
    let s = 0;
    for (let i = 0; i < 4; i++) s += rng.nextU32() / 4294967296;
    return s - 2;
}

/**
 * QUANT_ROWS rows of QUANT_ROW values: Gaussian rows at several scales, heavy outliers, and super-blocks that are
 * all zero, all positive, all negative, tiny (below ggml's GROUP_MAX_EPS), constant, or zero in some sub-blocks.
 */
export function quantTestData(seed = 1234): Float32Array {
    const rng = new Rng(seed);
    const x = new Float32Array(QUANT_ROWS * QUANT_ROW);
    const scales = [1, 0.02, 37.5, 1e-3, 0.5, 3];
    for (let r = 0; r < QUANT_ROWS; r++) {
        const row = x.subarray(r * QUANT_ROW, (r + 1) * QUANT_ROW);
        const scale = scales[r % scales.length];
        for (let i = 0; i < QUANT_ROW; i++) {
            let v = gauss(rng) * scale;
            if (rng.nextU32() % 61 === 0) v *= 12; // outliers
            row[i] = v;
        }
        const half = row.subarray(256); // the second super-block of the row gets a special shape
        switch (r % 12) {
            case 0:
                half.fill(0);
                break;
            case 1:
                half.forEach((v, i) => {
                    half[i] = Math.abs(v) + 0.01;
                });
                break;
            case 2:
                half.forEach((v, i) => {
                    half[i] = -Math.abs(v) - 0.01;
                });
                break;
            case 3:
                half.forEach((v, i) => {
                    half[i] = v * 1e-18;
                });
                break;
            case 4:
                half.fill(0.75);
                break;
            case 5:
                for (let i = 0; i < 256; i += 64) half.fill(0, i, i + 32);
                break;
            case 6:
                half.fill(-2.5);
                break;
            case 7:
                for (let i = 0; i < 256; i += 16) half[i] = 100;
                break;
            case 8:
                half.forEach((v, i) => {
                    half[i] = Math.abs(v);
                });
                half[17] = 0;
                break;
            default:
                break;
        }
    }
    return x;
}
