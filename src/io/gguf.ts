// gguf.ts: a GGUF v3 writer (SPEC-gguf §1): header, typed metadata, tensor infos, then the tensor data, each
// tensor padded to the alignment. Tensor data is pulled from the caller one tensor (or one chunk) at a time and
// streamed to the file, so a model of many GB never sits in memory; the file is written under a temporary name
// (atomic.ts) and renamed when complete, and any failure (a full disk included) removes it and names the file.
import {promises as fs} from "node:fs";
import type {FileHandle} from "node:fs/promises";
import path from "node:path";
import {QloraError} from "../errors.js";
import {createAtomicFile, recoverInterruptedWrites} from "./atomic.js";
import {GGML_TYPE_TRAITS, ggmlTensorBytes, ggmlTypeName, type GgmlType} from "./gguf-quants.js";

export const GGUF_MAGIC = 0x46554747; // "GGUF" little-endian
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;
/** llama.cpp's GGML_MAX_NAME: a tensor name must be shorter than this many bytes */
export const GGML_MAX_NAME = 64;
export const GGML_MAX_DIMS = 4;

/** GGUF metadata value types */
export const GgufValueType = {
    UINT8: 0,
    INT8: 1,
    UINT16: 2,
    INT16: 3,
    UINT32: 4,
    INT32: 5,
    FLOAT32: 6,
    BOOL: 7,
    STRING: 8,
    ARRAY: 9,
    UINT64: 10,
    INT64: 11,
    FLOAT64: 12
} as const;

/** the scalar types a metadata value or array element can have */
export type GgufScalarType = "u8" | "i8" | "u16" | "i16" | "u32" | "i32" | "f32" | "bool" | "string" | "u64" | "i64" | "f64";
type Scalar = number | bigint | boolean | string;

export type GgufValue =
    | {type: GgufScalarType; value: Scalar}
    | {type: "array"; itemType: GgufScalarType; items: readonly Scalar[]};

const TYPE_ID: Record<GgufScalarType, number> = {
    u8: GgufValueType.UINT8,
    i8: GgufValueType.INT8,
    u16: GgufValueType.UINT16,
    i16: GgufValueType.INT16,
    u32: GgufValueType.UINT32,
    i32: GgufValueType.INT32,
    f32: GgufValueType.FLOAT32,
    bool: GgufValueType.BOOL,
    string: GgufValueType.STRING,
    u64: GgufValueType.UINT64,
    i64: GgufValueType.INT64,
    f64: GgufValueType.FLOAT64
};

const INT_RANGE: Partial<Record<GgufScalarType, [number, number]>> = {
    u8: [0, 0xff],
    i8: [-0x80, 0x7f],
    u16: [0, 0xffff],
    i16: [-0x8000, 0x7fff],
    u32: [0, 0xffffffff],
    i32: [-0x80000000, 0x7fffffff]
};

function checkScalar(key: string, type: GgufScalarType, v: Scalar): void {
    const bad = (what: string) => {
        throw new QloraError(
            `GGUF metadata "${key}": ${JSON.stringify(typeof v === "bigint" ? v.toString() : v)} is not ${what}`
        );
    };
    if (type === "string") {
        if (typeof v !== "string") bad("a string");
    } else if (type === "bool") {
        if (typeof v !== "boolean") bad("a boolean");
    } else if (type === "f32" || type === "f64") {
        if (typeof v !== "number") bad("a number");
    } else if (type === "u64" || type === "i64") {
        if (typeof v !== "bigint" && !(typeof v === "number" && Number.isSafeInteger(v))) bad("an integer");
        const b = BigInt(v as number | bigint);
        if (type === "u64" ? b < 0n || b > 0xffffffffffffffffn : b < -(2n ** 63n) || b >= 2n ** 63n) bad(`a ${type}`);
    } else {
        const [lo, hi] = INT_RANGE[type]!;
        if (typeof v !== "number" || !Number.isInteger(v) || v < lo || v > hi) bad(`a ${type}`);
    }
}

/** GGUF metadata in insertion order; keys are checked (non-empty, unique) and values range-checked */
export class GgufMetadata {
    private readonly entries = new Map<string, GgufValue>();

    /** adds a key; a second value for the same key is an error (llama.cpp rejects duplicate keys) */
    set(key: string, value: GgufValue): this {
        if (!/^[\x21-\x7e]+$/.test(key) || key.startsWith(".") || key.endsWith(".") || key.includes(".."))
            throw new QloraError(`GGUF metadata key ${JSON.stringify(key)} is not a dotted ASCII name`);
        if (this.entries.has(key)) throw new QloraError(`GGUF metadata key "${key}" is set twice`);
        if (value.type === "array") {
            if (value.items.length === 0) throw new QloraError(`GGUF metadata "${key}": an array must not be empty`);
            for (const item of value.items) checkScalar(key, value.itemType, item);
        } else checkScalar(key, value.type, value.value);
        this.entries.set(key, value);
        return this;
    }

