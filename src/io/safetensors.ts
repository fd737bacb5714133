// safetensors reader and writer.
//
// Format: an 8-byte little-endian u64 header length N, then N bytes of UTF-8 JSON
// `{name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {string: string}}`, then the data section.
// Offsets are relative to the start of the data section. Everything here reads with positioned reads on a
// FileHandle: shards are often larger than 2 GiB, where fs.readFile gives up, and a model never needs to be in
// memory twice.
//
// All typed-array views assume a little-endian host (every platform Node ships for), which is the byte order
// safetensors stores.

import {constants as bufferConstants} from "node:buffer";
import {promises as fs, type Stats} from "node:fs";
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {openRegularFile, readTextFile} from "./files.js";
import {createAtomicFile, writeFileAtomic} from "./atomic.js";

// ------------------------------------------------------------------
// dtypes

export type SafetensorsDtype = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

export const SAFETENSORS_DTYPE_SIZES: Readonly<Record<SafetensorsDtype, number>> = {
    F64: 8,
    F32: 4,
    F16: 2,
    BF16: 2,
    I64: 8,
    I32: 4,
    I16: 2,
    I8: 1,
    U8: 1,
    BOOL: 1
};

const SUPPORTED_DTYPES = Object.keys(SAFETENSORS_DTYPE_SIZES) as SafetensorsDtype[];

export function isSafetensorsDtype(value: unknown): value is SafetensorsDtype {
    return typeof value === "string" && Object.hasOwn(SAFETENSORS_DTYPE_SIZES, value);
}

/** The typed array `readTyped` returns for each dtype (F16/BF16 stay raw bits: Node 20 has no Float16Array). */
export type SafetensorsTypedArray =
    | Float64Array<ArrayBuffer>
    | Float32Array<ArrayBuffer>
    | Uint16Array<ArrayBuffer>
    | BigInt64Array<ArrayBuffer>
    | Int32Array<ArrayBuffer>
    | Int16Array<ArrayBuffer>
    | Int8Array<ArrayBuffer>
    | Uint8Array<ArrayBuffer>;

export interface TensorInfo {
    readonly name: string;
    readonly dtype: SafetensorsDtype;
    readonly shape: readonly number[];
    readonly byteLength: number;
    /** absolute byte offset of the tensor's data in the file */
    readonly dataOffset: number;
    /** path of the file that holds the tensor */
    readonly file: string;
}

export interface TensorToWrite {
    name: string;
    dtype: SafetensorsDtype;
    shape: readonly number[];
    /**
     * the bytes, or a function that makes them when the writer gets to this tensor (a merge computes one tensor
     * at a time instead of holding the whole model); its size must be the dtype's times the shape's
     */
    data: ArrayBufferView | (() => ArrayBufferView | Promise<ArrayBufferView>);
}

/** the bytes a tensor takes in the file: its dtype's size times its elements */
function tensorBytes(tensor: TensorToWrite): number {
    return shapeNumel(tensor.shape) * SAFETENSORS_DTYPE_SIZES[tensor.dtype];
}

/** a tensor's data, made now when it is lazy, checked against its dtype and shape */
async function tensorData(tensor: TensorToWrite, file: string): Promise<ArrayBufferView> {
    const data = typeof tensor.data === "function" ? await tensor.data() : tensor.data;
    checkDataSize(tensor, data, file);
    return data;
}

function checkDataSize(tensor: TensorToWrite, data: ArrayBufferView, file: string): void {
    const expectedBytes = tensorBytes(tensor);
    if (data.byteLength !== expectedBytes)
        throw new QloraError(
            `tensor "${tensor.name}" is ${tensor.dtype} ${formatShape(tensor.shape)} (${expectedBytes} bytes) ` +
                `but its data has ${data.byteLength} bytes`,
            {file}
        );
}

/** safetensors' own limit (MAX_HEADER_SIZE in the Rust crate); anything larger is corruption, not a model */
const MAX_HEADER_BYTES = 100_000_000;

/** the largest typed array Node.js allocates (buffer.constants.MAX_LENGTH: 4 GiB on 64-bit Node 20) */
const MAX_TENSOR_BYTES = bufferConstants.MAX_LENGTH;

/** one read or write call moves at most this much: the OS caps a single call just below 2 GiB */
const IO_CHUNK_BYTES = 1 << 30;

function shapeNumel(shape: readonly number[]): number {
    let numel = 1;
    for (const dim of shape) numel *= dim;
    return numel;
}

function formatShape(shape: readonly number[]): string {
    return `[${shape.join(", ")}]`;
}

