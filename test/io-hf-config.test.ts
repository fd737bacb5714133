import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {fileURLToPath} from "node:url";
import {QloraError} from "../src/errors.js";
import {attentionWindow, loadModelConfig, parseModelConfig} from "../src/io/hf-config.js";
import {computeRopeInvFreq} from "../src/model/rope.js";

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const tinyQwenDir = path.resolve(repoRoot, "..", "shared", "models", "tiny-qwen2");

let tempDir: string;
before(async () => {
    tempDir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-config-"));
});
after(async () => {
    await fs.rm(tempDir, {recursive: true, force: true});
});

// Llama 3.1 8B's config.json (transformers 4 layout: top-level rope_theta, rope_scaling), with head_dim written out
const llama31Config = {
    architectures: ["LlamaForCausalLM"],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: 128000,
    eos_token_id: [128001, 128008, 128009],
    head_dim: 128,
    hidden_act: "silu",
    hidden_size: 4096,
    initializer_range: 0.02,
    intermediate_size: 14336,
    max_position_embeddings: 131072,
    mlp_bias: false,
    model_type: "llama",
    num_attention_heads: 32,
    num_hidden_layers: 32,
    num_key_value_heads: 8,
    pretraining_tp: 1,
    rms_norm_eps: 1e-5,
    rope_scaling: {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
        rope_type: "llama3"
    },
    rope_theta: 500000.0,
    tie_word_embeddings: false,
    torch_dtype: "bfloat16",
    transformers_version: "4.43.0.dev0",
    use_cache: true,
    vocab_size: 128256
};

// Mistral 7B v0.1
const mistralConfig = {
    architectures: ["MistralForCausalLM"],
    bos_token_id: 1,
    eos_token_id: 2,
    hidden_act: "silu",
    hidden_size: 4096,
    initializer_range: 0.02,
    intermediate_size: 14336,
    max_position_embeddings: 32768,
    model_type: "mistral",
    num_attention_heads: 32,
    num_hidden_layers: 32,
    num_key_value_heads: 8,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    sliding_window: 4096,
    tie_word_embeddings: false,
    torch_dtype: "bfloat16",
    transformers_version: "4.34.0.dev0",
    use_cache: true,
    vocab_size: 32000
};

function withChanges(base: Record<string, unknown>, changes: Record<string, unknown>): Record<string, unknown> {
    const result: Record<string, unknown> = {...base, ...changes};
    for (const [key, value] of Object.entries(changes)) if (value === undefined) delete result[key];
    return result;
}

function assertConfigError(json: unknown, pattern: RegExp): void {
    assert.throws(
        () => parseModelConfig(json, "some/model/config.json"),
        (err: unknown) => {
            assert.ok(err instanceof QloraError, `expected a QloraError, got ${String(err)}`);
            assert.ok(err.message.startsWith("some/model/config.json: "), err.message);
            assert.match(err.message, pattern);
            return true;
        }
    );
}

/** the float64 formulas, written out independently of the implementation */
function defaultInvFreq64(base: number, dim: number): number[] {
    return Array.from({length: dim / 2}, (_, i) => 1 / base ** ((2 * i) / dim));
}

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, relativeTolerance: number): void {
    assert.equal(actual.length, expected.length);
    for (let i = 0; i < expected.length; i++) {
        const error = Math.abs(actual[i] - expected[i]) / Math.abs(expected[i]);
        assert.ok(error <= relativeTolerance, `index ${i}: ${actual[i]} vs ${expected[i]} (relative error ${error})`);
    }
}

