// GGUF encoders against ggml: byte-identical to ggml-quants.c's reference quantizers, decoders identical to its
// dequantize_row_*; and the type each tensor gets (the converter's f16/q8_0 rules, llama-quantize's Q4_K_M mix).
//
// The golden hashes were made by compiling ggml/src/ggml-quants.c from the llama.cpp that node-llama-cpp 3.21.1
// bundles (node_modules/node-llama-cpp/llama/gitRelease.bundle; gcc -O2, x86-64 baseline, so no FMA) and running
// quantize_row_{q8_0,q5_0,q4_K,q6_K}_ref and dequantize_row_* on quantTestData() (test/helpers/gguf-quant-data.ts).
import {test} from "node:test";
import assert from "node:assert/strict";
import {createHash} from "node:crypto";
import {f32ToHalf} from "../src/backend/cpu.js";
import {
    decodeTensor,
    encodeTensor,
    GgmlType,
    ggmlTensorBytes,
    tensorTypeFor,
    typeFallback,
    useMoreBits,
    type GgufOuttype
} from "../src/io/gguf-quants.js";
import {QUANT_ROW, QUANT_ROWS, quantTestData} from "./helpers/gguf-quant-data.js";

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

const GOLDEN: Record<string, {type: GgmlType; ref: string; encoded: string; decoded: string}> = {
    Q8_0: {
        type: GgmlType.Q8_0,
        ref: "quantize_row_q8_0_ref",
        encoded: "8979b54c443d1bf6bd9c36ae6f9ff192e6ec7822ad14652d05fdad44b0c2708d",
        decoded: "168baa9c67766ff24258f832741d9b7c2f6be57a4ad5a7b3c1004aab4f201ab8"
    },
    Q5_0: {
        type: GgmlType.Q5_0,
        ref: "quantize_row_q5_0_ref",
        encoded: "8c3bee61b7276848a8164e4ca31fe702a5a11b80a56aefcca78db228bd65de42",
        decoded: "2e2c7762274361691b6242b1b432c3ff47e694f3b78ba92d42e8c57884f58ba4"
    },
    Q4_K: {
        type: GgmlType.Q4_K,
        ref: "quantize_row_q4_K_ref (make_qkx2_quants)",
        encoded: "24f8d00118729017b87cd8a9fe1751ccafe4651818802167c99085a7ec642c61",
        decoded: "d7079c635bc2ba9fae280eb0b22c47fde2b0e4cbdbdc365a45dd2a0b10756f4e"
    },
    Q6_K: {
        type: GgmlType.Q6_K,
        ref: "quantize_row_q6_K_ref (make_qx_quants)",
        encoded: "6a3fba611592c4bced04bf1a39c52cd7a5196cb32376559538dcefda01b00e1c",
        decoded: "072463671ef5aa91cc6949fc1cb5ecc7ab8476490b128ad11f0d03d33ce79d2f"
    }
};

for (const [name, golden] of Object.entries(GOLDEN)) {
    test(`${name}: byte-identical to ggml's ${golden.ref}, decoded as dequantize_row_*`, () => {
        const x = quantTestData();
        const encoded = encodeTensor(golden.type, x, QUANT_ROW, QUANT_ROWS);
        assert.equal(encoded.length, ggmlTensorBytes(golden.type, [QUANT_ROW, QUANT_ROWS]));
        assert.equal(sha256(encoded), golden.encoded);
        const decoded = decodeTensor(golden.type, encoded, QUANT_ROW, QUANT_ROWS);
        assert.equal(sha256(new Uint8Array(decoded.buffer)), golden.decoded);
    });
}

test("encoding is row-independent: a row alone encodes to the same bytes (rows can be streamed)", () => {
    const x = quantTestData();
    for (const type of [GgmlType.Q8_0, GgmlType.Q5_0, GgmlType.Q4_K, GgmlType.Q6_K]) {
        const all = encodeTensor(type, x, QUANT_ROW, QUANT_ROWS);
        const rowBytes = all.length / QUANT_ROWS;
        const one = encodeTensor(type, x.subarray(5 * QUANT_ROW, 6 * QUANT_ROW), QUANT_ROW, 1);
        assert.deepEqual(one, all.subarray(5 * rowBytes, 6 * rowBytes));
    }
});

