// decoder.ts: the decoder-only transformer family (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 3), one implementation driven by
// config.json: loading (fp32, or 4-bit projections) and the host model's forward, which runs the one decoder
// graph (graph.ts) on the CPU backend. Weights are read from bf16/f16/f32 checkpoints.
import {QloraError} from "../errors.js";
import {cpu, halfToF32} from "../backend/cpu.js";
import {cpuBackend, type CpuTensors} from "../backend/cpu-backend.js";
import type {TokenPick} from "../backend/sampling.js";
import {loadModelConfig, type ModelConfig} from "../io/hf-config.js";
import {computeLocalRope, computeRopeInvFreq} from "./rope.js";
import {DenseLinear, type LinearLayer} from "../backend/linear.js";
import {frozenBase} from "../lora/layer.js";
import {Projection} from "../lora/projection.js";
import {trainedOnBackend, type TrainedFull} from "./graph.js";
import type {TrainableTensor} from "../lora/layer.js";
import {DecoderGraph, KVCache, shiftTargets, type GraphWeights, type LossResult, type TrainBatch} from "./graph.js";
import type {CausalLm} from "./causal-lm.js";

export {KVCache};
import {
    openCheckpoint,
    projHasBias,
    projModule,
    projNames,
    projShape,
    layerNormNames,
    qkNormNames,
    readFloatTensor,
    readTensorF32,
    type ProjName
} from "./weights.js";
import type {BitsAndBytesConfig} from "../quant/config.js";
import {loadBnb4bitCheckpoint} from "../quant/bnb-checkpoint.js";
import {Linear4bit} from "../quant/linear4bit.js";
import {quantize4bit, type QuantState4bit} from "../quant/nf4.js";
import type {SafetensorsCheckpoint} from "../io/safetensors.js";

export interface LoadOptions {
    /**
     * quantize the projections to 4 bits as they are read (QLoRA). A checkpoint that is already quantized
     * (config.json has a bitsandbytes quantization_config) loads its 4-bit weights whatever this says.
     */
    quantization?: BitsAndBytesConfig | null;
}

/**
 * RMSNorm weights as the graph multiplies by them: gemma3's (1 + w) (Gemma3RMSNorm, in fp32) is added here, once, as
 * llama.cpp's converter does
 */
export interface DecoderLayer {
    inputNorm: Float32Array; // [C]
    /** the norm before the MLP (llama's post_attention_layernorm, gemma3's pre_feedforward_layernorm) */
    postNorm: Float32Array; // [C]
    /** qwen3, gemma3: RMSNorm weights over each head of q and k [head_dim] */
    qNorm?: Float32Array;
    kNorm?: Float32Array;
    /** gemma3: the norms of the attention's output (its post_attention_layernorm) and of the MLP's [C] */
    attnOutNorm?: Float32Array;
    mlpOutNorm?: Float32Array;
    /** the model's projections (projNames(config): the other names are absent) */
    proj: Record<ProjName, LinearLayer>;
}

export interface DecoderParams {
    embed: Float32Array; // [V, C]
    layers: DecoderLayer[];
    norm: Float32Array; // [C]
    lmHead: Float32Array; // [V, C], the embedding itself when tied
    /** full weights that train (LoRA's modules_to_save): the embedding and/or the output layer, with gradients */
    trainedFull?: TrainedFull<TrainableTensor>;
}

export interface ForwardOptions {
    /** [B, S] 1 for real tokens, 0 for padding (S = cache length + T with a cache, else T) */
    attentionMask?: Uint8Array;
    /** [B, T] positions; default: past length + 0..T-1 for every row (as transformers does without position_ids) */
    positionIds?: Int32Array;
    cache?: KVCache<Float32Array>;
    /** the cache row of the first of the B rows */
    firstRow?: number;
    /** compute logits only for these rows of the flattened [B*T] tokens (default: all) */
    logitRows?: number[];
}

export class DecoderModel implements CausalLm {
    readonly device = "cpu" as const;
    readonly invFreq: Float32Array;
    readonly attentionScaling: number;
    /** longrope: long_factor's table and the position from which transformers uses it */
    readonly longRope: {invFreq: Float32Array; fromPosition: number} | null;
    /** gemma3: the RoPE of the sliding layers (rope_local_base_freq) */
    readonly localRope: {invFreq: Float32Array; attentionScaling: number} | null;

