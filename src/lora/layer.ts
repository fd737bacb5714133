// layer.ts: a linear layer with a LoRA branch (PEFT's LoraLayer for Linear / Linear4bit), forward and a
// hand-written backward.
//
//   y = base(x) + s * (drop(x) A^T) B^T          A [r, in], B [out, r], s = alpha / r (or alpha / sqrt(r))
//
// Saved by forwardTrain for backward: the layer input x (the caller keeps that buffer alive), the dropout mask,
// drop(x) and xa = drop(x) A^T [M, r]. Backward (gradient rule: parameter grads +=, the input grad = or +=):
//   dB += s dy^T xa;  dxa = s dy B;  dA += dxa^T drop(x);  dx = dy W + (dxa A) * mask;  dbias += colsum(dy)
//
// DoRA (PEFT's DoraLinearLayer): a magnitude m [out] rescales each output row, k = m / ||W + s B A||_row with the
// norm treated as a constant (detached, DoRA paper §4.3):
//   y = x W^T + b + (k - 1) (drop(x) W^T) + k s (drop(x) A^T B^T)        (without dropout: k (x W^T + s x A^T B^T) + b)
//   dm += colsum(dy * (drop(x) W^T + s xa B^T)) / norm;  the LoRA backward runs on dy * k;  the base term adds
//   ((k - 1) dy) W through the mask
import {cpu} from "../backend/cpu.js";
import {DenseLinear} from "../backend/linear.js";
import {Linear4bit} from "../quant/linear4bit.js";
import type {DropoutClock} from "../backend/dropout.js";
import type {LinearLayer, TrainableLinear} from "../backend/linear.js";

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
export function baseWeightF32(base: LinearLayer): Float32Array {
    if (base instanceof DenseLinear) return base.weightF32();
    if (base instanceof Linear4bit) return base.dequantizeWeight();
    throw new Error("DoRA needs a dense or 4-bit base layer");
}

/**
 * W[out, in] += scaling · B A, in place: the weight a LoRA branch adds. The one place it is computed (merge,
 * GGUF export and DoRA's norm all call it).
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
    for (let j = 0; j < outF; j++) {
        let ss = 0;
        for (let i = 0; i < inF; i++) ss += W[j * inF + i] ** 2;
        norms[j] = Math.sqrt(ss);
    }
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

interface Saved {
    x: Float32Array;
    M: number;
    xd: Float32Array; // drop(x), or x itself without dropout
    mask: Float32Array | null; // 0 or 1/(1-p) per element
    xa: Float32Array; // [M, r]
    /** DoRA: k = m / norm [out], norm [out], inner = drop(x) W^T + s xa B^T [M, out] */
    dora: {k: Float32Array; norm: Float32Array; inner: Float32Array} | null;
}

/** where a layer's dropout masks come from: the run's clock and the layer's projection number (projectionIndex) */
export interface LoraDropoutSource {
    clock: DropoutClock;
    projection: number;
}

export class LoraLinear implements TrainableLinear {
    readonly dA: Float32Array | null;
    readonly dB: Float32Array | null;
    /** trainable bias gradient (bias "all"/"lora_only"), else null */
    readonly dBias: Float32Array | null;
    /** DoRA magnitude gradient [out] */
    readonly dMagnitude: Float32Array | null;
    private saved: Saved | null = null;
    /** dropout is active only in training mode */
    training = false;