function isNonNegativeInteger(value: unknown): value is number {
    return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

function describeJsonValue(value: unknown): string {
    if (value === null) return "null";
    if (Array.isArray(value)) return "an array";
    return `a ${typeof value}`;
}

// ------------------------------------------------------------------
// float conversions (exported: the model, quantizers and exporters need them too)

// Shared scratch views for reinterpreting one float's bits.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** bf16 is the top half of an f32: widening is a shift. */
export function bf16ToF32(bits: Uint16Array): Float32Array<ArrayBuffer> {
    const out = new Float32Array(bits.length);
    const outBits = new Uint32Array(out.buffer);
    for (let i = 0; i < bits.length; i++) outBits[i] = bits[i] << 16;
    return out;
}

let f16ToF32BitsTable: Uint32Array | null = null;

// Every f16 value is exactly representable in f32, so a 65,536-entry table of f32 bit patterns is exact
// (subnormals, infinities and NaN payloads included) and fast.
function getF16ToF32BitsTable(): Uint32Array {
    if (f16ToF32BitsTable) return f16ToF32BitsTable;
    const table = new Uint32Array(65536);
    for (let h = 0; h < 65536; h++) {
        const sign = (h & 0x8000) << 16;
        const exponent = (h >> 10) & 0x1f;
        const mantissa = h & 0x3ff;
        if (exponent === 0x1f) {
            table[h] = (sign | 0x7f800000 | (mantissa << 13)) >>> 0; // inf / NaN, payload kept
        } else if (exponent !== 0) {
            table[h] = (sign | ((exponent + 112) << 23) | (mantissa << 13)) >>> 0; // rebias 15 -> 127
        } else {
            // zero or subnormal: value = mantissa * 2^-24, exact in f32
            scratchF32[0] = mantissa * 2 ** -24;
            table[h] = (sign | scratchU32[0]) >>> 0;
        }
    }
    f16ToF32BitsTable = table;
    return table;
}

export function f16ToF32(bits: Uint16Array): Float32Array<ArrayBuffer> {
    const table = getF16ToF32BitsTable();
    const out = new Float32Array(bits.length);
    const outBits = new Uint32Array(out.buffer);
    for (let i = 0; i < bits.length; i++) outBits[i] = table[bits[i]];
    return out;
}

function f32BitsToBf16Bits(f: number): number {
    if ((f & 0x7f800000) === 0x7f800000 && (f & 0x007fffff) !== 0) {
        // NaN: keep sign and top payload bits, force the quiet bit so truncation can't turn it into inf
        return ((f >>> 16) | 0x0040) & 0xffff;
    }
    // round to nearest, ties to even; overflow carries into the exponent and correctly gives inf
    return ((f + 0x7fff + ((f >>> 16) & 1)) >>> 16) & 0xffff;
}

export function f32ToBf16(values: Float32Array): Uint16Array<ArrayBuffer> {
    const inBits = new Uint32Array(values.buffer, values.byteOffset, values.length);
    const out = new Uint16Array(values.length);
    for (let i = 0; i < values.length; i++) out[i] = f32BitsToBf16Bits(inBits[i]);
    return out;
}

// Round-to-nearest-even f32 -> f16 on bit patterns (the algorithm of numpy's npy_floatbits_to_halfbits).
function f32BitsToF16Bits(f: number): number {
    const sign = (f >>> 16) & 0x8000;
    const exponentBits = f & 0x7f800000;
    if (exponentBits >= 0x47800000) {
        const mantissa = f & 0x007fffff;
        if (exponentBits === 0x7f800000 && mantissa !== 0) {
            // NaN: keep the top payload bits, but make sure it stays a NaN
            let half = 0x7c00 + (mantissa >>> 13);
            if (half === 0x7c00) half++;
            return sign | half;
        }
        return sign | 0x7c00; // inf, or too large: overflow to inf
    }
    if (exponentBits <= 0x38000000) {
        // result is a subnormal half or zero
        if (exponentBits < 0x33000000) return sign; // below half of the smallest subnormal: signed zero
        const exponent = exponentBits >>> 23;
        let significand = 0x00800000 + (f & 0x007fffff);
        significand >>>= 113 - exponent;
        // round half to even; the shift may have dropped bits, so look at them in the original
        if ((significand & 0x3fff) !== 0x1000 || (f & 0x7ff) !== 0) significand += 0x1000;
        return sign | (significand >>> 13); // a carry into the exponent field is the correct result
    }
    const halfExponent = (exponentBits - 0x38000000) >>> 13;
    let significand = f & 0x007fffff;
    if ((significand & 0x3fff) !== 0x1000) significand += 0x1000;
    // a carry out of the significand bumps the exponent; reaching 0x7c00 is the correct overflow to inf
    return sign | (halfExponent + (significand >>> 13));
}

export function f32ToF16(values: Float32Array): Uint16Array<ArrayBuffer> {
    const inBits = new Uint32Array(values.buffer, values.byteOffset, values.length);
    const out = new Uint16Array(values.length);
    for (let i = 0; i < values.length; i++) out[i] = f32BitsToF16Bits(inBits[i]);
    return out;
}

// ------------------------------------------------------------------
// positioned IO helpers

async function readFully(handle: fs.FileHandle, target: Uint8Array, position: number, file: string, what: string): Promise<void> {
    let done = 0;
    while (done < target.length) {
        const length = Math.min(target.length - done, IO_CHUNK_BYTES);
        const {bytesRead} = await handle.read(target, done, length, position + done);
        if (bytesRead === 0) {
            throw new QloraError(
                `the file ended after ${position + done} bytes while reading ${what} ` +
                    "(truncated download or a file being written? re-download the file)",
                {file}
            );
        }
        done += bytesRead;
    }
}

async function writeFully(handle: fs.FileHandle, source: Uint8Array, position: number): Promise<void> {
    let done = 0;
    while (done < source.length) {
        const length = Math.min(source.length - done, IO_CHUNK_BYTES);
        const {bytesWritten} = await handle.write(source, done, length, position + done);
        done += bytesWritten;
    }
}

function bytesOf(view: ArrayBufferView): Uint8Array {
    return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

// ------------------------------------------------------------------
// header parsing

interface ParsedHeader {
    tensors: Map<string, TensorInfo>;
    metadata: Record<string, string>;
}

function parseHeader(header: unknown, file: string, dataStart: number, dataSize: number): ParsedHeader {
    if (header === null || typeof header !== "object" || Array.isArray(header)) {
        throw new QloraError(
            `the header is ${describeJsonValue(header)}, not a JSON object: not a safetensors file, or a corrupt one`,
            {file}
        );
    }
    const tensors = new Map<string, TensorInfo>();
    const ranges: Array<{name: string; begin: number; end: number}> = [];
    let metadata: Record<string, string> = {};
    for (const [name, entry] of Object.entries(header as Record<string, unknown>)) {
        if (name === "__metadata__") {
            metadata = parseMetadata(entry, file);
            continue;
        }
        if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
            throw new QloraError(
                `header entry for tensor "${name}" is ${describeJsonValue(entry)}, expected an object with dtype, shape and data_offsets`,
                {file}
            );
        }
        const {dtype, shape, data_offsets: dataOffsets} = entry as Record<string, unknown>;
        if (!isSafetensorsDtype(dtype)) {
            throw new QloraError(
                `tensor "${name}" has dtype ${quoteValue(dtype)}, which qlora cannot read ` +
                    `(supported: ${SUPPORTED_DTYPES.join(", ")}); convert the checkpoint to one of those`,
                {file}
            );
        }
        if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
            throw new QloraError(
                `tensor "${name}" has shape ${quoteValue(shape)}, expected a list of non-negative integers: the header is corrupt`,
                {file}
            );
        }
        if (
            !Array.isArray(dataOffsets) ||
            dataOffsets.length !== 2 ||
            !dataOffsets.every(isNonNegativeInteger) ||
            dataOffsets[0] > dataOffsets[1]
        ) {
            throw new QloraError(
                `tensor "${name}" has data_offsets ${quoteValue(dataOffsets)}, expected [begin, end] with 0 <= begin <= end: the header is corrupt`,
                {file}
            );
        }
        const [begin, end] = dataOffsets as [number, number];
        const expectedBytes = shapeNumel(shape) * SAFETENSORS_DTYPE_SIZES[dtype];
        if (!Number.isSafeInteger(expectedBytes)) {
            throw new QloraError(
                `tensor "${name}" has shape ${formatShape(shape)}, too large to be stored in any file: the header is corrupt`,
                {file}
            );
        }
        if (end - begin !== expectedBytes) {
            throw new QloraError(
                `tensor "${name}" is ${dtype} ${formatShape(shape)} (${expectedBytes} bytes) but its data_offsets ` +
                    `[${begin}, ${end}] span ${end - begin} bytes: the header is corrupt; re-download or re-export the file`,
                {file}
            );
        }
        if (end > dataSize) {
            throw new QloraError(
                `header says tensor "${name}" ends at byte ${end} but the file's data section has ${dataSize} bytes ` +
                    "(truncated download? re-download the file)",
                {file}
            );
        }
        tensors.set(
            name,
            Object.freeze({
                name,
                dtype,
                shape: Object.freeze([...shape]) as readonly number[],
                byteLength: expectedBytes,
                dataOffset: dataStart + begin,
                file
            })
        );
        if (end > begin) ranges.push({name, begin, end}); // empty tensors occupy no bytes, so they can't overlap
    }
    ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
    for (let i = 1; i < ranges.length; i++) {
        const previous = ranges[i - 1];
        const current = ranges[i];
        if (current.begin < previous.end) {
            throw new QloraError(
                `tensors "${previous.name}" (bytes ${previous.begin}-${previous.end}) and "${current.name}" ` +
                    `(bytes ${current.begin}-${current.end}) overlap: the header is corrupt; re-download or re-export the file`,
                {file}
            );
        }
    }
    return {tensors, metadata};
}

