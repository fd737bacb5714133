// nf4.ts: bitsandbytes-compatible 4-bit blockwise quantization (NF4, FP4) with double quantization of the
// block scales (SPEC-quant.md §2-§6). The arithmetic runs in the native addon (native/cpu/quant.cpp), which
// reproduces bnb's CUDA kernels bit for bit; this file holds the code tables, the state and the orchestration.
import {QloraError, quoteValue} from "../errors.js";
import {countNonFinite} from "../backend/cpu.js";
import {loadQuantOps, QUANT_TYPE_CODE, ROUND_DTYPE_CODE} from "../backend/native-quant-types.js";

export type QuantType = "nf4" | "fp4";
/** the dtype the weight had before quantization (bnb's quant_state.dtype); dequantization rounds to it */
export type QuantDtype = "float32" | "bfloat16" | "float16";

export const QUANT_TYPES: readonly QuantType[] = ["nf4", "fp4"];
export const QUANT_DTYPES: readonly QuantDtype[] = ["float32", "bfloat16", "float16"];
/** the block sizes bitsandbytes accepts for 4-bit quantization */
export const VALID_BLOCKSIZES: readonly number[] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/** block size of the second-level (double) quantization of the scales */
export const NESTED_BLOCKSIZE = 256;

/** the NF4 code table (bnb `get_4bit_type("nf4")`): code k decodes to NF4_CODE[k] * absmax */
export const NF4_CODE: Float32Array = Float32Array.from([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0
]);

/** the FP4 code table (bnb `get_4bit_type("fp4")`): sign bit 3, magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3 over 12 */
export const FP4_CODE: Float32Array = Float32Array.from(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3].map((v) => v / 12)
);

/**
 * bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), the exact float32 values bnb
 * uses for double quantization. Kept as data: bnb builds it with torch's float32 linspace, whose rounding a
 * float32 emulation reproduces only to 1-2 ulp in about 40 entries (SPEC-quant §4, §13), and the encoder must compare
 * against the very same values to produce the same codes.
 */
export const SIGNED_DYNAMIC_MAP: Float32Array = new Float32Array(
    Uint32Array.from([
        0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666, 0xbf5dcccd,
        0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd,
        0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd,
        0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
        0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a,
        0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333,
        0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8,
        0xbda75c2a, 0xbda1999a, 0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
        0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
        0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581,
        0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d,
        0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
        0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94,
        0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1,
        0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d, 0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374,
        0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
        0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85,
        0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
        0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7,
        0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
        0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000, 0x3eb13333, 0x3eb86666,
        0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a, 0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333,
        0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334,
        0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
        0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333,
        0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000
    ]).buffer
);

/**
 * A dynamic 8-bit map computed from its definition (SPEC-quant §4) in float32, emulating torch's linspace.
 * Equal to bnb's map within 2 ulp per entry; use SIGNED_DYNAMIC_MAP where bit-exactness matters.
 */
export function createDynamicMap(signed = true): Float32Array {
    const f = Math.fround;
    const data: number[] = [];
    for (let i = 0; i < 7; i++) {
        const steps = (signed ? 2 ** i : 2 ** (i + 1)) + 1;
        const start = f(0.1),
            step = f(f(1 - start) / (steps - 1)),
            halfway = Math.floor(steps / 2);
        const boundaries: number[] = [];
        for (let k = 0; k < steps; k++) boundaries.push(k < halfway ? f(start + f(step * k)) : f(1 - f(step * (steps - k - 1))));
        const scale = f(10 ** (i - 6));
        for (let j = 0; j + 1 < steps; j++) {
            const mean = f(f(boundaries[j] + boundaries[j + 1]) / 2);
            data.push(f(scale * mean));
            if (signed) data.push(-f(scale * mean));
        }
    }
    data.push(0, 1);
    data.sort((a, b) => a - b);
    return Float32Array.from(data);
}

/** bnb's QuantState of one 4-bit weight, flattened to what the checkpoint stores */
export interface QuantState4bit {
    /** two codes a byte, first element in the high nibble: ceil(n/2) bytes */
    packed: Uint8Array;
    /** f32 block scales [nblocks] without double quantization, else null */
    absmax: Float32Array | null;
    /** 8-bit codes of the block scales [nblocks] with double quantization, else null */
    absmaxQ: Uint8Array | null;
    /** f32 scales of the scales [ceil(nblocks / nestedBlocksize)] with double quantization, else null */
    nestedAbsmax: Float32Array | null;
    /** the mean subtracted from the scales before their quantization (0 without double quantization) */
    offset: number;
    /** the 256-entry map of the scale codes with double quantization, else null */
    nestedQuantMap: Float32Array | null;
    /** the 16-entry code table (NF4_CODE or FP4_CODE, or what a checkpoint stored) */
    quantMap: Float32Array;
    /** the weight's shape, e.g. [out, in] */
    shape: number[];
    blocksize: number;
    nestedBlocksize: number;
    quantType: QuantType;
    dtype: QuantDtype;
}

