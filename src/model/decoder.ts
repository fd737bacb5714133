// decoder.ts: the decoder-only transformer family (Llama, Qwen2, Mistral), one implementation driven by
// config.json. fp32 compute on the CPU backend; weights read from bf16/f16/f32 checkpoints.
//
// Block (pre-norm, as in transformers' LlamaDecoderLayer / Qwen2DecoderLayer):
//   h = x + o_proj(attn(rope(q_proj(norm1(x))), rope(k_proj(.)), v_proj(.)))
//   y = h + down_proj(silu(gate_proj(norm2(h))) * up_proj(norm2(h)))
import {QloraError} from "../errors.js";
import {cpu, halfToF32} from "../backend/cpu.js";
import {loadModelConfig, MAX_TENSOR_ELEMENTS, type ModelConfig} from "../io/hf-config.js";
import {computeRopeInvFreq} from "./rope.js";
import {DenseLinear, type LinearLayer} from "../backend/linear.js";
import {openCheckpoint, PROJ_NAMES, projHasBias, projModule, projShape, readFloatTensor, readTensorF32, type ProjName} from "./weights.js";
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

export interface DecoderLayer {
    inputNorm: Float32Array; // [C]
    postNorm: Float32Array; // [C]
    proj: Record<ProjName, LinearLayer>;
}

export interface DecoderParams {
    embed: Float32Array; // [V, C]
    layers: DecoderLayer[];
    norm: Float32Array; // [C]
    lmHead: Float32Array; // [V, C], the embedding itself when tied
    /** gradients of full weights that train (LoRA's modules_to_save): the embedding and/or the output layer */
    fullGrads?: {embed?: Float32Array; lmHead?: Float32Array};
}

/** per-layer key/value buffers [B, capacity, Hkv, D] for incremental decoding */
export class KVCache {
    readonly k: Float32Array[];
    readonly v: Float32Array[];
    /** number of positions already filled */
    length = 0;
    constructor(readonly cfg: ModelConfig, readonly batch: number, readonly capacity: number) {
        const n = batch * capacity * cfg.numKeyValueHeads * cfg.headDim;
        // the cache is sized from the request (prompt + max new tokens, capped by the context): a request past
        // what one buffer holds is an error that says what to lower, not a RangeError
        if (!(Number.isSafeInteger(n) && n <= MAX_TENSOR_ELEMENTS))
            throw new QloraError(`a key/value cache for ${capacity} positions (x ${batch} rows) needs ${n} values per layer, ` +
                `more than one buffer holds (${MAX_TENSOR_ELEMENTS}); lower the number of new tokens or the prompt length`);
        this.k = Array.from({length: cfg.numHiddenLayers}, () => new Float32Array(n));
        this.v = Array.from({length: cfg.numHiddenLayers}, () => new Float32Array(n));
    }
}

export interface ForwardOptions {
    /** [B, S] 1 for real tokens, 0 for padding (S = cache length + T with a cache, else T) */
    attentionMask?: Uint8Array;
    /** [B, T] positions; default: past length + 0..T-1 for every row (as transformers does without position_ids) */
    positionIds?: Int32Array;
    cache?: KVCache;
    /** compute logits only for these rows of the flattened [B*T] tokens (default: all) */
    logitRows?: number[];
}

export class DecoderModel {
    readonly invFreq: Float32Array;
    readonly attentionScaling: number;

    constructor(readonly config: ModelConfig, readonly params: DecoderParams) {
        const rope = computeRopeInvFreq(config);
        this.invFreq = rope.invFreq;
        this.attentionScaling = rope.attentionScaling;
    }

    /** loads config.json and the safetensors weights of a Hugging Face model folder (fp32, or 4-bit projections) */
    static async load(dir: string, opts: LoadOptions = {}): Promise<DecoderModel> {
        const cfg = await loadModelConfig(dir);
        return DecoderModel.fromCheckpoint(dir, cfg, opts);
    }

