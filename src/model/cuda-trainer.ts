// cuda-trainer.ts: the QLoRA/LoRA training step on an NVIDIA GPU. The same graph as training.ts (the CPU
// reference), on device buffers: bf16 activations and base weights, fp32 accumulation, fp32 LoRA master weights
// with bf16 copies for the GEMMs, NF4 projections dequantized into one scratch buffer right before each GEMM,
// flash attention, the loss in chunks of rows (bf16 logits, gradient written in place), AdamW on the device.
//
// Saved per block for backward (or recomputed under gradient checkpointing): the block input, both norms'
// outputs and rstd, q/k (after RoPE), v, the attention output and lse, h (residual after attention), gate, up
// and act. LoRA dropout masks are a hash of (seed, layer, projection, step), so recomputation regenerates them.
import {QloraError} from "../errors.js";
import {cuda, DeviceBuffer} from "../backend/cuda.js";
import {cudaAttentionOps} from "../backend/cuda-attention-types.js";
import {cudaGemmOps} from "../backend/cuda-gemm-types.js";
import {cudaKernelOps} from "../backend/cuda-kernels-types.js";
import {f32ToHalf} from "../backend/cpu.js";
import {DenseLinear, type LinearLayer} from "../backend/linear.js";
import {LoraLinear} from "../lora/layer.js";
import {Linear4bit} from "../quant/linear4bit.js";
import type {DecoderModel} from "./decoder.js";
import {checkPositionsFitContext, shiftTargets, type ForwardBackwardOptions, type LossResult, type TrainBatch} from "./training.js";
import {PROJ_NAMES, type ProjName} from "./weights.js";
import type {OptimizerStateDict} from "../optim/adamw.js";

interface LoraExtraOps {
    addBiasBf16(y: number, bias: number, N: number, C: number): void;
    dropoutBf16(out: number, inp: number, seed: number, p: number, n: number): void;
    dropoutAddBf16(y: number, x: number, seed: number, p: number, n: number): void;
}

/** a projection's frozen weight on the device */
interface DeviceWeight {
    outF: number;
    inF: number;
    bias: DeviceBuffer | null; // bf16 [out]
    dense: DeviceBuffer | null; // bf16 [out, in]
    nf4: {
        packed: DeviceBuffer; absmax: DeviceBuffer | null; absmaxQ: DeviceBuffer | null; nestedAbsmax: DeviceBuffer | null;
        nestedCode: DeviceBuffer | null; code: DeviceBuffer; offset: number; blocksize: number; nestedBlocksize: number;
    } | null;
}

/** the LoRA branch of a projection on the device */
interface DeviceLora {
    host: LoraLinear;
    r: number;
    scaling: number;
    dropout: number;
    A: DeviceBuffer; // f32 [r, in] master
    B: DeviceBuffer; // f32 [out, r]
    dA: DeviceBuffer; // f32 grads
    dB: DeviceBuffer;
    Ab: DeviceBuffer; // bf16 copies for the GEMMs
    Bb: DeviceBuffer;
}

interface DeviceProj {
    w: DeviceWeight;
    lora: DeviceLora | null;
    index: number; // a distinct number per projection of the model, for dropout seeds
}

interface BlockActs {
    x: DeviceBuffer; xn1: DeviceBuffer; rstd1: DeviceBuffer; q: DeviceBuffer; k: DeviceBuffer; v: DeviceBuffer;
    att: DeviceBuffer; lse: DeviceBuffer; h: DeviceBuffer; xn2: DeviceBuffer; rstd2: DeviceBuffer;
    gate: DeviceBuffer; up: DeviceBuffer; act: DeviceBuffer; out: DeviceBuffer;
    /** per LoRA projection: xa = drop(x) A^T [N, r] bf16 */
    xa: Map<ProjName, DeviceBuffer>;
}

function bf16Upload(values: Float32Array): DeviceBuffer {
    return DeviceBuffer.from("bf16", f32ToHalf(values, "BF16"));
}

function dequantInto(out: DeviceBuffer, w: DeviceWeight): void {
    const g = cudaGemmOps();
    const q = w.nf4!;
    g.dequantize4bit(out.ptr, "bf16", q.packed.ptr, q.absmax?.ptr ?? 0, q.absmaxQ?.ptr ?? 0, q.nestedAbsmax?.ptr ?? 0,
        q.nestedCode?.ptr ?? 0, q.offset, q.code.ptr, q.blocksize, q.nestedBlocksize, w.outF * w.inF);
}