    u32(key: string, v: number): this {
        return this.set(key, {type: "u32", value: v});
    }
    i32(key: string, v: number): this {
        return this.set(key, {type: "i32", value: v});
    }
    u64(key: string, v: number | bigint): this {
        return this.set(key, {type: "u64", value: v});
    }
    f32(key: string, v: number): this {
        return this.set(key, {type: "f32", value: v});
    }
    bool(key: string, v: boolean): this {
        return this.set(key, {type: "bool", value: v});
    }
    string(key: string, v: string): this {
        return this.set(key, {type: "string", value: v});
    }
    array(key: string, itemType: GgufScalarType, items: readonly Scalar[]): this {
        return this.set(key, {type: "array", itemType, items});
    }

    has(key: string): boolean {
        return this.entries.has(key);
    }
    get(key: string): GgufValue | undefined {
        return this.entries.get(key);
    }
    get size(): number {
        return this.entries.size;
    }
    [Symbol.iterator](): IterableIterator<[string, GgufValue]> {
        return this.entries.entries();
    }
}

/** what a tensor's data source returns: all its bytes, or its bytes in consecutive chunks */
export type GgufTensorData = Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;

export interface GgufTensor {
    /** the GGUF name, e.g. blk.0.attn_q.weight */
    name: string;
    type: GgmlType;
    /** ggml dimensions, innermost first: a PyTorch [out, in] weight is ne = [in, out] */
    ne: readonly number[];
    /** produces exactly ggmlTensorBytes(type, ne) bytes; called once, in file order, while the file is written */
    data: () => GgufTensorData | Promise<GgufTensorData>;
}

export interface GgufContent {
    metadata: GgufMetadata;
    tensors: readonly GgufTensor[];
    /** data alignment; written as general.alignment when it is not the default 32 */
    alignment?: number;
}

export interface WriteGgufOptions {
    /** called after each tensor's data is written */
    onTensor?: (index: number, tensor: GgufTensor, bytes: number) => void;
}

export interface WriteGgufResult {
    file: string;
    bytes: number;
    tensorCount: number;
}

// ------------------------------------------------------------------
// header encoding

class ByteSink {
    private readonly parts: Buffer[] = [];
    private buf = Buffer.alloc(1 << 16);
    private pos = 0;
    length = 0;

    private ensure(n: number): void {
        if (this.pos + n <= this.buf.length) return;
        this.parts.push(this.buf.subarray(0, this.pos));
        this.buf = Buffer.alloc(Math.max(1 << 16, n));
        this.pos = 0;
    }
    u8(v: number): void {
        this.ensure(1);
        this.buf.writeUInt8(v, this.pos);
        this.pos += 1;
        this.length += 1;
    }
    i8(v: number): void {
        this.ensure(1);
        this.buf.writeInt8(v, this.pos);
        this.pos += 1;
        this.length += 1;
    }
    u16(v: number): void {
        this.ensure(2);
        this.buf.writeUInt16LE(v, this.pos);
        this.pos += 2;
        this.length += 2;
    }
    i16(v: number): void {
        this.ensure(2);
        this.buf.writeInt16LE(v, this.pos);
        this.pos += 2;
        this.length += 2;
    }
    u32(v: number): void {
        this.ensure(4);
        this.buf.writeUInt32LE(v, this.pos);
        this.pos += 4;
        this.length += 4;
    }
    i32(v: number): void {
        this.ensure(4);
        this.buf.writeInt32LE(v, this.pos);
        this.pos += 4;
        this.length += 4;
    }
    f32(v: number): void {
        this.ensure(4);
        this.buf.writeFloatLE(v, this.pos);
        this.pos += 4;
        this.length += 4;
    }
    f64(v: number): void {
        this.ensure(8);
        this.buf.writeDoubleLE(v, this.pos);
        this.pos += 8;
        this.length += 8;
    }
    u64(v: number | bigint): void {
        this.ensure(8);
        this.buf.writeBigUInt64LE(BigInt(v), this.pos);
        this.pos += 8;
        this.length += 8;
    }
    i64(v: number | bigint): void {
        this.ensure(8);
        this.buf.writeBigInt64LE(BigInt(v), this.pos);
        this.pos += 8;
        this.length += 8;
    }
    bytes(b: Uint8Array): void {
        this.ensure(b.length);
        this.buf.set(b, this.pos);
        this.pos += b.length;
        this.length += b.length;
    }
    string(s: string): void {
        const b = Buffer.from(s, "utf8");
        this.u64(b.length);
        this.bytes(b);
    }
    toBuffer(): Buffer {
        return Buffer.concat([...this.parts, this.buf.subarray(0, this.pos)]);
    }
}

