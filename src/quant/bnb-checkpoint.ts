// bnb-checkpoint.ts: pre-quantized bitsandbytes 4-bit checkpoints (`*-bnb-4bit`), read and written in the
// layout transformers' save_pretrained produces (SPEC-quant §7).
//
// Per quantized Linear P: `P.weight` (U8 [ceil(n/2), 1] packed nibbles), `P.weight.absmax` (U8 codes with
// double quantization, else F32), `P.weight.quant_map` (F32 [16]), with double quantization also
// `P.weight.nested_absmax` and `P.weight.nested_quant_map`, and `P.weight.quant_state.bitsandbytes__nf4` (or
// `__fp4`): the UTF-8 bytes of a JSON object with quant_type, blocksize, dtype, shape and the nested fields.
// A weight is pre-quantized iff that quant_state sibling exists; the decision is made per tensor.
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {readTextFile} from "../io/files.js";
import {writeDirAtomic, writeFileAtomic} from "../io/atomic.js";
import {
    SafetensorsCheckpoint,
    writeShardedSafetensors,
    type SafetensorsDtype,
    type ShardedWriteResult,
    type TensorToWrite
} from "../io/safetensors.js";
import {parseQuantizationConfig, quantizationConfigToJson, type BitsAndBytesConfig} from "./config.js";
import {
    checkBlocksize,
    checkQuantType,
    QUANT_DTYPES,
    validateQuantState,
    type QuantDtype,
    type QuantState4bit,
    type QuantType
} from "./nf4.js";

export const QUANT_STATE_KEY_PREFIX = "quant_state.bitsandbytes__";

/** the key suffixes bnb's QuantState.from_dict accepts (QuantState.valid_qs_keys) */
export const VALID_QS_KEYS: readonly string[] = [
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state",
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset"
];

/** the `<weight>.quant_state.bitsandbytes__*` key of a weight, or null when the weight is not pre-quantized */
export function quantStateKey(ckpt: SafetensorsCheckpoint, weightName: string): string | null {
    for (const type of ["nf4", "fp4"]) {
        const key = `${weightName}.${QUANT_STATE_KEY_PREFIX}${type}`;
        if (ckpt.has(key)) return key;
    }
    return null;
}

/** whether `weightName` is a pre-quantized 4-bit weight (SPEC-quant §7.3) */
export function isQuantizedWeight(ckpt: SafetensorsCheckpoint, weightName: string): boolean {
    return quantStateKey(ckpt, weightName) !== null;
}

/** the names of every pre-quantized weight in the checkpoint, sorted */
export function quantizedWeightNames(ckpt: SafetensorsCheckpoint): string[] {
    const marker = `.${QUANT_STATE_KEY_PREFIX}`;
    return ckpt
        .names()
        .filter((n) => n.includes(marker))
        .map((n) => n.slice(0, n.indexOf(marker)))
        .sort();
}

/** the JSON blob of a quant state as bnb writes it */
interface QuantStateJson {
    quant_type: QuantType;
    blocksize: number;
    dtype: QuantDtype;
    shape: number[];
    nested_blocksize?: number;
    nested_dtype?: string;
    nested_offset?: number;
}

function parseQuantStateJson(bytes: Uint8Array, key: string, file: string): QuantStateJson {
    let json: unknown;
    try {
        json = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("utf8"));
    } catch (err) {
        throw new QloraError(`tensor "${key}" does not hold valid JSON (${(err as Error).message}); the checkpoint is corrupt`, {
            file
        });
    }
    if (json === null || typeof json !== "object" || Array.isArray(json))
        throw new QloraError(`tensor "${key}" holds ${quoteValue(json)}, expected a JSON object`, {file});
    const obj = json as Record<string, unknown>;
    const field = (name: string, ok: (v: unknown) => boolean, expected: string): unknown => {
        if (!ok(obj[name]))
            throw new QloraError(`tensor "${key}": field "${name}" is ${quoteValue(obj[name])}, expected ${expected}`, {file});
        return obj[name];
    };
    try {
        checkQuantType(obj.quant_type);
        checkBlocksize(obj.blocksize);
    } catch (err) {
        throw new QloraError(`tensor "${key}": ${(err as Error).message}`, {file, cause: err});
    }
    const dtype = field(
        "dtype",
        (v) => QUANT_DTYPES.includes(v as QuantDtype),
        `one of ${QUANT_DTYPES.join(", ")}`
    ) as QuantDtype;
    const shape = field(
        "shape",
        (v) => Array.isArray(v) && v.length > 0 && v.every((d) => Number.isSafeInteger(d) && d >= 0),
        "a list of non-negative integers"
    ) as number[];
    const result: QuantStateJson = {quant_type: obj.quant_type as QuantType, blocksize: obj.blocksize as number, dtype, shape};
    if (obj.nested_offset !== undefined || obj.nested_blocksize !== undefined) {
        result.nested_blocksize = field(
            "nested_blocksize",
            (v) => Number.isSafeInteger(v) && (v as number) > 0,
            "a positive integer"
        ) as number;
        result.nested_offset = field("nested_offset", (v) => typeof v === "number" && Number.isFinite(v), "a number") as number;
        result.nested_dtype = field("nested_dtype", (v) => v === undefined || v === "float32", '"float32"') as string | undefined;
    }
    return result;
}