function parseMetadata(entry: unknown, file: string): Record<string, string> {
    if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
        throw new QloraError(
            `"__metadata__" is ${describeJsonValue(entry)}, expected an object of strings: the header is corrupt`,
            {file}
        );
    }
    const metadata: Record<string, string> = {};
    for (const [key, value] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof value !== "string") {
            throw new QloraError(
                `"__metadata__" key "${key}" is ${describeJsonValue(value)}; safetensors metadata values must be strings`,
                {file}
            );
        }
        metadata[key] = value;
    }
    return metadata;
}

// ------------------------------------------------------------------
// reader

export class SafetensorsFile {
    readonly path: string;
    readonly metadata: Readonly<Record<string, string>>;
    private handle: fs.FileHandle | null;
    private readonly tensors: Map<string, TensorInfo>;

    private constructor(filePath: string, handle: fs.FileHandle, header: ParsedHeader) {
        this.path = filePath;
        this.handle = handle;
        this.tensors = header.tensors;
        this.metadata = Object.freeze(header.metadata);
    }

    /**
     * Opens the file and reads and validates its header only; tensor data is read on demand. A FIFO, device or
     * folder is refused at once (openRegularFile), so a hostile model folder cannot make loading hang.
     */
    static async open(filePath: string): Promise<SafetensorsFile> {
        const {handle} = await openRegularFile(filePath, "safetensors file");
        try {
            const header = await readHeader(handle, filePath);
            return new SafetensorsFile(filePath, handle, header);
        } catch (err) {
            await handle.close();
            throw err;
        }
    }

