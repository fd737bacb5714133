// linear.ts: the projections of a decoder block as the model holds them on the host. A projection slot holds a
// LinearLayer: a frozen base (DenseLinear here, Linear4bit in src/quant), or LoRA's LoraLinear around one
// (src/lora). The graph runs every projection through lora/projection.ts over a backend; the bases are its
// FrozenWeight on the CPU. It lives in the lowest layer because the model above and lora/quant beside it use it.
import {linearBackwardInput, linearForward, type DenseWeight} from "./cpu.js";
import type {FrozenWeight} from "./backend.js";

/** a projection as the model holds it: its shape and bias (frozen unless a LoRA config trains biases) */
export interface LinearLayer {
    readonly inFeatures: number;
    readonly outFeatures: number;
    readonly bias: Float32Array | null;
}

/** a frozen host weight with its bias: what a LoRA branch wraps, and the CPU backend's FrozenWeight */
export interface BaseLinear extends LinearLayer, FrozenWeight<Float32Array> {
    /** out[M, outFeatures] = x[M, inFeatures] W^T + bias */
    forward(out: Float32Array, x: Float32Array, M: number): void;
}

/** a plain fp32 linear layer: y = x W^T + b */
export class DenseLinear implements BaseLinear {
    constructor(readonly dense: DenseWeight) {}
    get inFeatures(): number {
        return this.dense.inFeatures;
    }
    get outFeatures(): number {
        return this.dense.outFeatures;
    }
    get bias(): Float32Array | null {
        return this.dense.bias;
    }
    /** the fp32 weight [out, in] */
    weightF32(): Float32Array {
        return this.dense.weight;
    }
    weightInto(out: Float32Array): void {
        out.set(this.dense.weight);
    }
    forward(out: Float32Array, x: Float32Array, M: number): void {
        linearForward(out, x, M, this.dense);
    }
    product(y: Float32Array, x: Float32Array, M: number): void {
        linearForward(y, x, M, {...this.dense, bias: null});
    }
    productTranspose(dx: Float32Array, dy: Float32Array, M: number, accumulate: boolean): void {
        linearBackwardInput(dx, dy, M, this.dense, accumulate);
    }
}
