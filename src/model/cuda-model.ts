// cuda-model.ts: a model on an NVIDIA GPU, for training (the QLoRA/LoRA step) and for inference (generation with a
// KV cache in device memory, evaluation): the decoder graph (graph.ts) over the CUDA backend, with the projections
// on the device: bf16 base weights (NF4 dequantized into one scratch buffer right before each GEMM, or the fused
// 4-bit GEMV when decoding a few rows), fp32 LoRA master weights with bf16 copies for the GEMMs, fp32 gradients.
//
// LoRA dropout masks are a hash of (seed, micro-batch, projection, element) shared with the CPU
// (native/include/qlora_dropout.h, backend/dropout.ts): a block recomputed under gradient checkpointing
// regenerates them, and the CPU and the GPU draw the same masks.
import {QloraError} from "../errors.js";
import type {GraphLinear} from "../backend/backend.js";
import {DropoutClock} from "../backend/dropout.js";
import {cudaBackend, type CudaTensors} from "../backend/cuda-backend.js";
import {cuda, DeviceBuffer} from "../backend/cuda.js";
import {cudaGemmOps, GEMV_4BIT_MAX_M} from "../backend/cuda-gemm-types.js";
import {cudaKernelOps} from "../backend/cuda-kernels-types.js";
import {cudaLoraOps} from "../backend/cuda-lora-types.js";
import {f32ToHalf} from "../backend/cpu.js";
import {DenseLinear, type LinearLayer} from "../backend/linear.js";
import {LoraLinear} from "../lora/layer.js";
import {Linear4bit} from "../quant/linear4bit.js";
import type {DecoderModel} from "./decoder.js";
import {
    DecoderGraph,
    KVCache,
    type ForwardBackwardOptions,
    type GraphWeights,
    type LossResult,
    type TrainBatch
} from "./graph.js";
import type {CausalLm, LmForwardOptions} from "./causal-lm.js";
import type {ModelConfig} from "../io/hf-config.js";
import {PROJ_NAMES, projectionIndex, type ProjName} from "./weights.js";