export class CudaTrainer {
    private readonly layers: Record<ProjName, DeviceProj>[];
    private readonly embed: DeviceBuffer; // bf16 [V, C]
    private readonly lmHead: DeviceBuffer; // bf16 [V, C] (the embedding when tied)
    private readonly norms: {input: DeviceBuffer; post: DeviceBuffer}[];
    private readonly finalNorm: DeviceBuffer;
    private readonly invFreq: DeviceBuffer;
    private readonly scratchW: DeviceBuffer; // bf16, the largest projection: dequantized weights land here
    private readonly loras: DeviceLora[] = [];
    /** bumped every micro-batch: part of the dropout seeds (the trainer sets it on resume) */
    microStep = 0;

    /**
     * `offloadActivations`: with gradient checkpointing, each block's input goes to host memory once the next
     * block has read it and comes back for the recomputation (Unsloth's offloaded checkpointing): the device then
     * holds one block input instead of one per layer, at the cost of a copy each way per layer (synchronous
     * here: the copies are not yet overlapped with compute).
     */
    constructor(readonly model: DecoderModel, readonly seed = 0, readonly offloadActivations = false) {
        const cfg = model.config;
        this.embed = bf16Upload(model.params.embed);
        this.lmHead = model.params.lmHead === model.params.embed ? this.embed : bf16Upload(model.params.lmHead);
        this.finalNorm = bf16Upload(model.params.norm);
        this.invFreq = DeviceBuffer.from("f32", model.invFreq);
        let maxW = 0, index = 0;
        this.norms = [];
        this.layers = model.params.layers.map((layer) => {
            this.norms.push({input: bf16Upload(layer.inputNorm), post: bf16Upload(layer.postNorm)});
            const out = {} as Record<ProjName, DeviceProj>;
            for (const p of PROJ_NAMES) {
                const proj = this.toDevice(layer.proj[p], index++);
                maxW = Math.max(maxW, proj.w.outF * proj.w.inF);
                out[p] = proj;
            }
            return out;
        });
        this.scratchW = DeviceBuffer.alloc("bf16", maxW);
        if (cfg.headDim !== 64 && cfg.headDim !== 128)
            throw new QloraError(`the CUDA attention kernels handle head_dim 64 and 128; this model has ${cfg.headDim}`);
    }

    private toDevice(layer: LinearLayer, index: number): DeviceProj {
        const lora = layer instanceof LoraLinear ? layer : null;
        const base = lora ? lora.base : layer;
        const w: DeviceWeight = {outF: base.outFeatures, inF: base.inFeatures, bias: base.bias ? bf16Upload(base.bias) : null,
            dense: null, nf4: null};
        if (base instanceof Linear4bit) {
            const s = base.state;
            w.nf4 = {
                packed: DeviceBuffer.from("u8", s.packed), code: DeviceBuffer.from("f32", s.quantMap),
                absmax: s.absmax ? DeviceBuffer.from("f32", s.absmax) : null,
                absmaxQ: s.absmaxQ ? DeviceBuffer.from("u8", s.absmaxQ) : null,
                nestedAbsmax: s.nestedAbsmax ? DeviceBuffer.from("f32", s.nestedAbsmax) : null,
                nestedCode: s.nestedQuantMap ? DeviceBuffer.from("f32", s.nestedQuantMap) : null,
                offset: s.offset, blocksize: s.blocksize, nestedBlocksize: s.nestedBlocksize,
            };
        } else if (base instanceof DenseLinear) {
            w.dense = bf16Upload(base.weightF32());
        } else throw new QloraError("the CUDA trainer supports dense and 4-bit projections");
        let dl: DeviceLora | null = null;
        if (lora?.lora) {
            if (lora.dBias) throw new QloraError("training biases (bias: all / lora_only) is not supported on CUDA yet; use bias: none");
            if (lora.lora.magnitude) throw new QloraError("DoRA (use_dora) is not supported on CUDA yet; train it with --device cpu");
            const l = lora.lora;
            dl = {host: lora, r: l.r, scaling: l.scaling, dropout: l.dropout, A: DeviceBuffer.from("f32", l.A),
                B: DeviceBuffer.from("f32", l.B), dA: DeviceBuffer.zeros("f32", l.A.length), dB: DeviceBuffer.zeros("f32", l.B.length),
                Ab: DeviceBuffer.alloc("bf16", l.A.length), Bb: DeviceBuffer.alloc("bf16", l.B.length)};
            this.loras.push(dl);
        }
        const proj = {w, lora: dl, index};
        if (dl) this.refreshLoraCopy(dl);
        return proj;
    }

    private refreshLoraCopy(l: DeviceLora): void {
        const k = cudaKernelOps();
        k.f32ToBf16(l.Ab.ptr, l.A.ptr, l.A.length);
        k.f32ToBf16(l.Bb.ptr, l.B.ptr, l.B.length);
    }

