// rope.ts: RoPE inverse frequencies for every scaling variant config.json can name (transformers'
// ROPE_INIT_FUNCTIONS: default, linear, dynamic, llama3, yarn, longrope), computed the way transformers computes
// them so the tables agree to the last bit or so. io/hf-config.ts parses the settings; the math lives with the model.
import {QloraError} from "../errors.js";
import type {ModelConfig, RopeScaling} from "../io/hf-config.js";

// ------------------------------------------------------------------
// RoPE inverse frequencies (transformers' ROPE_INIT_FUNCTIONS)
//
// transformers builds inv_freq in float32 torch ops; each step below rounds to f32 (Math.fround) the way those
// ops do, so our table matches theirs to the last bit or so. Python scalars in a tensor op are cast to f32 first.

const f32 = Math.fround;

export interface RopeFrequencies {
    /** [rotaryDim / 2] inverse frequencies */
    invFreq: Float32Array<ArrayBuffer>;
    /** multiplies cos and sin (yarn/longrope attention scaling; 1 otherwise) */
    attentionScaling: number;
    /**
     * longrope: the table of long_factor, which transformers switches to for a forward whose largest position
     * reaches original_max_position_embeddings (invFreq holds short_factor's table)
     */
    long?: {invFreq: Float32Array<ArrayBuffer>; fromPosition: number};
}

/** base ** (arange(0, dim, 2) / dim) in f32, as torch computes it */
function ropePositionFrequencies(base: number, dim: number): Float32Array<ArrayBuffer> {
    const half = Math.floor((dim + 1) / 2);
    const frequencies = new Float32Array(half);
    const baseF32 = f32(base);
    for (let i = 0; i < half; i++) {
        const exponent = f32((2 * i) / dim);
        frequencies[i] = f32(baseF32 ** exponent);
    }
    return frequencies;
}

function defaultInvFreq(base: number, dim: number): Float32Array<ArrayBuffer> {
    const frequencies = ropePositionFrequencies(base, dim);
    const invFreq = new Float32Array(frequencies.length);
    for (let i = 0; i < invFreq.length; i++) invFreq[i] = f32(1 / frequencies[i]);
    return invFreq;
}

export function computeRopeInvFreq(cfg: ModelConfig): RopeFrequencies {
    const rope = ropeFrequencies(cfg);
    // extreme rope_theta or scaling factors overflow float32 (a factor of 1e-40 divides by a subnormal): the
    // model would run on Inf/NaN or collapsed positions instead of failing
    const bad = [rope.invFreq, rope.long?.invFreq ?? rope.invFreq]
        .map((t) => t.findIndex((x) => !(Number.isFinite(x) && x > 0)))
        .reduce((a, b) => Math.max(a, b));
    if (bad >= 0 || !(Number.isFinite(rope.attentionScaling) && rope.attentionScaling > 0)) {
        const key = cfg.ropeScaling ? (cfg.raw.rope_scaling ? "rope_scaling" : "rope_parameters") : "rope_theta";
        throw new QloraError(
            `"${key}" gives ${
                bad >= 0 ? `rotary frequency ${bad} = ${rope.invFreq[bad]}` : `attention scaling ${rope.attentionScaling}`
            }, outside float32's range (rope_theta ${cfg.ropeTheta}` +
                `${cfg.ropeScaling ? `, ${cfg.ropeScaling.type} scaling` : ""}); is config.json corrupt?`,
            {file: cfg.file}
        );
    }
    return rope;
}

/**
 * gemma3: the RoPE of its sliding layers (rope_local_base_freq and no scaling, or rope_parameters.sliding_attention),
 * computed as the global one is; null for a model with one RoPE
 */
export function computeLocalRope(cfg: ModelConfig): RopeFrequencies | null {
    if (!cfg.localRope) return null;
    return computeRopeInvFreq({...cfg, ropeTheta: cfg.localRope.theta, ropeScaling: cfg.localRope.scaling, localRope: null});
}

function ropeFrequencies(cfg: ModelConfig): RopeFrequencies {
    const dim = cfg.rotaryDim;
    const base = cfg.ropeTheta;
    const scaling = cfg.ropeScaling;
    if (!scaling || scaling.type === "default" || scaling.type === "dynamic") {
        // dynamic NTK only changes the base once a sequence exceeds max_position_embeddings; at init it is default
        return {invFreq: defaultInvFreq(base, dim), attentionScaling: 1};
    }
    switch (scaling.type) {
        case "linear": {
            const invFreq = defaultInvFreq(base, dim);
            const factor = f32(scaling.factor!);
            for (let i = 0; i < invFreq.length; i++) invFreq[i] = f32(invFreq[i] / factor);
            return {invFreq, attentionScaling: 1};
        }
        case "llama3":
            return {invFreq: llama3InvFreq(defaultInvFreq(base, dim), scaling), attentionScaling: 1};
        case "yarn":
            return yarnFrequencies(cfg, scaling, base, dim);
        case "longrope":
            return longropeFrequencies(cfg, scaling, base, dim);
    }
}