    constructor(
        readonly config: ModelConfig,
        readonly params: DecoderParams
    ) {
        const rope = computeRopeInvFreq(config);
        this.invFreq = rope.invFreq;
        this.attentionScaling = rope.attentionScaling;
        this.longRope = rope.long ?? null;
        const local = computeLocalRope(config);
        this.localRope = local && {invFreq: local.invFreq, attentionScaling: local.attentionScaling};
    }

    /** loads config.json and the safetensors weights of a Hugging Face model folder (fp32, or 4-bit projections) */
    static async load(dir: string, opts: LoadOptions = {}): Promise<DecoderModel> {
        const cfg = await loadModelConfig(dir);
        return DecoderModel.fromCheckpoint(dir, cfg, opts);
    }

    static async fromCheckpoint(dir: string, cfg: ModelConfig, opts: LoadOptions = {}): Promise<DecoderModel> {
        computeRopeInvFreq(cfg); // a rope config that overflows float32 fails here, before any weight is read
        computeLocalRope(cfg);
        let preQuantized: Map<string, QuantState4bit> | null = null;
        if (cfg.quantizationConfig) {
            const bnb = await loadBnb4bitCheckpoint(dir);
            preQuantized = bnb.states;
            await bnb.ckpt.close();
            for (const [name, state] of preQuantized) {
                const m = /^model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.weight$/.exec(name);
                const expected = m ? projShape(cfg, m[1] as ProjName) : null;
                if (!expected || state.shape[0] !== expected[0] || state.shape[1] !== expected[1])
                    throw new QloraError(
                        `4-bit tensor "${name}" has shape [${state.shape.join(", ")}], which config.json ` +
                            `does not describe` +
                            (expected ? ` (expected [${expected.join(", ")}])` : ""),
                        {file: dir}
                    );
            }
        }
        const quant = opts.quantization?.load_in_4bit ? opts.quantization : null;
        const ckpt = await openCheckpoint(dir, cfg, new Set(preQuantized?.keys() ?? []));
        try {
            const read = (name: string) => readTensorF32(ckpt, name);
            const readNorm = async (name: string) => {
                const w = await read(name);
                if (cfg.rmsNormUnitOffset) for (let i = 0; i < w.length; i++) w[i] += 1;
                return w;
            };
            const embed = await read("model.embed_tokens.weight");
            const layers: DecoderLayer[] = [];
            for (let l = 0; l < cfg.numHiddenLayers; l++) {
                const proj = {} as Record<ProjName, LinearLayer>;
                for (const p of projNames(cfg)) {
                    const [outF, inF] = projShape(cfg, p);
                    const name = `${projModule(l, p)}.weight`;
                    const bias = projHasBias(cfg, p) ? await read(`${projModule(l, p)}.bias`) : null;
                    const state = preQuantized?.get(name);
                    if (state) proj[p] = new Linear4bit(state, bias);
                    else if (quant) proj[p] = new Linear4bit(await quantizeWeight(ckpt, name, [outF, inF], quant), bias);
                    else proj[p] = new DenseLinear({outFeatures: outF, inFeatures: inF, weight: await read(name), bias});
                }
                const qk = cfg.qkNorm ? qkNormNames(l) : null;
                const norms = layerNormNames(cfg, l);
                layers.push({
                    inputNorm: await readNorm(norms.input),
                    postNorm: await readNorm(norms.preMlp),
                    ...(qk ? {qNorm: await readNorm(qk.q), kNorm: await readNorm(qk.k)} : {}),
                    ...(norms.attnOut && norms.mlpOut
                        ? {attnOutNorm: await readNorm(norms.attnOut), mlpOutNorm: await readNorm(norms.mlpOut)}
                        : {}),
                    proj
                });
            }
            const norm = await readNorm("model.norm.weight");
            const lmHead = cfg.tieWordEmbeddings ? embed : await read("lm_head.weight");
            return new DecoderModel(cfg, {embed, layers, norm, lmHead});
        } finally {
            await ckpt.close();
        }
    }

    /** true when the projections are 4-bit */
    get quantized(): boolean {
        return this.params.layers.some((l) =>
            Object.values(l.proj).some((p) => p instanceof Linear4bit || (p as {base?: unknown}).base instanceof Linear4bit)
        );
    }

    get maxPositions(): number {
        return this.config.maxPositionEmbeddings;
    }

    /**
     * Runs the model on ids [B, T] and returns the logits [rows, V] (all B*T rows unless logitRows is given).
     * With a cache, the new keys and values are appended to it and attention covers the cached positions.
     */
    forward(ids: Int32Array, B: number, T: number, opts: ForwardOptions = {}): Float32Array {
        const hidden = this.forwardHidden(ids, B, T, opts);
        return this.logits(hidden, opts.logitRows ?? null, B * T);
    }