async function readAux(
    ckpt: SafetensorsCheckpoint,
    weightName: string,
    suffix: string,
    dtype: SafetensorsDtype,
    file: string
): Promise<Uint8Array | Float32Array> {
    const key = `${weightName}.${suffix}`;
    if (!ckpt.has(key))
        throw new QloraError(
            `tensor "${key}" is missing: the 4-bit weight "${weightName}" needs it ` +
                "(incomplete download, or a checkpoint not written by bitsandbytes/transformers)",
            {file}
        );
    const info = ckpt.info(key);
    if (info.dtype !== dtype) throw new QloraError(`tensor "${key}" has dtype ${info.dtype}, expected ${dtype}`, {file});
    return dtype === "F32" ? await ckpt.readF32(key) : await ckpt.readBytes(key);
}

/** rebuilds the QuantState4bit of one pre-quantized weight (`weightName` ends in ".weight") */
export async function readQuantState(ckpt: SafetensorsCheckpoint, weightName: string): Promise<QuantState4bit> {
    const file = ckpt.path;
    const stateKey = quantStateKey(ckpt, weightName);
    if (!stateKey)
        throw new QloraError(
            `tensor "${weightName}" has no "${weightName}.${QUANT_STATE_KEY_PREFIX}nf4" (or fp4) ` +
                "sibling, so it is not a bitsandbytes 4-bit weight",
            {file}
        );
    const meta = parseQuantStateJson(await ckpt.readBytes(stateKey), stateKey, file);
    const keyType = stateKey.slice(stateKey.lastIndexOf("__") + 2);
    if (keyType !== meta.quant_type)
        throw new QloraError(`tensor "${stateKey}" says quant_type "${meta.quant_type}" but its key says "${keyType}"`, {file});
    if (!ckpt.has(weightName))
        throw new QloraError(`tensor "${weightName}" is missing but its quant state "${stateKey}" exists`, {file});
    // the packed bytes, whatever dtype quant_storage gave them (uint8 normally)
    const packed = await ckpt.readBytes(weightName);
    const nested = meta.nested_offset !== undefined;
    const quantMap = (await readAux(ckpt, weightName, "quant_map", "F32", file)) as Float32Array;
    let state: QuantState4bit;
    if (nested) {
        state = {
            packed,
            absmax: null,
            absmaxQ: (await readAux(ckpt, weightName, "absmax", "U8", file)) as Uint8Array,
            nestedAbsmax: (await readAux(ckpt, weightName, "nested_absmax", "F32", file)) as Float32Array,
            offset: Math.fround(meta.nested_offset!),
            nestedQuantMap: (await readAux(ckpt, weightName, "nested_quant_map", "F32", file)) as Float32Array,
            quantMap,
            shape: meta.shape,
            blocksize: meta.blocksize,
            nestedBlocksize: meta.nested_blocksize!,
            quantType: meta.quant_type,
            dtype: meta.dtype
        };
    } else {
        state = {
            packed,
            absmax: (await readAux(ckpt, weightName, "absmax", "F32", file)) as Float32Array,
            absmaxQ: null,
            nestedAbsmax: null,
            offset: 0,
            nestedQuantMap: null,
            quantMap,
            shape: meta.shape,
            blocksize: meta.blocksize,
            nestedBlocksize: 256,
            quantType: meta.quant_type,
            dtype: meta.dtype
        };
    }
    try {
        validateQuantState(state, `4-bit weight "${weightName}"`);
    } catch (err) {
        throw new QloraError((err as Error).message, {file, cause: err});
    }
    return state;
}

export interface Bnb4bitCheckpoint {
    /** the folder */
    dir: string;
    /** config.json as parsed JSON */
    config: Record<string, unknown>;
    quantization: BitsAndBytesConfig;
    ckpt: SafetensorsCheckpoint;
    /** one state per pre-quantized weight, keyed by the weight's name ("model.layers.0.mlp.up_proj.weight") */
    states: Map<string, QuantState4bit>;
    /** every other tensor (norms, embeddings, biases, unquantized layers): read them through ckpt */
    denseNames: string[];
}