    /** the trainable tensors on the device, in the order of lora.trainableTensors() (A then B per module) */
    deviceTensors(): {name: string; param: DeviceBuffer; grad: DeviceBuffer}[] {
        return this.loras.flatMap((l) => [
            {name: `base_model.model.${l.host.module}.lora_A.weight`, param: l.A, grad: l.dA},
            {name: `base_model.model.${l.host.module}.lora_B.weight`, param: l.B, grad: l.dB},
        ]);
    }

    zeroGrad(): void {
        for (const l of this.loras) {
            cuda().memset(l.dA.ptr, 0, l.dA.bytes);
            cuda().memset(l.dB.ptr, 0, l.dB.bytes);
        }
    }

    /** after the optimizer updated the f32 masters: new bf16 copies */
    afterOptimizerStep(): void {
        for (const l of this.loras) this.refreshLoraCopy(l);
    }

    /** copies the device LoRA weights (and grads) back into the host LoraLinear layers */
    syncToHost(withGrads = false): void {
        for (const l of this.loras) {
            const lw = l.host.lora!;
            cuda().download(lw.A, l.A.ptr);
            cuda().download(lw.B, l.B.ptr);
            if (withGrads) {
                cuda().download(l.host.dA!, l.dA.ptr);
                cuda().download(l.host.dB!, l.dB.ptr);
            }
        }
    }

    // ------------------------------------------------------------------
    // linear layers

    /** y[N, out] (bf16) = x W^T (+ b) (+ s drop(x) A^T B^T); returns xa for the backward */
    private linearForward(y: DeviceBuffer, x: DeviceBuffer, N: number, p: DeviceProj, training: boolean): DeviceBuffer | null {
        const g = cudaGemmOps(), {w} = p;
        let W = w.dense;
        if (!W) {
            dequantInto(this.scratchW, w);
            W = this.scratchW;
        }
        g.gemm(false, true, N, w.outF, w.inF, 1, x.ptr, w.inF, "bf16", W.ptr, w.inF, "bf16", 0, y.ptr, w.outF, "bf16");
        if (w.bias) (cuda() as unknown as LoraExtraOps).addBiasBf16(y.ptr, w.bias.ptr, N, w.outF);
        const l = p.lora;
        if (!l) return null;
        let xin = x;
        let dropped: DeviceBuffer | null = null;
        if (training && l.dropout > 0) {
            dropped = DeviceBuffer.alloc("bf16", N * w.inF);
            (cuda() as unknown as LoraExtraOps).dropoutBf16(dropped.ptr, x.ptr, this.dropoutSeed(p), l.dropout, N * w.inF);
            xin = dropped;
        }
        const xa = DeviceBuffer.alloc("bf16", N * l.r);
        g.gemm(false, true, N, l.r, w.inF, 1, xin.ptr, w.inF, "bf16", l.Ab.ptr, w.inF, "bf16", 0, xa.ptr, l.r, "bf16");
        g.gemm(false, true, N, w.outF, l.r, l.scaling, xa.ptr, l.r, "bf16", l.Bb.ptr, l.r, "bf16", 1, y.ptr, w.outF, "bf16");
        dropped?.free();
        return xa;
    }

    /** the mask seed of one projection in one micro-batch (< 2^53); a recomputation in the same micro-batch repeats it */
    private dropoutSeed(p: DeviceProj): number {
        return (this.seed % 1024) * 2 ** 40 + (this.microStep % 2 ** 24) * 2 ** 16 + p.index + 1;
    }