    pickForward(ids: Int32Array, B: number, T: number, opts: ForwardOptions, picks: readonly TokenPick[] | null): Int32Array {
        const hidden = this.forwardHidden(ids, B, T, opts);
        return this.hostGraph().pickTokens(hidden, opts.logitRows ?? null, B * T, picks);
    }

    newCache(batch: number, capacity: number, blocks?: number): KVCache<Float32Array> {
        return new KVCache(this.config, batch, capacity, undefined, undefined, blocks);
    }

    score(batch: TrainBatch): LossResult {
        return this.hostGraph().score(batch);
    }

    /** the final hidden states [B*T, C] after the last norm */
    forwardHidden(ids: Int32Array, B: number, T: number, opts: ForwardOptions = {}): Float32Array {
        return this.hostGraph().forwardHidden(ids, B, T, opts);
    }

    /** logits [rows, V] = hidden[rows] @ lm_head^T */
    logits(hidden: Float32Array, rows: number[] | null, totalRows: number): Float32Array {
        return this.hostGraph().logits(hidden, rows, totalRows);
    }

    /**
     * The decoder graph over the CPU backend with this model's current layers (LoRA wraps them after loading,
     * so the graph is made when asked for). `trainFull`: the full weights that train (modules_to_save) get gradients;
     * `mlpChunkRows`: GraphOptions' (tests run the chunked MLP on short sequences with it).
     */
    hostGraph(options: {trainFull?: boolean; mlpChunkRows?: number} = {}): DecoderGraph<CpuTensors> {
        const p = this.params;
        const weights: GraphWeights<CpuTensors> = {
            embed: p.embed,
            lmHead: p.lmHead,
            finalNorm: p.norm,
            invFreq: this.invFreq,
            longRope: this.longRope,
            localRope: this.localRope,
            layers: p.layers.map((layer) => {
                const proj = {} as Record<ProjName, Projection<CpuTensors>>;
                for (const name of projNames(this.config))
                    proj[name] = new Projection(cpuBackend(), frozenBase(layer.proj[name]), layer.proj[name]);
                const {inputNorm, postNorm, qNorm, kNorm, attnOutNorm, mlpOutNorm} = layer;
                return {inputNorm, postNorm, qNorm, kNorm, attnOutNorm, mlpOutNorm, proj};
            })
        };
        const full = options.trainFull ? p.trainedFull : undefined;
        return new DecoderGraph(cpuBackend(), this.config, weights, {
            attentionScaling: this.attentionScaling,
            mlpChunkRows: options.mlpChunkRows,
            trained: full && trainedOnBackend<CpuTensors>(cpuBackend(), full)
        });
    }

    /**
     * transformers' causal-LM loss: logits at t predict labels at t+1; mean over labels != -100.
     * logits [B*T, V], labels [B, T] (any negative value is ignored).
     */
    causalLmLoss(logits: Float32Array, labels: Int32Array, B: number, T: number): {loss: number; count: number} {
        const V = this.config.vocabSize;
        const targets = shiftTargets(labels, B, T);
        const losses = new Float32Array(B * T);
        // logits from forward() are soft-capped already (gemma3)
        const count = cpu().crossEntropyForward(losses, null, logits, targets, B * T, V);
        let sum = 0;
        for (let i = 0; i < losses.length; i++) sum += losses[i];
        return {loss: count > 0 ? sum / count : NaN, count};
    }
}

/**
 * Quantizes one projection as bitsandbytes does when transformers loads it: from the tensor in the compute
 * dtype (bf16 checkpoints with a bf16 compute dtype quantize the bf16 values; otherwise their f32 upcast).
 */
async function quantizeWeight(
    ckpt: SafetensorsCheckpoint,
    name: string,
    shape: [number, number],
    cfg: BitsAndBytesConfig
): Promise<QuantState4bit> {
    const opts = {quantType: cfg.bnb_4bit_quant_type, compressStatistics: cfg.bnb_4bit_use_double_quant, shape};
    return readFloatTensor(ckpt, name, (t) => {
        if (t.dtype === "BF16" && cfg.bnb_4bit_compute_dtype === "bfloat16") return quantize4bit({bf16: t.values}, opts);
        const values = t.dtype === "F32" ? t.values : halfToF32(t.values, t.dtype);
        return quantize4bit(values, {...opts, dtype: "float32"});
    });
}
