// linear4bit.ts: a frozen 4-bit linear layer (bnb's Linear4bit, SPEC-quant §8): the weight stays packed and is
// dequantized into a shared f32 scratch buffer for each GEMM, a tile of rows at a time, so a layer costs
// 0.5 bytes a weight at rest and the scratch never exceeds one tile whatever the layer size.
import {QloraError} from "../errors.js";
import {cpu, type DenseWeight} from "../backend/cpu.js";
import type {BaseLinear} from "../backend/linear.js";
import {dequantize4bit, dequantize4bitRowsInto, quantize4bit, type Quantize4bitOptions, type QuantState4bit} from "./nf4.js";

/** default scratch tile: 8 Mi floats (32 MiB); a 7B model's largest projection takes four tiles */
export const DEFAULT_TILE_ELEMENTS = 1 << 23;

// one scratch buffer per size, shared by every layer (ops are synchronous, so no two layers use it at once)
const scratchPool = new Map<number, Float32Array>();

function scratch(size: number): Float32Array {
    let buf = scratchPool.get(size);
    if (!buf) {
        buf = new Float32Array(size);
        scratchPool.set(size, buf);
    }
    return buf;
}

/** frees the shared dequantization buffers (they are re-created on the next forward) */
export function releaseLinear4bitScratch(): void {
    scratchPool.clear();
}

export interface Linear4bitOptions {
    /** at most this many weights are dequantized at once; default DEFAULT_TILE_ELEMENTS */
    tileElements?: number;
}

export class Linear4bit implements BaseLinear {
    readonly outFeatures: number;
    readonly inFeatures: number;
    /** rows of W dequantized per GEMM */
    private readonly tileRows: number;

    constructor(
        readonly state: QuantState4bit,
        readonly bias: Float32Array | null = null,
        options: Linear4bitOptions = {}
    ) {
        if (state.shape.length !== 2)
            throw new QloraError(`Linear4bit: the weight must be 2-D [out, in], got shape [${state.shape.join(", ")}]`);
        [this.outFeatures, this.inFeatures] = state.shape;
        if (bias && bias.length !== this.outFeatures)
            throw new QloraError(`Linear4bit: bias has ${bias.length} elements, the weight has ${this.outFeatures} rows`);
        const tile = options.tileElements ?? DEFAULT_TILE_ELEMENTS;
        this.tileRows = Math.max(1, Math.min(this.outFeatures, Math.floor(tile / Math.max(1, this.inFeatures))));
    }

    /** quantizes a dense f32 layer (weight [out, in]) */
    static fromDense(dense: DenseWeight, options: Quantize4bitOptions & Linear4bitOptions = {}): Linear4bit {
        return quantizeLinearWeight(dense.weight, dense.outFeatures, dense.inFeatures, dense.bias, options);
    }

    /** the dequantized weight [out, in], freshly allocated (as bnb's dequantize_4bit, rounded to the state's dtype) */
    dequantizeWeight(): Float32Array {
        return dequantize4bit(this.state);
    }

    /** out[M, out] = x[M, in] @ W^T + bias */
    forward(out: Float32Array, x: Float32Array, M: number): void {
        this.product(out, x, M);
        if (this.bias) cpu().addBias(out, out, this.bias, M, this.outFeatures);
    }

    /** y[M, out] = x[M, in] @ W^T, a tile of dequantized rows at a time */
    product(y: Float32Array, x: Float32Array, M: number): void {
        const ops = cpu();
        const N = this.outFeatures,
            K = this.inFeatures;
        const w = scratch(this.tileRows * K);
        for (let r0 = 0; r0 < N; r0 += this.tileRows) {
            const rows = Math.min(this.tileRows, N - r0);
            dequantize4bitRowsInto(w, this.state, r0, rows);
            // columns [r0, r0 + rows) of y, row stride N
            ops.sgemm(false, true, M, rows, K, 1, x, K, w, K, 0, r0 === 0 ? y : y.subarray(r0), N);
        }
    }

    /** out (=) the dequantized weight [out, in] */
    weightInto(out: Float32Array): void {
        dequantize4bitRowsInto(out, this.state, 0, this.outFeatures);
    }

    /** dx[M, in] (= or += when accumulate) = dy[M, out] @ W: the gradient through the frozen weight */
    productTranspose(dx: Float32Array, dy: Float32Array, M: number, accumulate: boolean): void {
        const ops = cpu();
        const N = this.outFeatures,
            K = this.inFeatures;
        const w = scratch(this.tileRows * K);
        for (let r0 = 0; r0 < N; r0 += this.tileRows) {
            const rows = Math.min(this.tileRows, N - r0);
            dequantize4bitRowsInto(w, this.state, r0, rows);
            const beta = r0 === 0 && !accumulate ? 0 : 1;
            ops.sgemm(false, false, M, K, rows, 1, r0 === 0 ? dy : dy.subarray(r0), N, w, K, beta, dx, K);
        }
    }
}

/** quantizes weight [out, in] (f32) into a Linear4bit; NF4, block 64, double quantization unless told otherwise */
export function quantizeLinearWeight(
    weight: Float32Array,
    outFeatures: number,
    inFeatures: number,
    bias: Float32Array | null = null,
    options: Quantize4bitOptions & Linear4bitOptions = {}
): Linear4bit {
    if (weight.length !== outFeatures * inFeatures)
        throw new QloraError(
            `quantizeLinearWeight: weight has ${weight.length} elements, ` +
                `[${outFeatures}, ${inFeatures}] needs ${outFeatures * inFeatures}`
        );
    const state = quantize4bit(weight, {...options, shape: [outFeatures, inFeatures]});
    return new Linear4bit(state, bias, options);
}