    /** dx[N, in] (= or +=) from dy[N, out]; accumulates dA, dB (f32) */
    private linearBackward(dx: DeviceBuffer, dy: DeviceBuffer, x: DeviceBuffer, xa: DeviceBuffer | null, N: number,
        p: DeviceProj, accumulate: boolean): void {
        const g = cudaGemmOps(), {w} = p;
        let W = w.dense;
        if (!W) {
            dequantInto(this.scratchW, w);
            W = this.scratchW;
        }
        g.gemm(false, false, N, w.inF, w.outF, 1, dy.ptr, w.outF, "bf16", W.ptr, w.inF, "bf16", accumulate ? 1 : 0,
            dx.ptr, w.inF, "bf16");
        const l = p.lora;
        if (!l || !xa) return;
        // dB[out, r] += s dy^T xa
        g.gemm(true, false, w.outF, l.r, N, l.scaling, dy.ptr, w.outF, "bf16", xa.ptr, l.r, "bf16", 1, l.dB.ptr, l.r, "f32");
        // dxa[N, r] = s dy B
        const dxa = DeviceBuffer.alloc("bf16", N * l.r);
        g.gemm(false, false, N, l.r, w.outF, l.scaling, dy.ptr, w.outF, "bf16", l.Bb.ptr, l.r, "bf16", 0, dxa.ptr, l.r, "bf16");
        // dA[r, in] += dxa^T drop(x)
        let xin = x, dropped: DeviceBuffer | null = null;
        const extra = cuda() as unknown as LoraExtraOps;
        if (l.dropout > 0) {
            dropped = DeviceBuffer.alloc("bf16", N * w.inF);
            extra.dropoutBf16(dropped.ptr, x.ptr, this.dropoutSeed(p), l.dropout, N * w.inF);
            xin = dropped;
        }
        g.gemm(true, false, l.r, w.inF, N, 1, dxa.ptr, l.r, "bf16", xin.ptr, w.inF, "bf16", 1, l.dA.ptr, w.inF, "f32");
        // dx += (dxa A) * mask
        if (l.dropout > 0) {
            const t = dropped!; // reuse as the [N, in] temporary
            g.gemm(false, false, N, w.inF, l.r, 1, dxa.ptr, l.r, "bf16", l.Ab.ptr, w.inF, "bf16", 0, t.ptr, w.inF, "bf16");
            extra.dropoutAddBf16(dx.ptr, t.ptr, this.dropoutSeed(p), l.dropout, N * w.inF);
        } else {
            g.gemm(false, false, N, w.inF, l.r, 1, dxa.ptr, l.r, "bf16", l.Ab.ptr, w.inF, "bf16", 1, dx.ptr, w.inF, "bf16");
        }
        dropped?.free();
        dxa.free();
    }

    // ------------------------------------------------------------------
    // the step

    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        const cfg = this.model.config, k = cudaKernelOps();
        const {B, T} = batch;
        const N = B * T, C = cfg.hiddenSize, L = cfg.numHiddenLayers;
        checkPositionsFitContext(cfg, batch.positionIds);
        this.microStep++;
        const ids = DeviceBuffer.from("i32", batch.inputIds);
        const pos = DeviceBuffer.from("i32", batch.positionIds);
        const keyValid = batch.attentionMask && !batch.attentionMask.every((v) => v === 1)
            ? DeviceBuffer.from("u8", batch.attentionMask) : null;
        const seg = batch.segIds ? DeviceBuffer.from("i32", batch.segIds) : null;
        const training = !opts.noBackward;
        const owned: DeviceBuffer[] = [ids, pos];
        if (keyValid) owned.push(keyValid);
        if (seg) owned.push(seg);
        const ctx = {B, T, N, pos, keyValid, seg, training};

        const x0 = DeviceBuffer.alloc("bf16", N * C);
        const bad = DeviceBuffer.zeros("i32", 2);
        k.embeddingForward(x0.ptr, bad.ptr, ids.ptr, this.embed.ptr, N, cfg.vocabSize, C);
        const badHost = bad.toHost() as Int32Array;
        bad.free();
        if (badHost[0] > 0) throw new QloraError(`token id at position ${badHost[1]} is outside the vocabulary`);

