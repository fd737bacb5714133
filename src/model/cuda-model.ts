// cuda-model.ts: a model on an NVIDIA GPU, for training (the QLoRA/LoRA step) and for inference (generation with a
// KV cache in device memory, evaluation): the decoder graph (graph.ts) over the CUDA backend, with the projections
// (lora/projection.ts, the CPU's too) on the device: bf16 base weights (NF4 dequantized into one scratch buffer
// right before each GEMM, or the fused 4-bit GEMV when decoding a few rows), fp32 trainable tensors (LoRA, DoRA
// magnitudes, biases) with bf16 copies for the GEMMs, fp32 gradients.
//
// LoRA dropout masks are a hash of (seed, micro-batch, projection, element) shared with the CPU
// (native/include/qlora_dropout.h, backend/dropout.ts): a block recomputed under gradient checkpointing
// regenerates them, and the CPU and the GPU draw the same masks.
import {QloraError} from "../errors.js";
import type {FrozenWeight, LoraTerm} from "../backend/backend.js";
import {DropoutClock} from "../backend/dropout.js";
import {cudaBackend, type CudaTensors} from "../backend/cuda-backend.js";
import type {TokenPick} from "../backend/sampling.js";
import {DeviceBuffer} from "../backend/cuda.js";
import {
    cudaGemmOps,
    GEMV_4BIT_MAX_LORA_R,
    GEMV_4BIT_MAX_M,
    GEMV_4BIT_MAX_PARTS,
    gemv4bitStateFields,
    type Gemv4bitStateArgs
} from "../backend/cuda-gemm-types.js";
import {cudaKernelOps} from "../backend/cuda-kernels-types.js";
import {cudaAttentionOps} from "../backend/cuda-attention-types.js";
import {f32ToHalf} from "../backend/cpu.js";
import {DenseLinear, type BaseLinear} from "../backend/linear.js";
import {frozenBase} from "../lora/layer.js";
import {Projection, type BackendTensor} from "../lora/projection.js";
import {Linear4bit} from "../quant/linear4bit.js";
import type {DecoderModel} from "./decoder.js";
import {
    DecoderGraph,
    KVCache,
    type ForwardBackwardOptions,
    type GraphWeights,
    type LossResult,
    type TrainBatch,
    type TrainedFull,
    trainedOnBackend
} from "./graph.js";
import {DecodeGraphs, cudaGraphsByDefault} from "./cuda-decode-graphs.js";
import type {CausalLm, LmForwardOptions} from "./causal-lm.js";
import type {ModelConfig} from "../io/hf-config.js";
import {projNames, type ProjName} from "./weights.js";

/** the 4-bit storage of a frozen weight on the device (bnb's layout) */
interface Device4bit {
    packed: DeviceBuffer;
    absmax: DeviceBuffer | null;
    absmaxQ: DeviceBuffer | null;
    nestedAbsmax: DeviceBuffer | null;
    nestedCode: DeviceBuffer | null;
    code: DeviceBuffer;
    offset: number;
    blocksize: number;
    nestedBlocksize: number;
}

/** the quantization state as dequantize4bit and gemv4bit take it, in their argument order */
function quantStateArgs(q: Device4bit): Gemv4bitStateArgs {
    return [
        q.packed.ptr,
        q.absmax?.ptr ?? 0,
        q.absmaxQ?.ptr ?? 0,
        q.nestedAbsmax?.ptr ?? 0,
        q.nestedCode?.ptr ?? 0,
        q.offset,
        q.code.ptr,
        q.blocksize,
        q.nestedBlocksize
    ];
}

function bf16Upload(values: Float32Array): DeviceBuffer {
    return DeviceBuffer.from("bf16", f32ToHalf(values, "BF16"));
}

/** QLORA_CUDA_EMBED_ON_HOST=0 keeps the input embedding in device memory */
export function embedOnHostByDefault(): boolean {
    return process.env.QLORA_CUDA_EMBED_ON_HOST !== "0";
}

/** bf16 in pinned host memory mapped for the device; in device memory where the host cannot pin it */
function hostResidentBf16(values: Float32Array): DeviceBuffer {
    const bits = f32ToHalf(values, "BF16");
    try {
        return DeviceBuffer.hostResident("bf16", bits);
    } catch {
        return DeviceBuffer.from("bf16", bits);
    }
}

/**
 * A projection's frozen weight on the device: bf16 [out, in], or 4-bit dequantized into the model's shared scratch
 * right before each GEMM (or read by the fused dequantize + GEMV when decoding a few rows).
 */
