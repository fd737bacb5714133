// linear.ts: the linear layers a decoder block is made of. The model calls only this interface, so LoRA
// (src/lora) and quantized bases (src/quant) slot in by wrapping or replacing a layer.
import {linearForward, type DenseWeight} from "../backend/cpu.js";

export interface LinearLayer {
    readonly inFeatures: number;
    readonly outFeatures: number;
    /** out[M, outFeatures] = layer(x[M, inFeatures]) */
    forward(out: Float32Array, x: Float32Array, M: number): void;
}

/** a plain fp32 linear layer: y = x W^T + b */
export class DenseLinear implements LinearLayer {
    constructor(readonly dense: DenseWeight) {}
    get inFeatures(): number {
        return this.dense.inFeatures;
    }
    get outFeatures(): number {
        return this.dense.outFeatures;
    }
    forward(out: Float32Array, x: Float32Array, M: number): void {
        linearForward(out, x, M, this.dense);
    }
}
