// bnb-4bit checkpoints: the fixture that transformers + bitsandbytes saved (../shared/fixtures/ref-qwen2/bnb-4bit)
// loads to the weights we get by quantizing the model ourselves, and what we write is byte-identical to it.
import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {FIXTURES, SHARED} from "./helpers/paths.js";
import {QloraError} from "../src/errors.js";
import {SafetensorsCheckpoint, writeSafetensors, type TensorToWrite} from "../src/io/safetensors.js";
import {readTensorF32} from "../src/model/weights.js";
import {dequantize4bit, quantize4bit, type QuantState4bit} from "../src/quant/nf4.js";
import {
    loadBnb4bitCheckpoint,
    pythonFloatRepr,
    quantStateJson,
    readQuantState,
    writeBnb4bitCheckpoint,
    type Bnb4bitCheckpoint
} from "../src/quant/bnb-checkpoint.js";
import {
    bitsAndBytesConfig,
    isModuleSkipped,
    parseQuantizationConfig,
    quantizationConfigToJson,
    TRANSFORMERS_BNB_DEFAULTS
} from "../src/quant/config.js";

const BNB_DIR = path.join(FIXTURES, "bnb-4bit");
const BASE_DIR = path.join(SHARED, "models", "tiny-qwen2");

let tempDir: string;
let bnb: Bnb4bitCheckpoint;
let base: SafetensorsCheckpoint;
before(async () => {
    tempDir = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-bnb-"));
    bnb = await loadBnb4bitCheckpoint(BNB_DIR);
    base = await SafetensorsCheckpoint.open(BASE_DIR);
});
after(async () => {
    await bnb.ckpt.close();
    await base.close();
    await fs.rm(tempDir, {recursive: true, force: true});
});

function assertBytesEqual(actual: ArrayBufferView, expected: ArrayBufferView, what: string): void {
    const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
    const b = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
    assert.equal(a.length, b.length, `${what}: length`);
    assert.ok(a.equals(b), `${what}: bytes differ (first at ${a.findIndex((v, i) => v !== b[i])})`);
}

function assertStatesEqual(actual: QuantState4bit, expected: QuantState4bit, what: string): void {
    assertBytesEqual(actual.packed, expected.packed, `${what} packed`);
    assertBytesEqual(actual.absmaxQ!, expected.absmaxQ!, `${what} absmax`);
    assertBytesEqual(actual.nestedAbsmax!, expected.nestedAbsmax!, `${what} nested_absmax`);
    assertBytesEqual(actual.nestedQuantMap!, expected.nestedQuantMap!, `${what} nested_quant_map`);
    assertBytesEqual(actual.quantMap, expected.quantMap, `${what} quant_map`);
    assert.ok(Object.is(actual.offset, expected.offset), `${what} offset`);
    assert.deepEqual(
        [actual.shape, actual.blocksize, actual.nestedBlocksize, actual.quantType, actual.dtype],
        [expected.shape, expected.blocksize, expected.nestedBlocksize, expected.quantType, expected.dtype],
        what
    );
}

/** quantizes the bf16 base model the way from_pretrained(dtype=float32, nf4 + double quant) does */
async function quantizeBase(): Promise<Map<string, QuantState4bit>> {
    const states = new Map<string, QuantState4bit>();
    for (const name of bnb.states.keys()) {
        const x = await readTensorF32(base, name);
        states.set(name, quantize4bit(x, {shape: [...base.info(name).shape], quantType: "nf4", compressStatistics: true}));
    }
    return states;
}

async function denseTensors(ckpt: SafetensorsCheckpoint, names: string[]): Promise<TensorToWrite[]> {
    const out: TensorToWrite[] = [];
    for (const name of names) {
        const info = ckpt.info(name);
        out.push({name, dtype: info.dtype, shape: info.shape, data: await ckpt.readBytes(name)});
    }
    return out;
}

