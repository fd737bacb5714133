// linear.ts: the linear layers a decoder block is made of. The model calls only this interface, so LoRA
// (src/lora) and quantized bases (src/quant) slot in by wrapping or replacing a layer. It lives in the lowest
// layer because both the model above and lora/quant beside it implement or call it.
import {linearBackwardInput, linearForward, type DenseWeight} from "./cpu.js";
import type {GraphLinear} from "./backend.js";

export interface LinearLayer {
    readonly inFeatures: number;
    readonly outFeatures: number;
    /** out[M, outFeatures] = layer(x[M, inFeatures]) */
    forward(out: Float32Array, x: Float32Array, M: number): void;
    /** dx[M, inFeatures] (= or += when accumulate) = dy[M, outFeatures] @ W: the gradient through a frozen weight */
    backwardInput(dx: Float32Array, dy: Float32Array, M: number, accumulate: boolean): void;
    /** the bias, when the layer has one (frozen unless a LoRA config trains biases) */
    readonly bias: Float32Array | null;
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
    get bias(): Float32Array | null {
        return this.dense.bias;
    }
    /** the fp32 weight [out, in] */
    weightF32(): Float32Array {
        return this.dense.weight;
    }
    forward(out: Float32Array, x: Float32Array, M: number): void {
        linearForward(out, x, M, this.dense);
    }
    backwardInput(dx: Float32Array, dy: Float32Array, M: number, accumulate: boolean): void {
        linearBackwardInput(dx, dy, M, this.dense, accumulate);
    }
}

/** a layer that takes part in training: forwardTrain saves what backward needs */
export interface TrainableLinear extends LinearLayer {
    forwardTrain(out: Float32Array, x: Float32Array, M: number): void;
    /** dx (= or += when accumulate) from dy; accumulates parameter gradients if the layer has any */
    backward(dx: Float32Array, dy: Float32Array, accumulate: boolean): void;
}

export function isTrainable(layer: LinearLayer): layer is TrainableLinear {
    return typeof (layer as TrainableLinear).forwardTrain === "function";
}

/** a frozen layer in a training graph: only the input gradient flows through it */
export class FrozenLinear implements TrainableLinear {
    private rows = 0;
    constructor(readonly inner: LinearLayer) {}
    get inFeatures(): number {
        return this.inner.inFeatures;
    }
    get outFeatures(): number {
        return this.inner.outFeatures;
    }
    get bias(): Float32Array | null {
        return this.inner.bias;
    }
    forward(out: Float32Array, x: Float32Array, M: number): void {
        this.inner.forward(out, x, M);
    }
    backwardInput(dx: Float32Array, dy: Float32Array, M: number, accumulate: boolean): void {
        this.inner.backwardInput(dx, dy, M, accumulate);
    }
    forwardTrain(out: Float32Array, x: Float32Array, M: number): void {
        this.rows = M;
        this.inner.forward(out, x, M);
    }
    backward(dx: Float32Array, dy: Float32Array, accumulate: boolean): void {
        this.inner.backwardInput(dx, dy, this.rows, accumulate);
    }
}

/** the layer itself when it trains, else a frozen wrapper */
export function trainable(layer: LinearLayer): TrainableLinear {
    return isTrainable(layer) ? layer : new FrozenLinear(layer);
}

/**
 * A host layer as the decoder graph sees it (GraphLinear over Float32Array). A training forward keeps what the
 * backward needs inside the layer (forwardTrain), so nothing is handed back; the graph recomputes a block right
 * before its backward under gradient checkpointing, which refreshes that state.
 */
export class HostGraphLinear implements GraphLinear<Float32Array> {
    private readonly layer: TrainableLinear;
    constructor(layer: LinearLayer) {
        this.layer = trainable(layer);
    }
    get inFeatures(): number {
        return this.layer.inFeatures;
    }
    get outFeatures(): number {
        return this.layer.outFeatures;
    }
    forward(y: Float32Array, x: Float32Array, M: number, train: boolean): null {
        if (train) this.layer.forwardTrain(y, x, M);
        else this.layer.forward(y, x, M);
        return null;
    }
    backward(dx: Float32Array, dy: Float32Array, _x: Float32Array, _saved: unknown, _M: number, accumulate: boolean): void {
        this.layer.backward(dx, dy, accumulate);
    }
    release(): void {}
}