export interface Quantize4bitOptions {
    /** default "nf4" (bitsandbytes itself defaults to "fp4"; QLoRA recipes set "nf4") */
    quantType?: QuantType;
    /** default 64 */
    blocksize?: number;
    /** double quantization of the block scales (bnb compress_statistics / bnb_4bit_use_double_quant); default true */
    compressStatistics?: boolean;
    /** the weight's shape; default [n] */
    shape?: readonly number[];
    /** the dtype recorded in the state; default float32 for f32 input, bfloat16 for bf16 input */
    dtype?: QuantDtype;
}

function numel(shape: readonly number[]): number {
    return shape.reduce((a, b) => a * b, 1);
}

export function checkQuantType(value: unknown, what = "quant_type"): QuantType {
    if (value === "nf4" || value === "fp4") return value;
    throw new QloraError(`${what} is ${quoteValue(value)}; expected "nf4" or "fp4"`);
}

export function checkBlocksize(value: unknown, what = "blocksize"): number {
    if (typeof value === "number" && VALID_BLOCKSIZES.includes(value)) return value;
    throw new QloraError(`${what} is ${quoteValue(value)}; expected one of ${VALID_BLOCKSIZES.join(", ")}`);
}

export function codeTable(quantType: QuantType): Float32Array {
    return quantType === "nf4" ? NF4_CODE : FP4_CODE;
}

/** offset = mean of the scales as torch's CUDA mean computes it: fl32(sum) * fl32(1/n) */
export function meanF32(values: Float32Array): number {
    let sum = 0;
    for (let i = 0; i < values.length; i++) sum += values[i];
    return Math.fround(Math.fround(sum) * Math.fround(1 / values.length));
}

/** bnb `quantize_4bit(A, blocksize, compress_statistics, quant_type)`; bf16 input is quantized as bnb does on bf16 */
export function quantize4bit(values: Float32Array | {bf16: Uint16Array}, options: Quantize4bitOptions = {}): QuantState4bit {
    const quantType = checkQuantType(options.quantType ?? "nf4");
    const blocksize = checkBlocksize(options.blocksize ?? 64);
    const compress = options.compressStatistics ?? true;
    const isF32 = values instanceof Float32Array;
    const n = isF32 ? values.length : values.bf16.length;
    const shape = [...(options.shape ?? [n])];
    if (numel(shape) !== n)
        throw new QloraError(`quantize4bit: shape [${shape.join(", ")}] has ${numel(shape)} elements but the data has ${n}`);
    const dtype = options.dtype ?? (isF32 ? "float32" : "bfloat16");
    if (!QUANT_DTYPES.includes(dtype))
        throw new QloraError(`quantize4bit: dtype ${quoteValue(dtype)} is not one of ${QUANT_DTYPES.join(", ")}`);

    const ops = loadQuantOps();
    const nblocks = Math.ceil(n / blocksize);
    const packed = new Uint8Array(Math.ceil(n / 2));
    const absmax = new Float32Array(nblocks);
    if (isF32) ops.quantize4bitF32(packed, absmax, values, QUANT_TYPE_CODE[quantType], blocksize, n);
    else ops.quantize4bitBf16(packed, absmax, values.bf16, QUANT_TYPE_CODE[quantType], blocksize, n);

    const state: QuantState4bit = {
        packed,
        absmax,
        absmaxQ: null,
        nestedAbsmax: null,
        offset: 0,
        nestedQuantMap: null,
        quantMap: codeTable(quantType),
        shape,
        blocksize,
        nestedBlocksize: NESTED_BLOCKSIZE,
        quantType,
        dtype
    };
    if (!compress || nblocks === 0) return state;
    return {...state, absmax: null, ...doubleQuantizeAbsmax(absmax), nestedQuantMap: SIGNED_DYNAMIC_MAP};
}

/**
 * bnb's double quantization of the block scales (compress_statistics, SPEC-quant §6): 8-bit codes of (absmax - mean)
 * in blocks of NESTED_BLOCKSIZE over SIGNED_DYNAMIC_MAP. quantize4bit's second step, and the host's part of a
 * quantization whose 4-bit codes the GPU computed.
 */
export function doubleQuantizeAbsmax(absmax: Float32Array): {absmaxQ: Uint8Array; nestedAbsmax: Float32Array; offset: number} {
    const nblocks = absmax.length;
    const offset = meanF32(absmax);
    const centered = new Float32Array(nblocks);
    for (let i = 0; i < nblocks; i++) centered[i] = absmax[i] - offset;
    const absmaxQ = new Uint8Array(nblocks);
    const nestedAbsmax = new Float32Array(Math.ceil(nblocks / NESTED_BLOCKSIZE));
    loadQuantOps().quantizeBlockwise8bit(absmaxQ, nestedAbsmax, centered, SIGNED_DYNAMIC_MAP, NESTED_BLOCKSIZE, nblocks);
    return {absmaxQ, nestedAbsmax, offset};
}