    /** tensor names in header order */
    names(): string[] {
        return [...this.tensors.keys()];
    }

    has(name: string): boolean {
        return this.tensors.has(name);
    }

    info(name: string): TensorInfo {
        const info = this.tensors.get(name);
        if (!info) {
            const some = this.names()
                .slice(0, 3)
                .map((n) => `"${n}"`)
                .join(", ");
            throw new QloraError(
                `no tensor named "${name}" (the file holds ${this.tensors.size} tensors${some ? `, e.g. ${some}` : ""}); ` +
                    "is this the right checkpoint for the model?",
                {file: this.path}
            );
        }
        return info;
    }

    /** Reads exactly this tensor's bytes into a fresh buffer (offset 0, so any typed-array view is aligned). */
    async readBytes(name: string): Promise<Uint8Array<ArrayBuffer>> {
        const info = this.info(name);
        if (info.byteLength > MAX_TENSOR_BYTES) {
            throw new QloraError(
                `tensor "${name}" is ${info.byteLength} bytes, more than the ${MAX_TENSOR_BYTES} one buffer can hold in ` +
                    "Node.js; qlora cannot load a single tensor this large",
                {file: this.path}
            );
        }
        const bytes = new Uint8Array(info.byteLength);
        await readFully(this.openHandle(), bytes, info.dataOffset, this.path, `tensor "${name}"`);
        return bytes;
    }

    async readTyped(name: string): Promise<SafetensorsTypedArray> {
        const info = this.info(name);
        return typedView(info.dtype, await this.readBytes(name));
    }

    /** Reads a floating-point tensor as f32 (F16/BF16 widened exactly, F64 rounded to nearest). */
    async readF32(name: string): Promise<Float32Array<ArrayBuffer>> {
        const info = this.info(name);
        return toF32(info, await this.readBytes(name), this.path);
    }

    /** Reads an integer tensor as i32; I64 values outside the i32 range are an error. */
    async readI32(name: string): Promise<Int32Array<ArrayBuffer>> {
        const info = this.info(name);
        return toI32(info, await this.readBytes(name), this.path);
    }

    async close(): Promise<void> {
        const handle = this.handle;
        this.handle = null;
        if (handle) await handle.close();
    }

    async [Symbol.asyncDispose](): Promise<void> {
        await this.close();
    }

    private openHandle(): fs.FileHandle {
        if (!this.handle) {
            throw new QloraError("the file was already closed; open it again to read tensors", {file: this.path});
        }
        return this.handle;
    }
}

async function readHeader(handle: fs.FileHandle, file: string): Promise<ParsedHeader> {
    const stat = await handle.stat();
    if (stat.isDirectory()) {
        throw new QloraError("is a folder, not a safetensors file; open it with SafetensorsCheckpoint, or give the file itself", {
            file
        });
    }
    const fileSize = stat.size;
    if (fileSize < 8) {
        throw new QloraError(
            `the file has ${fileSize} bytes, too few for a safetensors file (it starts with an 8-byte header length); ` +
                "re-download the file",
            {file}
        );
    }
    const lengthBytes = Buffer.alloc(8);
    await readFully(handle, lengthBytes, 0, file, "the header length");
    const headerLength = lengthBytes.readBigUInt64LE(0);
    if (headerLength > BigInt(MAX_HEADER_BYTES)) {
        throw new QloraError(
            `the header length field says ${headerLength} bytes, above safetensors' 100 MB limit: ` +
                "this is not a safetensors file, or a corrupt one",
            {file}
        );
    }
    const headerBytesCount = Number(headerLength);
    if (8 + headerBytesCount > fileSize) {
        throw new QloraError(
            `the header length field says ${headerBytesCount} bytes but only ${fileSize - 8} bytes follow it ` +
                "(truncated download, or not a safetensors file? re-download the file)",
            {file}
        );
    }
    const headerBytes = Buffer.alloc(headerBytesCount);
    await readFully(handle, headerBytes, 8, file, "the header");
    let headerText: string;
    try {
        headerText = new TextDecoder("utf-8", {fatal: true}).decode(headerBytes);
    } catch (err) {
        throw new QloraError("the header is not valid UTF-8: not a safetensors file, or a corrupt one", {file, cause: err});
    }
    let header: unknown;
    try {
        header = JSON.parse(headerText);
    } catch (err) {
        throw new QloraError(
            `the header is not valid JSON (${(err as Error).message}): not a safetensors file, or a corrupt one`,
            {file, cause: err}
        );
    }
    const dataStart = 8 + headerBytesCount;
    return parseHeader(header, file, dataStart, fileSize - dataStart);
}

