// NF4/FP4 blockwise quantization with double quantization against bitsandbytes' CUDA output
// (../shared/fixtures/ref-qwen2/nf4.safetensors), plus the decision rules, edge cases and the 4-bit linear layer.
import {test, describe, before, after} from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import {FIXTURES, MODEL_DIR} from "./helpers/paths.js";
import {QloraError} from "../src/errors.js";
import {SafetensorsCheckpoint} from "../src/io/safetensors.js";
import {readTensorF32} from "../src/model/weights.js";
import {linearBackwardInput, linearForward} from "../src/backend/cpu.js";
import {loadQuantOps} from "../src/backend/native-quant-types.js";
import {
    createDynamicMap,
    dequantize4bit,
    FP4_CODE,
    NF4_CODE,
    quantize4bit,
    SIGNED_DYNAMIC_MAP,
    stateAbsmax
} from "../src/quant/nf4.js";
import {Linear4bit, quantizeLinearWeight} from "../src/quant/linear4bit.js";

let model: SafetensorsCheckpoint;
let fx: SafetensorsCheckpoint;
before(async () => {
    model = await SafetensorsCheckpoint.open(MODEL_DIR);
    fx = await SafetensorsCheckpoint.open(path.join(FIXTURES, "nf4.safetensors"));
});
after(async () => {
    await model.close();
    await fx.close();
});

/** index of the first element where a and b differ bit for bit (NaN-safe, -0 != +0), or -1 */
function firstDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
    assert.equal(a.length, b.length, "length");
    for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
    return -1;
}

function assertSame(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string): void {
    const i = firstDiff(actual, expected);
    assert.equal(i, -1, i < 0 ? "" : `${what}: element ${i} is ${actual[i]}, bitsandbytes has ${expected[i]}`);
}

function targetWeights(): string[] {
    return fx
        .names()
        .filter((n) => n.endsWith(".packed") && !n.includes("@") && !n.includes(".single."))
        .map((n) => n.slice(0, -".packed".length))
        .sort();
}

function f32UlpDistance(a: number, b: number): number {
    const buf = new Float32Array([a, b]);
    const bits = new Int32Array(buf.buffer);
    const key = (x: number) => (x < 0 ? 0x80000000 - x : x);
    return Math.abs(key(bits[0]) - key(bits[1]));
}

/** the next f32 above v (v != 0) */
function nextUp(v: number): number {
    const bits = new Uint32Array(new Float32Array([v]).buffer);
    bits[0] += v > 0 ? 1 : -1;
    return new Float32Array(bits.buffer)[0];
}

/** deterministic standard-normal-ish values */
function randn(n: number, seed: number): Float32Array {
    let s = seed >>> 0;
    const u = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) + 0.5) / 2 ** 32;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(u())) * Math.cos(2 * Math.PI * u());
    return out;
}

describe("code tables", () => {
    test("quant_map is the NF4 table", async () => {
        assertSame(NF4_CODE, await fx.readF32("quant_map"), "quant_map");
    });
    test("nested_quant_map is the signed dynamic map", async () => {
        assertSame(SIGNED_DYNAMIC_MAP, await fx.readF32("nested_quant_map"), "nested_quant_map");
    });
    test("the dynamic maps computed from their definition are within 2 ulp of bitsandbytes'", () => {
        const signed = createDynamicMap(true);
        assert.equal(signed.length, 256);
        for (let i = 0; i < 256; i++) assert.ok(f32UlpDistance(signed[i], SIGNED_DYNAMIC_MAP[i]) <= 2, `signed map entry ${i}`);
        const unsigned = createDynamicMap(false);
        assert.equal(unsigned[0], 0);
        assert.equal(unsigned[255], 1);
        assert.ok(Math.abs(unsigned[1] - 3.25e-7) < 1e-12 && Math.abs(unsigned[2] - 7.75e-7) < 1e-12);
        assert.ok(Math.abs(unsigned[254] - 0.996484399) < 1e-8);
        assert.equal(SIGNED_DYNAMIC_MAP[127], 0);
        assert.equal(SIGNED_DYNAMIC_MAP[0], Math.fround(-0.99296875));
    });
    test("FP4 table", () => {
        assert.deepEqual(
            Array.from(FP4_CODE.subarray(0, 8)),
            [0, 0.0625, 8, 12, 4, 6, 2, 3].map((v) => Math.fround(v / 12))
        );
        assert.ok(Object.is(FP4_CODE[8], -0));
    });
});

