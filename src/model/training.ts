// training.ts: the training forward and the hand-written backward of the decoder (no autograd).
//
// Each block's forward saves what its backward needs (BlockActs). With gradient checkpointing only each
// block's input is kept, and the block is recomputed just before its backward. The loss is transformers'
// causal-LM cross-entropy (logits at t predict labels[t+1]) summed over targets and multiplied by lossScale, so
// the trainer can pass 1 / (targets in the whole accumulated batch) and get the true token mean (SPEC-training §8).
// The logits are computed in chunks of rows and never held for the whole batch.
import {QloraError} from "../errors.js";
import {cpu} from "../backend/cpu.js";
import type {ModelConfig} from "../io/hf-config.js";
import {trainable, type TrainableLinear} from "../backend/linear.js";
import type {Rng} from "../backend/rng.js";
import type {DecoderModel} from "./decoder.js";
import {PROJ_NAMES, type ProjName} from "./weights.js";

export interface TrainBatch {
    B: number;
    T: number;
    inputIds: Int32Array; // [B*T]
    /** [B*T], not shifted; negative values are ignored */
    labels: Int32Array;
    /** [B*T] 1 real, 0 padding (null: no padding) */
    attentionMask: Uint8Array | null;
    positionIds: Int32Array; // [B*T]
    /** [B*T] packed-sequence index per token; attention stays inside a segment (null: one per row) */
    segIds: Int32Array | null;
}

export interface ForwardBackwardOptions {
    /** multiplies the summed loss before backward (1 / targets of the whole accumulated batch) */
    lossScale: number;
    gradientCheckpointing: boolean;
    /** rows of logits computed at a time (memory of the loss: rows x vocab floats) */
    lossChunkRows?: number;
    /** forward only (evaluation) */
    noBackward?: boolean;
}

export interface LossResult {
    /** sum of the cross-entropy over target tokens */
    lossSum: number;
    /** number of target tokens */
    targets: number;
}

interface BlockActs {
    x: Float32Array; // block input [N, C]
    xn1: Float32Array; // [N, C]
    rstd1: Float32Array; // [N]
    q: Float32Array; // [N, Hq*D] after RoPE
    k: Float32Array; // [N, Hkv*D] after RoPE
    v: Float32Array; // [N, Hkv*D]
    att: Float32Array; // [N, Hq*D]
    lse: Float32Array; // [B, Hq, T]
    h: Float32Array; // [N, C] residual after attention
    xn2: Float32Array;
    rstd2: Float32Array;
    gate: Float32Array; // [N, I]
    up: Float32Array; // [N, I]
    act: Float32Array; // [N, I] silu(gate) * up
    out: Float32Array; // [N, C] block output
}

/**
 * Rows longer than the model's context would run at RoPE positions the model never saw and give a finite,
 * meaningless loss: train and eval refuse them alike, naming the length knob that let them through.
 */
export function checkRowsFitContext(cfg: ModelConfig, longestRow: number, knob: string, knobValue: number | null): void {
    if (longestRow <= cfg.maxPositionEmbeddings) return;
    throw new QloraError(`${knob} ${knobValue ?? "(no limit)"} lets rows of ${longestRow} tokens through, longer than the ` +
        `model's context (max_position_embeddings ${cfg.maxPositionEmbeddings} in config.json); lower ${knob}`);
}

/** the same rule for a batch about to run (any caller of the trainers: positions past the context are refused) */
export function checkPositionsFitContext(cfg: ModelConfig, positionIds: Int32Array): void {
    let last = -1;
    for (let i = 0; i < positionIds.length; i++) if (positionIds[i] > last) last = positionIds[i];
    if (last >= cfg.maxPositionEmbeddings)
        throw new QloraError(`a batch reaches position ${last}, past the model's context (max_position_embeddings ` +
            `${cfg.maxPositionEmbeddings} in config.json); shorten the rows`);
}

/** next-token targets: target[b, t] = labels[b, t + 1], -100 at the last position */
export function shiftTargets(labels: Int32Array, B: number, T: number): Int32Array {
    const targets = new Int32Array(B * T).fill(-100);
    for (let b = 0; b < B; b++)
        for (let t = 0; t + 1 < T; t++) {
            const l = labels[b * T + t + 1];
            targets[b * T + t] = l >= 0 ? l : -100;
        }
    return targets;
}

export class DecoderTrainer {
    private readonly proj: Record<ProjName, TrainableLinear>[];

    /**
     * `dropoutRng`: the generator the LoRA dropout masks come from; with gradient checkpointing its state is
     * replayed when a block is recomputed, so the recomputed block sees the masks of the first forward.
     */
    constructor(readonly model: DecoderModel, private readonly dropoutRng: Rng | null = null) {
        this.proj = model.params.layers.map((layer) => {
            const p = {} as Record<ProjName, TrainableLinear>;
            for (const name of PROJ_NAMES) p[name] = trainable(layer.proj[name]);
            return p;
        });
    }

