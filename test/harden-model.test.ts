// Hardening of model and adapter loading (issue 8, findings 6, 8, 9 and parts of 13): config.json is checked
// against the checkpoint before anything is allocated from it, NaN/Inf weights are refused wherever weights are
// read, LoRA's r is bounded by the module shapes, model-folder files that are FIFOs fail at once, eval refuses
// rows past the context as train does, and inspect escapes control characters.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {
    chmodSync,
    copyFileSync,
    mkdirSync,
    mkdtempSync,
    openSync,
    readFileSync,
    rmSync,
    writeFileSync,
    writeSync,
    closeSync
} from "node:fs";
import os from "node:os";
import path from "node:path";
import {FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";
import {expectOneLineError, runCli} from "./helpers/cli.js";
import {copyModel, editConfig} from "./helpers/model-copy.js";
import {QloraError} from "../src/errors.js";
import {countNonFinite} from "../src/backend/cpu.js";
import {Rng} from "../src/backend/rng.js";
import type {DenseLinear} from "../src/backend/linear.js";
import {SafetensorsFile} from "../src/io/safetensors.js";
import {loadModel} from "../src/api/models.js";
import {DecoderModel, KVCache} from "../src/model/decoder.js";
import {generate} from "../src/model/generate.js";
import {assertFinite} from "../src/model/weights.js";
import {loadAdapter, readAdapterConfig, saveAdapter} from "../src/peft/adapter-files.js";
import {applyLora} from "../src/peft/inject.js";
import {LORA_DEFAULTS} from "../src/lora/config.js";
import {matchTargets} from "../src/lora/targets.js";
import {quantize4bit, validateQuantState} from "../src/quant/nf4.js";

const EVAL_DATA = path.join(REPO_ROOT, "examples", "data", "alpaca_eval.json");

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-harden-model-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

/** runs the CLI; a hang is a failure (timeout), not a stuck test run */
function qlora(...args: string[]) {
    const env: NodeJS.ProcessEnv = {...process.env, NO_COLOR: "1"};
    delete env.FORCE_COLOR;
    return runCli(args, {env, timeoutMs: 60_000});
}

const expectError = expectOneLineError;

let copies = 0;
/** a copy of the embedded model with some files changed */
const modelCopy = (edit?: (dir: string) => void) => copyModel(path.join(tmp, `model-${copies++}`), edit);

/** overwrites element `index` of a tensor in a safetensors file with raw bits (bf16/f16: 2 bytes, f32: 4) */
async function plantBits(file: string, tensor: string, index: number, bits: number) {
    const st = await SafetensorsFile.open(file);
    const info = st.info(tensor);
    await st.close();
    const size = info.dtype === "F32" ? 4 : 2;
    assert.ok(index * size < info.byteLength);
    const bytes = Buffer.alloc(size);
    if (size === 4) bytes.writeUInt32LE(bits);
    else bytes.writeUInt16LE(bits);
    const fd = openSync(file, "r+");
    writeSync(fd, bytes, 0, size, info.dataOffset + index * size);
    closeSync(fd);
}

const BF16_NAN = 0x7fc0,
    BF16_NEG_INF = 0xff80,
    F32_NAN = 0x7fc00000;

async function rejectsQlora(promise: Promise<unknown>, ...fragments: (string | RegExp)[]) {
    await assert.rejects(promise, (err: unknown) => {
        assert.ok(err instanceof QloraError, `a QloraError, got ${(err as Error)?.stack ?? err}`);
        for (const f of fragments)
            assert.match(err.message, typeof f === "string" ? new RegExp(f.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")) : f);
        return true;
    });
}

// ------------------------------------------------------------------
// finding 6: config.json is checked against the checkpoint before anything is allocated from it

test("num_hidden_layers 1e9 is refused within a second, with one line naming the key", async () => {
    const dir = modelCopy((d) =>
        editConfig(d, (c) => {
            c.num_hidden_layers = 1_000_000_000;
        })
    );
    const start = performance.now();
    await rejectsQlora(DecoderModel.load(dir), "config.json", `"num_hidden_layers" is 1000000000`);
    const elapsed = performance.now() - start;
    assert.ok(elapsed < 1000, `refused after ${elapsed.toFixed(0)} ms`);
    expectError(qlora("generate", "--model", dir, "--prompt", "x"), "num_hidden_layers", "1000000000");
});

test("a layer count or embedding the checkpoint does not hold is refused before the per-layer tensors are listed", async () => {
    // plausible sizes, but not those of the weights: the checkpoint's own layer count and embedding shape decide
    for (const layers of [9, 7, 5000]) {
        // layer_types (one entry per layer) follows, so that only the checkpoint disagrees
        const dir = modelCopy((d) =>
            editConfig(d, (c) => {
                c.num_hidden_layers = layers;
                c.layer_types = Array.from({length: layers}, () => "full_attention");
            })
        );
        const start = performance.now();
        await rejectsQlora(
            DecoderModel.load(dir),
            `"num_hidden_layers" is ${layers} but the checkpoint`,
            "holds 8 layers (model.layers.0 to model.layers.7)"
        );
        assert.ok(performance.now() - start < 1000);
    }
    const vocab = modelCopy((d) =>
        editConfig(d, (c) => {
            c.vocab_size = 32000;
        })
    );
    await rejectsQlora(
        DecoderModel.load(vocab),
        `"vocab_size" 32000 and "hidden_size" 256 imply model.embed_tokens.weight [32000, 256]`,
        "holds [16384, 256]"
    );
    const inter = modelCopy((d) =>
        editConfig(d, (c) => {
            c.intermediate_size = 1024;
        })
    );
    await rejectsQlora(DecoderModel.load(inter), "model.layers.0.mlp.gate_proj.weight", "[768, 256]", "[1024, 256]");
});

test("absurd sizes are refused from config.json alone, naming the keys", async () => {
    const cases: Array<[(c: Record<string, unknown>) => void, string[]]> = [
        [
            (c) => {
                c.vocab_size = 1e12;
            },
            [`"vocab_size" x "hidden_size"`, "1000000000000 x 256", "more than the 4294967296"]
        ],
        [
            (c) => {
                c.intermediate_size = 2 ** 40;
            },
            [`"intermediate_size" x "hidden_size"`]
        ],
        [
            (c) => {
                c.head_dim = 2 ** 30;
            },
            [`"num_attention_heads" x "head_dim" x "hidden_size"`]
        ],
        [
            (c) => {
                c.head_dim = 63;
            },
            [`"head_dim" gives a head dimension of 63`, "must be even"]
        ],
        [
            (c) => {
                c.hidden_size = -1;
            },
            [`"hidden_size" is -1, expected a positive integer`]
        ],
        [
            (c) => {
                c.num_hidden_layers = 1.5;
            },
            [`"num_hidden_layers" is 1.5`]
        ],
        // a scaling factor that overflows float32 would give Inf rotary frequencies, not an error
        [
            (c) => {
                c.rope_parameters = {rope_type: "linear", factor: 1e-40, rope_theta: 1e6};
            },
            [`"rope_parameters" gives rotary frequency 0 = Infinity, outside float32's range`]
        ]
    ];
    for (const [edit, fragments] of cases) {
        const dir = modelCopy((d) => editConfig(d, edit));
        const start = performance.now();
        await rejectsQlora(DecoderModel.load(dir), "config.json", ...fragments);
        assert.ok(performance.now() - start < 1000);
    }
    // the key/value cache is sized from the request: too large is an error that says what to lower
    const model = await DecoderModel.load(MODEL_DIR);
    assert.throws(
        () => new KVCache(model.config, 1, 2 ** 40),
        (err: unknown) =>
            err instanceof QloraError &&
            /a key\/value cache for 1099511627776 positions .* lower the number of new tokens/.test(err.message)
    );
    assert.throws(() => generate(model, [1, 2], {maxNewTokens: NaN}), /max_new_tokens must be a non-negative integer/);
});

// ------------------------------------------------------------------
// finding 8: NaN / Inf weights

test("countNonFinite and assertFinite (the check merge and export call) count NaN and Inf in f32, bf16 and f16", () => {
    const f32 = new Float32Array(1000).fill(0.5);
    assert.deepEqual(countNonFinite(f32), {nan: 0, inf: 0});
    assert.doesNotThrow(() => assertFinite("w", f32, "a.safetensors"));
    f32[3] = NaN;
    f32[500] = -NaN;
    f32[999] = -Infinity;
    f32[7] = 3.4028234663852886e38; // the largest finite f32 is finite
    assert.deepEqual(countNonFinite(f32), {nan: 2, inf: 1});
    assert.throws(
        () => assertFinite("base_model.model.x.lora_B.weight", f32, "/a/adapter_model.safetensors"),
        (err: unknown) => {
            assert.ok(err instanceof QloraError);
            assert.equal(
                err.message,
                `/a/adapter_model.safetensors: tensor "base_model.model.x.lora_B.weight" holds 2 NaN and ` +
                    "1 infinite values (of 1,000): the checkpoint is corrupt: re-download it"
            );
            return true;
        }
    );
    // bf16 and f16 bits: exponent all ones is Inf (mantissa 0) or NaN; the largest finite values are not flagged
    const bf16 = Uint16Array.from([0x3f80, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0, 0xffff, 0x0001]);
    assert.deepEqual(countNonFinite(bf16, "BF16"), {nan: 2, inf: 2});
    const f16 = Uint16Array.from([0x3c00, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0x7c01, 0x0001]);
    assert.deepEqual(countNonFinite(f16, "F16"), {nan: 2, inf: 2});
    assert.throws(
        () => assertFinite("t", Uint16Array.from([0x3f80, 0x7f80]), "f", "BF16", "retrain it"),
        /f: tensor "t" holds 1 infinite value \(of 2\): retrain it/
    );
    // a buffer large enough to be split between threads (chunks of at least 2^24 values) counts every value once
    const big = new Uint16Array(2 ** 25 + 3).fill(0x3f80);
    for (const i of [0, 2 ** 24 - 1, 2 ** 24, 2 ** 25 + 2]) big[i] = BF16_NAN;
    big[12345] = BF16_NEG_INF;
    assert.deepEqual(countNonFinite(big, "BF16"), {nan: 4, inf: 1});
});

test("a NaN or an Inf in one bf16 weight is refused by generate, train, eval and 4-bit loading, naming the tensor", async () => {
    const nanTensor = "model.layers.2.mlp.down_proj.weight";
    const nanDir = modelCopy();
    await plantBits(path.join(nanDir, "model.safetensors"), nanTensor, 12345, BF16_NAN);
    const nanMessage = [`tensor "${nanTensor}" holds 1 NaN value`, "model.safetensors", "re-download it"];
    expectError(qlora("generate", "--model", nanDir, "--prompt", "x", "--max-new-tokens", "1"), ...nanMessage);
    expectError(qlora("eval", "--model", nanDir, "--data", EVAL_DATA), ...nanMessage);
    // train quantizes the bf16 bits themselves (QLoRA defaults): the check runs on those bits
    expectError(
        qlora("train", "--model", nanDir, "--max_steps", "1", "--output_dir", path.join(tmp, "train-nan")),
        ...nanMessage
    );
    // --load-in-4bit (what generate, chat and eval pass: an f32 compute dtype, read through the f32 path)
    await rejectsQlora(loadModel(nanDir, {loadIn4bit: true}), ...nanMessage);

    const infTensor = "model.norm.weight";
    const infDir = modelCopy();
    await plantBits(path.join(infDir, "model.safetensors"), infTensor, 7, BF16_NEG_INF);
    await rejectsQlora(loadModel(infDir), `tensor "${infTensor}" holds 1 infinite value (of 256)`);
    await rejectsQlora(loadModel(infDir, {loadIn4bit: true}), `tensor "${infTensor}" holds 1 infinite value (of 256)`);
});

test("a NaN in an adapter's lora_B is refused by generate --adapter; a non-finite 4-bit scale is refused", async () => {
    const model = await DecoderModel.load(MODEL_DIR);
    const lora = applyLora(model, {r: 4, lora_alpha: 8, target_modules: ["q_proj", "v_proj"]}, {initRng: new Rng(1)});
    const adapter = path.join(tmp, "adapter-nan");
    await saveAdapter(adapter, lora);
    const tensor = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    await plantBits(path.join(adapter, "adapter_model.safetensors"), tensor, 5, F32_NAN);
    expectError(
        qlora("generate", "--adapter", adapter, "--prompt", "x", "--max-new-tokens", "1"),
        `adapter_model.safetensors: tensor "${tensor}" holds 1 NaN value (of 512)`,
        "the adapter is corrupt"
    );

    const state = quantize4bit(
        new Float32Array(4096).map((_, i) => Math.sin(i)),
        {shape: [64, 64], compressStatistics: false}
    );
    assert.doesNotThrow(() => validateQuantState(state));
    state.absmax![3] = Infinity;
    assert.throws(
        () => validateQuantState(state, '4-bit weight "w"'),
        /4-bit weight "w": absmax holds 0 NaN and 1 infinite values/
    );
});

test("a pre-quantized bnb-4bit checkpoint gets the same checks: layer count, NaN scales, NaN dense weights", async () => {
    const bnbCopy = (edit: (dir: string) => void | Promise<void>) => {
        const dir = path.join(tmp, `bnb-${copies++}`);
        mkdirSync(dir);
        for (const f of ["config.json", "model.safetensors", "generation_config.json"]) {
            copyFileSync(path.join(FIXTURES, "bnb-4bit", f), path.join(dir, f));
            chmodSync(path.join(dir, f), 0o644);
        }
        return Promise.resolve(edit(dir)).then(() => dir);
    };
    const layers = await bnbCopy((d) =>
        editConfig(d, (c) => {
            c.num_hidden_layers = 9;
            c.layer_types = Array.from({length: 9}, () => "full_attention");
        })
    );
    await rejectsQlora(DecoderModel.load(layers), `"num_hidden_layers" is 9 but the checkpoint`, "holds 8 layers");
    const scale = await bnbCopy((d) =>
        plantBits(path.join(d, "model.safetensors"), "model.layers.0.self_attn.q_proj.weight.nested_absmax", 2, F32_NAN)
    );
    await rejectsQlora(
        DecoderModel.load(scale),
        `4-bit weight "model.layers.0.self_attn.q_proj.weight": nested_absmax holds 1 NaN`
    );
    const dense = await bnbCopy((d) =>
        plantBits(path.join(d, "model.safetensors"), "model.layers.3.input_layernorm.weight", 0, F32_NAN)
    );
    await rejectsQlora(DecoderModel.load(dense), `tensor "model.layers.3.input_layernorm.weight" holds 1 NaN value (of 256)`);
    // the untouched fixture still loads
    assert.equal((await DecoderModel.load(await bnbCopy(() => undefined))).quantized, true);
});

// ------------------------------------------------------------------
// finding 9: r is bounded by the shapes of the modules it wraps

test("r above the smallest targeted dimension is refused naming the module; r equal to it is accepted", async () => {
    // the tiny model's k_proj and v_proj are [128, 256]: LoRA's rank there is at most 128
    expectError(
        qlora("train", "--r", "1000000", "--max_steps", "1", "--output_dir", path.join(tmp, "train-r")),
        "r: 1000000 is larger than the targeted module model.layers.0.self_attn.k_proj allows",
        "[128, 256]",
        "use r <= 128"
    );
    const model = await DecoderModel.load(MODEL_DIR);
    assert.throws(
        () => applyLora(model, {r: 129, target_modules: "all-linear"}),
        /r: 129 is larger than the targeted module model\.layers\.0\.self_attn\.k_proj allows/
    );
    // only q_proj and o_proj ([256, 256]) targeted: 256 is the bound
    assert.throws(() => applyLora(model, {r: 257, target_modules: ["q_proj", "o_proj"]}), /use r <= 256/);
    const lora = applyLora(model, {r: 128, target_modules: "all-linear"}, {initRng: new Rng(2)});
    assert.equal(lora.layers.get("model.layers.0.self_attn.k_proj")!.lora!.A.length, 128 * 256);
    const logits = model.forward(Int32Array.from([1, 2, 3]), 1, 3);
    assert.ok(logits.every(Number.isFinite));

    // an adapter whose adapter_config.json claims a huge r is refused as such before any tensor is read
    const adapter = path.join(tmp, "adapter-big-r");
    await saveAdapter(adapter, applyLora(await DecoderModel.load(MODEL_DIR), {r: 4, target_modules: ["v_proj"]}));
    const cfgFile = path.join(adapter, "adapter_config.json");
    writeFileSync(cfgFile, JSON.stringify({...JSON.parse(readFileSync(cfgFile, "utf8")), r: 1_000_000}));
    await rejectsQlora(
        loadAdapter(adapter, await DecoderModel.load(MODEL_DIR)),
        "adapter_config.json: r: 1000000 is larger than",
        "model.layers.0.self_attn.v_proj",
        "use r <= 128"
    );
});

test("a corrupt adapter_config.json is a QloraError naming the file and key, never a TypeError", async () => {
    const cases: Array<[unknown, string]> = [
        [null, "expected a JSON object"],
        [[1, 2], "expected a JSON object"],
        [{r: 4, target_modules: 5}, "target_modules: must be a list of module names"],
        [{r: 4, modules_to_save: "lm_head"}, "modules_to_save: must be a list of module names or null"],
        [{r: 4, lora_dropout: "0.1"}, "lora_dropout: must be a number in [0, 1)"],
        [{r: "8"}, "r: must be a positive integer"],
        [{r: 4, use_dora: "yes"}, "use_dora: must be true or false"],
        [{r: 4, alpha_pattern: {q_proj: 64}}, "alpha_pattern is"]
    ];
    for (const [json, fragment] of cases) {
        const dir = path.join(tmp, `adapter-config-${cases.findIndex((c) => c[0] === json)}`);
        mkdirSync(dir, {recursive: true});
        writeFileSync(path.join(dir, "adapter_config.json"), JSON.stringify(json));
        await rejectsQlora(readAdapterConfig(dir), "adapter_config.json", fragment);
    }
});

test("target_modules patterns that would backtrack for hours are refused before they run; usual patterns match", () => {
    const names = Array.from({length: 8}, (_, l) =>
        ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"].map((p) => `model.layers.${l}.${p}`)
    ).flat();
    const match = (pattern: string) => matchTargets(names, {...LORA_DEFAULTS, target_modules: pattern}, "qwen2");
    // in a child process with a timeout: were the check gone, the match would block this process for hours
    const script = `import {matchTargets} from ${JSON.stringify(path.join(REPO_ROOT, "src", "lora", "targets.ts"))};
        for (const p of ["(.*)*x", "(a|aa)+b", ".*.*.*.*.*x"]) {
            try { matchTargets(${JSON.stringify(names)}, {target_modules: p}, "qwen2"); console.log("matched"); }
            catch (e) { console.log(e.message); }
        }`;
    const r = spawnSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
        encoding: "utf8",
        cwd: REPO_ROOT,
        timeout: 30_000
    });
    assert.equal(r.signal, null, "matching hung");
    const [nested, alternation, many] = r.stdout.trim().split("\n");
    assert.match(nested, /target_modules: the pattern "\(\.\*\)\*x" repeats a group that itself repeats/);
    assert.match(alternation, /repeats a group that itself repeats or alternates/);
    assert.match(many, /has more than 4 unbounded repetitions/);
    assert.equal(match(String.raw`.*\.(q_proj|v_proj)`).length, 16);
    assert.equal(match(String.raw`^(?!.*mlp).*\.(q|v)_proj$`).length, 16);
    assert.equal(match(String.raw`model\.layers\.[0-3]\.mlp\.up_proj`).length, 4);
});

// ------------------------------------------------------------------
// finding 13: FIFOs, eval past the context, inspect's output

test("a FIFO named config.json, model.safetensors or adapter_config.json fails at once", () => {
    const mkfifo = (file: string) => {
        rmSync(file, {force: true});
        const r = spawnSync("mkfifo", [file]);
        assert.equal(r.status, 0, `mkfifo ${file}`);
    };
    const config = modelCopy((d) => mkfifo(path.join(d, "config.json")));
    expectError(qlora("generate", "--model", config, "--prompt", "x"), "config.json", "FIFO");
    const weights = modelCopy((d) => mkfifo(path.join(d, "model.safetensors")));
    expectError(qlora("generate", "--model", weights, "--prompt", "x"), "model.safetensors", "FIFO");
    const adapter = path.join(tmp, "adapter-fifo");
    mkdirSync(adapter);
    mkfifo(path.join(adapter, "adapter_config.json"));
    expectError(qlora("generate", "--adapter", adapter, "--prompt", "x"), "adapter_config.json", "FIFO");
});

test("eval refuses rows longer than the model's context, as train does; rows cut to fit are scored with a warning", () => {
    const dir = modelCopy((d) =>
        editConfig(d, (c) => {
            c.max_position_embeddings = 64;
        })
    );
    const data = path.join(tmp, "long.json");
    writeFileSync(
        data,
        JSON.stringify([
            {instruction: "Repeat the words.", input: "", output: Array.from({length: 80}, (_, i) => `word${i}`).join(" ")},
            {instruction: "Add the numbers.", input: "1 2", output: "3"}
        ])
    );
    expectError(
        qlora("eval", "--model", dir, "--data", data),
        /max_seq_length 1024 lets rows of \d+ tokens through, longer than the model's context \(max_position_embeddings 64/
    );
    const ok = qlora("eval", "--model", dir, "--data", data, "--max-seq-length", "64", "--json");
    assert.equal(ok.code, 0, ok.stderr);
    const result = JSON.parse(ok.stdout.trim());
    assert.equal(result.rows, 2);
    assert.ok(Number.isFinite(result.loss) && result.loss > 0);
    assert.match(ok.stderr, /^warning: 1 of 2 examples are longer than max_seq_length 64 and were truncated$/m);
});

test("inspect prints control characters of tensor names and config strings escaped", () => {
    const evil = "evil\u001b[31mred\rback\u0008";
    const dir = modelCopy((d) => {
        editConfig(d, (c) => {
            c.architectures = ["Qwen2\u001b[2JForCausalLM"];
        });
        // an extra, empty tensor with a hostile name: header rewritten, data section kept
        const file = path.join(d, "model.safetensors");
        const bytes = readFileSync(file);
        const headerLength = Number(bytes.readBigUInt64LE(0));
        const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString("utf8"));
        header[evil] = {dtype: "F32", shape: [0], data_offsets: [0, 0]};
        let json = Buffer.from(JSON.stringify(header), "utf8");
        json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
        const length = Buffer.alloc(8);
        length.writeBigUInt64LE(BigInt(json.length));
        writeFileSync(file, Buffer.concat([length, json, bytes.subarray(8 + headerLength)]));
    });
    const r = qlora("inspect", "--model", dir);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stdout, /[\u0000-\u0009\u000b-\u001f\u007f]/, "no control character but newlines reaches the terminal");
    assert.ok(r.stdout.includes(String.raw`"evil\u001b[31mred\rback\b"`), r.stdout);
    assert.ok(r.stdout.includes(String.raw`Qwen2\u001b[2JForCausalLM`), r.stdout);
    assert.match(r.stdout, /unused tensors\s+1 \(not described by config\.json/);
    // the model still loads: the extra tensor is ignored, as transformers ignores unexpected keys
    const json = qlora("inspect", "--model", dir, "--json");
    assert.deepEqual(JSON.parse(json.stdout).unusedTensors, [evil]);
});

test("finite weights far out of range (3e38 passes the NaN/Inf check) make forward and scoring refuse, not return Inf", async () => {
    const model = await DecoderModel.load(MODEL_DIR);
    const ids = Int32Array.from([3915, 559, 1954]);
    assert.ok(model.forward(ids, 1, 3).every(Number.isFinite));
    const q = model.params.layers[2].proj.v_proj as DenseLinear;
    q.weightF32().fill(3e38, 0, 256);
    assert.throws(
        () => model.forward(ids, 1, 3),
        (err: unknown) =>
            err instanceof QloraError &&
            /the model's forward pass overflowed: \d+ of 49152 logits are NaN or infinite\. A weight of the model or of the adapter is far out of range/.test(
                err.message
            )
    );
    const batch = {
        B: 1,
        T: 3,
        inputIds: ids,
        labels: ids,
        attentionMask: null,
        positionIds: Int32Array.from([0, 1, 2]),
        segIds: null
    };
    assert.throws(() => model.score(batch), /the model's forward pass overflowed: the loss is (NaN|Infinity)/);
});