        const checkpoint = opts.gradientCheckpointing && training;
        const offload = checkpoint && this.offloadActivations;
        const inputs: DeviceBuffer[] = [x0];
        const offloaded: (Uint16Array | null)[] = [];
        const acts: (BlockActs | null)[] = [];
        let x = x0;
        for (let l = 0; l < L; l++) {
            const a = this.blockForward(l, x, ctx);
            if (offload) {
                // block l's input is read again only by its recomputation in the backward
                offloaded[l] = x.toHost() as Uint16Array;
                x.free();
            }
            x = a.out;
            inputs.push(x);
            if (checkpoint || !training) {
                this.freeActs(a);
                acts.push(null);
            } else acts.push(a);
        }
        // final norm and the loss in chunks of rows
        const xf = DeviceBuffer.alloc("bf16", N * C);
        const rstdF = DeviceBuffer.alloc("f32", N);
        k.rmsnormForward(xf.ptr, rstdF.ptr, x.ptr, this.finalNorm.ptr, N, C, cfg.rmsNormEps);
        const targetsHost = shiftTargets(batch.labels, B, T);
        const dxf = training ? DeviceBuffer.alloc("bf16", N * C) : null;
        const loss = this.lossChunks(xf, targetsHost, N, opts.lossScale, dxf, opts.lossChunkRows ?? 1024);
        if (!training || !dxf) {
            for (const b of [...inputs, xf, rstdF, ...owned]) b.free();
            return loss;
        }
        let dx = DeviceBuffer.alloc("bf16", N * C);
        k.rmsnormBackward(dx.ptr, null, dxf.ptr, x.ptr, this.finalNorm.ptr, rstdF.ptr, N, C);
        dxf.free();
        xf.free();
        rstdF.free();
        for (let l = L - 1; l >= 0; l--) {
            const host = offloaded[l];
            if (host) {
                inputs[l] = DeviceBuffer.from("bf16", host);
                offloaded[l] = null;
            }
            const a = acts[l] ?? this.blockForward(l, inputs[l], ctx);
            const dPrev = this.blockBackward(l, a, dx, ctx);
            dx.free();
            dx = dPrev;
            this.freeActs(a);
            a.out.free(); // a recomputed block's own output, or inputs[l + 1] itself (free is idempotent)
            inputs[l + 1].free();
            acts[l] = null;
        }
        dx.free();
        inputs[0].free();
        for (const b of owned) b.free();
        return loss;
    }

    /** the logits [B*T, V] (f32 on the host) of a forward pass in bf16: for checking against the CPU and the fixtures */
    forwardLogits(batch: TrainBatch): Float32Array {
        const cfg = this.model.config, k = cudaKernelOps(), g = cudaGemmOps();
        const {B, T} = batch;
        const N = B * T, C = cfg.hiddenSize, V = cfg.vocabSize;
        const ids = DeviceBuffer.from("i32", batch.inputIds);
        const pos = DeviceBuffer.from("i32", batch.positionIds);
        const keyValid = batch.attentionMask ? DeviceBuffer.from("u8", batch.attentionMask) : null;
        const seg = batch.segIds ? DeviceBuffer.from("i32", batch.segIds) : null;
        const ctx = {B, T, N, pos, keyValid, seg, training: false};
        let x = DeviceBuffer.alloc("bf16", N * C);
        k.embeddingForward(x.ptr, null, ids.ptr, this.embed.ptr, N, cfg.vocabSize, C);
        for (let l = 0; l < cfg.numHiddenLayers; l++) {
            const a = this.blockForward(l, x, ctx);
            this.freeActs(a);
            x.free();
            x = a.out;
        }
        const xf = DeviceBuffer.alloc("bf16", N * C);
        k.rmsnormForward(xf.ptr, null, x.ptr, this.finalNorm.ptr, N, C, cfg.rmsNormEps);
        const logits = DeviceBuffer.alloc("f32", N * V);
        g.gemm(false, true, N, V, C, 1, xf.ptr, C, "bf16", this.lmHead.ptr, C, "bf16", 0, logits.ptr, V, "f32");
        const out = logits.toHost() as Float32Array;
        for (const b of [ids, pos, keyValid, seg, x, xf, logits]) b?.free();
        return out;
    }

    /** frees a block's saved activations except its input and output (the neighbours' buffers) */
    private freeActs(a: BlockActs): void {
        for (const key of ["xn1", "rstd1", "q", "k", "v", "att", "lse", "h", "xn2", "rstd2", "gate", "up", "act"] as const) a[key].free();
        for (const b of a.xa.values()) b.free();
        a.xa.clear();
    }

    private lossChunks(xf: DeviceBuffer, targetsHost: Int32Array, N: number, lossScale: number, dxf: DeviceBuffer | null,
        chunkRows: number): LossResult {
        const cfg = this.model.config, C = cfg.hiddenSize, V = cfg.vocabSize;
        const g = cudaGemmOps(), k = cudaKernelOps();
        const targets = DeviceBuffer.from("i32", targetsHost);
        const lossBuf = DeviceBuffer.alloc("f32", N);
        const count = DeviceBuffer.zeros("i32", 1);
        const rows = Math.min(chunkRows, N);
        const logits = DeviceBuffer.alloc("bf16", rows * V);
        for (let start = 0; start < N; start += rows) {
            const M = Math.min(rows, N - start);
            const xrow = xf.ptr + start * C * 2;
            g.gemm(false, true, M, V, C, 1, xrow, C, "bf16", this.lmHead.ptr, C, "bf16", 0, logits.ptr, V, "bf16");
            const tgt = targets.ptr + start * 4, lossRow = lossBuf.ptr + start * 4;
            if (dxf) {
                k.crossEntropyFused(lossRow, null, count.ptr, logits.ptr, tgt, lossScale, M, V);
                g.gemm(false, false, M, C, V, 1, logits.ptr, V, "bf16", this.lmHead.ptr, C, "bf16", 0, dxf.ptr + start * C * 2, C, "bf16");
            } else k.crossEntropyForward(lossRow, null, count.ptr, logits.ptr, tgt, M, V);
        }
        const lossHost = lossBuf.toHost() as Float32Array;
        const countHost = (count.toHost() as Int32Array)[0];
        let lossSum = 0;
        for (let i = 0; i < N; i++) lossSum += lossHost[i];
        for (const b of [targets, lossBuf, count, logits]) b.free();
        return {lossSum, targets: countHost};
    }

    private blockForward(l: number, x: DeviceBuffer, ctx: {B: number; T: number; N: number; pos: DeviceBuffer;
        keyValid: DeviceBuffer | null; seg: DeviceBuffer | null; training: boolean}): BlockActs {
        const cfg = this.model.config, k = cudaKernelOps(), at = cudaAttentionOps(), p = this.layers[l];
        const {B, T, N} = ctx;
        const C = cfg.hiddenSize, Hq = cfg.numAttentionHeads, Hkv = cfg.numKeyValueHeads, D = cfg.headDim;
        const I = cfg.intermediateSize, eps = cfg.rmsNormEps;
        const bf = (n: number) => DeviceBuffer.alloc("bf16", n);
        const a: BlockActs = {
            x, xn1: bf(N * C), rstd1: DeviceBuffer.alloc("f32", N), q: bf(N * Hq * D), k: bf(N * Hkv * D), v: bf(N * Hkv * D),
            att: bf(N * Hq * D), lse: DeviceBuffer.alloc("f32", B * Hq * T), h: bf(N * C), xn2: bf(N * C),
            rstd2: DeviceBuffer.alloc("f32", N), gate: bf(N * I), up: bf(N * I), act: bf(N * I), out: bf(N * C), xa: new Map(),
        };
        const keep = (name: ProjName, xa: DeviceBuffer | null) => {
            if (xa) a.xa.set(name, xa);
        };
        k.rmsnormForward(a.xn1.ptr, a.rstd1.ptr, x.ptr, this.norms[l].input.ptr, N, C, eps);
        keep("q_proj", this.linearForward(a.q, a.xn1, N, p.q_proj, ctx.training));
        keep("k_proj", this.linearForward(a.k, a.xn1, N, p.k_proj, ctx.training));
        keep("v_proj", this.linearForward(a.v, a.xn1, N, p.v_proj, ctx.training));
        k.ropeForward(a.q.ptr, a.q.ptr, ctx.pos.ptr, this.invFreq.ptr, this.model.attentionScaling, N, Hq, D);
        k.ropeForward(a.k.ptr, a.k.ptr, ctx.pos.ptr, this.invFreq.ptr, this.model.attentionScaling, N, Hkv, D);
        at.attentionForward(a.att.ptr, a.lse.ptr, a.q.ptr, a.k.ptr, a.v.ptr, ctx.keyValid?.ptr ?? null, ctx.seg?.ptr ?? null,
            B, T, T, Hq, Hkv, D, 0, 1 / Math.sqrt(D));
        const o = bf(N * C);
        keep("o_proj", this.linearForward(o, a.att, N, p.o_proj, ctx.training));
        k.residualRmsnormForward(a.h.ptr, a.xn2.ptr, a.rstd2.ptr, x.ptr, o.ptr, this.norms[l].post.ptr, N, C, eps);
        o.free();
        keep("gate_proj", this.linearForward(a.gate, a.xn2, N, p.gate_proj, ctx.training));
        keep("up_proj", this.linearForward(a.up, a.xn2, N, p.up_proj, ctx.training));
        k.swigluForward(a.act.ptr, a.gate.ptr, a.up.ptr, N * I);
        keep("down_proj", this.linearForward(a.out, a.act, N, p.down_proj, ctx.training));
        k.addInplaceBf16(a.out.ptr, a.h.ptr, N * C);
        return a;
    }

    private blockBackward(l: number, a: BlockActs, dout: DeviceBuffer, ctx: {B: number; T: number; N: number;
        pos: DeviceBuffer; keyValid: DeviceBuffer | null; seg: DeviceBuffer | null}): DeviceBuffer {
        const cfg = this.model.config, k = cudaKernelOps(), at = cudaAttentionOps(), p = this.layers[l];
        const {B, T, N} = ctx;
        const C = cfg.hiddenSize, Hq = cfg.numAttentionHeads, Hkv = cfg.numKeyValueHeads, D = cfg.headDim;
        const I = cfg.intermediateSize;
        const bf = (n: number) => DeviceBuffer.alloc("bf16", n);
        const xa = (name: ProjName) => a.xa.get(name) ?? null;
        // MLP
        const dact = bf(N * I);
        this.linearBackward(dact, dout, a.act, xa("down_proj"), N, p.down_proj, false);
        const dgate = bf(N * I), dup = bf(N * I);
        k.swigluBackward(dgate.ptr, dup.ptr, dact.ptr, a.gate.ptr, a.up.ptr, N * I);
        dact.free();
        const dxn = bf(N * C);
        this.linearBackward(dxn, dgate, a.xn2, xa("gate_proj"), N, p.gate_proj, false);
        this.linearBackward(dxn, dup, a.xn2, xa("up_proj"), N, p.up_proj, true);
        dgate.free();
        dup.free();
        const dh = bf(N * C);
        k.rmsnormBackward(dh.ptr, null, dxn.ptr, a.h.ptr, this.norms[l].post.ptr, a.rstd2.ptr, N, C);
        k.addInplaceBf16(dh.ptr, dout.ptr, N * C);
        // attention
        const datt = bf(N * Hq * D);
        this.linearBackward(datt, dh, a.att, xa("o_proj"), N, p.o_proj, false);
        const dq = bf(N * Hq * D), dk = bf(N * Hkv * D), dv = bf(N * Hkv * D);
        at.attentionBackward(dq.ptr, dk.ptr, dv.ptr, datt.ptr, a.q.ptr, a.k.ptr, a.v.ptr, a.att.ptr, a.lse.ptr,
            ctx.keyValid?.ptr ?? null, ctx.seg?.ptr ?? null, B, T, T, Hq, Hkv, D, 0, 1 / Math.sqrt(D));
        datt.free();
        k.ropeBackward(dq.ptr, dq.ptr, ctx.pos.ptr, this.invFreq.ptr, this.model.attentionScaling, N, Hq, D);
        k.ropeBackward(dk.ptr, dk.ptr, ctx.pos.ptr, this.invFreq.ptr, this.model.attentionScaling, N, Hkv, D);
        this.linearBackward(dxn, dq, a.xn1, xa("q_proj"), N, p.q_proj, false);
        this.linearBackward(dxn, dk, a.xn1, xa("k_proj"), N, p.k_proj, true);
        this.linearBackward(dxn, dv, a.xn1, xa("v_proj"), N, p.v_proj, true);
        dq.free();
        dk.free();
        dv.free();
        const dx = bf(N * C);
        k.rmsnormBackward(dx.ptr, null, dxn.ptr, a.x.ptr, this.norms[l].input.ptr, a.rstd1.ptr, N, C);
        k.addInplaceBf16(dx.ptr, dh.ptr, N * C);
        dxn.free();
        dh.free();
        return dx;
    }
}