/**
 * Opens a `*-bnb-4bit` folder: config.json's quantization_config plus the quant state of every quantized
 * weight. A U8 `*.weight` without its quant state is an error that names the tensor. Close `ckpt` when done.
 */
export async function loadBnb4bitCheckpoint(dir: string): Promise<Bnb4bitCheckpoint> {
    const configFile = path.join(dir, "config.json");
    const text = await readTextFile(configFile, {what: "config.json"});
    let config: Record<string, unknown>;
    try {
        config = JSON.parse(text) as Record<string, unknown>;
    } catch (err) {
        throw new QloraError(`invalid JSON: ${(err as Error).message}`, {file: configFile, cause: err});
    }
    if (config === null || typeof config !== "object" || Array.isArray(config))
        throw new QloraError("expected a JSON object of model settings", {file: configFile});
    if (config.quantization_config === undefined)
        throw new QloraError(
            "config.json has no quantization_config: not a pre-quantized bitsandbytes checkpoint " +
                "(load it as a normal model and quantize it with load_in_4bit)",
            {file: configFile}
        );
    const quantization = parseQuantizationConfig(config.quantization_config, configFile);
    const ckpt = await SafetensorsCheckpoint.open(dir);
    try {
        const quantized = new Set(quantizedWeightNames(ckpt));
        const states = new Map<string, QuantState4bit>();
        for (const name of quantized) states.set(name, await readQuantState(ckpt, name));
        const aux = new Set<string>();
        for (const name of quantized) {
            for (const suffix of VALID_QS_KEYS) aux.add(`${name}.${suffix}`);
            aux.add(`${name}.${QUANT_STATE_KEY_PREFIX}nf4`).add(`${name}.${QUANT_STATE_KEY_PREFIX}fp4`);
        }
        const denseNames: string[] = [];
        for (const name of ckpt.names()) {
            if (quantized.has(name) || aux.has(name)) continue;
            if (name.endsWith(".weight") && ckpt.info(name).dtype === "U8")
                throw new QloraError(
                    `tensor "${name}" is U8 (packed 4-bit) but "${name}.${QUANT_STATE_KEY_PREFIX}` +
                        `${quantization.bnb_4bit_quant_type}" is missing, so it cannot be dequantized ` +
                        "(incomplete download?)",
                    {file: ckpt.fileFor(name).path}
                );
            denseNames.push(name);
        }
        return {dir, config, quantization, ckpt, states, denseNames};
    } catch (err) {
        await ckpt.close();
        throw err;
    }
}