    /** runs forward (and backward unless noBackward) on one micro-batch; parameter gradients accumulate */
    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        const cfg = this.model.config, ops = cpu();
        const {B, T} = batch;
        const N = B * T, C = cfg.hiddenSize, L = cfg.numHiddenLayers;
        checkPositionsFitContext(cfg, batch.positionIds);
        const x0 = new Float32Array(N * C);
        const bad = ops.embeddingForward(x0, batch.inputIds, this.model.params.embed, N, cfg.vocabSize, C);
        if (bad >= 0) throw new Error(`token id ${batch.inputIds[bad]} is outside the vocabulary`);

        const checkpoint = opts.gradientCheckpointing && !opts.noBackward;
        const inputs: Float32Array[] = [x0];
        const acts: (BlockActs | null)[] = [];
        const rngStates: (number[] | null)[] = [];
        let x: Float32Array = x0;
        for (let l = 0; l < L; l++) {
            rngStates.push(checkpoint && this.dropoutRng ? this.dropoutRng.getState() : null);
            const a = this.blockForward(l, x, batch);
            acts.push(checkpoint || opts.noBackward ? null : a);
            x = a.out;
            inputs.push(x);
        }
        // final norm, then the loss in chunks of rows
        const xf = new Float32Array(N * C);
        const rstdF = new Float32Array(N);
        ops.rmsnormForward(xf, rstdF, x, this.model.params.norm, N, C, cfg.rmsNormEps);
        const targets = shiftTargets(batch.labels, B, T);
        const dxf = opts.noBackward ? null : new Float32Array(N * C);
        const {lossSum, targets: count} = this.lossChunks(xf, targets, N, opts.lossScale, dxf, opts.lossChunkRows ?? 512);
        if (opts.noBackward || !dxf) return {lossSum, targets: count};