function typedView(dtype: SafetensorsDtype, bytes: Uint8Array<ArrayBuffer>): SafetensorsTypedArray {
    const {buffer, byteOffset, byteLength} = bytes;
    const count = byteLength / SAFETENSORS_DTYPE_SIZES[dtype];
    switch (dtype) {
        case "F64":
            return new Float64Array(buffer, byteOffset, count);
        case "F32":
            return new Float32Array(buffer, byteOffset, count);
        case "F16":
        case "BF16":
            return new Uint16Array(buffer, byteOffset, count);
        case "I64":
            return new BigInt64Array(buffer, byteOffset, count);
        case "I32":
            return new Int32Array(buffer, byteOffset, count);
        case "I16":
            return new Int16Array(buffer, byteOffset, count);
        case "I8":
            return new Int8Array(buffer, byteOffset, count);
        case "U8":
        case "BOOL":
            return bytes;
    }
}

function toF32(info: TensorInfo, bytes: Uint8Array<ArrayBuffer>, file: string): Float32Array<ArrayBuffer> {
    const values = typedView(info.dtype, bytes);
    switch (info.dtype) {
        case "F32":
            return values as Float32Array<ArrayBuffer>;
        case "F16":
            return f16ToF32(values as Uint16Array);
        case "BF16":
            return bf16ToF32(values as Uint16Array);
        case "F64":
            return Float32Array.from(values as Float64Array);
        default:
            throw new QloraError(
                `tensor "${info.name}" is ${info.dtype}, not a floating-point tensor; read it with readI32 or readTyped`,
                {file}
            );
    }
}

function toI32(info: TensorInfo, bytes: Uint8Array<ArrayBuffer>, file: string): Int32Array<ArrayBuffer> {
    const values = typedView(info.dtype, bytes);
    switch (info.dtype) {
        case "I32":
            return values as Int32Array<ArrayBuffer>;
        case "I16":
        case "I8":
        case "U8":
        case "BOOL":
            return Int32Array.from(values as Int16Array | Int8Array | Uint8Array);
        case "I64": {
            // an i64 fits in i32 exactly when its high word is the sign extension of its low word
            const words = new Int32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
            const out = new Int32Array(words.length / 2);
            for (let i = 0; i < out.length; i++) {
                const low = words[2 * i];
                if (words[2 * i + 1] !== low >> 31) {
                    const value = (values as BigInt64Array)[i];
                    throw new QloraError(
                        `tensor "${info.name}" holds ${value} at index ${i}, outside the int32 range; ` +
                            "token ids and labels must fit in 32 bits",
                        {file}
                    );
                }
                out[i] = low;
            }
            return out;
        }
        default:
            throw new QloraError(
                `tensor "${info.name}" is ${info.dtype}, not an integer tensor; read it with readF32 or readTyped`,
                {file}
            );
    }
}

// ------------------------------------------------------------------
// checkpoints: one file, or shards behind model.safetensors.index.json

export const SAFETENSORS_SINGLE_FILE = "model.safetensors";
export const SAFETENSORS_INDEX_FILE = "model.safetensors.index.json";

export class SafetensorsCheckpoint {
    /** the folder, or the single file, that was opened */
    readonly path: string;
    /** the index file when the checkpoint is sharded, else null */
    readonly indexPath: string | null;
    readonly files: readonly SafetensorsFile[];
    /** sum of all tensors' byte lengths */
    readonly totalBytes: number;
    private readonly fileOfTensor: Map<string, SafetensorsFile>;

    private constructor(
        checkpointPath: string,
        indexPath: string | null,
        files: SafetensorsFile[],
        fileOfTensor: Map<string, SafetensorsFile>
    ) {
        this.path = checkpointPath;
        this.indexPath = indexPath;
        this.files = files;
        this.fileOfTensor = fileOfTensor;
        let totalBytes = 0;
        for (const [name, file] of fileOfTensor) totalBytes += file.info(name).byteLength;
        this.totalBytes = totalBytes;
    }