describe("config.json parsing", () => {
    test("tiny-qwen2 (transformers 5: rope_parameters, dtype)", async () => {
        const cfg = await loadModelConfig(tinyQwenDir);
        assert.equal(cfg.file, path.join(tinyQwenDir, "config.json"));
        assert.deepEqual(
            {...cfg, raw: undefined, file: undefined},
            {
                modelType: "qwen2",
                architectures: ["Qwen2ForCausalLM"],
                vocabSize: 16384,
                hiddenSize: 256,
                intermediateSize: 768,
                numHiddenLayers: 8,
                numAttentionHeads: 4,
                numKeyValueHeads: 2,
                headDim: 64,
                rotaryDim: 64,
                qkNorm: false,
                fusedProjections: false,
                rmsNormUnitOffset: false,
                sandwichNorms: false,
                embedScale: null,
                attentionScale: 0.125,
                finalLogitSoftcap: null,
                localRope: null,
                rmsNormEps: 1e-6,
                ropeTheta: 1e6,
                ropeScaling: null,
                maxPositionEmbeddings: 2048,
                tieWordEmbeddings: true,
                attentionBias: true,
                attentionOutputBias: false,
                mlpBias: false,
                hiddenAct: "silu",
                slidingWindow: null,
                layerTypes: Array.from({length: 8}, () => "full_attention"),
                bosTokenId: 16381,
                eosTokenIds: [16381],
                padTokenId: null,
                torchDtype: "bfloat16",
                quantizationConfig: null,
                raw: undefined,
                file: undefined
            }
        );
        assert.equal(cfg.raw.transformers_version, "5.17.0");
        assert.equal((await loadModelConfig(path.join(tinyQwenDir, "config.json"))).hiddenSize, 256);
    });

    test("llama 3.1 with top-level rope_theta, llama3 rope_scaling and explicit head_dim", () => {
        const cfg = parseModelConfig(llama31Config, "llama/config.json");
        assert.equal(cfg.modelType, "llama");
        assert.equal(cfg.ropeTheta, 500000);
        assert.equal(cfg.headDim, 128);
        assert.equal(cfg.numKeyValueHeads, 8);
        assert.deepEqual(cfg.eosTokenIds, [128001, 128008, 128009]);
        assert.equal(cfg.attentionBias, false);
        assert.equal(cfg.attentionOutputBias, false);
        assert.equal(cfg.tieWordEmbeddings, false);
        assert.equal(cfg.slidingWindow, null);
        assert.equal(cfg.torchDtype, "bfloat16");
        assert.deepEqual(
            {...cfg.ropeScaling, raw: undefined},
            {
                type: "llama3",
                factor: 8,
                lowFreqFactor: 1,
                highFreqFactor: 4,
                originalMaxPositionEmbeddings: 8192,
                raw: undefined
            }
        );
    });

    test("head_dim can differ from hidden_size / heads", () => {
        const cfg = parseModelConfig(withChanges(llama31Config, {head_dim: 64}), "x/config.json");
        assert.equal(cfg.headDim, 64);
        assert.equal(parseModelConfig(withChanges(llama31Config, {head_dim: undefined}), "x/config.json").headDim, 128);
    });

    test("llama attention_bias turns on q/k/v and o biases; mlp_bias", () => {
        const cfg = parseModelConfig(withChanges(llama31Config, {attention_bias: true, mlp_bias: true}), "x/config.json");
        assert.equal(cfg.attentionBias, true);
        assert.equal(cfg.attentionOutputBias, true);
        assert.equal(cfg.mlpBias, true);
    });

    test("mistral", () => {
        const cfg = parseModelConfig(mistralConfig, "mistral/config.json");
        assert.equal(cfg.modelType, "mistral");
        assert.equal(cfg.slidingWindow, 4096);
        assert.equal(cfg.headDim, 128);
        assert.deepEqual(cfg.eosTokenIds, [2]);
        assert.equal(cfg.bosTokenId, 1);
        assert.equal(cfg.attentionBias, false);
        assert.equal(cfg.ropeScaling, null);
        assert.equal(parseModelConfig(withChanges(mistralConfig, {sliding_window: null}), "m/config.json").slidingWindow, null);
    });

    test("defaults: num_key_value_heads, tie_word_embeddings, rope_theta; qwen2 sliding window needs use_sliding_window", () => {
        const minimal = {
            model_type: "qwen2",
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            sliding_window: 4096
        };
        const cfg = parseModelConfig(minimal, "q/config.json");
        assert.equal(cfg.numKeyValueHeads, 4);
        assert.equal(cfg.headDim, 16);
        assert.equal(cfg.tieWordEmbeddings, false);
        assert.equal(cfg.ropeTheta, 10000);
        assert.equal(cfg.slidingWindow, null);
        assert.deepEqual(cfg.eosTokenIds, []);
        assert.equal(cfg.torchDtype, null);
        assert.deepEqual(cfg.architectures, []);
        // use_sliding_window alone: max_window_layers (28) is past the 2 layers, so none slides
        assert.equal(parseModelConfig({...minimal, use_sliding_window: true}, "q/config.json").slidingWindow, null);
    });

    test("sliding-window layers: mistral on every layer, qwen2 from max_window_layers or layer_types", () => {
        const m = parseModelConfig(withChanges(mistralConfig, {num_hidden_layers: 3}), "m/config.json");
        assert.deepEqual(m.layerTypes, ["sliding_attention", "sliding_attention", "sliding_attention"]);
        assert.deepEqual(
            [0, 1, 2].map((l) => attentionWindow(m, l)),
            [4096, 4096, 4096]
        );
        // MistralConfig's default when the key is absent
        const absent = parseModelConfig(withChanges(mistralConfig, {sliding_window: undefined}), "m/config.json");
        assert.equal(absent.slidingWindow, 4096);
        const none = parseModelConfig(withChanges(mistralConfig, {sliding_window: null, num_hidden_layers: 2}), "m/config.json");
        assert.deepEqual([attentionWindow(none, 0), attentionWindow(none, 1)], [0, 0]);
        const qwen = {
            model_type: "qwen2",
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            sliding_window: 8,
            use_sliding_window: true,
            max_window_layers: 2
        };
        const q = parseModelConfig(qwen, "q/config.json");
        assert.deepEqual(
            [0, 1, 2, 3].map((l) => attentionWindow(q, l)),
            [0, 0, 8, 8]
        );
        assert.equal(q.slidingWindow, 8);
        const typed = parseModelConfig(
            {...qwen, layer_types: ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
            "q/config.json"
        );
        assert.deepEqual(
            [0, 1, 2, 3].map((l) => attentionWindow(typed, l)),
            [8, 0, 8, 0]
        );
        // without use_sliding_window no layer slides, and layer_types may not ask for one
        assert.equal(parseModelConfig({...qwen, use_sliding_window: false}, "q/config.json").slidingWindow, null);
        const refuse = (changes: Record<string, unknown>, pattern: RegExp) =>
            assert.throws(
                () => parseModelConfig(withChanges(qwen, changes), "q/config.json"),
                (e: unknown) => e instanceof QloraError && pattern.test(e.message)
            );
        refuse(
            {use_sliding_window: false, layer_types: ["sliding_attention", "full_attention", "full_attention", "full_attention"]},
            /"layer_types" has "sliding_attention" layers but no window/
        );
        refuse(
            {layer_types: ["full_attention", "chunked_attention", "full_attention", "full_attention"]},
            /"layer_types\[1\]" is "chunked_attention", which qlora does not implement/
        );
        refuse({layer_types: ["full_attention"]}, /"layer_types" .* expected a list of 4 entries/);
        refuse({max_window_layers: -1}, /"max_window_layers" is -1/);
        refuse({sliding_window: 0}, /"sliding_window" is 0, expected a positive integer or null/);
        assert.throws(
            () =>
                parseModelConfig(
                    withChanges(mistralConfig, {num_hidden_layers: 2, layer_types: ["sliding_attention", "full_attention"]}),
                    "m/config.json"
                ),
            /"layer_types" mixes full and sliding layers/
        );
    });

    test("rope scaling from rope_scaling.type (old key) and from rope_parameters (transformers 5)", () => {
        const old = parseModelConfig(withChanges(mistralConfig, {rope_scaling: {type: "linear", factor: 2}}), "m/config.json");
        assert.equal(old.ropeScaling?.type, "linear");
        assert.equal(old.ropeScaling?.factor, 2);
        const v5 = parseModelConfig(
            withChanges(llama31Config, {
                rope_theta: undefined,
                rope_scaling: undefined,
                rope_parameters: {rope_type: "yarn", rope_theta: 1e6, factor: 4, original_max_position_embeddings: 32768}
            }),
            "l/config.json"
        );
        assert.equal(v5.ropeTheta, 1e6);
        assert.equal(v5.ropeScaling?.type, "yarn");
        assert.equal(v5.ropeScaling?.originalMaxPositionEmbeddings, 32768);
        const plain = parseModelConfig(
            withChanges(llama31Config, {
                rope_theta: undefined,
                rope_scaling: null,
                rope_parameters: {rope_type: "default", rope_theta: 123}
            }),
            "l/config.json"
        );
        assert.equal(plain.ropeScaling, null);
        assert.equal(plain.ropeTheta, 123);
    });

    test("dtype spellings", () => {
        assert.equal(
            parseModelConfig(withChanges(mistralConfig, {torch_dtype: "float32"}), "m/config.json").torchDtype,
            "float32"
        );
        assert.equal(
            parseModelConfig(withChanges(mistralConfig, {torch_dtype: undefined, dtype: "float16"}), "m/config.json").torchDtype,
            "float16"
        );
        assert.equal(parseModelConfig(withChanges(mistralConfig, {torch_dtype: "auto"}), "m/config.json").torchDtype, null);
    });

    test("quantization_config is passed through", () => {
        const quantization = {quant_method: "bitsandbytes", load_in_4bit: true, bnb_4bit_quant_type: "nf4"};
        const cfg = parseModelConfig(withChanges(mistralConfig, {quantization_config: quantization}), "m/config.json");
        assert.deepEqual(cfg.quantizationConfig, quantization);
    });
});

describe("config.json errors", () => {
    test("unsupported model_type", () => {
        assertConfigError(
            withChanges(mistralConfig, {model_type: "gpt2"}),
            /model_type "gpt2" is not supported \(supported: llama, qwen2, qwen3, mistral, phi3, gemma3_text\)/
        );
        assertConfigError(withChanges(mistralConfig, {model_type: undefined}), /"model_type" is undefined/);
    });

    test("missing config.json names the folder", async () => {
        await assert.rejects(loadModelConfig(tempDir), (err: unknown) => {
            assert.ok(err instanceof QloraError);
            assert.ok(err.message.startsWith(tempDir), err.message);
            assert.match(err.message, /a Hugging Face model folder needs config\.json/);
            return true;
        });
    });

    test("invalid JSON", async () => {
        const dir = path.join(tempDir, "bad-json");
        await fs.mkdir(dir);
        await fs.writeFile(path.join(dir, "config.json"), '{"model_type": ');
        await assert.rejects(loadModelConfig(dir), /config\.json: is not valid JSON/);
    });

    test("heads must divide evenly", () => {
        assertConfigError(
            withChanges(mistralConfig, {num_key_value_heads: 5}),
            /"num_key_value_heads" is 5, which does not divide num_attention_heads \(32\)/
        );
    });

    test("types and positivity are checked per key", () => {
        assertConfigError(
            withChanges(mistralConfig, {hidden_size: "4096"}),
            /"hidden_size" is "4096", expected a positive integer/
        );
        assertConfigError(withChanges(mistralConfig, {num_hidden_layers: 0}), /"num_hidden_layers" is 0/);
        assertConfigError(withChanges(mistralConfig, {vocab_size: undefined}), /"vocab_size" is missing/);
        assertConfigError(withChanges(mistralConfig, {rms_norm_eps: -1}), /"rms_norm_eps" is -1, expected a positive number/);
        assertConfigError(
            withChanges(mistralConfig, {tie_word_embeddings: "yes"}),
            /"tie_word_embeddings" is "yes", expected true or false/
        );
        assertConfigError(withChanges(mistralConfig, {eos_token_id: [2, "x"]}), /"eos_token_id"/);
        assertConfigError(withChanges(mistralConfig, {hidden_act: "gelu"}), /"hidden_act" is "gelu"/);
        assertConfigError(withChanges(mistralConfig, {torch_dtype: "int8"}), /"torch_dtype" is "int8"/);
        assertConfigError(
            withChanges(mistralConfig, {hidden_size: 4095, head_dim: undefined}),
            /"hidden_size" is 4095, not divisible by num_attention_heads/
        );
        assertConfigError([1, 2], /should hold a JSON object/);
    });

    test("rope scaling errors name the key", () => {
        assertConfigError(
            withChanges(llama31Config, {rope_scaling: {rope_type: "llama3", factor: 8}}),
            /"rope_scaling\.low_freq_factor" is missing; rope type "llama3" needs it/
        );
        assertConfigError(
            withChanges(llama31Config, {rope_scaling: {rope_type: "mrope", factor: 8}}),
            /"rope_scaling\.rope_type" is "mrope", which qlora does not implement/
        );
        assertConfigError(withChanges(llama31Config, {rope_scaling: {type: "linear"}}), /"rope_scaling\.factor" is missing/);
        assertConfigError(
            withChanges(llama31Config, {rope_theta: undefined, rope_scaling: undefined, rope_parameters: {rope_theta: "big"}}),
            /"rope_parameters\.rope_theta" is "big"/
        );
    });
});

describe("RoPE inverse frequencies", () => {
    test("default: 1 / theta^(2i/d), tiny-qwen2", async () => {
        const cfg = await loadModelConfig(tinyQwenDir);
        const {invFreq, attentionScaling} = computeRopeInvFreq(cfg);
        assert.equal(attentionScaling, 1);
        assert.equal(invFreq.length, 32);
        assert.equal(invFreq[0], 1);
        assertClose(invFreq, defaultInvFreq64(1e6, 64), 2e-7);
        // the f32 values torch produces (numpy float32 mirror of transformers' formula)
        assert.equal(invFreq[1], Math.fround(0.6493816375732422));
    });

    test("llama3: hand-computed smooth interpolation between the low and high frequency bands", () => {
        const cfg = parseModelConfig(llama31Config, "llama/config.json");
        const {invFreq, attentionScaling} = computeRopeInvFreq(cfg);
        assert.equal(attentionScaling, 1);
        assert.equal(invFreq.length, 64);
        // llama 3.1: factor 8, low 1, high 4, original context 8192
        const lowFreqWavelen = 8192 / 1;
        const highFreqWavelen = 8192 / 4;
        const expected = defaultInvFreq64(500000, 128).map((freq) => {
            const wavelen = (2 * Math.PI) / freq;
            if (wavelen < highFreqWavelen) return freq;
            if (wavelen > lowFreqWavelen) return freq / 8;
            const smooth = (8192 / wavelen - 1) / (4 - 1);
            return ((1 - smooth) * freq) / 8 + smooth * freq;
        });
        assertClose(invFreq, expected, 1e-6);
        // spot values, and which band each lands in: 0..28 untouched, 29..34 blended, 35..63 divided by 8
        assert.equal(invFreq[0], 1);
        assertClose([invFreq[1]], [0.8146172338565447], 1e-7);
        assertClose([invFreq[30]], [0.0013718935677611381], 1e-6);
        assertClose([invFreq[63]], [3.068925988914511e-7], 1e-6);
        const unscaled = defaultInvFreq64(500000, 128);
        for (let i = 0; i < 64; i++) {
            const ratio = invFreq[i] / unscaled[i];
            if (i <= 28) assert.ok(Math.abs(ratio - 1) < 1e-6, `index ${i} should be unscaled`);
            else if (i >= 35) assert.ok(Math.abs(ratio - 1 / 8) < 1e-6, `index ${i} should be divided by 8`);
            else assert.ok(ratio < 1 - 1e-3 && ratio > 1 / 8 + 1e-3, `index ${i} should be blended (ratio ${ratio})`);
        }
    });

    test("linear divides by the factor; dynamic is default at init", () => {
        const linear = parseModelConfig(withChanges(mistralConfig, {rope_scaling: {type: "linear", factor: 4}}), "m/config.json");
        assertClose(
            computeRopeInvFreq(linear).invFreq,
            defaultInvFreq64(10000, 128).map((f) => f / 4),
            2e-7
        );
        const dynamic = parseModelConfig(
            withChanges(mistralConfig, {rope_scaling: {type: "dynamic", factor: 4}}),
            "m/config.json"
        );
        assertClose(computeRopeInvFreq(dynamic).invFreq, defaultInvFreq64(10000, 128), 2e-7);
    });

    test("yarn: attention factor, extrapolated high frequencies, interpolated low ones", () => {
        // Qwen2.5's long-context recipe
        const cfg = parseModelConfig(
            withChanges(mistralConfig, {
                model_type: "qwen2",
                rope_theta: 1e6,
                rope_scaling: {type: "yarn", factor: 4, original_max_position_embeddings: 32768}
            }),
            "q/config.json"
        );
        const {invFreq, attentionScaling} = computeRopeInvFreq(cfg);
        assert.ok(Math.abs(attentionScaling - (0.1 * Math.log(4) + 1)) < 1e-12);
        const dim = 128;
        const base = defaultInvFreq64(1e6, dim);
        // hand-computed correction range for beta_fast 32, beta_slow 1
        const correctionDim = (rotations: number): number =>
            (dim * Math.log(32768 / (rotations * 2 * Math.PI))) / (2 * Math.log(1e6));
        const low = Math.max(Math.floor(correctionDim(32)), 0);
        const high = Math.min(Math.ceil(correctionDim(1)), dim - 1);
        const expected = base.map((freq, i) => {
            const ramp = Math.min(Math.max((i - low) / (high - low), 0), 1);
            return (freq / 4) * ramp + freq * (1 - ramp);
        });
        assertClose(invFreq, expected, 1e-6);
        assert.equal(invFreq[0], 1);
        assertClose([invFreq[63]], [base[63] / 4], 1e-6);

        const withAttentionFactor = parseModelConfig(
            withChanges(mistralConfig, {
                rope_scaling: {rope_type: "yarn", factor: 4, attention_factor: 0.5}
            }),
            "q/config.json"
        );
        assert.equal(computeRopeInvFreq(withAttentionFactor).attentionScaling, 0.5);
    });
});

test("partial_rotary_factor below 1 is refused: Llama/Qwen2/Mistral and the RoPE ops rotate whole heads", () => {
    assertConfigError(
        withChanges(llama31Config, {partial_rotary_factor: 0.5}),
        /"partial_rotary_factor" is 0\.5: RoPE over 64 of the 128 dimensions of a head is not supported for model_type "llama"/
    );
    assertConfigError(
        withChanges(llama31Config, {rope_scaling: {...(llama31Config.rope_scaling as object), partial_rotary_factor: 0.25}}),
        /"partial_rotary_factor" is 0\.25/
    );
    assert.equal(parseModelConfig(withChanges(llama31Config, {partial_rotary_factor: 1}), "x/config.json").rotaryDim, 128);
});

// ------------------------------------------------------------------
// Qwen3 and Phi-3 / Phi-4-mini (issue 15)

/** Qwen/Qwen3-0.6B's config.json (transformers 4 layout) */
const qwen3Config = {
    architectures: ["Qwen3ForCausalLM"],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: 151643,
    eos_token_id: 151645,
    head_dim: 128,
    hidden_act: "silu",
    hidden_size: 1024,
    intermediate_size: 3072,
    max_position_embeddings: 40960,
    max_window_layers: 28,
    model_type: "qwen3",
    num_attention_heads: 16,
    num_hidden_layers: 28,
    num_key_value_heads: 8,
    rms_norm_eps: 1e-6,
    rope_scaling: null,
    rope_theta: 1000000,
    sliding_window: null,
    tie_word_embeddings: true,
    torch_dtype: "bfloat16",
    use_sliding_window: false,
    vocab_size: 151936
};

/** microsoft/Phi-4-mini-instruct's config.json, with its 48 longrope factors shortened to a formula */
const phi4MiniConfig = {
    architectures: ["Phi3ForCausalLM"],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: 199999,
    embd_pdrop: 0.0,
    eos_token_id: 199999,
    full_attn_mod: 1,
    hidden_act: "silu",
    hidden_size: 3072,
    intermediate_size: 8192,
    max_position_embeddings: 131072,
    model_type: "phi3",
    num_attention_heads: 24,
    num_hidden_layers: 32,
    num_key_value_heads: 8,
    original_max_position_embeddings: 4096,
    pad_token_id: 199999,
    partial_rotary_factor: 0.75,
    resid_pdrop: 0.0,
    rms_norm_eps: 1e-5,
    rope_scaling: {
        long_factor: Array.from({length: 48}, (_, i) => 1 + i * 0.5),
        short_factor: Array.from({length: 48}, (_, i) => 1 + i * 0.01),
        type: "longrope"
    },
    rope_theta: 10000.0,
    sliding_window: 262144,
    tie_word_embeddings: true,
    torch_dtype: "bfloat16",
    vocab_size: 200064
};

describe("qwen3 and phi3 configs", () => {
    test("Qwen3-0.6B: head_dim independent of hidden_size / heads, q/k norms, no biases", () => {
        const c = parseModelConfig(qwen3Config, "q3/config.json");
        assert.equal(c.modelType, "qwen3");
        assert.equal(c.headDim, 128); // 1024 / 16 would be 64
        assert.equal(c.rotaryDim, 128);
        assert.equal(c.qkNorm, true);
        assert.equal(c.fusedProjections, false);
        assert.equal(c.attentionBias, false);
        assert.equal(c.attentionOutputBias, false);
        assert.equal(c.slidingWindow, null);
        // Qwen3Config's head_dim default is 128, not hidden_size / heads
        const {head_dim: _drop, ...noHeadDim} = qwen3Config;
        assert.equal(parseModelConfig(noHeadDim, "q3/config.json").headDim, 128);
        // attention_bias covers q, k, v and o as in Qwen3Attention
        const biased = parseModelConfig(withChanges(qwen3Config, {attention_bias: true}), "q3/config.json");
        assert.equal(biased.attentionBias, true);
        assert.equal(biased.attentionOutputBias, true);
    });

    test("Phi-4-mini: fused projections, partial rotary 0.75 of 128, longrope", () => {
        const c = parseModelConfig(phi4MiniConfig, "phi/config.json");
        assert.equal(c.modelType, "phi3");
        assert.equal(c.fusedProjections, true);
        assert.equal(c.qkNorm, false);
        assert.equal(c.headDim, 128);
        assert.equal(c.rotaryDim, 96);
        assert.equal(c.rmsNormEps, 1e-5);
        assert.equal(c.ropeScaling?.type, "longrope");
        assert.equal(c.attentionBias, false);
    });

    test("longrope: short_factor's table below the original context, long_factor's from it, transformers' attention factor", () => {
        const c = parseModelConfig(phi4MiniConfig, "phi/config.json");
        const rope = computeRopeInvFreq(c);
        const dim = 96;
        assert.equal(rope.invFreq.length, dim / 2);
        // factor = 131072 / 4096 = 32; sqrt(1 + ln 32 / ln 4096)
        assert.ok(Math.abs(rope.attentionScaling - Math.sqrt(1 + Math.log(32) / Math.log(4096))) < 1e-12);
        assert.equal(rope.long?.fromPosition, 4096);
        for (let i = 0; i < dim / 2; i++) {
            const base = 10000 ** ((2 * i) / dim);
            const short = 1 / ((1 + i * 0.01) * base);
            const long = 1 / ((1 + i * 0.5) * base);
            // f32 ops as torch's: the rounded exponent alone moves base ** e by up to ln(1e4) x 2^-24 ~ 5.5e-7
            assert.ok(Math.abs(rope.invFreq[i] - short) <= 1e-6 * short, `short ${i}: ${rope.invFreq[i]} vs ${short}`);
            assert.ok(Math.abs(rope.long!.invFreq[i] - long) <= 1e-6 * long, `long ${i}: ${rope.long!.invFreq[i]} vs ${long}`);
        }
        // transformers 5 keeps original_max_position_embeddings (and partial_rotary_factor) in rope_parameters
        const {rope_scaling, original_max_position_embeddings, partial_rotary_factor, rope_theta, ...rest} = phi4MiniConfig;
        const v5 = parseModelConfig(
            {
                ...rest,
                rope_parameters: {
                    rope_type: "longrope",
                    rope_theta,
                    partial_rotary_factor,
                    original_max_position_embeddings,
                    short_factor: rope_scaling.short_factor,
                    long_factor: rope_scaling.long_factor
                }
            },
            "phi/config.json"
        );
        assert.equal(v5.rotaryDim, 96);
        const v5rope = computeRopeInvFreq(v5);
        assert.deepEqual(v5rope.invFreq, rope.invFreq);
        assert.deepEqual(v5rope.long, rope.long);
        assert.equal(v5rope.attentionScaling, rope.attentionScaling);
    });

    test("phi3 values qlora does not implement are refused, naming the key", () => {
        assertConfigError(
            withChanges(phi4MiniConfig, {rope_scaling: {...phi4MiniConfig.rope_scaling, short_factor: [1, 2, 3]}}),
            /"rope_scaling\.short_factor" has 3 entries; longrope needs one per rotary frequency \(48/
        );
        assertConfigError(withChanges(phi4MiniConfig, {resid_pdrop: 0.1}), /"resid_pdrop" is 0\.1/);
        assertConfigError(withChanges(phi4MiniConfig, {embd_pdrop: 0.1}), /"embd_pdrop" is 0\.1/);
        assertConfigError(withChanges(phi4MiniConfig, {partial_rotary_factor: 0.31}), /"partial_rotary_factor" gives 39 rotary/);
        assertConfigError(withChanges(phi4MiniConfig, {head_dim: 64}), /"head_dim" is 64, but a phi3 model's heads split/);
        assertConfigError(
            withChanges(phi4MiniConfig, {rope_scaling: {...phi4MiniConfig.rope_scaling, type: "ntk-by-parts"}}),
            /"rope_scaling\.rope_type" is "ntk-by-parts", which qlora does not implement/
        );
        // qwen3 rotates whole heads like qwen2
        assertConfigError(withChanges(qwen3Config, {partial_rotary_factor: 0.5}), /not supported for model_type "qwen3"/);
    });
});