describe("reading the bitsandbytes checkpoint", () => {
    test("quantization_config and the set of quantized weights", () => {
        assert.deepEqual(bnb.quantization, {
            load_in_4bit: true,
            bnb_4bit_quant_type: "nf4",
            bnb_4bit_compute_dtype: "float32",
            bnb_4bit_use_double_quant: true,
            bnb_4bit_quant_storage: "uint8",
            llm_int8_skip_modules: null
        });
        assert.equal(bnb.states.size, 56);
        for (const name of bnb.states.keys()) assert.match(name, /^model\.layers\.\d\.(self_attn|mlp)\.\w+_proj\.weight$/);
        assert.ok(bnb.denseNames.includes("model.embed_tokens.weight"));
        assert.ok(bnb.denseNames.includes("model.layers.0.self_attn.q_proj.bias"));
        assert.ok(!bnb.denseNames.some((n) => n.includes("absmax") || n.includes("quant")));
        // 1 embedding + 1 final norm + 8 layers x (2 norms + 3 biases)
        assert.equal(bnb.denseNames.length, 2 + 8 * 5);
    });

    test("loads to the same states and weights as quantizing ../shared/models/tiny-qwen2", async () => {
        const ours = await quantizeBase();
        for (const [name, state] of bnb.states) {
            assertStatesEqual(ours.get(name)!, state, name);
            const a = dequantize4bit(state),
                b = dequantize4bit(ours.get(name)!);
            assertBytesEqual(a, b, `${name} dequantized`);
        }
    });

    test("the quant_state JSON we write is the one bitsandbytes wrote", async () => {
        for (const [name, state] of bnb.states) {
            const stored = Buffer.from(await bnb.ckpt.readBytes(`${name}.quant_state.bitsandbytes__nf4`)).toString("utf8");
            assert.equal(quantStateJson(state), stored, name);
        }
    });

    test("pythonFloatRepr follows Python's repr", () => {
        const cases: [number, string][] = [
            [0.1265462338924408, "0.1265462338924408"],
            [1, "1.0"],
            [0, "0.0"],
            [-0, "-0.0"],
            [1e-5, "1e-05"],
            [0.0001, "0.0001"],
            [123.5, "123.5"],
            [1e16, "1e+16"],
            [1234567890123456, "1234567890123456.0"],
            [-2.5e-7, "-2.5e-07"],
            [Math.fround(0.1), "0.10000000149011612"],
            [1.5e300, "1.5e+300"]
        ];
        for (const [x, s] of cases) assert.equal(pythonFloatRepr(x), s, String(x));
    });
});

describe("writing a bnb-4bit checkpoint", () => {
    test("quantizing the base model and saving it reproduces the bitsandbytes checkpoint byte for byte", async () => {
        const dir = path.join(tempDir, "ours");
        // the fixture was saved from a float32 model: dense tensors are the f32 upcasts of the bf16 base
        const dense: TensorToWrite[] = [];
        for (const name of bnb.denseNames) {
            const data = await readTensorF32(base, name);
            dense.push({name, dtype: "F32", shape: [...base.info(name).shape], data});
        }
        const config = JSON.parse(await fs.readFile(path.join(BASE_DIR, "config.json"), "utf8")) as Record<string, unknown>;
        await writeBnb4bitCheckpoint(dir, {config, quantization: bnb.quantization, states: await quantizeBase(), dense});
        assertBytesEqual(
            await fs.readFile(path.join(dir, "model.safetensors")),
            await fs.readFile(path.join(BNB_DIR, "model.safetensors")),
            "model.safetensors"
        );
        const written = JSON.parse(await fs.readFile(path.join(dir, "config.json"), "utf8"));
        assert.deepEqual(written.quantization_config, bnb.config.quantization_config);
    });

    test("load -> save -> load round trip keeps every byte", async () => {
        const dir = path.join(tempDir, "roundtrip");
        await writeBnb4bitCheckpoint(dir, {
            config: bnb.config,
            quantization: bnb.quantization,
            states: bnb.states,
            dense: await denseTensors(bnb.ckpt, bnb.denseNames)
        });
        assertBytesEqual(
            await fs.readFile(path.join(dir, "model.safetensors")),
            await fs.readFile(path.join(BNB_DIR, "model.safetensors")),
            "model.safetensors"
        );
        const again = await loadBnb4bitCheckpoint(dir);
        try {
            assert.deepEqual(again.quantization, bnb.quantization);
            assert.deepEqual(again.denseNames, bnb.denseNames);
            for (const [name, state] of bnb.states) assertStatesEqual(again.states.get(name)!, state, name);
        } finally {
            await again.ckpt.close();
        }
    });

    test("sharded, without double quantization, FP4 and bf16 states round trip", async () => {
        const dir = path.join(tempDir, "sharded-fp4");
        const states = new Map<string, QuantState4bit>();
        for (const name of [...bnb.states.keys()].slice(0, 6)) {
            const bits = (await base.readTyped(name)) as Uint16Array;
            states.set(
                name,
                quantize4bit({bf16: bits}, {shape: [...base.info(name).shape], quantType: "fp4", compressStatistics: false})
            );
        }
        const quantization = bitsAndBytesConfig({
            bnb_4bit_quant_type: "fp4",
            bnb_4bit_use_double_quant: false,
            bnb_4bit_compute_dtype: "bfloat16"
        });
        const result = await writeBnb4bitCheckpoint(dir, {
            config: {model_type: "qwen2"},
            quantization,
            states,
            dense: [],
            maxShardBytes: 100_000
        });
        assert.ok(result.files.length > 1 && result.indexFile);
        const again = await loadBnb4bitCheckpoint(dir);
        try {
            assert.deepEqual(again.quantization, quantization);
            for (const [name, state] of states) {
                const loaded = again.states.get(name)!;
                assert.equal(loaded.quantType, "fp4");
                assert.equal(loaded.dtype, "bfloat16");
                assert.equal(loaded.absmaxQ, null);
                assertBytesEqual(loaded.packed, state.packed, name);
                assertBytesEqual(loaded.absmax!, state.absmax!, name);
                assertBytesEqual(dequantize4bit(loaded), dequantize4bit(state), name);
            }
        } finally {
            await again.ckpt.close();
        }
    });
});