/** Python's repr() of a float (what json.dumps writes): shortest round-trip digits, Python's notation */
export function pythonFloatRepr(x: number): string {
    if (Number.isNaN(x)) return "NaN";
    if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
    if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
    const [mantissa, expText] = x.toExponential().split("e");
    const exp = Number(expText);
    const sign = mantissa.startsWith("-") ? "-" : "";
    const digits = mantissa.replace("-", "").replace(".", "");
    if (exp < -4 || exp >= 16) {
        const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
        return `${sign}${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
    }
    if (exp < 0) return `${sign}0.${"0".repeat(-exp - 1)}${digits}`;
    if (digits.length <= exp + 1) return `${sign}${digits}${"0".repeat(exp + 1 - digits.length)}.0`;
    return `${sign}${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
}

/** the quant state JSON exactly as bnb's QuantState.as_dict + json.dumps writes it */
export function quantStateJson(state: QuantState4bit): string {
    let text =
        `{"quant_type": "${state.quantType}", "blocksize": ${state.blocksize}, "dtype": "${state.dtype}", ` +
        `"shape": [${state.shape.join(", ")}]`;
    if (state.absmaxQ)
        text +=
            `, "nested_blocksize": ${state.nestedBlocksize}, "nested_dtype": "float32", ` +
            `"nested_offset": ${pythonFloatRepr(state.offset)}`;
    return text + "}";
}

/** the tensors of one quantized weight under `weightName` (SPEC-quant §7.1) */
export function quantStateTensors(weightName: string, state: QuantState4bit): TensorToWrite[] {
    validateQuantState(state, `4-bit weight "${weightName}"`);
    const tensors: TensorToWrite[] = [{name: weightName, dtype: "U8", shape: [state.packed.length, 1], data: state.packed}];
    if (state.absmaxQ) {
        tensors.push({name: `${weightName}.absmax`, dtype: "U8", shape: [state.absmaxQ.length], data: state.absmaxQ});
        tensors.push({
            name: `${weightName}.nested_absmax`,
            dtype: "F32",
            shape: [state.nestedAbsmax!.length],
            data: state.nestedAbsmax!
        });
        tensors.push({name: `${weightName}.nested_quant_map`, dtype: "F32", shape: [256], data: state.nestedQuantMap!});
    } else {
        tensors.push({name: `${weightName}.absmax`, dtype: "F32", shape: [state.absmax!.length], data: state.absmax!});
    }
    tensors.push({name: `${weightName}.quant_map`, dtype: "F32", shape: [16], data: state.quantMap});
    const json = Buffer.from(quantStateJson(state), "utf8");
    tensors.push({
        name: `${weightName}.${QUANT_STATE_KEY_PREFIX}${state.quantType}`,
        dtype: "U8",
        shape: [json.length],
        data: new Uint8Array(json.buffer, json.byteOffset, json.byteLength)
    });
    return tensors;
}

// safetensors' Rust writer lays tensors out by dtype (in the reverse order of its Dtype enum), then by name
const DTYPE_ORDER: readonly SafetensorsDtype[] = ["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"];

/** the order the Python safetensors writer stores tensors in (largest dtype first, then by name) */
export function safetensorsWriteOrder(tensors: readonly TensorToWrite[]): TensorToWrite[] {
    return [...tensors].sort(
        (a, b) => DTYPE_ORDER.indexOf(b.dtype) - DTYPE_ORDER.indexOf(a.dtype) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)
    );
}

export interface WriteBnb4bitOptions {
    /** the model's config.json object; quantization_config is replaced */
    config: Record<string, unknown>;
    quantization: BitsAndBytesConfig;
    /** weight name ("model.layers.0.mlp.up_proj.weight") -> its 4-bit state */
    states: ReadonlyMap<string, QuantState4bit>;
    /** every tensor that stays dense (embeddings, norms, biases, skipped modules) */
    dense: readonly TensorToWrite[];
    /** default 5 GB, as save_pretrained */
    maxShardBytes?: number;
}

/**
 * Writes a `*-bnb-4bit` checkpoint as transformers' save_pretrained does: config.json with quantization_config
 * and model.safetensors (sharded above maxShardBytes) with `__metadata__` {"format": "pt"}, tensors in the
 * Python writer's order, so a single-file checkpoint is byte-identical to one bnb/transformers saved. The folder
 * is written atomically (io/atomic.ts): an existing `dir` must be empty or an earlier checkpoint of this writer.
 */
export async function writeBnb4bitCheckpoint(dir: string, options: WriteBnb4bitOptions): Promise<ShardedWriteResult> {
    const tensors: TensorToWrite[] = [...options.dense];
    for (const [name, state] of options.states) {
        if (state.quantType !== options.quantization.bnb_4bit_quant_type)
            throw new QloraError(
                `4-bit weight "${name}" is ${state.quantType} but the quantization config says ` +
                    `bnb_4bit_quant_type "${options.quantization.bnb_4bit_quant_type}"`,
                {file: dir}
            );
        if ((state.absmaxQ !== null) !== options.quantization.bnb_4bit_use_double_quant)
            throw new QloraError(
                `4-bit weight "${name}" ${state.absmaxQ ? "has" : "lacks"} double-quantized scales but ` +
                    `the quantization config says bnb_4bit_use_double_quant ${options.quantization.bnb_4bit_use_double_quant}`,
                {file: dir}
            );
        tensors.push(...quantStateTensors(name, state));
    }
    const config: Record<string, unknown> = {
        ...options.config,
        quantization_config: quantizationConfigToJson(options.quantization)
    };
    const sorted: Record<string, unknown> = {};
    for (const key of Object.keys(config).sort()) sorted[key] = config[key];
    let written: ShardedWriteResult | undefined;
    // a fresh folder swapped into place: never a mix with (or the deletion of) files already in `dir`
    await writeDirAtomic(
        dir,
        async (tmp) => {
            written = await writeShardedSafetensors(
                tmp,
                "model",
                safetensorsWriteOrder(tensors),
                options.maxShardBytes ?? 5_000_000_000,
                {format: "pt"}
            );
            await writeFileAtomic(path.join(tmp, "config.json"), JSON.stringify(sorted, null, 2) + "\n");
        },
        {replace: "owned", kind: "bnb-4bit-model"}
    );
    const inDir = (file: string) => path.join(dir, path.basename(file));
    return {
        files: written!.files.map(inDir),
        indexFile: written!.indexFile && inDir(written!.indexFile),
        totalSize: written!.totalSize
    };
}