/** AdamW over the device tensors of a CudaTrainer (the transformers optim names; 8-bit states for >= 4096 elements) */
export class CudaAdamW {
    private readonly slots: {name: string; param: DeviceBuffer; grad: DeviceBuffer; kind: "torch32" | "bnb32" | "bnb8";
        s1: number; s2: number; a1: number; a2: number; decay: boolean; n: number}[] = [];
    private readonly qmaps: {signed: DeviceBuffer; unsigned: DeviceBuffer} | null = null;
    private steps = 0;
    private readonly sumsq: DeviceBuffer;

    constructor(tensors: {name: string; param: DeviceBuffer; grad: DeviceBuffer; decay: boolean}[],
        readonly opts: {optimBits: 32 | 8; paged: boolean; variant: "torch" | "bnb"; betas: [number, number]; eps: number;
            weightDecay: number; min8bitSize: number; blocksize: number}, maps: {signed: Float32Array; unsigned: Float32Array}) {
        const k = cudaKernelOps();
        const alloc = (bytes: number) => {
            const ptr = opts.paged ? k.allocPagedState(bytes) : cuda().alloc(bytes);
            cuda().memset(ptr, 0, bytes);
            return ptr;
        };
        for (const t of tensors) {
            const n = t.param.length;
            const kind = opts.variant === "torch" ? "torch32" : opts.optimBits === 8 && n >= opts.min8bitSize ? "bnb8" : "bnb32";
            const bytes = kind === "bnb8" ? n : n * 4;
            const blocks = Math.ceil(n / opts.blocksize);
            this.slots.push({name: t.name, param: t.param, grad: t.grad, kind, s1: alloc(bytes), s2: alloc(bytes),
                a1: kind === "bnb8" ? alloc(blocks * 4) : 0, a2: kind === "bnb8" ? alloc(blocks * 4) : 0, decay: t.decay, n});
        }
        if (this.slots.some((s) => s.kind === "bnb8"))
            this.qmaps = {signed: DeviceBuffer.from("f32", maps.signed), unsigned: DeviceBuffer.from("f32", maps.unsigned)};
        this.sumsq = DeviceBuffer.alloc("f32", 2); // one double
    }