describe("NF4 + double quantization is bit-identical to bitsandbytes", () => {
    test("every target weight (7 projections x 8 layers), from the f32 upcast", async () => {
        const names = targetWeights();
        assert.equal(names.length, 56);
        for (const w of names) {
            const x = await readTensorF32(model, w);
            const state = quantize4bit(x, {
                quantType: "nf4",
                blocksize: 64,
                compressStatistics: true,
                shape: [...model.info(w).shape]
            });
            assertSame(state.packed, await fx.readBytes(`${w}.packed`), `${w}.packed`);
            assertSame(state.absmaxQ!, await fx.readBytes(`${w}.absmax_q`), `${w}.absmax_q`);
            assertSame(state.nestedAbsmax!, await fx.readF32(`${w}.nested_absmax`), `${w}.nested_absmax`);
            assert.ok(Object.is(state.offset, (await fx.readF32(`${w}.offset`))[0]), `${w}.offset`);
            assert.equal(state.absmax, null);
            assert.equal(state.dtype, "float32");
        }
    });

    test("layer 0: dequantization, no double quantization, and quantizing the bf16 tensor itself", async () => {
        for (const w of targetWeights().filter((n) => n.startsWith("model.layers.0."))) {
            const shape = [...model.info(w).shape];
            const x = await readTensorF32(model, w);
            const state = quantize4bit(x, {shape});
            assertSame(dequantize4bit(state), await fx.readF32(`${w}.dequant`), `${w}.dequant`);

            const single = quantize4bit(x, {shape, compressStatistics: false});
            assertSame(single.packed, await fx.readBytes(`${w}.single.packed`), `${w}.single.packed`);
            assertSame(single.absmax!, await fx.readF32(`${w}.single.absmax`), `${w}.single.absmax`);
            assert.equal(single.absmaxQ, null);

            const bits = (await model.readTyped(w)) as Uint16Array;
            const b = quantize4bit({bf16: bits}, {shape});
            const bw = `${w}@bf16`;
            assert.equal(b.dtype, "bfloat16");
            assertSame(b.packed, await fx.readBytes(`${bw}.packed`), `${bw}.packed`);
            assertSame(b.absmaxQ!, await fx.readBytes(`${bw}.absmax_q`), `${bw}.absmax_q`);
            assertSame(b.nestedAbsmax!, await fx.readF32(`${bw}.nested_absmax`), `${bw}.nested_absmax`);
            assert.ok(Object.is(b.offset, (await fx.readF32(`${bw}.offset`))[0]), `${bw}.offset`);
            // bnb dequantizes to the weight's dtype: bf16-rounded values
            assertSame(dequantize4bit(b), await fx.readF32(`${bw}.dequant`), `${bw}.dequant`);
        }
    });

    test("decoded double-quantized scales are within one 8-bit step of the f32 scales", async () => {
        const w = "model.layers.0.self_attn.q_proj.weight";
        const x = await readTensorF32(model, w);
        const exact = quantize4bit(x, {compressStatistics: false}).absmax!;
        const decoded = stateAbsmax(quantize4bit(x));
        for (let i = 0; i < exact.length; i++) assert.ok(Math.abs(decoded[i] - exact[i]) < 0.02 * exact[i] + 1e-4, `scale ${i}`);
    });
});