    /**
     * Opens a model folder (`model.safetensors`, else `model.safetensors.index.json` and its shards, the order
     * transformers looks in), or a single `.safetensors` file. Reads every header up front so a missing or
     * truncated shard is reported now rather than halfway through loading.
     */
    static async open(pathOrDir: string): Promise<SafetensorsCheckpoint> {
        let stat: Stats;
        try {
            stat = await fs.stat(pathOrDir);
        } catch (err) {
            throw new QloraError("no such file or folder; give a model folder or a .safetensors file", {
                file: pathOrDir,
                cause: err
            });
        }
        if (!stat.isDirectory()) return SafetensorsCheckpoint.fromFiles(pathOrDir, null, [pathOrDir], null);

        const singlePath = path.join(pathOrDir, SAFETENSORS_SINGLE_FILE);
        if (await pathExists(singlePath)) return SafetensorsCheckpoint.fromFiles(pathOrDir, null, [singlePath], null);

        const indexPath = path.join(pathOrDir, SAFETENSORS_INDEX_FILE);
        if (await pathExists(indexPath)) {
            const weightMap = await readIndexWeightMap(indexPath);
            const shardNames = [...new Set(weightMap.values())];
            const shardPaths = shardNames.map((shard) => path.join(pathOrDir, shard));
            for (let i = 0; i < shardPaths.length; i++) {
                if (!(await pathExists(shardPaths[i]))) {
                    throw new QloraError(
                        `lists shard "${shardNames[i]}", which is not in ${pathOrDir} (incomplete download? download the missing shard)`,
                        {file: indexPath}
                    );
                }
            }
            return SafetensorsCheckpoint.fromFiles(pathOrDir, indexPath, shardPaths, weightMap);
        }

        let hint = "";
        try {
            const entries = await fs.readdir(pathOrDir);
            if (entries.some((entry) => entry.endsWith(".bin") || entry.endsWith(".pt") || entry.endsWith(".pth"))) {
                hint = " (it has PyTorch .bin/.pt weights: save the model with safe_serialization=True to get safetensors)";
            } else if (entries.some((entry) => entry.endsWith(".safetensors"))) {
                hint = ` (it has other .safetensors files: pass the file itself)`;
            }
        } catch {
            // the listing is only for the hint
        }
        throw new QloraError(`the folder has neither ${SAFETENSORS_SINGLE_FILE} nor ${SAFETENSORS_INDEX_FILE}${hint}`, {
            file: pathOrDir
        });
    }

    private static async fromFiles(
        checkpointPath: string,
        indexPath: string | null,
        filePaths: string[],
        weightMap: Map<string, string> | null
    ): Promise<SafetensorsCheckpoint> {
        const files: SafetensorsFile[] = [];
        try {
            for (const filePath of filePaths) files.push(await SafetensorsFile.open(filePath));
            const fileOfTensor = new Map<string, SafetensorsFile>();
            for (const file of files) {
                for (const name of file.names()) {
                    const other = fileOfTensor.get(name);
                    if (other) {
                        throw new QloraError(
                            `tensor "${name}" is in both ${other.path} and ${file.path}: the checkpoint is inconsistent`,
                            {file: indexPath ?? checkpointPath}
                        );
                    }
                    fileOfTensor.set(name, file);
                }
            }
            if (weightMap && indexPath) {
                for (const [name, shard] of weightMap) {
                    const holder = fileOfTensor.get(name);
                    if (!holder || path.basename(holder.path) !== shard) {
                        throw new QloraError(
                            `says tensor "${name}" is in "${shard}", but ${holder ? `it is in "${path.basename(holder.path)}"` : "no shard holds it"}: ` +
                                "the index does not match the shards (mixed downloads? re-download the checkpoint)",
                            {file: indexPath}
                        );
                    }
                }
            }
            return new SafetensorsCheckpoint(checkpointPath, indexPath, files, fileOfTensor);
        } catch (err) {
            await Promise.all(files.map((file) => file.close()));
            throw err;
        }
    }

    names(): string[] {
        return [...this.fileOfTensor.keys()];
    }

    has(name: string): boolean {
        return this.fileOfTensor.has(name);
    }

    info(name: string): TensorInfo {
        return this.fileFor(name).info(name);
    }

    /** the file that holds the tensor (its path is useful in messages) */
    fileFor(name: string): SafetensorsFile {
        const file = this.fileOfTensor.get(name);
        if (!file) {
            throw new QloraError(
                `no tensor named "${name}" in the checkpoint (${this.fileOfTensor.size} tensors in ${this.files.length} file(s)); ` +
                    "is this the right checkpoint for the model?",
                {file: this.indexPath ?? this.path}
            );
        }
        return file;
    }

    readBytes(name: string): Promise<Uint8Array<ArrayBuffer>> {
        return this.fileFor(name).readBytes(name);
    }

    readTyped(name: string): Promise<SafetensorsTypedArray> {
        return this.fileFor(name).readTyped(name);
    }