function llama3InvFreq(invFreq: Float32Array, scaling: RopeScaling): Float32Array<ArrayBuffer> {
    const factor = scaling.factor!;
    const lowFreqFactor = scaling.lowFreqFactor!;
    const highFreqFactor = scaling.highFreqFactor!;
    const oldContextLen = scaling.originalMaxPositionEmbeddings!;
    const lowFreqWavelen = f32(oldContextLen / lowFreqFactor);
    const highFreqWavelen = f32(oldContextLen / highFreqFactor);
    const twoPi = f32(2 * Math.PI);
    const out = new Float32Array(invFreq.length);
    for (let i = 0; i < invFreq.length; i++) {
        // torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar
        const wavelen = f32(f32(1 / invFreq[i]) * twoPi);
        // long wavelengths (low frequencies) are slowed down by the factor, short ones kept
        const scaled = wavelen > lowFreqWavelen ? f32(invFreq[i] / f32(factor)) : invFreq[i];
        const isMediumFrequency = !(wavelen < highFreqWavelen) && !(wavelen > lowFreqWavelen);
        if (!isMediumFrequency) {
            out[i] = scaled;
            continue;
        }
        // in between: blend smoothly from "divided by factor" to "unchanged"
        const smooth = f32(
            f32(f32(f32(1 / wavelen) * f32(oldContextLen)) - f32(lowFreqFactor)) / f32(highFreqFactor - lowFreqFactor)
        );
        const slowed = f32(f32(f32(1 - smooth) * scaled) / f32(factor));
        out[i] = f32(slowed + f32(smooth * scaled));
    }
    return out;
}

function yarnFrequencies(cfg: ModelConfig, scaling: RopeScaling, base: number, dim: number): RopeFrequencies {
    const factor = scaling.factor!;
    const originalMaxPositions = scaling.originalMaxPositionEmbeddings || cfg.maxPositionEmbeddings;
    const getMscale = (scale: number, mscale = 1): number => (scale <= 1 ? 1 : 0.1 * mscale * Math.log(scale) + 1);
    let attentionScaling = scaling.attentionFactor;
    if (attentionScaling === undefined) {
        attentionScaling =
            scaling.mscale && scaling.mscaleAllDim
                ? getMscale(factor, scaling.mscale) / getMscale(factor, scaling.mscaleAllDim)
                : getMscale(factor);
    }
    const betaFast = scaling.betaFast || 32;
    const betaSlow = scaling.betaSlow || 1;
    // the dimension index at which a frequency completes `rotations` turns over the original context
    const correctionDim = (rotations: number): number =>
        (dim * Math.log(originalMaxPositions / (rotations * 2 * Math.PI))) / (2 * Math.log(base));
    const truncate = scaling.raw.truncate !== false;
    let low = correctionDim(betaFast);
    let high = correctionDim(betaSlow);
    if (truncate) {
        low = Math.floor(low);
        high = Math.ceil(high);
    }
    low = Math.max(low, 0);
    high = Math.min(high, dim - 1);
    if (low === high) high += 0.001; // avoid dividing by zero in the ramp

    const positionFrequencies = ropePositionFrequencies(base, dim);
    const invFreq = new Float32Array(positionFrequencies.length);
    const factorF32 = f32(factor);
    const lowF32 = f32(low);
    const rampWidth = f32(high - low);
    for (let i = 0; i < invFreq.length; i++) {
        const extrapolation = f32(1 / positionFrequencies[i]);
        const interpolation = f32(1 / f32(factorF32 * positionFrequencies[i]));
        const ramp = Math.min(Math.max(f32(f32(i - lowF32) / rampWidth), 0), 1);
        const extrapolationFactor = f32(1 - ramp);
        invFreq[i] = f32(f32(interpolation * f32(1 - extrapolationFactor)) + f32(extrapolation * extrapolationFactor));
    }
    return {invFreq, attentionScaling};
}

/**
 * longrope's pretrained context: original_max_position_embeddings (top level in transformers 4, inside
 * rope_parameters in 5), undefined when the config has none; null for other rope types
 */
export function longropeOriginalContext(cfg: ModelConfig): number | undefined | null {
    if (cfg.ropeScaling?.type !== "longrope") return null;
    const topLevel = cfg.raw.original_max_position_embeddings;
    return typeof topLevel === "number" && topLevel > 0 ? topLevel : cfg.ropeScaling.originalMaxPositionEmbeddings;
}

function longropeFrequencies(cfg: ModelConfig, scaling: RopeScaling, base: number, dim: number): RopeFrequencies {
    // Phi-3: then the ratio of the extended to the pretrained context is the factor
    const original = longropeOriginalContext(cfg) ?? undefined;
    let factor = scaling.factor;
    let originalMaxPositions = cfg.maxPositionEmbeddings;
    if (original !== undefined) {
        originalMaxPositions = original;
        factor = cfg.maxPositionEmbeddings / original;
    }
    let attentionScaling = scaling.attentionFactor;
    if (attentionScaling === undefined) {
        attentionScaling =
            factor === undefined || factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(originalMaxPositions));
    }
    const positionFrequencies = ropePositionFrequencies(base, dim);
    // 1 / (ext_factors * base ** (arange(0, dim, 2) / dim)) in f32
    const table = (name: "short_factor" | "long_factor"): Float32Array<ArrayBuffer> => {
        const factors = scaling.raw[name] as number[];
        if (factors.length !== positionFrequencies.length)
            throw new QloraError(
                `"rope_scaling.${name}" has ${factors.length} entries but the rotary dimension needs ${positionFrequencies.length}`,
                {file: cfg.file}
            );
        const out = new Float32Array(positionFrequencies.length);
        for (let i = 0; i < out.length; i++) out[i] = f32(1 / f32(f32(factors[i]) * positionFrequencies[i]));
        return out;
    };
    // short_factor until a sequence is longer than the original context (transformers' longrope_frequency_update)
    return {
        invFreq: table("short_factor"),
        attentionScaling,
        long: {invFreq: table("long_factor"), fromPosition: originalMaxPositions}
    };
}