describe("decision rules and edge cases", () => {
    test("NF4: a value exactly on a threshold takes the lower code; codes count thresholds strictly exceeded", () => {
        // bnb's CUDA literals as nvcc rounds them (decimal straight to f32; 4 of them are 1 ulp away from
        // Math.fround of the same decimal, which rounds through f64)
        const t = Array.from(
            new Float32Array(
                Uint32Array.from([
                    0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff, 0x3df64863,
                    0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9
                ]).buffer
            )
        );
        // one block of 64 with absmax 1 so u = x exactly
        const x = new Float32Array(64);
        x[0] = 1;
        t.forEach((v, k) => {
            x[2 + 2 * k] = v; // on the threshold: code k
            x[3 + 2 * k] = nextUp(v); // 1 ulp above: code k + 1
        });
        const s = quantize4bit(x, {compressStatistics: false});
        const nib = (i: number) => (i & 1 ? s.packed[i >> 1] & 15 : s.packed[i >> 1] >> 4);
        assert.equal(nib(0), 15);
        t.forEach((_, k) => {
            assert.equal(nib(2 + 2 * k), k, `on threshold ${k}`);
            assert.equal(nib(3 + 2 * k), k + 1, `above threshold ${k}`);
        });
    });

    test("FP4: sign bit, thresholds and decoding", () => {
        const x = Float32Array.from([1, -1, 0.9, 0.8, 0.5, -0.45, 0.3, 0.21, 0.2, 0.1, 0.05, 0.003, 0.002, -0.0, 0.25, -0.6]);
        const s = quantize4bit(x, {quantType: "fp4", blocksize: 32, compressStatistics: false});
        const nib = (i: number) => (i & 1 ? s.packed[i >> 1] & 15 : s.packed[i >> 1] >> 4);
        const codes = Array.from(x, (_, i) => nib(i));
        assert.deepEqual(
            codes,
            [
                0b0011, 0b1011, 0b0011, 0b0010, 0b0101, 0b1101, 0b0100, 0b0111, 0b0110, 0b0110, 0b0001, 0b0001, 0b0000, 0b0000,
                0b0111, 0b1010
            ]
        );
        const back = dequantize4bit(s);
        codes.forEach((c, i) => assert.equal(back[i], FP4_CODE[c]));
    });

    test("round trip error is bounded by half the largest gap of the code (NF4 and FP4)", () => {
        const x = randn(64 * 50 + 17, 7); // a ragged last block
        for (const [quantType, halfGap] of [
            ["nf4", 0.152],
            ["fp4", 0.167]
        ] as const) {
            for (const compressStatistics of [false, true]) {
                const s = quantize4bit(x, {quantType, compressStatistics});
                const y = dequantize4bit(s);
                const scales = stateAbsmax(s);
                const exact = quantize4bit(x, {quantType, compressStatistics: false}).absmax!;
                for (let i = 0; i < x.length; i++) {
                    const b = Math.floor(i / 64);
                    // the scale error of double quantization adds at most |code| * |scale error|
                    const bound = halfGap * exact[b] + Math.abs(scales[b] - exact[b]) + 1e-6;
                    assert.ok(Math.abs(y[i] - x[i]) <= bound, `${quantType} element ${i}: ${x[i]} -> ${y[i]}`);
                }
            }
        }
    });

    test("all-zero block encodes as the exact-zero code and decodes to 0; odd n pads with the zero code", () => {
        const x = new Float32Array(64 + 64 + 5);
        x.set(randn(64, 3), 0);
        x.set(randn(5, 4), 128);
        const s = quantize4bit(x);
        for (let j = 32; j < 64; j++) assert.equal(s.packed[j], 0x77);
        assert.equal(s.packed.length, 67);
        assert.equal(s.packed[66] & 15, 7);
        const y = dequantize4bit(s);
        for (let i = 64; i < 128; i++) assert.equal(y[i], 0);
        const fp4 = quantize4bit(x, {quantType: "fp4"});
        for (let j = 32; j < 64; j++) assert.equal(fp4.packed[j], 0);
    });

    test("8-bit blockwise: the chosen code is the nearest map entry", () => {
        const ops = loadQuantOps();
        const n = 1000;
        const x = randn(n, 11);
        const q = new Uint8Array(n),
            absmax = new Float32Array(Math.ceil(n / 256));
        ops.quantizeBlockwise8bit(q, absmax, x, SIGNED_DYNAMIC_MAP, 256, n);
        for (let i = 0; i < n; i++) {
            const u = Math.fround(x[i] * Math.fround(1 / absmax[Math.floor(i / 256)]));
            const d = Math.abs(SIGNED_DYNAMIC_MAP[q[i]] - u);
            for (let k = 0; k < 256; k++) assert.ok(d <= Math.abs(SIGNED_DYNAMIC_MAP[k] - u), `element ${i}`);
        }
        const y = new Float32Array(n);
        ops.dequantizeBlockwise8bit(y, q, absmax, SIGNED_DYNAMIC_MAP, 0, 256, n);
        for (let i = 0; i < n; i++) assert.equal(y[i], Math.fround(SIGNED_DYNAMIC_MAP[q[i]] * absmax[Math.floor(i / 256)]));
    });

    test("bad options are QloraErrors that name the option", () => {
        const x = new Float32Array(64);
        assert.throws(
            () => quantize4bit(x, {quantType: "int4" as never}),
            (e: unknown) => e instanceof QloraError && /quant_type/.test(e.message) && /"int4"/.test(e.message)
        );
        assert.throws(
            () => quantize4bit(x, {blocksize: 48}),
            (e: unknown) => e instanceof QloraError && /blocksize/.test(e.message)
        );
        assert.throws(() => quantize4bit(x, {shape: [3, 7]}), QloraError);
    });

    test("native ops check their buffers", () => {
        const ops = loadQuantOps();
        assert.throws(
            () => ops.quantize4bitF32(new Uint8Array(1), new Float32Array(1), new Float32Array(64), 0, 64, 64),
            RangeError
        );
        assert.throws(
            () => ops.quantize4bitF32(new Uint8Array(32), new Float32Array(1), new Float32Array(64), 5, 64, 64),
            RangeError
        );
    });
});