    constructor(
        readonly module: string,
        readonly base: LinearLayer,
        readonly lora: LoraWeights | null,
        trainBias: boolean,
        private readonly dropoutSource: LoraDropoutSource | null
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

    /** inference forward (no dropout, nothing saved) */
    forward(out: Float32Array, x: Float32Array, M: number): void {
        if (this.lora?.magnitude) {
            const training = this.training;
            this.training = false;
            this.forwardTrain(out, x, M);
            this.training = training;
            this.saved = null;
            return;
        }
        this.base.forward(out, x, M);
        if (!this.lora) return;
        const {r, A, B, scaling} = this.lora;
        const K = this.inFeatures,
            N = this.outFeatures,
            ops = cpu();
        const xa = new Float32Array(M * r);
        ops.sgemm(false, true, M, r, K, 1, x, K, A, K, 0, xa, r);
        ops.sgemm(false, true, M, N, r, scaling, xa, r, B, r, 1, out, N);
    }

    /** dx = dy (W + s B A), without touching parameter gradients */
    backwardInput(dx: Float32Array, dy: Float32Array, M: number, accumulate: boolean): void {
        if (this.lora?.magnitude) {
            // dx = (dy * k) (W + s B A), k from the current weights
            const N = this.outFeatures;
            const norm = doraRowNorms(baseWeightF32(this.base), this.lora, N, this.inFeatures);
            const g = new Float32Array(M * N);
            for (let m = 0; m < M; m++)
                for (let n = 0; n < N; n++) g[m * N + n] = (dy[m * N + n] * this.lora.magnitude[n]) / norm[n];
            dy = g;
        }
        this.base.backwardInput(dx, dy, M, accumulate);
        if (!this.lora) return;
        const {r, A, B, scaling} = this.lora;
        const K = this.inFeatures,
            N = this.outFeatures,
            ops = cpu();
        const dxa = new Float32Array(M * r);
        ops.sgemm(false, false, M, r, N, scaling, dy, N, B, r, 0, dxa, r);
        ops.sgemm(false, false, M, K, r, 1, dxa, r, A, K, 1, dx, K);
    }

    /** training forward: saves what backward needs; x must stay unchanged until backward */
    forwardTrain(out: Float32Array, x: Float32Array, M: number): void {
        this.base.forward(out, x, M);
        if (!this.lora) {
            this.saved = {x, M, xd: x, mask: null, xa: new Float32Array(0), dora: null};
            return;
        }
        const {r, A, B, scaling, dropout, magnitude} = this.lora;
        const K = this.inFeatures,
            N = this.outFeatures,
            ops = cpu();
        let xd = x,
            mask: Float32Array | null = null;
        if (this.training && dropout > 0) {
            // inverted dropout on the LoRA branch's input only (the base path sees x)
            const src = this.dropoutSource;
            if (!src) throw new Error(`${this.module}: dropout in training needs a DropoutClock`);
            mask = new Float32Array(M * K);
            ops.dropoutMask(mask, src.clock.seedFor(src.projection), dropout, M * K);
            xd = new Float32Array(M * K);
            for (let i = 0; i < mask.length; i++) xd[i] = x[i] * mask[i];
        }
        const xa = new Float32Array(M * r);
        ops.sgemm(false, true, M, r, K, 1, xd, K, A, K, 0, xa, r);
        if (!magnitude) {
            ops.sgemm(false, true, M, N, r, scaling, xa, r, B, r, 1, out, N);
            this.saved = {x, M, xd, mask, xa, dora: null};
            return;
        }
        // DoRA: inner = drop(x) W^T + s xa B^T; out += (k - 1) (drop(x) W^T) + k s xa B^T
        const norm = doraRowNorms(baseWeightF32(this.base), this.lora, N, K);
        const k = new Float32Array(N);
        for (let n = 0; n < N; n++) k[n] = magnitude[n] / norm[n];
        const inner = new Float32Array(M * N);
        if (mask) this.base.forward(inner, xd, M);
        else inner.set(out);
        const bias = this.base.bias;
        if (bias) for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) inner[m * N + n] -= bias[n];
        const baseTerm = Float32Array.from(inner);
        ops.sgemm(false, true, M, N, r, scaling, xa, r, B, r, 1, inner, N);
        for (let m = 0; m < M; m++)
            for (let n = 0; n < N; n++) {
                const i = m * N + n;
                out[i] += (k[n] - 1) * baseTerm[i] + k[n] * (inner[i] - baseTerm[i]);
            }
        this.saved = {x, M, xd, mask, xa, dora: {k, norm, inner}};
    }

    /** dx (= or += when accumulate) from dy [M, out]; accumulates the parameter gradients */
    backward(dx: Float32Array, dy: Float32Array, accumulate: boolean): void {
        const s = this.saved;
        if (!s) throw new Error(`${this.module}: backward without a training forward`);
        const M = s.M,
            K = this.inFeatures,
            N = this.outFeatures,
            ops = cpu();
        this.base.backwardInput(dx, dy, M, accumulate);
        if (this.dBias) {
            for (let m = 0; m < M; m++) for (let n = 0; n < N; n++) this.dBias[n] += dy[m * N + n];
        }
        if (s.dora && this.dMagnitude) {
            const {k, norm, inner} = s.dora;
            // dm = colsum(dy * inner) / norm
            for (let m = 0; m < M; m++)
                for (let n = 0; n < N; n++) this.dMagnitude[n] += (dy[m * N + n] * inner[m * N + n]) / norm[n];
            // the (k - 1) base term, through the dropout mask; the LoRA branch then sees dy * k
            const g1 = new Float32Array(M * N),
                g = new Float32Array(M * N);
            for (let m = 0; m < M; m++)
                for (let n = 0; n < N; n++) {
                    g1[m * N + n] = dy[m * N + n] * (k[n] - 1);
                    g[m * N + n] = dy[m * N + n] * k[n];
                }
            if (s.mask) {
                const t = new Float32Array(M * K);
                this.base.backwardInput(t, g1, M, false);
                for (let i = 0; i < t.length; i++) dx[i] += t[i] * s.mask[i];
            } else this.base.backwardInput(dx, g1, M, true);
            dy = g;
        }
        if (this.lora && this.dA && this.dB) {
            const {r, A, B, scaling} = this.lora;
            // dB[N, r] += s * dy^T[N, M] @ xa[M, r]
            ops.sgemm(true, false, N, r, M, scaling, dy, N, s.xa, r, 1, this.dB, r);
            // dxa[M, r] = s * dy[M, N] @ B[N, r]
            const dxa = new Float32Array(M * r);
            ops.sgemm(false, false, M, r, N, scaling, dy, N, B, r, 0, dxa, r);
            // dA[r, K] += dxa^T[r, M] @ xd[M, K]
            ops.sgemm(true, false, r, K, M, 1, dxa, r, s.xd, K, 1, this.dA, K);
            // dx += (dxa @ A) * mask
            if (s.mask) {
                const t = new Float32Array(M * K);
                ops.sgemm(false, false, M, K, r, 1, dxa, r, A, K, 0, t, K);
                for (let i = 0; i < t.length; i++) dx[i] += t[i] * s.mask[i];
            } else ops.sgemm(false, false, M, K, r, 1, dxa, r, A, K, 1, dx, K);
        }
        this.saved = null;
    }

    zeroGrad(): void {
        this.dMagnitude?.fill(0);
        this.dA?.fill(0);
        this.dB?.fill(0);
        this.dBias?.fill(0);
    }
}