    /** clips to maxNorm (0: no clipping) and returns the norm before clipping */
    clipGradNorm(maxNorm: number): number {
        const k = cudaKernelOps();
        const bufs = this.slots.map((s) => s.grad.ptr), lens = this.slots.map((s) => s.n);
        k.optimSumSquares(this.sumsq.ptr, bufs, lens);
        const host = new Float64Array(1);
        cuda().download(host, this.sumsq.ptr);
        const norm = Math.sqrt(host[0]);
        if (maxNorm > 0) k.optimClipScale(bufs, lens, this.sumsq.ptr, maxNorm);
        return norm;
    }

    step(lr: number): void {
        const k = cudaKernelOps(), o = this.opts;
        this.steps++;
        for (const s of this.slots) {
            const wd = s.decay ? o.weightDecay : 0;
            if (s.kind === "torch32") k.adamwTorchStep(s.param.ptr, s.s1, s.s2, s.grad.ptr, lr, o.betas[0], o.betas[1], o.eps, wd, this.steps, s.n);
            else if (s.kind === "bnb32") k.adamwBnb32Step(s.param.ptr, s.s1, s.s2, s.grad.ptr, lr, o.betas[0], o.betas[1], o.eps, wd, this.steps, s.n);
            else k.adamwBnb8Step(s.param.ptr, s.s1, s.s2, s.a1, s.a2, s.grad.ptr, this.qmaps!.signed.ptr, this.qmaps!.unsigned.ptr,
                lr, o.betas[0], o.betas[1], o.eps, wd, this.steps, o.blocksize, s.n);
        }
    }