/** checks that a state's arrays have the sizes its shape and block sizes imply (states read from files) */
export function validateQuantState(state: QuantState4bit, what = "quant state"): void {
    const n = numel(state.shape);
    const nblocks = Math.ceil(n / state.blocksize);
    const fail = (msg: string): never => {
        throw new QloraError(`${what}: ${msg}`);
    };
    if (state.packed.length !== Math.ceil(n / 2))
        fail(`packed weight has ${state.packed.length} bytes, shape [${state.shape.join(", ")}] needs ${Math.ceil(n / 2)}`);
    if (state.quantMap.length !== 16) fail(`quant_map has ${state.quantMap.length} entries, expected 16`);
    if (state.absmaxQ) {
        if (state.absmaxQ.length !== nblocks) fail(`absmax has ${state.absmaxQ.length} entries, expected ${nblocks}`);
        const nested = Math.ceil(nblocks / state.nestedBlocksize);
        if (!state.nestedAbsmax || state.nestedAbsmax.length !== nested)
            fail(`nested_absmax has ${state.nestedAbsmax?.length ?? 0} entries, expected ${nested}`);
        if (state.nestedQuantMap?.length !== 256)
            fail(`nested_quant_map has ${state.nestedQuantMap?.length ?? 0} entries, expected 256`);
    } else if (!state.absmax || state.absmax.length !== nblocks) {
        fail(`absmax has ${state.absmax?.length ?? 0} entries, expected ${nblocks}`);
    }
    // the float parts of a state scale every weight of their block: one NaN there is a block of NaN weights
    if (!Number.isFinite(state.offset)) fail(`nested_offset is ${state.offset}; the checkpoint is corrupt: re-download it`);
    const floats: Array<[string, Float32Array | null]> = [
        ["quant_map", state.quantMap],
        ["absmax", state.absmax],
        ["nested_absmax", state.nestedAbsmax],
        ["nested_quant_map", state.nestedQuantMap]
    ];
    for (const [name, values] of floats) {
        if (!values) continue;
        const {nan, inf} = countNonFinite(values);
        if (nan + inf > 0) fail(`${name} holds ${nan} NaN and ${inf} infinite values; the checkpoint is corrupt: re-download it`);
    }
}

/** the f32 block scales of a state (decoding the double quantization if there is one) */
export function stateAbsmax(state: QuantState4bit): Float32Array {
    if (state.absmax) return state.absmax;
    const nblocks = state.absmaxQ!.length;
    const out = new Float32Array(nblocks);
    loadQuantOps().dequantizeBlockwise8bit(
        out,
        state.absmaxQ!,
        state.nestedAbsmax!,
        state.nestedQuantMap!,
        state.offset,
        state.nestedBlocksize,
        nblocks
    );
    return out;
}

export interface Dequantize4bitOptions {
    /** round to the state's dtype, as bnb returns the weight in quant_state.dtype; default true */
    roundToDtype?: boolean;
}

/**
 * Rows [rowBegin, rowBegin + rows) of the weight (viewed as [shape[0], rest]) into out[rows * cols], f32.
 * The linear layer uses this to dequantize into a scratch buffer.
 */
export function dequantize4bitRowsInto(
    out: Float32Array,
    state: QuantState4bit,
    rowBegin: number,
    rows: number,
    options: Dequantize4bitOptions = {}
): void {
    const cols = state.shape.length > 1 ? numel(state.shape.slice(1)) : 1;
    const roundDtype = (options.roundToDtype ?? true) ? ROUND_DTYPE_CODE[state.dtype] : ROUND_DTYPE_CODE.float32;
    const nested = state.absmaxQ !== null;
    loadQuantOps().dequantize4bitRows(
        out,
        state.packed,
        state.absmaxQ,
        nested ? state.nestedAbsmax! : state.absmax!,
        nested ? state.nestedQuantMap : null,
        state.offset,
        state.quantMap,
        state.blocksize,
        state.nestedBlocksize,
        roundDtype,
        rowBegin,
        rows,
        cols
    );
}

/** bnb `dequantize_4bit(packed, quant_state)` as f32 (values rounded to the state's dtype unless told otherwise) */
export function dequantize4bit(state: QuantState4bit, options: Dequantize4bitOptions = {}): Float32Array {
    const n = numel(state.shape);
    const out = new Float32Array(n);
    const rows = state.shape.length > 1 ? state.shape[0] : n;
    dequantize4bitRowsInto(out, state, 0, rows, options);
    return out;
}