    static async fromCheckpoint(dir: string, cfg: ModelConfig, opts: LoadOptions = {}): Promise<DecoderModel> {
        computeRopeInvFreq(cfg); // a rope config that overflows float32 fails here, before any weight is read
        let preQuantized: Map<string, QuantState4bit> | null = null;
        if (cfg.quantizationConfig) {
            const bnb = await loadBnb4bitCheckpoint(dir);
            preQuantized = bnb.states;
            await bnb.ckpt.close();
            for (const [name, state] of preQuantized) {
                const m = /^model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.weight$/.exec(name);
                const expected = m ? projShape(cfg, m[1] as ProjName) : null;
                if (!expected || state.shape[0] !== expected[0] || state.shape[1] !== expected[1])
                    throw new QloraError(`4-bit tensor "${name}" has shape [${state.shape.join(", ")}], which config.json ` +
                        `does not describe` + (expected ? ` (expected [${expected.join(", ")}])` : ""), {file: dir});
            }
        }
        const quant = opts.quantization?.load_in_4bit ? opts.quantization : null;
        const ckpt = await openCheckpoint(dir, cfg, new Set(preQuantized?.keys() ?? []));
        try {
            const read = (name: string) => readTensorF32(ckpt, name);
            const embed = await read("model.embed_tokens.weight");
            const layers: DecoderLayer[] = [];
            for (let l = 0; l < cfg.numHiddenLayers; l++) {
                const proj = {} as Record<ProjName, LinearLayer>;
                for (const p of PROJ_NAMES) {
                    const [outF, inF] = projShape(cfg, p);
                    const name = `${projModule(l, p)}.weight`;
                    const bias = projHasBias(cfg, p) ? await read(`${projModule(l, p)}.bias`) : null;
                    const state = preQuantized?.get(name);
                    if (state) proj[p] = new Linear4bit(state, bias);
                    else if (quant) proj[p] = new Linear4bit(await quantizeWeight(ckpt, name, [outF, inF], quant), bias);
                    else proj[p] = new DenseLinear({outFeatures: outF, inFeatures: inF, weight: await read(name), bias});
                }
                layers.push({
                    inputNorm: await read(`model.layers.${l}.input_layernorm.weight`),
                    postNorm: await read(`model.layers.${l}.post_attention_layernorm.weight`),
                    proj,
                });
            }
            const norm = await read("model.norm.weight");
            const lmHead = cfg.tieWordEmbeddings ? embed : await read("lm_head.weight");
            return new DecoderModel(cfg, {embed, layers, norm, lmHead});
        } finally {
            await ckpt.close();
        }
    }