function writeScalar(sink: ByteSink, type: GgufScalarType, v: Scalar): void {
    switch (type) {
        case "u8":
            sink.u8(v as number);
            break;
        case "i8":
            sink.i8(v as number);
            break;
        case "u16":
            sink.u16(v as number);
            break;
        case "i16":
            sink.i16(v as number);
            break;
        case "u32":
            sink.u32(v as number);
            break;
        case "i32":
            sink.i32(v as number);
            break;
        case "f32":
            sink.f32(v as number);
            break;
        case "f64":
            sink.f64(v as number);
            break;
        case "bool":
            sink.u8(v ? 1 : 0);
            break;
        case "string":
            sink.string(v as string);
            break;
        case "u64":
            sink.u64(v as number | bigint);
            break;
        case "i64":
            sink.i64(v as number | bigint);
            break;
    }
}

export function alignUp(x: number, alignment: number): number {
    return x + ((alignment - (x % alignment)) % alignment);
}

export interface PlannedTensor {
    tensor: GgufTensor;
    bytes: number;
    offset: number;
}

function planTensors(tensors: readonly GgufTensor[], alignment: number): PlannedTensor[] {
    const names = new Set<string>();
    let offset = 0;
    return tensors.map((tensor) => {
        const {name, ne, type} = tensor;
        const nameBytes = Buffer.byteLength(name, "utf8");
        if (nameBytes === 0 || nameBytes >= GGML_MAX_NAME)
            throw new QloraError(`GGUF tensor name "${name}" must have 1 to ${GGML_MAX_NAME - 1} bytes`);
        if (names.has(name)) throw new QloraError(`GGUF tensor "${name}" appears twice`);
        names.add(name);
        if (ne.length < 1 || ne.length > GGML_MAX_DIMS || ne.some((d) => !Number.isSafeInteger(d) || d < 1))
            throw new QloraError(`GGUF tensor "${name}" has dimensions [${ne.join(", ")}]; expected 1 to 4 positive integers`);
        if (!GGML_TYPE_TRAITS[type]) throw new QloraError(`GGUF tensor "${name}" has an unknown ggml type ${type}`);
        if (ne[0] % GGML_TYPE_TRAITS[type].blockSize !== 0)
            throw new QloraError(
                `GGUF tensor "${name}": rows of ${ne[0]} values cannot be stored as ${ggmlTypeName(type)} ` +
                    `(blocks of ${GGML_TYPE_TRAITS[type].blockSize})`
            );
        const bytes = ggmlTensorBytes(type, ne);
        const planned = {tensor, bytes, offset};
        offset += alignUp(bytes, alignment);
        return planned;
    });
}

/** the header: magic, version, counts, metadata, tensor infos, and the padding up to the data section */
export function encodeGgufHeader(content: GgufContent): {header: Buffer; planned: PlannedTensor[]} {
    const alignment = content.alignment ?? GGUF_DEFAULT_ALIGNMENT;
    if (!Number.isInteger(alignment) || alignment < 1 || (alignment & (alignment - 1)) !== 0 || alignment > 0xffffffff)
        throw new QloraError(`GGUF alignment ${alignment} is not a power of two`);
    const metadata = content.metadata;
    const existing = metadata.get("general.alignment");
    if (existing && (existing.type !== "u32" || existing.value !== alignment))
        throw new QloraError(`GGUF metadata general.alignment must be the u32 ${alignment}`);
    const extraAlignmentKey = !existing && alignment !== GGUF_DEFAULT_ALIGNMENT;
    const planned = planTensors(content.tensors, alignment);

    const sink = new ByteSink();
    sink.u32(GGUF_MAGIC);
    sink.u32(GGUF_VERSION);
    sink.u64(planned.length);
    sink.u64(metadata.size + (extraAlignmentKey ? 1 : 0));
    const entries: [string, GgufValue][] = [...metadata];
    if (extraAlignmentKey) entries.push(["general.alignment", {type: "u32", value: alignment}]);
    for (const [key, value] of entries) {
        sink.string(key);
        if (value.type === "array") {
            sink.u32(GgufValueType.ARRAY);
            sink.u32(TYPE_ID[value.itemType]);
            sink.u64(value.items.length);
            for (const item of value.items) writeScalar(sink, value.itemType, item);
        } else {
            sink.u32(TYPE_ID[value.type]);
            writeScalar(sink, value.type, value.value);
        }
    }
    for (const p of planned) {
        sink.string(p.tensor.name);
        sink.u32(p.tensor.ne.length);
        for (const d of p.tensor.ne) sink.u64(d);
        sink.u32(p.tensor.type);
        sink.u64(p.offset);
    }
    if (planned.length > 0) sink.bytes(new Uint8Array(alignUp(sink.length, alignment) - sink.length));
    return {header: sink.toBuffer(), planned};
}

