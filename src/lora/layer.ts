// layer.ts: PEFT's LoRA layer as the host holds it (LoraLinear: the trainable tensors around a frozen base), and
// the weight arithmetic written once for merge, GGUF export and DoRA's initial magnitude:
//
//   W' = W + s B A          A [r, in], B [out, r], s = alpha / r (or alpha / sqrt(r))
//   DoRA: W' = (m / ||W + s B A||_row) (W + s B A)
//
// The forward and backward of the layer, on either device, are projection.ts's.
import {cpu} from "../backend/cpu.js";
import {cpuBackend} from "../backend/cpu-backend.js";
import type {DropoutClock} from "../backend/dropout.js";
import type {BaseLinear, LinearLayer} from "../backend/linear.js";

export interface TrainableTensor {
    /** the name PEFT saves it under, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight */
    name: string;
    param: Float32Array;
    grad: Float32Array;
    shape: number[];
    /** AdamW weight decay applies (not to biases) */
    decay: boolean;
    /** keep 32-bit optimizer state under 8-bit optimizers (transformers does so for embeddings) */
    fp32State?: boolean;
}

export interface LoraWeights {
    r: number;
    scaling: number;
    dropout: number;
    A: Float32Array; // [r, in]
    B: Float32Array; // [out, r]
    /** DoRA's magnitude vector [out], or null for plain LoRA */
    magnitude: Float32Array | null;
}

/** the frozen weight [out, in] in f32 (4-bit weights dequantized as the forward sees them) */
export function baseWeightF32(base: BaseLinear): Float32Array {
    const W = new Float32Array(base.outFeatures * base.inFeatures);
    base.weightInto(W);
    return W;
}

/**
 * W[out, in] += scaling · B A, in place: the weight a LoRA branch adds, on the host (merge, GGUF export and DoRA's
 * initial magnitude call it; projection.ts's DoRA norm is the same GEMM over the backend).
 */
export function addDeltaWeight(
    W: Float32Array,
    lora: Pick<LoraWeights, "A" | "B" | "r" | "scaling">,
    outF: number,
    inF: number
): Float32Array {
    cpu().sgemm(false, false, outF, inF, lora.r, lora.scaling, lora.B, lora.r, lora.A, inF, 1, W, inF);
    return W;
}

/** the L2 norm of each row of W[out, in] (f64 sums, rounded to f32 as PEFT's fp32 weight_norm is) */
function rowNorms(W: Float32Array, outF: number, inF: number): Float32Array {
    const norms = new Float32Array(outF);
    cpuBackend().rowNorms(norms, W, outF, inF);
    return norms;
}

/** ||W + s B A|| per output row */
export function doraRowNorms(
    W: Float32Array,
    lora: Pick<LoraWeights, "A" | "B" | "r" | "scaling">,
    outF: number,
    inF: number
): Float32Array {
    return rowNorms(addDeltaWeight(Float32Array.from(W), lora, outF, inF), outF, inF);
}

/** DoRA's merged weight, in place: `merged` holds W + s B A and becomes (m / ||W + s B A||_row) (W + s B A) */
export function applyDoraMagnitude(merged: Float32Array, magnitude: Float32Array, outF: number, inF: number): Float32Array {
    const norms = rowNorms(merged, outF, inF);
    for (let j = 0; j < outF; j++) {
        const k = magnitude[j] / norms[j];
        for (let i = 0; i < inF; i++) merged[j * inF + i] *= k;
    }
    return merged;
}

/** where a layer's dropout masks come from: the run's clock and the layer's projection number (projectionIndex) */
export interface LoraDropoutSource {
    clock: DropoutClock;
    projection: number;
}

/**
 * A projection with PEFT's LoRA branch (and DoRA magnitude, trained bias), as the model holds it on the host: the
 * frozen base and the trainable tensors with their gradients (the host optimizer's, and what adapters save). It
 * computes nothing itself: the graph runs it through projection.ts on the CPU or the GPU.
 */
export class LoraLinear implements LinearLayer {
    readonly dA: Float32Array | null;
    readonly dB: Float32Array | null;
    /** trainable bias gradient (bias "all"/"lora_only"), else null */
    readonly dBias: Float32Array | null;
    /** DoRA magnitude gradient [out] */
    readonly dMagnitude: Float32Array | null;

    constructor(
        readonly module: string,
        readonly base: BaseLinear,
        readonly lora: LoraWeights | null,
        trainBias: boolean,
        readonly dropoutSource: LoraDropoutSource | null
    ) {
        this.dA = lora ? new Float32Array(lora.A.length) : null;
        this.dB = lora ? new Float32Array(lora.B.length) : null;
        this.dBias = trainBias && base.bias ? new Float32Array(base.bias.length) : null;
        this.dMagnitude = lora?.magnitude ? new Float32Array(lora.magnitude.length) : null;
    }

    get inFeatures(): number {
        return this.base.inFeatures;
    }
    get outFeatures(): number {
        return this.base.outFeatures;
    }
    get bias(): Float32Array | null {
        return this.base.bias;
    }

    trainableTensors(): TrainableTensor[] {
        const out: TrainableTensor[] = [];
        const prefix = `base_model.model.${this.module}`;
        if (this.lora && this.dA && this.dB) {
            out.push({
                name: `${prefix}.lora_A.weight`,
                param: this.lora.A,
                grad: this.dA,
                shape: [this.lora.r, this.inFeatures],
                decay: true
            });
            out.push({
                name: `${prefix}.lora_B.weight`,
                param: this.lora.B,
                grad: this.dB,
                shape: [this.outFeatures, this.lora.r],
                decay: true
            });
        }
        if (this.lora?.magnitude && this.dMagnitude)
            out.push({
                name: `${prefix}.lora_magnitude_vector`,
                param: this.lora.magnitude,
                grad: this.dMagnitude,
                shape: [this.outFeatures],
                decay: true
            });
        if (this.dBias && this.base.bias)
            out.push({name: `${prefix}.bias`, param: this.base.bias, grad: this.dBias, shape: [this.outFeatures], decay: false});
        return out;
    }

    zeroGrad(): void {
        this.dMagnitude?.fill(0);
        this.dA?.fill(0);
        this.dB?.fill(0);
        this.dBias?.fill(0);
    }
}

/** the frozen weight of a projection slot: the layer itself, or the base a LoraLinear wraps */
export function frozenBase(layer: LinearLayer): BaseLinear {
    return layer instanceof LoraLinear ? layer.base : (layer as BaseLinear);
}
