// reference-decoder.ts: a deliberately plain float64 implementation of the decoder forward, written from
// transformers' modeling_llama / modeling_qwen2 and sharing no code with src/model, so that the model can be
// checked on configurations the golden fixtures do not cover (llama names, untied embeddings, no biases,
// head_dim != hidden / heads, rope scaling).
import type {ModelConfig} from "../../src/io/hf-config.js";

export type Tensors = Map<string, Float64Array>;

function linear(x: Float64Array, N: number, K: number, w: Float64Array, Nout: number, b?: Float64Array): Float64Array {
    const y = new Float64Array(N * Nout);
    for (let n = 0; n < N; n++)
        for (let o = 0; o < Nout; o++) {
            let s = b ? b[o] : 0;
            for (let k = 0; k < K; k++) s += x[n * K + k] * w[o * K + k];
            y[n * Nout + o] = s;
        }
    return y;
}

function rmsnorm(x: Float64Array, N: number, C: number, w: Float64Array, eps: number): Float64Array {
    const y = new Float64Array(N * C);
    for (let n = 0; n < N; n++) {
        let ss = 0;
        for (let c = 0; c < C; c++) ss += x[n * C + c] ** 2;
        const r = 1 / Math.sqrt(ss / C + eps);
        for (let c = 0; c < C; c++) y[n * C + c] = w[c] * x[n * C + c] * r;
    }
    return y;
}

function rope(x: Float64Array, T: number, H: number, D: number, invFreq: Float32Array | Float64Array, scaling: number): void {
    const half = D / 2;
    for (let t = 0; t < T; t++)
        for (let h = 0; h < H; h++) {
            const o = (t * H + h) * D;
            for (let i = 0; i < half; i++) {
                const a = t * invFreq[i];
                const c = Math.cos(a) * scaling,
                    s = Math.sin(a) * scaling;
                const x0 = x[o + i],
                    x1 = x[o + i + half];
                x[o + i] = x0 * c - x1 * s;
                x[o + i + half] = x1 * c + x0 * s;
            }
        }
}

/** logits [T, V] of one unpadded sequence */
export function referenceForward(
    cfg: ModelConfig,
    w: Tensors,
    ids: number[],
    invFreq: Float32Array | Float64Array,
    scaling = 1
): Float64Array {
    const T = ids.length,
        C = cfg.hiddenSize,
        Hq = cfg.numAttentionHeads,
        Hkv = cfg.numKeyValueHeads,
        D = cfg.headDim;
    const I = cfg.intermediateSize,
        V = cfg.vocabSize;
    const get = (n: string) => {
        const t = w.get(n);
        if (!t) throw new Error(`reference: missing ${n}`);
        return t;
    };
    const emb = get("model.embed_tokens.weight");
    let x = new Float64Array(T * C);
    ids.forEach((id, t) => x.set(emb.subarray(id * C, (id + 1) * C), t * C));
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
        const p = `model.layers.${l}.`;
        const opt = (n: string) => w.get(p + n);
        const xn = rmsnorm(x, T, C, get(p + "input_layernorm.weight"), cfg.rmsNormEps);
        const q = linear(xn, T, C, get(p + "self_attn.q_proj.weight"), Hq * D, opt("self_attn.q_proj.bias"));
        const k = linear(xn, T, C, get(p + "self_attn.k_proj.weight"), Hkv * D, opt("self_attn.k_proj.bias"));
        const v = linear(xn, T, C, get(p + "self_attn.v_proj.weight"), Hkv * D, opt("self_attn.v_proj.bias"));
        rope(q, T, Hq, D, invFreq, scaling);
        rope(k, T, Hkv, D, invFreq, scaling);
        const att = new Float64Array(T * Hq * D);
        for (let h = 0; h < Hq; h++) {
            const hk = Math.floor(h / (Hq / Hkv));
            for (let t = 0; t < T; t++) {
                const s = new Float64Array(t + 1);
                let m = -Infinity;
                for (let j = 0; j <= t; j++) {
                    let d = 0;
                    for (let e = 0; e < D; e++) d += q[(t * Hq + h) * D + e] * k[(j * Hkv + hk) * D + e];
                    s[j] = d / Math.sqrt(D);
                    m = Math.max(m, s[j]);
                }
                let z = 0;
                for (let j = 0; j <= t; j++) z += s[j] = Math.exp(s[j] - m);
                for (let j = 0; j <= t; j++)
                    for (let e = 0; e < D; e++) att[(t * Hq + h) * D + e] += (s[j] / z) * v[(j * Hkv + hk) * D + e];
            }
        }
        const o = linear(att, T, Hq * D, get(p + "self_attn.o_proj.weight"), C, opt("self_attn.o_proj.bias"));
        x = x.map((val, i) => val + o[i]);
        const xn2 = rmsnorm(x, T, C, get(p + "post_attention_layernorm.weight"), cfg.rmsNormEps);
        const g = linear(xn2, T, C, get(p + "mlp.gate_proj.weight"), I, opt("mlp.gate_proj.bias"));
        const u = linear(xn2, T, C, get(p + "mlp.up_proj.weight"), I, opt("mlp.up_proj.bias"));
        const a = g.map((gv, i) => (gv / (1 + Math.exp(-gv))) * u[i]);
        const d = linear(a, T, I, get(p + "mlp.down_proj.weight"), C, opt("mlp.down_proj.bias"));
        x = x.map((val, i) => val + d[i]);
    }
    const xf = rmsnorm(x, T, C, get("model.norm.weight"), cfg.rmsNormEps);
    const head = cfg.tieWordEmbeddings ? emb : get("lm_head.weight");
    return linear(xf, T, C, head, V);
}