test("Q8_0 by hand: d = amax/127 as f16, codes round(x/d)", () => {
    const x = Float32Array.from({length: 32}, (_, j) => (j - 16) / 8); // amax 2
    const bytes = encodeTensor(GgmlType.Q8_0, x, 32, 1);
    assert.equal(bytes.length, 34);
    const d = new DataView(bytes.buffer).getUint16(0, true);
    assert.equal(d, f32ToHalf(Float32Array.of(2 / 127), "F16")[0]);
    const codes = Array.from(new Int8Array(bytes.buffer, 2, 32));
    assert.deepEqual(
        codes,
        Array.from(x, (v) => Math.sign(v) * Math.round((Math.abs(v) * 127) / 2))
    );
    const back = decodeTensor(GgmlType.Q8_0, bytes, 32, 1);
    for (let j = 0; j < 32; j++) assert.ok(Math.abs(back[j] - x[j]) < 0.01);
});

test("F16 is round-to-nearest-even with overflow to infinity, like the F16C conversion", () => {
    const x = new Float32Array([
        0,
        -0,
        1,
        -2.5,
        1 / 3,
        65504,
        65519,
        65520,
        70000,
        -1e9,
        1e-7,
        6e-8,
        3e-8,
        2.98e-8,
        Math.fround(1 + 2 ** -11),
        Math.fround(1 + 3 * 2 ** -11)
    ]);
    const bytes = encodeTensor(GgmlType.F16, x, x.length, 1);
    const ours = new Uint16Array(bytes.buffer, 0, x.length);
    assert.deepEqual(Array.from(ours), Array.from(f32ToHalf(x, "F16")));
    assert.equal(ours[7], 0x7c00); // 65520 rounds up to +inf
    assert.equal(ours[8], 0x7c00);
    assert.equal(ours[9], 0xfc00);
    const nan = encodeTensor(GgmlType.F16, Float32Array.of(NaN), 1, 1);
    assert.equal(new Uint16Array(nan.buffer)[0] & 0x7fff, 0x7e00);
    const round = decodeTensor(GgmlType.F16, bytes, x.length, 1);
    assert.equal(round[2], 1);
    assert.equal(round[3], -2.5);
});

test("rows that are not a whole number of blocks are refused", () => {
    assert.throws(() => encodeTensor(GgmlType.Q4_K, new Float32Array(128), 128, 1), /whole number of Q4_K blocks/);
    assert.throws(() => encodeTensor(GgmlType.Q8_0, new Float32Array(48), 48, 1), /whole number of Q8_0 blocks/);
    assert.throws(() => encodeTensor(GgmlType.Q4_0, new Float32Array(32), 32, 1), /cannot encode/);
});

