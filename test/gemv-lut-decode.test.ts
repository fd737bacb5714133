// The register decode of the 4-bit GEMV's LUT kernel (native/cuda/nf4.cu, lut_build / lut_decode4 / lut_word),
// emulated on the CPU with the same PRMT selector constants: every 16-bit input, in the low and in the high half
// of a code word, must give the packed bf16/f16 pairs of the direct table lookup (the byte's high nibble is its
// first weight, which goes to the low half). The constants are restated from nf4.cu (no file can share them
// across C++ and TypeScript); a change there needs the same change here.
import {test} from "node:test";
import assert from "node:assert/strict";
import {Rng} from "../src/backend/rng.js";
import {f32ToBf16, f32ToF16} from "../src/io/safetensors.js";
import {FP4_CODE, NF4_CODE} from "../src/quant/nf4.js";

// as in nf4.cu
const LUT_LOW_BYTES = 0x6420;
const LUT_HIGH_BYTES = 0x7531;
const LUT_BIT3_NIBBLES_0_3 = 0xd9c8;
const LUT_BIT3_NIBBLES_4_7 = 0xfbea;
const LUT_FIRST_PAIR = 0x4051;
const LUT_SECOND_PAIR = 0x6273;

/** PTX prmt.b32 (no mode): byte j of the result is byte c[4j+2:4j] of {b, a}, or, with c[4j+3] set, that byte's
 * bit 7 replicated over the byte; only c[15:0] counts */
function prmt(a: number, b: number, c: number): number {
    let d = 0;
    for (let j = 0; j < 4; j++) {
        const ctl = (c >>> (4 * j)) & 15,
            i = ctl & 7;
        let byte = ((i < 4 ? a : b) >>> (8 * (i & 3))) & 0xff;
        if (ctl & 8) byte = byte & 0x80 ? 0xff : 0;
        d |= byte << (8 * j);
    }
    return d >>> 0;
}

/** lut_build: the low and high bytes of the 16 rounded code values, entry e in byte e % 4 of register e / 4 */
function lutBuild(bits: Uint16Array): {lo: number[]; hi: number[]} {
    const lo: number[] = [],
        hi: number[] = [];
    for (let j = 0; j < 4; j++) {
        const p01 = (bits[4 * j] | (bits[4 * j + 1] << 16)) >>> 0,
            p23 = (bits[4 * j + 2] | (bits[4 * j + 3] << 16)) >>> 0;
        lo.push(prmt(p01, p23, LUT_LOW_BYTES));
        hi.push(prmt(p01, p23, LUT_HIGH_BYTES));
    }
    return {lo, hi};
}

/** lut_decode4 */
function lutDecode4(lut: {lo: number[]; hi: number[]}, sel: number, upper: number): [number, number] {
    const pick = (t: number[]) => ((prmt(t[0], t[1], sel) & ~upper) | (prmt(t[2], t[3], sel) & upper)) >>> 0;
    const lo = pick(lut.lo),
        hi = pick(lut.hi);
    return [prmt(lo, hi, LUT_FIRST_PAIR), prmt(lo, hi, LUT_SECOND_PAIR)];
}

/** lut_word: pair[b] = the two weights of byte b of w */
function lutWord(lut: {lo: number[]; hi: number[]}, w: number): number[] {
    const sel = (w & 0x77777777) >>> 0,
        w4 = (w << 4) >>> 0;
    return [
        ...lutDecode4(lut, sel, prmt(w4, w, LUT_BIT3_NIBBLES_0_3)),
        ...lutDecode4(lut, sel >>> 16, prmt(w4, w, LUT_BIT3_NIBBLES_4_7))
    ];
}

/** the direct lookup: byte b of w holds the first weight in its high nibble; packed first in the low half */
function expectedPair(bits: Uint16Array, w: number, b: number): number {
    const byte = (w >>> (8 * b)) & 0xff;
    return (bits[byte >>> 4] | (bits[byte & 15] << 16)) >>> 0;
}

function checkAllInputs(bits: Uint16Array, what: string): void {
    const lut = lutBuild(bits);
    const rng = new Rng(7);
    for (let v = 0; v < 0x10000; v++) {
        // v in the low half (pairs 0, 1) and in the high half (pairs 2, 3), beside random bits
        const other = Math.floor(rng.next() * 0x10000);
        for (const w of [(v | (other << 16)) >>> 0, ((v << 16) | other) >>> 0]) {
            const got = lutWord(lut, w);
            for (let b = 0; b < 4; b++) {
                const want = expectedPair(bits, w, b);
                if (got[b] !== want)
                    assert.fail(
                        `${what}: word 0x${w.toString(16)} byte ${b}: got 0x${got[b].toString(16)}, want 0x${want.toString(16)}`
                    );
            }
        }
    }
}

test("prmt emulation: byte select (the CUDA docs' example) and sign replicate", () => {
    assert.equal(prmt(0x03020100, 0x07060504, 0x7531), 0x07050301);
    assert.equal(prmt(0x00008000, 0x7f000000, 0xf8c9), 0x000000ff);
    assert.equal(prmt(0x00008000, 0x80000000, 0xf9c8), 0xffff0000);
    assert.equal(prmt(0x00008000, 0x7f000000, 0xffff7531), prmt(0x00008000, 0x7f000000, 0x7531)); // c[31:16] ignored
});

test("the LUT decode gives the direct table lookup for every 16-bit input, both halves of a word", () => {
    checkAllInputs(f32ToBf16(NF4_CODE), "nf4 bf16");
    checkAllInputs(f32ToF16(NF4_CODE), "nf4 f16");
    checkAllInputs(f32ToBf16(FP4_CODE), "fp4 bf16");
    // 16 distinct random 16-bit values with distinct low and high bytes: a wrong byte or entry cannot match by luck
    const bits = new Uint16Array(16);
    for (let e = 0; e < 16; e++) bits[e] = (e * 17 + 3) | ((0xf0 - e * 13) << 8);
    assert.equal(new Set([...bits].map((x) => x & 0xff)).size, 16);
    assert.equal(new Set([...bits].map((x) => x >>> 8)).size, 16);
    checkAllInputs(bits, "distinct bytes");
});