/** a projection's frozen weight on the device */
interface DeviceWeight {
    outF: number;
    inF: number;
    bias: DeviceBuffer | null; // bf16 [out]
    dense: DeviceBuffer | null; // bf16 [out, in]
    nf4: {
        packed: DeviceBuffer;
        absmax: DeviceBuffer | null;
        absmaxQ: DeviceBuffer | null;
        nestedAbsmax: DeviceBuffer | null;
        nestedCode: DeviceBuffer | null;
        code: DeviceBuffer;
        offset: number;
        blocksize: number;
        nestedBlocksize: number;
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

function bf16Upload(values: Float32Array): DeviceBuffer {
    return DeviceBuffer.from("bf16", f32ToHalf(values, "BF16"));
}

/** the scratch buffer dequantized weights land in, and the dropout seed of the current micro-batch */
interface CudaLinearContext {
    readonly scratchW: DeviceBuffer;
    dropoutSeed(index: number): number;
}

/** one projection on the device: y = x W^T (+ b) (+ s drop(x) A^T B^T); forward hands xa = drop(x) A^T to backward */
class CudaLinear implements GraphLinear<DeviceBuffer> {
    constructor(
        readonly w: DeviceWeight,
        readonly lora: DeviceLora | null,
        private readonly index: number,
        private readonly ctx: CudaLinearContext
    ) {}

    get inFeatures(): number {
        return this.w.inF;
    }
    get outFeatures(): number {
        return this.w.outF;
    }

    /** the bf16 weight: the dense copy, or the 4-bit weight dequantized into the shared scratch */
    private weight(): DeviceBuffer {
        const {w} = this;
        if (w.dense) return w.dense;
        const q = w.nf4!;
        cudaGemmOps().dequantize4bit(
            this.ctx.scratchW.ptr,
            "bf16",
            q.packed.ptr,
            q.absmax?.ptr ?? 0,
            q.absmaxQ?.ptr ?? 0,
            q.nestedAbsmax?.ptr ?? 0,
            q.nestedCode?.ptr ?? 0,
            q.offset,
            q.code.ptr,
            q.blocksize,
            q.nestedBlocksize,
            w.outF * w.inF
        );
        return this.ctx.scratchW;
    }

    /** drop(x) into a new buffer, or null without dropout */
    private dropped(x: DeviceBuffer, N: number): DeviceBuffer | null {
        const l = this.lora!;
        if (l.dropout <= 0) return null;
        const out = DeviceBuffer.alloc("bf16", N * this.w.inF);
        cudaLoraOps().dropoutBf16(out.ptr, x.ptr, this.ctx.dropoutSeed(this.index), l.dropout, N * this.w.inF);
        return out;
    }

    /** whether the fused 4-bit GEMV takes this layer's layout (false after it refused once) */
    private gemvUsable = true;

    /**
     * y[N, out] = x W^T: with `fused`, for a few rows of a 4-bit weight (decoding) the fused dequantize + GEMV, else
     * a GEMM over the bf16 weight
     */
    private baseProduct(y: DeviceBuffer, x: DeviceBuffer, N: number, fused: boolean): void {
        const g = cudaGemmOps(),
            {w} = this,
            q = w.nf4;
        if (fused && q && this.gemvUsable && N <= GEMV_4BIT_MAX_M) {
            try {
                g.gemv4bit(
                    y.ptr,
                    "bf16",
                    x.ptr,
                    "bf16",
                    q.packed.ptr,
                    q.absmax?.ptr ?? 0,
                    q.absmaxQ?.ptr ?? 0,
                    q.nestedAbsmax?.ptr ?? 0,
                    q.nestedCode?.ptr ?? 0,
                    q.offset,
                    q.code.ptr,
                    q.blocksize,
                    q.nestedBlocksize,
                    N,
                    w.outF,
                    w.inF
                );
                return;
            } catch (err) {
                // a layout the kernel does not handle (K % 8, block size): dequantize + GEMM from now on
                if (!(err instanceof RangeError)) throw err;
                this.gemvUsable = false;
            }
        }
        g.gemm(
            false,
            true,
            N,
            w.outF,
            w.inF,
            1,
            x.ptr,
            w.inF,
            "bf16",
            this.weight().ptr,
            w.inF,
            "bf16",
            0,
            y.ptr,
            w.outF,
            "bf16"
        );
    }

    forward(y: DeviceBuffer, x: DeviceBuffer, N: number, train: boolean): DeviceBuffer | null {
        const g = cudaGemmOps(),
            {w} = this;
        // training keeps the GEMM: the GEMV rounds differently, and the backward's product must match the forward's
        this.baseProduct(y, x, N, !train);
        if (w.bias) cudaLoraOps().addBiasBf16(y.ptr, w.bias.ptr, N, w.outF);
        const l = this.lora;
        if (!l) return null;
        const dropped = train ? this.dropped(x, N) : null;
        const xa = DeviceBuffer.alloc("bf16", N * l.r);
        g.gemm(false, true, N, l.r, w.inF, 1, (dropped ?? x).ptr, w.inF, "bf16", l.Ab.ptr, w.inF, "bf16", 0, xa.ptr, l.r, "bf16");
        g.gemm(false, true, N, w.outF, l.r, l.scaling, xa.ptr, l.r, "bf16", l.Bb.ptr, l.r, "bf16", 1, y.ptr, w.outF, "bf16");
        dropped?.free();
        if (train) return xa;
        xa.free();
        return null;
    }

    backward(dx: DeviceBuffer, dy: DeviceBuffer, x: DeviceBuffer, saved: unknown, N: number, accumulate: boolean): void {
        const g = cudaGemmOps(),
            {w} = this;
        g.gemm(
            false,
            false,
            N,
            w.inF,
            w.outF,
            1,
            dy.ptr,
            w.outF,
            "bf16",
            this.weight().ptr,
            w.inF,
            "bf16",
            accumulate ? 1 : 0,
            dx.ptr,
            w.inF,
            "bf16"
        );
        const l = this.lora,
            xa = saved as DeviceBuffer | null;
        if (!l || !xa) return;
        // dB[out, r] += s dy^T xa
        g.gemm(true, false, w.outF, l.r, N, l.scaling, dy.ptr, w.outF, "bf16", xa.ptr, l.r, "bf16", 1, l.dB.ptr, l.r, "f32");
        // dxa[N, r] = s dy B
        const dxa = DeviceBuffer.alloc("bf16", N * l.r);
        g.gemm(false, false, N, l.r, w.outF, l.scaling, dy.ptr, w.outF, "bf16", l.Bb.ptr, l.r, "bf16", 0, dxa.ptr, l.r, "bf16");
        // dA[r, in] += dxa^T drop(x)
        const dropped = this.dropped(x, N);
        g.gemm(true, false, l.r, w.inF, N, 1, dxa.ptr, l.r, "bf16", (dropped ?? x).ptr, w.inF, "bf16", 1, l.dA.ptr, w.inF, "f32");
        // dx += (dxa A) * mask
        if (dropped) {
            // drop(x) is no longer needed: reuse it as the [N, in] temporary
            g.gemm(false, false, N, w.inF, l.r, 1, dxa.ptr, l.r, "bf16", l.Ab.ptr, w.inF, "bf16", 0, dropped.ptr, w.inF, "bf16");
            cudaLoraOps().dropoutAddBf16(dx.ptr, dropped.ptr, this.ctx.dropoutSeed(this.index), l.dropout, N * w.inF);
            dropped.free();
        } else {
            g.gemm(false, false, N, w.inF, l.r, 1, dxa.ptr, l.r, "bf16", l.Ab.ptr, w.inF, "bf16", 1, dx.ptr, w.inF, "bf16");
        }
        dxa.free();
    }

    release(saved: unknown): void {
        (saved as DeviceBuffer | null)?.free();
    }
}

export class CudaModel implements CudaLinearContext, CausalLm {
    readonly device = "cuda" as const;
    readonly scratchW: DeviceBuffer; // bf16, the largest projection: dequantized weights land here
    private readonly graph: DecoderGraph<CudaTensors>;
    private readonly loras: DeviceLora[] = [];

    /**
     * `offloadActivations`: with gradient checkpointing, each block's input goes to host memory once the next
     * block has read it and comes back for the recomputation (Unsloth's offloaded checkpointing): the device then
     * holds one block input instead of one per layer, at the cost of a copy each way per layer (synchronous
     * here: the copies are not yet overlapped with compute).
     */
    constructor(
        readonly model: DecoderModel,
        readonly dropoutClock = new DropoutClock(0),
        offloadActivations = false
    ) {
        const cfg = model.config,
            p = model.params;
        if (cfg.headDim !== 64 && cfg.headDim !== 128)
            throw new QloraError(`the CUDA attention kernels handle head_dim 64 and 128; this model has ${cfg.headDim}`);
        const maxW = p.layers.reduce(
            (m, layer) => PROJ_NAMES.reduce((mm, n) => Math.max(mm, layer.proj[n].outFeatures * layer.proj[n].inFeatures), m),
            0
        );
        this.scratchW = DeviceBuffer.alloc("bf16", maxW);
        const embed = bf16Upload(p.embed);
        const weights: GraphWeights<CudaTensors> = {
            embed,
            lmHead: p.lmHead === p.embed ? embed : bf16Upload(p.lmHead),
            finalNorm: bf16Upload(p.norm),
            invFreq: DeviceBuffer.from("f32", model.invFreq),
            layers: p.layers.map((layer, l) => {
                const proj = {} as Record<ProjName, CudaLinear>;
                for (const name of PROJ_NAMES) proj[name] = this.toDevice(layer.proj[name], projectionIndex(l, name));
                return {inputNorm: bf16Upload(layer.inputNorm), postNorm: bf16Upload(layer.postNorm), proj};
            })
        };
        this.graph = new DecoderGraph(cudaBackend(), cfg, weights, {
            attentionScaling: model.attentionScaling,
            offloadActivations
        });
    }

    private toDevice(layer: LinearLayer, index: number): CudaLinear {
        const lora = layer instanceof LoraLinear ? layer : null;
        const base = lora ? lora.base : layer;
        const w: DeviceWeight = {
            outF: base.outFeatures,
            inF: base.inFeatures,
            bias: base.bias ? bf16Upload(base.bias) : null,
            dense: null,
            nf4: null
        };
        if (base instanceof Linear4bit) {
            const s = base.state;
            w.nf4 = {
                packed: DeviceBuffer.from("u8", s.packed),
                code: DeviceBuffer.from("f32", s.quantMap),
                absmax: s.absmax ? DeviceBuffer.from("f32", s.absmax) : null,
                absmaxQ: s.absmaxQ ? DeviceBuffer.from("u8", s.absmaxQ) : null,
                nestedAbsmax: s.nestedAbsmax ? DeviceBuffer.from("f32", s.nestedAbsmax) : null,
                nestedCode: s.nestedQuantMap ? DeviceBuffer.from("f32", s.nestedQuantMap) : null,
                offset: s.offset,
                blocksize: s.blocksize,
                nestedBlocksize: s.nestedBlocksize
            };
        } else if (base instanceof DenseLinear) {
            w.dense = bf16Upload(base.weightF32());
        } else throw new QloraError("the CUDA trainer supports dense and 4-bit projections");
        let dl: DeviceLora | null = null;
        if (lora?.lora) {
            if (lora.dBias)
                throw new QloraError("training biases (bias: all / lora_only) is not supported on CUDA yet; use bias: none");
            if (lora.lora.magnitude)
                throw new QloraError("DoRA (use_dora) is not supported on CUDA yet; train it with --device cpu");
            const l = lora.lora;
            dl = {
                host: lora,
                r: l.r,
                scaling: l.scaling,
                dropout: l.dropout,
                A: DeviceBuffer.from("f32", l.A),
                B: DeviceBuffer.from("f32", l.B),
                dA: DeviceBuffer.zeros("f32", l.A.length),
                dB: DeviceBuffer.zeros("f32", l.B.length),
                Ab: DeviceBuffer.alloc("bf16", l.A.length),
                Bb: DeviceBuffer.alloc("bf16", l.B.length)
            };
            this.loras.push(dl);
            this.refreshLoraCopy(dl);
        }
        return new CudaLinear(w, dl, index, this);
    }

    /** the mask seed of one projection in the current micro-batch: the CPU layers' seed (DropoutClock) */
    dropoutSeed(index: number): number {
        return this.dropoutClock.seedFor(index);
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
            {name: `base_model.model.${l.host.module}.lora_B.weight`, param: l.B, grad: l.dB}
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

    forwardBackward(batch: TrainBatch, opts: ForwardBackwardOptions): LossResult {
        if (!opts.noBackward) this.dropoutClock.microBatch++;
        return this.graph.forwardBackward(batch, opts);
    }

    /** the logits [B*T, V] (f32 on the host) of a forward pass in bf16: for checking against the CPU and the fixtures */
    forwardLogits(batch: TrainBatch): Float32Array {
        const {B, T} = batch;
        const hidden = this.graph.forwardHidden(batch.inputIds, B, T, {
            positionIds: batch.positionIds,
            attentionMask: batch.attentionMask ?? undefined,
            segIds: batch.segIds ?? undefined
        });
        const logits = this.graph.logits(hidden, null, B * T);
        hidden.free();
        return logits;
    }

    get config(): ModelConfig {
        return this.model.config;
    }

    /** logits [rows, V] for ids [B, T], appending to `cache` (a KV cache of this model's newCache) */
    forward(ids: Int32Array, B: number, T: number, opts: LmForwardOptions = {}): Float32Array {
        const hidden = this.graph.forwardHidden(ids, B, T, {cache: opts.cache as KVCache<DeviceBuffer> | undefined});
        try {
            return this.graph.logits(hidden, opts.logitRows ?? null, B * T);
        } finally {
            hidden.free();
        }
    }

    /** a KV cache in device memory (bf16); release() frees it */
    newCache(batch: number, capacity: number): KVCache<DeviceBuffer> {
        return new KVCache<DeviceBuffer>(
            this.model.config,
            batch,
            capacity,
            (n) => DeviceBuffer.zeros("bf16", n),
            (t) => t.free()
        );
    }

    score(batch: TrainBatch): LossResult {
        return this.graph.score(batch);
    }
}