    /** true when the projections are 4-bit */
    get quantized(): boolean {
        return this.params.layers.some((l) => Object.values(l.proj).some((p) => p instanceof Linear4bit ||
            (p as {base?: unknown}).base instanceof Linear4bit));
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

    /** the final hidden states [B*T, C] after the last norm */
    forwardHidden(ids: Int32Array, B: number, T: number, opts: ForwardOptions = {}): Float32Array {
        const cfg = this.config, ops = cpu();
        const C = cfg.hiddenSize, Hq = cfg.numAttentionHeads, Hkv = cfg.numKeyValueHeads, D = cfg.headDim;
        const N = B * T;
        const cache = opts.cache;
        const past = cache ? cache.length : 0;
        const S = cache ? cache.capacity : T;
        if (ids.length !== N) throw new Error(`forward: ids has ${ids.length} elements, expected B*T = ${N}`);
        if (cache && (cache.batch !== B || past + T > cache.capacity))
            throw new QloraError(`the sequence needs ${past + T} positions but the cache holds ${cache.capacity}`);
        if (past + T > cfg.maxPositionEmbeddings)
            throw new QloraError(`the sequence has ${past + T} tokens but the model's context length ` +
                `(max_position_embeddings) is ${cfg.maxPositionEmbeddings}`);

        const pos = opts.positionIds ?? new Int32Array(N).map((_, i) => past + (i % T));
        let keyValid: Uint8Array | null = null;
        if (opts.attentionMask) {
            const S_mask = past + T;
            if (opts.attentionMask.length !== B * S_mask)
                throw new Error(`forward: attentionMask has ${opts.attentionMask.length} elements, expected ${B * S_mask}`);
            keyValid = new Uint8Array(B * S);
            for (let b = 0; b < B; b++) keyValid.set(opts.attentionMask.subarray(b * S_mask, (b + 1) * S_mask), b * S);
        }

        const x = new Float32Array(N * C);
        const bad = ops.embeddingForward(x, ids, this.params.embed, N, cfg.vocabSize, C);
        if (bad >= 0) throw new QloraError(`token id ${ids[bad]} at position ${bad} is outside the vocabulary (${cfg.vocabSize} tokens)`);

        const xn = new Float32Array(N * C);
        const q = new Float32Array(N * Hq * D);
        const k = new Float32Array(N * Hkv * D);
        const v = new Float32Array(N * Hkv * D);
        const att = new Float32Array(N * Hq * D);
        const tmp = new Float32Array(N * C);
        const gate = new Float32Array(N * cfg.intermediateSize);
        const up = new Float32Array(N * cfg.intermediateSize);
        const scale = 1 / Math.sqrt(D);
        for (let l = 0; l < cfg.numHiddenLayers; l++) {
            const layer = this.params.layers[l];
            // attention
            ops.rmsnormForward(xn, null, x, layer.inputNorm, N, C, cfg.rmsNormEps);
            layer.proj.q_proj.forward(q, xn, N);
            layer.proj.k_proj.forward(k, xn, N);
            layer.proj.v_proj.forward(v, xn, N);
            ops.ropeForward(q, q, pos, this.invFreq, this.attentionScaling, N, Hq, D);
            ops.ropeForward(k, k, pos, this.invFreq, this.attentionScaling, N, Hkv, D);
            let kAll: Float32Array = k, vAll: Float32Array = v;
            if (cache) {
                const row = Hkv * D;
                for (let b = 0; b < B; b++) {
                    cache.k[l].set(k.subarray(b * T * row, (b + 1) * T * row), (b * S + past) * row);
                    cache.v[l].set(v.subarray(b * T * row, (b + 1) * T * row), (b * S + past) * row);
                }
                kAll = cache.k[l];
                vAll = cache.v[l];
            }
            // with a cache, keys beyond past + t are hidden by causality, so S can be the whole capacity
            ops.attentionForward(att, null, q, kAll, vAll, keyValid, null, B, T, S, Hq, Hkv, D, past, scale);
            layer.proj.o_proj.forward(tmp, att, N);
            ops.addInplace(x, tmp, N * C);
            // MLP
            ops.rmsnormForward(xn, null, x, layer.postNorm, N, C, cfg.rmsNormEps);
            layer.proj.gate_proj.forward(gate, xn, N);
            layer.proj.up_proj.forward(up, xn, N);
            ops.swigluForward(gate, gate, up, N * cfg.intermediateSize);
            layer.proj.down_proj.forward(tmp, gate, N);
            ops.addInplace(x, tmp, N * C);
        }
        if (cache) cache.length = past + T;
        ops.rmsnormForward(xn, null, x, this.params.norm, N, C, cfg.rmsNormEps);
        return xn;
    }

    /** logits [rows, V] = hidden[rows] @ lm_head^T */
    logits(hidden: Float32Array, rows: number[] | null, totalRows: number): Float32Array {
        const C = this.config.hiddenSize, V = this.config.vocabSize;
        let h: Float32Array = hidden, M = totalRows;
        if (rows) {
            h = new Float32Array(rows.length * C);
            rows.forEach((r, i) => h.set(hidden.subarray(r * C, (r + 1) * C), i * C));
            M = rows.length;
        }
        const out = new Float32Array(M * V);
        cpu().sgemm(false, true, M, V, C, 1, h, C, this.params.lmHead, C, 0, out, V);
        return out;
    }

    /**
     * transformers' causal-LM loss: logits at t predict labels at t+1; mean over labels != -100.
     * logits [B*T, V], labels [B, T] (any negative value is ignored).
     */
    causalLmLoss(logits: Float32Array, labels: Int32Array, B: number, T: number): {loss: number; count: number} {
        const V = this.config.vocabSize;
        const targets = new Int32Array(B * T).fill(-100);
        for (let b = 0; b < B; b++)
            for (let t = 0; t + 1 < T; t++) targets[b * T + t] = labels[b * T + t + 1];
        const losses = new Float32Array(B * T);
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
async function quantizeWeight(ckpt: SafetensorsCheckpoint, name: string, shape: [number, number],
    cfg: BitsAndBytesConfig): Promise<QuantState4bit> {
    const opts = {quantType: cfg.bnb_4bit_quant_type, compressStatistics: cfg.bnb_4bit_use_double_quant, shape};
    return readFloatTensor(ckpt, name, (t) => {
        if (t.dtype === "BF16" && cfg.bnb_4bit_compute_dtype === "bfloat16") return quantize4bit({bf16: t.values}, opts);
        const values = t.dtype === "F32" ? t.values : halfToF32(t.values, t.dtype);
        return quantize4bit(values, {...opts, dtype: "float32"});
    });
}