class CudaWeight implements FrozenWeight<DeviceBuffer> {
    private readonly dense: DeviceBuffer | null = null;
    private readonly q: Device4bit | null = null;
    /** whether the fused 4-bit GEMV takes this layer's layout (false after it refused once) */
    private gemvUsable = true;
    /** whether the grouped GEMV took the group this weight leads (false after it refused once) */
    private groupUsable = true;

    constructor(
        base: BaseLinear,
        private readonly scratch: DeviceBuffer
    ) {
        this.inFeatures = base.inFeatures;
        this.outFeatures = base.outFeatures;
        if (base instanceof Linear4bit) {
            const s = base.state;
            this.q = {
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
        } else if (base instanceof DenseLinear) this.dense = bf16Upload(base.weightF32());
        else throw new QloraError("the CUDA backend supports dense and 4-bit projections");
    }
    readonly inFeatures: number;
    readonly outFeatures: number;

    /** the bf16 weight: the dense copy, or the 4-bit weight dequantized into the shared scratch */
    private weight(): DeviceBuffer {
        if (this.dense) return this.dense;
        const q = this.q!;
        cudaGemmOps().dequantize4bit(this.scratch.ptr, "bf16", ...quantStateArgs(q), this.outFeatures * this.inFeatures);
        return this.scratch;
    }

    /**
     * y[M, out] = x W^T: when decoding a few rows of a 4-bit weight, the fused dequantize + GEMV; else a GEMM over
     * the bf16 weight (training keeps the GEMM: the GEMV rounds differently, and the backward's product must match)
     */
    product(y: DeviceBuffer, x: DeviceBuffer, M: number, decoding: boolean): void {
        if (decoding && this.gemv(y, x, M, null)) return;
        cudaBackend().gemm(false, true, M, this.outFeatures, this.inFeatures, 1, x, this.weight(), 0, y);
    }

    /** decoding a few rows of a 4-bit weight: the fused GEMV adds the LoRA update before its one rounding */
    productWithLora(
        y: DeviceBuffer,
        x: DeviceBuffer,
        M: number,
        lora: {xa: DeviceBuffer; B: DeviceBuffer; r: number; scale: number}
    ): boolean {
        return lora.r <= GEMV_4BIT_MAX_LORA_R && this.gemv(y, x, M, lora);
    }

    /**
     * y[M, out] = x W^T (+ scale xa B^T) by the fused dequantize + GEMV when the weight is 4-bit and M small;
     * false when it does not apply (a layout the kernel refused once is not tried again: dequantize + GEMM)
     */
    private gemv(
        y: DeviceBuffer,
        x: DeviceBuffer,
        M: number,
        lora: {xa: DeviceBuffer; B: DeviceBuffer; r: number; scale: number} | null
    ): boolean {
        const q = this.q;
        if (!q || !this.gemvUsable || M > GEMV_4BIT_MAX_M) return false;
        try {
            cudaGemmOps().gemv4bit(
                y.ptr,
                "bf16",
                x.ptr,
                "bf16",
                ...quantStateArgs(q),
                M,
                this.outFeatures,
                this.inFeatures,
                lora?.xa.ptr,
                lora?.B.ptr,
                lora?.r ?? 0,
                lora?.scale
            );
            return true;
        } catch (err) {
            // a layout the kernel does not handle (K % 8, block size): dequantize + GEMM from now on
            if (!(err instanceof RangeError)) throw err;
            this.gemvUsable = false;
            return false;
        }
    }

    /** decoding q, k, v (or gate, up) of one x: the 4-bit weights' fused GEMVs, LoRA terms included, in one launch */
    productGroup(
        parts: {
            weight: FrozenWeight<DeviceBuffer>;
            y: DeviceBuffer;
            lora: LoraTerm<DeviceBuffer> | null;
            bias: DeviceBuffer | null;
        }[],
        x: DeviceBuffer,
        M: number
    ): boolean {
        const K = this.inFeatures;
        const usable = (w: FrozenWeight<DeviceBuffer>): w is CudaWeight =>
            w instanceof CudaWeight && w.q !== null && w.gemvUsable && w.inFeatures === K;
        if (!this.groupUsable || M > GEMV_4BIT_MAX_M || parts.length > GEMV_4BIT_MAX_PARTS) return false;
        if (!parts.every((p) => usable(p.weight))) return false;
        if (parts.some((p) => (p.lora && p.lora.r > GEMV_4BIT_MAX_LORA_R) || (p.bias && p.bias.dtype !== "bf16"))) return false;
        try {
            cudaGemmOps().gemv4bitGroup(
                x.ptr,
                "bf16",
                M,
                K,
                parts.map(({weight, y, lora, bias}) => {
                    return {
                        y: y.ptr,
                        yDtype: "bf16" as const,
                        ...gemv4bitStateFields(quantStateArgs((weight as CudaWeight).q!)),
                        N: weight.outFeatures,
                        loraXa: lora?.xa.ptr,
                        loraB: lora?.B.ptr,
                        loraR: lora?.r ?? 0,
                        loraScale: lora?.scale,
                        bias: bias?.ptr
                    };
                })
            );
            return true;
        } catch (err) {
            // a layout the grouped kernel does not take: each weight on its own from now on
            if (!(err instanceof RangeError)) throw err;
            this.groupUsable = false;
            return false;
        }
    }

    productTranspose(dx: DeviceBuffer, dy: DeviceBuffer, M: number, accumulate: boolean): void {
        cudaBackend().gemm(false, false, M, this.inFeatures, this.outFeatures, 1, dy, this.weight(), accumulate ? 1 : 0, dx);
    }

    weightInto(out: DeviceBuffer): void {
        cudaKernelOps().bf16ToF32(out.ptr, this.weight().ptr, this.outFeatures * this.inFeatures);
    }
}

export class CudaModel implements CausalLm {
    readonly device = "cuda" as const;
    /** bf16, the largest projection: dequantized 4-bit weights land here */
    private readonly scratchW: DeviceBuffer;
    private readonly graph: DecoderGraph<CudaTensors>;
    private readonly projections: Projection<CudaTensors>[] = [];
    private readonly trained: TrainedFull<BackendTensor<DeviceBuffer>>;
    /** where the input embedding lives: "host" (pinned, read over PCIe: frozen and untied) or "device" */
    readonly embedPlacement: "host" | "device";

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
        if (!cudaAttentionOps().attentionSupportsHeadDim(cfg.headDim))
            throw new QloraError(`the CUDA attention kernels handle head_dim 64, 96 and 128; this model has ${cfg.headDim}`);
        const maxW = p.layers.reduce(
            (m, layer) => projNames(cfg).reduce((mm, n) => Math.max(mm, layer.proj[n].outFeatures * layer.proj[n].inFeatures), m),
            0
        );
        this.scratchW = DeviceBuffer.alloc("bf16", maxW);
        const be = cudaBackend();
        // full weights that train (modules_to_save): fp32 masters and gradients on the device, bf16 copies for the graph
        this.trained = p.trainedFull ? trainedOnBackend<CudaTensors>(be, p.trainedFull) : {};
        // a frozen, untied input embedding stays in pinned host memory: a step gathers only its tokens' rows
        const embedOnHost = p.lmHead !== p.embed && !this.trained.embed && embedOnHostByDefault();
        const embed = embedOnHost ? hostResidentBf16(p.embed) : bf16Upload(p.embed);
        this.embedPlacement = embed.onHost ? "host" : "device";
        const weights: GraphWeights<CudaTensors> = {
            embed,
            lmHead: p.lmHead === p.embed ? embed : bf16Upload(p.lmHead),
            finalNorm: bf16Upload(p.norm),
            invFreq: DeviceBuffer.from("f32", model.invFreq),
            longRope: model.longRope && {
                invFreq: DeviceBuffer.from("f32", model.longRope.invFreq),
                fromPosition: model.longRope.fromPosition
            },
            localRope: model.localRope && {
                invFreq: DeviceBuffer.from("f32", model.localRope.invFreq),
                attentionScaling: model.localRope.attentionScaling
            },
            layers: p.layers.map((layer) => {
                const proj = {} as Record<ProjName, Projection<CudaTensors>>;
                for (const name of projNames(cfg)) {
                    const host = layer.proj[name];
                    proj[name] = new Projection(be, new CudaWeight(frozenBase(host), this.scratchW), host);
                    this.projections.push(proj[name]);
                }
                return {
                    inputNorm: bf16Upload(layer.inputNorm),
                    postNorm: bf16Upload(layer.postNorm),
                    qNorm: layer.qNorm && bf16Upload(layer.qNorm),
                    kNorm: layer.kNorm && bf16Upload(layer.kNorm),
                    // gemma3: (1 + w) rounded to bf16 once (transformers multiplies by it in fp32)
                    attnOutNorm: layer.attnOutNorm && bf16Upload(layer.attnOutNorm),
                    mlpOutNorm: layer.mlpOutNorm && bf16Upload(layer.mlpOutNorm),
                    proj
                };
            })
        };
        this.graph = new DecoderGraph(be, cfg, weights, {
            attentionScaling: model.attentionScaling,
            offloadActivations,
            trained: this.trained
        });
        this.decodeGraphs = new DecodeGraphs(this.graph);
    }

