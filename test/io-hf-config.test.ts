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
            /model_type "gpt2" is not supported \(supported: llama, qwen2, mistral\)/
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
