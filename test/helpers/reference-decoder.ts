// reference-decoder.ts: a deliberately plain float64 implementation of the decoder forward, written from
// transformers' modeling_llama / modeling_qwen2 / modeling_qwen3 / modeling_phi3 / modeling_gemma3 and sharing no code with src/model,
// so that the model can be checked on configurations the golden fixtures do not cover (llama names, untied
// embeddings, no biases, head_dim != hidden / heads, rope scaling, sliding-window layers, qwen3's q/k norms, phi3's
// fused projections and partial rotary, gemma3's (1 + w) and sandwich norms, scaled embeddings, GELU-tanh gate,
// local RoPE, query_pre_attn_scalar and final soft-capping).
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

/** rotate_half RoPE of the first R dimensions of each head (Phi3: the rest pass through) */
function rope(
    x: Float64Array,
    T: number,
    H: number,
    D: number,
    invFreq: Float32Array | Float64Array,
    scaling: number,
    R = D
): void {
    const half = R / 2;
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

/** logits [T, V] of one unpadded sequence; `local`: gemma3's RoPE of sliding layers */
export function referenceForward(
    cfg: ModelConfig,
    w: Tensors,
    ids: number[],
    invFreq: Float32Array | Float64Array,
    scaling = 1,
    local: {invFreq: Float32Array | Float64Array; attentionScaling: number} | null = null
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
    const gemma = cfg.modelType === "gemma3_text";
    // Gemma3RMSNorm multiplies by (1 + w)
    const norm = (x: Float64Array, N: number, D: number, name: string) => {
        const weight = get(name);
        return rmsnorm(x, N, D, gemma ? weight.map((v) => 1 + v) : weight, cfg.rmsNormEps);
    };
    const emb = get("model.embed_tokens.weight");
    let x = new Float64Array(T * C);
    ids.forEach((id, t) => x.set(emb.subarray(id * C, (id + 1) * C), t * C));
    // Gemma3TextScaledWordEmbedding: the scale as a float32 tensor (the fp32 model's dtype)
    if (gemma) x = x.map((v) => v * Math.fround(Math.sqrt(C)));
    for (let l = 0; l < cfg.numHiddenLayers; l++) {
        const p = `model.layers.${l}.`;
        const opt = (n: string) => w.get(p + n);
        const xn = norm(x, T, C, p + "input_layernorm.weight");
        let q: Float64Array, k: Float64Array, v: Float64Array;
        const qkvW = opt("self_attn.qkv_proj.weight");
        if (qkvW) {
            // Phi3Attention: qkv rows are [q; k; v]
            const W = (Hq + 2 * Hkv) * D;
            const qkv = linear(xn, T, C, qkvW, W);
            const part = (from: number, n: number) => {
                const out = new Float64Array(T * n);
                for (let t = 0; t < T; t++) out.set(qkv.subarray(t * W + from, t * W + from + n), t * n);
                return out;
            };
            q = part(0, Hq * D);
            k = part(Hq * D, Hkv * D);
            v = part((Hq + Hkv) * D, Hkv * D);
        } else {
            q = linear(xn, T, C, get(p + "self_attn.q_proj.weight"), Hq * D, opt("self_attn.q_proj.bias"));
            k = linear(xn, T, C, get(p + "self_attn.k_proj.weight"), Hkv * D, opt("self_attn.k_proj.bias"));
            v = linear(xn, T, C, get(p + "self_attn.v_proj.weight"), Hkv * D, opt("self_attn.v_proj.bias"));
        }
        // Qwen3Attention: RMSNorm over each head of q and k, before RoPE
        if (opt("self_attn.q_norm.weight")) q = norm(q, T * Hq, D, p + "self_attn.q_norm.weight");
        if (opt("self_attn.k_norm.weight")) k = norm(k, T * Hkv, D, p + "self_attn.k_norm.weight");
        // Gemma3RotaryEmbedding: sliding layers rotate by the local base
        const sliding = cfg.layerTypes[l] === "sliding_attention";
        const table = local && sliding ? local.invFreq : invFreq,
            tableScaling = local && sliding ? local.attentionScaling : scaling;
        rope(q, T, Hq, D, table, tableScaling, cfg.rotaryDim);
        rope(k, T, Hkv, D, table, tableScaling, cfg.rotaryDim);
        // Gemma3Attention: query_pre_attn_scalar ** -0.5
        const scoreScale = gemma ? (cfg.raw.query_pre_attn_scalar as number) ** -0.5 : 1 / Math.sqrt(D);
        const att = new Float64Array(T * Hq * D);
        // a sliding layer's mask: transformers' sliding_window_overlay, kv_idx > q_idx - sliding_window
        const window = cfg.layerTypes[l] === "sliding_attention" ? cfg.slidingWindow : null;
        const sees = (t: number, j: number) => j <= t && (window === null || j > t - window);
        for (let h = 0; h < Hq; h++) {
            const hk = Math.floor(h / (Hq / Hkv));
            for (let t = 0; t < T; t++) {
                const s = new Float64Array(t + 1);
                let m = -Infinity;
                for (let j = 0; j <= t; j++) {
                    if (!sees(t, j)) continue;
                    let d = 0;
                    for (let e = 0; e < D; e++) d += q[(t * Hq + h) * D + e] * k[(j * Hkv + hk) * D + e];
                    s[j] = d * scoreScale;
                    m = Math.max(m, s[j]);
                }
                let z = 0;
                for (let j = 0; j <= t; j++) if (sees(t, j)) z += s[j] = Math.exp(s[j] - m);
                for (let j = 0; j <= t; j++)
                    if (sees(t, j))
                        for (let e = 0; e < D; e++) att[(t * Hq + h) * D + e] += (s[j] / z) * v[(j * Hkv + hk) * D + e];
            }
        }
        let o = linear(att, T, Hq * D, get(p + "self_attn.o_proj.weight"), C, opt("self_attn.o_proj.bias"));
        // Gemma3DecoderLayer: post_attention_layernorm on the attention output, pre_feedforward_layernorm before the MLP
        if (gemma) o = norm(o, T, C, p + "post_attention_layernorm.weight");
        x = x.map((val, i) => val + o[i]);
        const xn2 = norm(x, T, C, p + (gemma ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight"));
        let g: Float64Array, u: Float64Array;
        const gateUpW = opt("mlp.gate_up_proj.weight");
        if (gateUpW) {
            // Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
            const gu = linear(xn2, T, C, gateUpW, 2 * I);
            g = new Float64Array(T * I);
            u = new Float64Array(T * I);
            for (let t = 0; t < T; t++) {
                g.set(gu.subarray(t * 2 * I, t * 2 * I + I), t * I);
                u.set(gu.subarray(t * 2 * I + I, (t + 1) * 2 * I), t * I);
            }
        } else {
            g = linear(xn2, T, C, get(p + "mlp.gate_proj.weight"), I, opt("mlp.gate_proj.bias"));
            u = linear(xn2, T, C, get(p + "mlp.up_proj.weight"), I, opt("mlp.up_proj.bias"));
        }
        // gelu_pytorch_tanh for gemma3, silu otherwise
        const gelu = (v: number) => 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v ** 3)));
        const a = g.map((gv, i) => (gemma ? gelu(gv) : gv / (1 + Math.exp(-gv))) * u[i]);
        let d = linear(a, T, I, get(p + "mlp.down_proj.weight"), C, opt("mlp.down_proj.bias"));
        if (gemma) d = norm(d, T, C, p + "post_feedforward_layernorm.weight");
        x = x.map((val, i) => val + d[i]);
    }
    const xf = norm(x, T, C, "model.norm.weight");
    const head = cfg.tieWordEmbeddings ? emb : get("lm_head.weight");
    const logits = linear(xf, T, C, head, V);
    // Gemma3ForCausalLM: final_logit_softcapping
    const cap = cfg.raw.final_logit_softcapping;
    if (gemma && typeof cap === "number") return logits.map((v) => cap * Math.tanh(v / cap));
    return logits;
}