    readF32(name: string): Promise<Float32Array<ArrayBuffer>> {
        return this.fileFor(name).readF32(name);
    }

    readI32(name: string): Promise<Int32Array<ArrayBuffer>> {
        return this.fileFor(name).readI32(name);
    }

    async close(): Promise<void> {
        await Promise.all(this.files.map((file) => file.close()));
    }

    async [Symbol.asyncDispose](): Promise<void> {
        await this.close();
    }
}

async function pathExists(filePath: string): Promise<boolean> {
    try {
        await fs.access(filePath);
        return true;
    } catch {
        return false;
    }
}

async function readIndexWeightMap(indexPath: string): Promise<Map<string, string>> {
    const text = await readTextFile(indexPath, {what: "safetensors index"});
    let index: unknown;
    try {
        index = JSON.parse(text);
    } catch (err) {
        throw new QloraError(`cannot read the index as JSON (${(err as Error).message}); re-download it`, {
            file: indexPath,
            cause: err
        });
    }
    const weightMap = (index as {weight_map?: unknown} | null)?.weight_map;
    if (weightMap === null || typeof weightMap !== "object" || Array.isArray(weightMap)) {
        throw new QloraError(
            `"weight_map" is ${describeJsonValue(weightMap)}, expected an object from tensor name to shard file; re-download the index`,
            {file: indexPath}
        );
    }
    const result = new Map<string, string>();
    for (const [name, shard] of Object.entries(weightMap as Record<string, unknown>)) {
        // shard names are plain file names next to the index; refuse anything that points elsewhere
        if (typeof shard !== "string" || shard === "" || shard !== path.basename(shard) || shard === "." || shard === "..") {
            throw new QloraError(
                `"weight_map" entry "${name}" is ${quoteValue(shard)}, expected a shard file name in the same folder`,
                {file: indexPath}
            );
        }
        result.set(name, shard);
    }
    return result;
}

// ------------------------------------------------------------------
// writer

function validateTensorsToWrite(tensors: readonly TensorToWrite[], file: string): void {
    const seen = new Set<string>();
    for (const tensor of tensors) {
        if (tensor.name === "__metadata__") {
            throw new QloraError(`cannot write a tensor named "__metadata__": the name is reserved by safetensors`, {file});
        }
        if (seen.has(tensor.name))
            throw new QloraError(`tensor "${tensor.name}" is given twice; tensor names must be unique`, {file});
        seen.add(tensor.name);
        if (!isSafetensorsDtype(tensor.dtype)) {
            throw new QloraError(
                `tensor "${tensor.name}" has dtype ${quoteValue(tensor.dtype)} (supported: ${SUPPORTED_DTYPES.join(", ")})`,
                {file}
            );
        }
        if (!tensor.shape.every(isNonNegativeInteger)) {
            throw new QloraError(
                `tensor "${tensor.name}" has shape ${JSON.stringify(tensor.shape)}, expected non-negative integers`,
                {file}
            );
        }
        if (typeof tensor.data !== "function") checkDataSize(tensor, tensor.data, file);
    }
}

function validateMetadata(metadata: Record<string, string> | undefined, file: string): void {
    if (!metadata) return;
    for (const [key, value] of Object.entries(metadata)) {
        if (typeof value !== "string") {
            throw new QloraError(
                `metadata key "${key}" is ${describeJsonValue(value)}; safetensors metadata values must be strings`,
                {file}
            );
        }
    }
}

/**
 * The header JSON, padded with spaces to a multiple of 8 bytes so the data section starts 8-aligned.
 *
 * Layout choice: tensors are stored in the order given. The Python/Rust writer instead sorts by dtype alignment
 * (largest first) and then by name, which keeps every tensor naturally aligned for zero-copy mmap; readers don't
 * care about the order, and our readers copy each tensor into a fresh aligned buffer anyway, so the caller's order
 * (usually layer order, which makes sequential loading sequential on disk) wins.
 */
function encodeHeader(tensors: readonly TensorToWrite[], metadata: Record<string, string> | undefined): Uint8Array {
    const header: Record<string, unknown> = {};
    if (metadata) header.__metadata__ = metadata;
    let offset = 0;
    for (const tensor of tensors) {
        const end = offset + tensorBytes(tensor);
        header[tensor.name] = {dtype: tensor.dtype, shape: [...tensor.shape], data_offsets: [offset, end]};
        offset = end;
    }
    const json = Buffer.from(JSON.stringify(header), "utf8");
    const paddedLength = Math.ceil(json.length / 8) * 8;
    const padded = Buffer.alloc(paddedLength, 0x20);
    json.copy(padded);
    return padded;
}

/**
 * Writes a safetensors file: streams each tensor to an exclusive temporary file next to `filePath` (atomic.ts),
 * then renames it into place, so a crash or error never leaves a half-written file under the real name.
 */