describe("Linear4bit", () => {
    test("forward equals sgemm on the dequantized weight, and backwardInput dy @ W", async () => {
        const bnb = await SafetensorsCheckpoint.open(path.join(FIXTURES, "bnb-4bit"));
        try {
            const w = "model.layers.0.self_attn.q_proj";
            const weight = await readTensorF32(model, `${w}.weight`);
            const bias = await readTensorF32(bnb, `${w}.bias`);
            const [N, K] = model.info(`${w}.weight`).shape;
            const layer = quantizeLinearWeight(weight, N, K, bias);
            assert.equal(layer.outFeatures, N);
            assert.equal(layer.inFeatures, K);
            const dense = {outFeatures: N, inFeatures: K, weight: layer.dequantizeWeight(), bias};
            const M = 5;
            const x = randn(M * K, 21),
                dy = randn(M * N, 22);

            const expected = new Float32Array(M * N),
                out = new Float32Array(M * N);
            linearForward(expected, x, M, dense);
            layer.forward(out, x, M);
            assertSame(out, expected, "forward");

            const dxExpected = new Float32Array(M * K).fill(0.5),
                dx = new Float32Array(M * K).fill(0.5);
            linearBackwardInput(dxExpected, dy, M, dense, true);
            layer.productTranspose(dx, dy, M, true);
            assertSame(dx, dxExpected, "productTranspose (accumulate)");

            // tiles of a few rows (the last one ragged) give the same result up to summation order
            const tiled = new Linear4bit(layer.state, bias, {tileElements: 3 * K + 5});
            const out2 = new Float32Array(M * N).fill(NaN);
            tiled.forward(out2, x, M);
            for (let i = 0; i < out2.length; i++)
                assert.ok(Math.abs(out2[i] - expected[i]) <= 1e-5 * (1 + Math.abs(expected[i])), `tiled forward ${i}`);
            const dx2 = new Float32Array(M * K).fill(NaN);
            linearBackwardInput(dxExpected, dy, M, dense, false);
            tiled.productTranspose(dx2, dy, M, false);
            for (let i = 0; i < dx2.length; i++)
                assert.ok(Math.abs(dx2[i] - dxExpected[i]) <= 1e-5 * (1 + Math.abs(dxExpected[i])), `tiled backward ${i}`);
        } finally {
            await bnb.close();
        }
    });
});