describe("errors", () => {
    async function copyWithout(dir: string, drop: (name: string) => boolean): Promise<void> {
        await fs.mkdir(dir, {recursive: true});
        const names = bnb.ckpt.names().filter((n) => !drop(n));
        await writeSafetensors(path.join(dir, "model.safetensors"), await denseTensors(bnb.ckpt, names), {format: "pt"});
        await fs.copyFile(path.join(BNB_DIR, "config.json"), path.join(dir, "config.json"));
    }

    test("a missing quant state key is a QloraError naming the tensor", async () => {
        const dir = path.join(tempDir, "no-absmax");
        const missing = "model.layers.3.mlp.up_proj.weight.nested_absmax";
        await copyWithout(dir, (n) => n === missing);
        await assert.rejects(
            loadBnb4bitCheckpoint(dir),
            (e: unknown) =>
                e instanceof QloraError &&
                e.message.includes(`"${missing}" is missing`) &&
                e.message.includes("model.layers.3.mlp.up_proj.weight")
        );
    });

    test("a packed weight without its quant_state is a QloraError naming the weight", async () => {
        const dir = path.join(tempDir, "no-quant-state");
        const weight = "model.layers.1.self_attn.k_proj.weight";
        await copyWithout(dir, (n) => n.startsWith(`${weight}.`));
        await assert.rejects(
            loadBnb4bitCheckpoint(dir),
            (e: unknown) => e instanceof QloraError && e.message.includes(`"${weight}"`) && e.message.includes("quant_state")
        );
    });

    test("readQuantState of a dense tensor names it", async () => {
        await assert.rejects(
            readQuantState(bnb.ckpt, "model.embed_tokens.weight"),
            (e: unknown) => e instanceof QloraError && e.message.includes("model.embed_tokens.weight")
        );
    });

    test("bad quantization_config values name the key", () => {
        const good = bnb.config.quantization_config as Record<string, unknown>;
        const bad = (patch: Record<string, unknown>, key: string) =>
            assert.throws(
                () => parseQuantizationConfig({...good, ...patch}, "config.json"),
                (e: unknown) =>
                    e instanceof QloraError &&
                    e.message.includes(`quantization_config.${key}`) &&
                    e.message.startsWith("config.json: ")
            );
        bad({bnb_4bit_quant_type: "int4"}, "bnb_4bit_quant_type");
        bad({bnb_4bit_compute_dtype: "float64"}, "bnb_4bit_compute_dtype");
        bad({bnb_4bit_use_double_quant: "yes"}, "bnb_4bit_use_double_quant");
        bad({llm_int8_skip_modules: "lm_head"}, "llm_int8_skip_modules");
        bad({quant_method: "gptq"}, "quant_method");
        bad({load_in_4bit: false, _load_in_4bit: false}, "load_in_4bit");
        bad({load_in_8bit: true}, "load_in_8bit");
        assert.throws(
            () => bitsAndBytesConfig({bnb_4bit_quant_type: "nf8" as never}),
            (e: unknown) => e instanceof QloraError && e.message.includes("BitsAndBytesConfig.bnb_4bit_quant_type")
        );
    });
});

describe("BitsAndBytesConfig", () => {
    test("defaults: transformers' for files, QLoRA's for user options; aliases", () => {
        assert.deepEqual(parseQuantizationConfig({load_in_4bit: true}, "config.json"), TRANSFORMERS_BNB_DEFAULTS);
        const cfg = bitsAndBytesConfig({bnb_4bit_compute_dtype: "torch.bfloat16" as never});
        assert.equal(cfg.bnb_4bit_quant_type, "nf4");
        assert.equal(cfg.bnb_4bit_use_double_quant, true);
        assert.equal(cfg.bnb_4bit_compute_dtype, "bfloat16");
        assert.equal(bitsAndBytesConfig({bnb_4bit_compute_dtype: "fp16" as never}).bnb_4bit_compute_dtype, "float16");
    });

    test("quantization_config JSON has every key, as transformers writes it", () => {
        assert.deepEqual(quantizationConfigToJson(bnb.quantization), bnb.config.quantization_config);
    });

    test("skip modules", () => {
        const cfg = bitsAndBytesConfig({llm_int8_skip_modules: ["mlp.down_proj", "vision_tower"]});
        assert.ok(isModuleSkipped(cfg, "lm_head"));
        assert.ok(isModuleSkipped(cfg, "model.layers.3.mlp.down_proj"));
        assert.ok(!isModuleSkipped(cfg, "model.layers.3.mlp.up_proj"));
        assert.ok(!isModuleSkipped(cfg, "model.layers.3.self_attn.q_proj"));
    });
});