export async function writeSafetensors(
    filePath: string,
    tensors: readonly TensorToWrite[],
    metadata?: Record<string, string>
): Promise<void> {
    validateTensorsToWrite(tensors, filePath);
    validateMetadata(metadata, filePath);
    const header = encodeHeader(tensors, metadata);
    const out = await createAtomicFile(filePath);
    try {
        const lengthField = Buffer.alloc(8);
        lengthField.writeBigUInt64LE(BigInt(header.length));
        await writeFully(out.handle, lengthField, 0);
        await writeFully(out.handle, header, 8);
        let position = 8 + header.length;
        for (const tensor of tensors) {
            const data = await tensorData(tensor, filePath);
            await writeFully(out.handle, bytesOf(data), position);
            position += data.byteLength;
        }
    } catch (err) {
        await out.abort();
        if (err instanceof QloraError) throw err;
        throw new QloraError(`cannot write the file: ${(err as Error).message}`, {file: filePath, cause: err});
    }
    await out.commit();
}

export interface ShardedWriteResult {
    /** the safetensors files written, in shard order */
    files: string[];
    /** the index written, or null when everything fit in one file */
    indexFile: string | null;
    /** sum of the tensors' byte lengths (the index's metadata.total_size) */
    totalSize: number;
}

/**
 * Writes a checkpoint the way transformers' save_pretrained does: `model.safetensors` when everything fits in
 * `maxShardBytes`, else `model-00001-of-0000N.safetensors`… plus `model.safetensors.index.json`
 * (`{metadata: {total_size}, weight_map}`, keys sorted, indent 2). Shards are filled greedily in the given order;
 * a tensor larger than the limit gets a shard of its own. The folder must not hold weights of that name already:
 * a save over an earlier one would mix the two (transformers prefers `model.safetensors` over an index), and
 * removing the earlier files could delete the user's model. Write into a fresh folder (writeDirAtomic's).
 */
export async function writeShardedSafetensors(
    dir: string,
    baseName = "model",
    tensors: readonly TensorToWrite[],
    maxShardBytes: number,
    metadata?: Record<string, string>
): Promise<ShardedWriteResult> {
    if (!(maxShardBytes > 0)) {
        throw new QloraError(`maximum shard size must be a positive number of bytes, got ${maxShardBytes}`, {file: dir});
    }
    validateTensorsToWrite(tensors, dir);
    const singleName = `${baseName}.safetensors`;
    const indexName = `${baseName}.safetensors.index.json`;
    const shardPattern = new RegExp(`^${escapeRegExp(baseName)}-\\d{5}-of-\\d{5}\\.safetensors$`);
    try {
        await fs.mkdir(dir, {recursive: true});
        const earlier = (await fs.readdir(dir)).filter(
            (entry) => entry === singleName || entry === indexName || shardPattern.test(entry)
        );
        if (earlier.length > 0)
            throw new QloraError(
                `already holds ${earlier.sort()[0]}${earlier.length > 1 ? ` and ${earlier.length - 1} more weight files` : ""} ` +
                    "of an earlier save; write the checkpoint into a new folder (qlora does not mix or delete weight files)",
                {file: dir}
            );
    } catch (err) {
        if (err instanceof QloraError) throw err;
        throw new QloraError(`cannot write into the folder: ${(err as Error).message}`, {file: dir, cause: err});
    }

    const shards: TensorToWrite[][] = [];
    let current: TensorToWrite[] = [];
    let currentBytes = 0;
    let totalSize = 0;
    for (const tensor of tensors) {
        const size = tensorBytes(tensor);
        if (current.length > 0 && currentBytes + size > maxShardBytes) {
            shards.push(current);
            current = [];
            currentBytes = 0;
        }
        current.push(tensor);
        currentBytes += size;
        totalSize += size;
    }
    if (current.length > 0 || shards.length === 0) shards.push(current);

    if (shards.length === 1) {
        const filePath = path.join(dir, singleName);
        await writeSafetensors(filePath, shards[0], metadata);
        return {files: [filePath], indexFile: null, totalSize};
    }

    const count = shards.length;
    const shardNames = shards.map(
        (_, i) => `${baseName}-${String(i + 1).padStart(5, "0")}-of-${String(count).padStart(5, "0")}.safetensors`
    );
    const weightMap: Record<string, string> = {};
    for (let i = 0; i < count; i++) {
        await writeSafetensors(path.join(dir, shardNames[i]), shards[i], metadata);
        for (const tensor of shards[i]) weightMap[tensor.name] = shardNames[i];
    }
    const sortedWeightMap: Record<string, string> = {};
    for (const name of Object.keys(weightMap).sort()) sortedWeightMap[name] = weightMap[name];
    const indexPath = path.join(dir, indexName);
    await writeFileAtomic(
        indexPath,
        JSON.stringify({metadata: {total_size: totalSize}, weight_map: sortedWeightMap}, null, 2) + "\n"
    );
    return {files: shardNames.map((name) => path.join(dir, name)), indexFile: indexPath, totalSize};
}

function escapeRegExp(text: string): string {
    return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