    /** whether one-token decoding steps replay CUDA graphs (default: on unless QLORA_CUDA_GRAPHS=0) */
    cudaGraphs = cudaGraphsByDefault();
    private readonly decodeGraphs: DecodeGraphs;

    /** decoding steps recorded as CUDA graphs, replays, and why recording failed (null: it has not) */
    decodeGraphStats(): {recorded: number; replays: number; failure: string | null} {
        const g = this.decodeGraphs;
        return {recorded: g.recorded, replays: g.replays, failure: g.failure};
    }

    /** the trainable tensors on the device, in the order of the LoRA model's trainableTensors() */
    deviceTensors(): {name: string; param: DeviceBuffer; grad: DeviceBuffer; decay: boolean; fp32State: boolean}[] {
        return this.allTensors().map((t) => ({
            name: t.host.name,
            param: t.param,
            grad: t.grad,
            decay: t.host.decay,
            fp32State: t.host.fp32State ?? false
        }));
    }

    private allTensors(): BackendTensor<DeviceBuffer>[] {
        const full = [this.trained.lmHead, this.trained.embed].filter((t) => t !== undefined);
        return this.projections.flatMap((p) => p.tensors).concat(full);
    }

    zeroGrad(): void {
        for (const t of this.allTensors()) cudaBackend().zeroParam(t.grad, t.host.grad.length);
    }