    /** the states in the CPU optimizer's format (src/optim/adamw.ts), so checkpoints resume on either device */
    stateDict(): OptimizerStateDict {
        const tensors: OptimizerStateDict["tensors"] = {};
        for (const s of this.slots) {
            const blocks = Math.ceil(s.n / this.opts.blocksize);
            const get = (ptr: number, kind: "f32" | "u8", n: number) => {
                const out = kind === "f32" ? new Float32Array(n) : new Uint8Array(n);
                cuda().download(out, ptr);
                return out;
            };
            if (s.kind === "torch32") {
                tensors[`state.${s.name}.exp_avg`] = get(s.s1, "f32", s.n);
                tensors[`state.${s.name}.exp_avg_sq`] = get(s.s2, "f32", s.n);
            } else if (s.kind === "bnb32") {
                tensors[`state.${s.name}.state1`] = get(s.s1, "f32", s.n);
                tensors[`state.${s.name}.state2`] = get(s.s2, "f32", s.n);
            } else {
                tensors[`state.${s.name}.state1`] = get(s.s1, "u8", s.n);
                tensors[`state.${s.name}.state2`] = get(s.s2, "u8", s.n);
                tensors[`state.${s.name}.absmax1`] = get(s.a1, "f32", blocks);
                tensors[`state.${s.name}.absmax2`] = get(s.a2, "f32", blocks);
            }
        }
        if (this.qmaps) {
            tensors.qmap1 = this.qmaps.signed.toHost() as Float32Array;
            tensors.qmap2 = this.qmaps.unsigned.toHost() as Float32Array;
        }
        return {tensors, metadata: {format: "qlora.adamw", version: 1, step: this.steps,
            options: {...this.opts, betas: [...this.opts.betas]},
            params: this.slots.map((s) => ({name: s.name, numel: s.n, state: s.kind, weightDecay: s.decay,
                paged: this.opts.paged && s.n >= 100_000}))}};
    }

    loadStateDict(saved: OptimizerStateDict): void {
        const meta = saved.metadata;
        if (meta.params.length !== this.slots.length || meta.params.some((p, i) => p.name !== this.slots[i].name ||
            p.numel !== this.slots[i].n || p.state !== this.slots[i].kind))
            throw new QloraError("the saved optimizer state does not match these trainable parameters; resume with the same config");
        const put = (ptr: number, key: string) => {
            const t = saved.tensors[key];
            if (!t) throw new QloraError(`the saved optimizer state has no ${key}`);
            cuda().upload(ptr, t);
        };
        for (const s of this.slots) {
            if (s.kind === "torch32") {
                put(s.s1, `state.${s.name}.exp_avg`);
                put(s.s2, `state.${s.name}.exp_avg_sq`);
            } else {
                put(s.s1, `state.${s.name}.state1`);
                put(s.s2, `state.${s.name}.state2`);
                if (s.kind === "bnb8") {
                    put(s.a1, `state.${s.name}.absmax1`);
                    put(s.a2, `state.${s.name}.absmax2`);
                }
            }
        }
        this.steps = meta.step;
    }

    get stateBytes(): number {
        return this.slots.reduce((a, s) => a + (s.kind === "bnb8" ? 2 * s.n + 8 * Math.ceil(s.n / this.opts.blocksize) : 8 * s.n), 0);
    }
}