        // backward
        let dx: Float32Array = new Float32Array(N * C);
        ops.rmsnormBackward(dx, null, dxf, x, this.model.params.norm, rstdF, N, C);
        const rngAfterForward = this.dropoutRng?.getState() ?? null;
        for (let l = L - 1; l >= 0; l--) {
            let a = acts[l];
            if (!a) {
                const state = rngStates[l];
                if (state && this.dropoutRng) this.dropoutRng.setState(state);
                a = this.blockForward(l, inputs[l], batch);
            }
            dx = this.blockBackward(l, a, dx, batch);
            acts[l] = null;
        }
        if (rngAfterForward && this.dropoutRng) this.dropoutRng.setState(rngAfterForward);
        const dEmbed = this.model.params.fullGrads?.embed;
        if (dEmbed) ops.embeddingBackward(dEmbed, dx, batch.inputIds, N, cfg.vocabSize, C);
        return {lossSum, targets: count};
    }

    private lossChunks(xf: Float32Array, targets: Int32Array, N: number, lossScale: number,
        dxf: Float32Array | null, chunkRows: number): LossResult {
        const C = this.model.config.hiddenSize, V = this.model.config.vocabSize, ops = cpu();
        const head = this.model.params.lmHead;
        let lossSum = 0, count = 0;
        // only rows with a target need logits
        const rows: number[] = [];
        for (let i = 0; i < N; i++) if (targets[i] >= 0) rows.push(i);
        for (let start = 0; start < rows.length; start += chunkRows) {
            const idx = rows.slice(start, start + chunkRows);
            const M = idx.length;
            const h = new Float32Array(M * C);
            const tg = new Int32Array(M);
            idx.forEach((r, i) => {
                h.set(xf.subarray(r * C, (r + 1) * C), i * C);
                tg[i] = targets[r];
            });
            const logits = new Float32Array(M * V);
            ops.sgemm(false, true, M, V, C, 1, h, C, head, C, 0, logits, V);
            const loss = new Float32Array(M), lse = new Float32Array(M);
            count += ops.crossEntropyForward(loss, lse, logits, tg, M, V);
            for (let i = 0; i < M; i++) lossSum += loss[i];
            if (dxf) {
                ops.crossEntropyBackward(logits, logits, lse, tg, lossScale, M, V); // in place: dlogits
                const dHead = this.model.params.fullGrads?.lmHead;
                // a trained output layer (modules_to_save): dW[V, C] += dlogits^T h
                if (dHead) ops.sgemm(true, false, V, C, M, 1, logits, V, h, C, 1, dHead, C);
                const dh = new Float32Array(M * C);
                ops.sgemm(false, false, M, C, V, 1, logits, V, head, C, 0, dh, C);
                idx.forEach((r, i) => dxf.set(dh.subarray(i * C, (i + 1) * C), r * C));
            }
        }
        return {lossSum, targets: count};
    }

    private blockForward(l: number, x: Float32Array, batch: TrainBatch): BlockActs {
        const cfg = this.model.config, ops = cpu(), layer = this.model.params.layers[l], p = this.proj[l];
        const {B, T} = batch;
        const N = B * T, C = cfg.hiddenSize, Hq = cfg.numAttentionHeads, Hkv = cfg.numKeyValueHeads, D = cfg.headDim;
        const I = cfg.intermediateSize, eps = cfg.rmsNormEps;
        const a: BlockActs = {
            x, xn1: new Float32Array(N * C), rstd1: new Float32Array(N),
            q: new Float32Array(N * Hq * D), k: new Float32Array(N * Hkv * D), v: new Float32Array(N * Hkv * D),
            att: new Float32Array(N * Hq * D), lse: new Float32Array(B * Hq * T), h: new Float32Array(N * C),
            xn2: new Float32Array(N * C), rstd2: new Float32Array(N), gate: new Float32Array(N * I),
            up: new Float32Array(N * I), act: new Float32Array(N * I), out: new Float32Array(N * C),
        };
        ops.rmsnormForward(a.xn1, a.rstd1, x, layer.inputNorm, N, C, eps);
        p.q_proj.forwardTrain(a.q, a.xn1, N);
        p.k_proj.forwardTrain(a.k, a.xn1, N);
        p.v_proj.forwardTrain(a.v, a.xn1, N);
        ops.ropeForward(a.q, a.q, batch.positionIds, this.model.invFreq, this.model.attentionScaling, N, Hq, D);
        ops.ropeForward(a.k, a.k, batch.positionIds, this.model.invFreq, this.model.attentionScaling, N, Hkv, D);
        ops.attentionForward(a.att, a.lse, a.q, a.k, a.v, batch.attentionMask, batch.segIds, B, T, T, Hq, Hkv, D, 0,
            1 / Math.sqrt(D));
        p.o_proj.forwardTrain(a.h, a.att, N);
        ops.addInplace(a.h, x, N * C);
        ops.rmsnormForward(a.xn2, a.rstd2, a.h, layer.postNorm, N, C, eps);
        p.gate_proj.forwardTrain(a.gate, a.xn2, N);
        p.up_proj.forwardTrain(a.up, a.xn2, N);
        ops.swigluForward(a.act, a.gate, a.up, N * I);
        p.down_proj.forwardTrain(a.out, a.act, N);
        ops.addInplace(a.out, a.h, N * C);
        return a;
    }

    /** returns d(block input) from d(block output) */
    private blockBackward(l: number, a: BlockActs, dout: Float32Array, batch: TrainBatch): Float32Array {
        const cfg = this.model.config, ops = cpu(), layer = this.model.params.layers[l], p = this.proj[l];
        const {B, T} = batch;
        const N = B * T, C = cfg.hiddenSize, Hq = cfg.numAttentionHeads, Hkv = cfg.numKeyValueHeads, D = cfg.headDim;
        const I = cfg.intermediateSize;
        // MLP: out = h + down(silu(gate(xn2)) * up(xn2))
        const dact = new Float32Array(N * I);
        p.down_proj.backward(dact, dout, false);
        const dgate = new Float32Array(N * I), dup = new Float32Array(N * I);
        ops.swigluBackward(dgate, dup, dact, a.gate, a.up, N * I);
        const dxn = new Float32Array(N * C);
        p.gate_proj.backward(dxn, dgate, false);
        p.up_proj.backward(dxn, dup, true);
        const dh = new Float32Array(N * C);
        ops.rmsnormBackward(dh, null, dxn, a.h, layer.postNorm, a.rstd2, N, C);
        ops.addInplace(dh, dout, N * C); // the residual stream
        // attention: h = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))
        const datt = new Float32Array(N * Hq * D);
        p.o_proj.backward(datt, dh, false);
        const dq = new Float32Array(N * Hq * D), dk = new Float32Array(N * Hkv * D), dv = new Float32Array(N * Hkv * D);
        ops.attentionBackward(dq, dk, dv, datt, a.q, a.k, a.v, a.att, a.lse, batch.attentionMask, batch.segIds,
            B, T, T, Hq, Hkv, D, 0, 1 / Math.sqrt(D));
        ops.ropeBackward(dq, dq, batch.positionIds, this.model.invFreq, this.model.attentionScaling, N, Hq, D);
        ops.ropeBackward(dk, dk, batch.positionIds, this.model.invFreq, this.model.attentionScaling, N, Hkv, D);
        p.q_proj.backward(dxn, dq, false);
        p.k_proj.backward(dxn, dk, true);
        p.v_proj.backward(dxn, dv, true);
        const dx = new Float32Array(N * C);
        ops.rmsnormBackward(dx, null, dxn, a.x, layer.inputNorm, a.rstd1, N, C);
        ops.addInplace(dx, dh, N * C);
        return dx;
    }
}