// ------------------------------------------------------------------
// writing

async function writeAll(fh: FileHandle, data: Uint8Array): Promise<void> {
    let done = 0;
    while (done < data.length) {
        const {bytesWritten} = await fh.write(data, done, data.length - done);
        if (bytesWritten <= 0) throw Object.assign(new Error("the write made no progress"), {code: "EIO"});
        done += bytesWritten;
    }
}

function isChunkIterable(d: GgufTensorData): d is Iterable<Uint8Array> | AsyncIterable<Uint8Array> {
    return !(d instanceof Uint8Array);
}

/** true when `head` (a file's first bytes) starts with the GGUF magic: what `--overwrite` may replace */
export function hasGgufMagic(head: Uint8Array): boolean {
    return head.length >= 4 && (head[0] | (head[1] << 8) | (head[2] << 16) | (head[3] << 24)) >>> 0 === GGUF_MAGIC;
}

/**
 * Writes a GGUF file: an exclusive temporary beside `file` first (atomic.ts), renamed to `file` once every byte is
 * on disk. On any failure the temporary file is removed and a QloraError names `file` (a full disk says so). An
 * existing `file` is replaced: callers that take the path from a user check it first (assertFileOutput).
 */
export async function writeGguf(file: string, content: GgufContent, opts: WriteGgufOptions = {}): Promise<WriteGgufResult> {
    const alignment = content.alignment ?? GGUF_DEFAULT_ALIGNMENT;
    const {header, planned} = encodeGgufHeader(content);
    const dir = path.dirname(path.resolve(file));
    try {
        await fs.mkdir(dir, {recursive: true});
    } catch (err) {
        throw new QloraError(`cannot create the folder: ${(err as Error).message}`, {file: dir, cause: err});
    }
    // temporaries an earlier, killed write of this file left behind (they can be many GB)
    await recoverInterruptedWrites(dir, path.basename(file));
    const out = await createAtomicFile(file);
    const fh = out.handle;
    let written = 0;
    try {
        await writeAll(fh, header);
        written += header.length;
        const zeros = new Uint8Array(alignment);
        for (let i = 0; i < planned.length; i++) {
            const {tensor, bytes} = planned[i];
            const data = await tensor.data();
            let got = 0;
            const put = async (chunk: Uint8Array) => {
                if (got + chunk.length > bytes) throw new Error(`tensor "${tensor.name}" produced more than its ${bytes} bytes`);
                await writeAll(fh, chunk);
                got += chunk.length;
                written += chunk.length;
            };
            if (isChunkIterable(data)) for await (const chunk of data) await put(chunk);
            else await put(data);
            if (got !== bytes) throw new Error(`tensor "${tensor.name}" produced ${got} bytes, expected ${bytes}`);
            const pad = alignUp(bytes, alignment) - bytes;
            if (pad > 0) {
                await writeAll(fh, zeros.subarray(0, pad));
                written += pad;
            }
            opts.onTensor?.(i, tensor, bytes);
        }
        await out.commit();
    } catch (err) {
        await out.abort();
        if (err instanceof QloraError) throw err;
        const code = (err as NodeJS.ErrnoException).code ?? "";
        const at = `${code} after ${formatBytes(written)} of the GGUF file`;
        if (code === "ENOSPC" || code === "EDQUOT")
            throw new QloraError(
                `the disk is full (${at}); free some space or write to another disk. Nothing was ` + "left under this name",
                {file, cause: err}
            );
        if (code === "EFBIG")
            throw new QloraError(
                `the file grew larger than the file system or the file-size limit (ulimit -f) allows ` +
                    `(${at}); write to another disk. Nothing was left under this name`,
                {file, cause: err}
            );
        throw new QloraError(`cannot write the GGUF file: ${(err as Error).message}`, {file, cause: err});
    }
    return {file, bytes: written, tensorCount: planned.length};
}

export function formatBytes(n: number): string {
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n / 1024,
        u = 0;
    while (v >= 1024 && u < units.length - 1) {
        v /= 1024;
        u++;
    }
    return `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}