test("use_more_bits picks llama.cpp's layers (SPEC-gguf §4.2 table)", () => {
    const layers = (n: number) => Array.from({length: n}, (_, i) => i).filter((i) => useMoreBits(i, n));
    assert.deepEqual(layers(22), [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
    assert.deepEqual(layers(24), [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    assert.deepEqual(layers(28), [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
    assert.deepEqual(layers(32), [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
    assert.deepEqual(layers(8), [0, 3, 6, 7]);
});

test("shape fallbacks: Q4_K → Q5_0, Q6_K → Q8_0 when 256 does not divide a row, F16 when 32 does not either", () => {
    assert.equal(typeFallback(GgmlType.Q4_K, 896), GgmlType.Q5_0);
    assert.equal(typeFallback(GgmlType.Q6_K, 896), GgmlType.Q8_0);
    assert.equal(typeFallback(GgmlType.Q4_K, 4864), GgmlType.Q4_K);
    assert.equal(typeFallback(GgmlType.Q4_K, 100), GgmlType.F16);
    assert.equal(typeFallback(GgmlType.Q8_0, 100), GgmlType.F16);
});

/** the tensor list of a dense qwen2 model as (GGUF name, ne) */
function qwen2Tensors(cfg: {
    C: number;
    ff: number;
    layers: number;
    heads: number;
    kv: number;
    hd: number;
    V: number;
    tied: boolean;
}) {
    const t: [string, number[]][] = [["token_embd.weight", [cfg.C, cfg.V]]];
    for (let l = 0; l < cfg.layers; l++) {
        const b = `blk.${l}`;
        t.push([`${b}.attn_norm.weight`, [cfg.C]], [`${b}.ffn_norm.weight`, [cfg.C]]);
        t.push([`${b}.attn_q.weight`, [cfg.C, cfg.heads * cfg.hd]], [`${b}.attn_q.bias`, [cfg.heads * cfg.hd]]);
        t.push([`${b}.attn_k.weight`, [cfg.C, cfg.kv * cfg.hd]], [`${b}.attn_k.bias`, [cfg.kv * cfg.hd]]);
        t.push([`${b}.attn_v.weight`, [cfg.C, cfg.kv * cfg.hd]], [`${b}.attn_v.bias`, [cfg.kv * cfg.hd]]);
        t.push([`${b}.attn_output.weight`, [cfg.heads * cfg.hd, cfg.C]]);
        t.push([`${b}.ffn_gate.weight`, [cfg.C, cfg.ff]], [`${b}.ffn_up.weight`, [cfg.C, cfg.ff]]);
        t.push([`${b}.ffn_down.weight`, [cfg.ff, cfg.C]]);
    }
    t.push(["output_norm.weight", [cfg.C]]);
    if (!cfg.tied) t.push(["output.weight", [cfg.C, cfg.V]]);
    return t;
}

function typeCounts(outtype: GgufOuttype, tensors: [string, number[]][], layers: number, tied: boolean) {
    const counts: Record<number, number> = {};
    for (const [name, ne] of tensors) {
        const type = tensorTypeFor(name, ne, outtype, {blockCount: layers, tiedEmbeddings: tied});
        counts[type] = (counts[type] ?? 0) + 1;
    }
    return counts;
}

test("Q4_K_M reproduces the official Qwen2.5-0.5B-Instruct Q4_K_M type counts (SPEC-gguf §4.2)", () => {
    // n_embd 896 is not a multiple of 256, so most tensors fall back; the file has an output.weight
    const tensors = qwen2Tensors({C: 896, ff: 4864, layers: 24, heads: 14, kv: 2, hd: 64, V: 151936, tied: false});
    assert.deepEqual(typeCounts("q4_k_m", tensors, 24, false), {
        [GgmlType.F32]: 121,
        [GgmlType.Q5_0]: 133,
        [GgmlType.Q8_0]: 13,
        [GgmlType.Q4_K]: 12,
        [GgmlType.Q6_K]: 12
    });
    const down = (l: number) =>
        tensorTypeFor(`blk.${l}.ffn_down.weight`, [4864, 896], "q4_k_m", {blockCount: 24, tiedEmbeddings: false});
    assert.equal(down(0), GgmlType.Q6_K);
    assert.equal(down(3), GgmlType.Q4_K);
    assert.equal(down(5), GgmlType.Q6_K);
});

test("tied embeddings get the output layer's type; f16/q8_0 follow the converter", () => {
    const ctxTied = {blockCount: 28, tiedEmbeddings: true};
    assert.equal(tensorTypeFor("token_embd.weight", [1536, 151936], "q4_k_m", ctxTied), GgmlType.Q6_K);
    assert.equal(
        tensorTypeFor("token_embd.weight", [1536, 151936], "q4_k_m", {...ctxTied, tiedEmbeddings: false}),
        GgmlType.Q4_K
    );
    assert.equal(tensorTypeFor("token_embd.weight", [896, 151936], "q4_k_m", ctxTied), GgmlType.Q8_0);
    assert.equal(tensorTypeFor("blk.0.attn_q.weight", [1536, 1536], "f16", ctxTied), GgmlType.F16);
    assert.equal(tensorTypeFor("blk.0.attn_q.bias", [1536], "f16", ctxTied), GgmlType.F32);
    assert.equal(tensorTypeFor("blk.0.attn_norm.weight", [1536], "q8_0", ctxTied), GgmlType.F32);
    assert.equal(tensorTypeFor("output.weight", [1536, 151936], "q8_0", ctxTied), GgmlType.Q8_0);
    assert.equal(tensorTypeFor("blk.0.ffn_down.weight", [8960, 1536], "q8_0", ctxTied), GgmlType.Q8_0);
    assert.equal(tensorTypeFor("blk.0.attn_q.weight", [100, 64], "q8_0", ctxTied), GgmlType.F16);
    assert.equal(tensorTypeFor("blk.0.attn_q.weight", [1536, 1536], "f32", ctxTied), GgmlType.F32);
    assert.equal(tensorTypeFor("rope_freqs.weight", [64], "q4_k_m", ctxTied), GgmlType.F32);
});