    /** after the optimizer updated the fp32 masters: new bf16 copies, DoRA norms of the new weights */
    afterOptimizerStep(): void {
        this.graph.afterUpdate();
    }

    /** copies the device tensors (and grads) back into the host layers */
    syncToHost(withGrads = false): void {
        const be = cudaBackend();
        for (const t of this.allTensors()) {
            be.paramToHost(t.host.param, t.param);
            if (withGrads) be.paramToHost(t.host.grad, t.grad);
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
        return this.withHidden(ids, B, T, opts, (hidden) => this.graph.logits(hidden, opts.logitRows ?? null, B * T));
    }

    /**
     * decoding: each logit row's next token chosen on the device; only the token ids come to the host. A one-token
     * step over cache rows replays a recorded CUDA graph (cuda-decode-graphs.ts) unless cudaGraphs is off.
     */
    pickForward(ids: Int32Array, B: number, T: number, opts: LmForwardOptions, picks: readonly TokenPick[] | null): Int32Array {
        const cache = opts.cache as KVCache<DeviceBuffer> | undefined;
        if (this.cudaGraphs && cache && T === 1 && !opts.attentionMask && !opts.positionIds) {
            const plan = this.graph.planStep(ids, B, T, {cache, firstRow: opts.firstRow});
            const hidden = this.decodeGraphs.step(ids, plan);
            if (hidden) {
                // the recorded hidden states stay with the graph (the next replay overwrites them)
                cache.advance(plan.firstRow, B, T);
                return this.graph.pickTokens(hidden, opts.logitRows ?? null, B * T, picks);
            }
        }
        return this.withHidden(ids, B, T, opts, (hidden) => this.graph.pickTokens(hidden, opts.logitRows ?? null, B * T, picks));
    }

    private withHidden<R>(ids: Int32Array, B: number, T: number, opts: LmForwardOptions, use: (hidden: DeviceBuffer) => R): R {
        const hidden = this.graph.forwardHidden(ids, B, T, {
            cache: opts.cache as KVCache<DeviceBuffer> | undefined,
            firstRow: opts.firstRow,
            attentionMask: opts.attentionMask,
            positionIds: opts.positionIds
        });
        try {
            return use(hidden);
        } finally {
            hidden.free();
        }
    }

    /** a paged KV cache in device memory (bf16); release() frees it (and the decoding steps recorded over it) */
    newCache(batch: number, capacity: number, blocks?: number): KVCache<DeviceBuffer> {
        const cache: KVCache<DeviceBuffer> = new KVCache<DeviceBuffer>(
            this.model.config,
            batch,
            capacity,
            (n) => DeviceBuffer.zeros("bf16", n),
            (t) => {
                this.decodeGraphs.drop(cache);
                t.free();
            },
            blocks
        );
        this.decodeGraphs.track(cache);
        return cache;
    }

    score(batch: TrainBatch): LossResult {
        return this.graph.score(batch);
    }
}
