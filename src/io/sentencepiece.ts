// sentencepiece.ts: reads a SentencePiece model file (tokenizer.model: a serialized sentencepiece.ModelProto,
// sentencepiece_model.proto) with a hand-written protobuf wire-format decoder: the pieces (text, score, type) and
// the trainer settings the GGUF export checks (model_type, byte_fallback). Fields it does not need are skipped; anything
// that is not well-formed protobuf of this shape is a one-line QloraError naming the file.
import {QloraError} from "../errors.js";
import {readRegularFile} from "./files.js";

/** ModelProto.SentencePiece.Type */
export const PieceType = {NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6} as const;

/** TrainerSpec.ModelType */
export const SpmModelType = {UNIGRAM: 1, BPE: 2, WORD: 3, CHAR: 4} as const;

export interface SentencePiece {
    piece: string;
    score: number;
    /** a PieceType value (NORMAL when the field is absent, as protobuf's default) */
    type: number;
}

export interface SentencePieceModel {
    pieces: SentencePiece[];
    trainerSpec: {
        /** an SpmModelType value (UNIGRAM when absent) */
        modelType: number;
        byteFallback: boolean;
    };
}

/** the largest tokenizer.model read (Gemma 3's, 262144 pieces, is 4.7 MB) */
export const MAX_SENTENCEPIECE_BYTES = 64 << 20;

const WIRE_VARINT = 0,
    WIRE_I64 = 1,
    WIRE_LEN = 2,
    WIRE_I32 = 5;

class Malformed extends Error {}

/** a protobuf message's bytes: fields read in order, each checked against the bytes left */
class Reader {
    pos: number;
    constructor(
        readonly buf: Uint8Array,
        start: number,
        readonly end: number
    ) {
        this.pos = start;
    }

    done(): boolean {
        return this.pos >= this.end;
    }

    /**
     * a varint as a number: exact up to 2^53, which every tag and length is; larger values (only a negative enum
     * or a malformed length) stay large enough to be refused
     */
    varint(): number {
        let result = 0,
            scale = 1;
        for (let i = 0; i < 10; i++) {
            if (this.pos >= this.end) throw new Malformed(`a number runs past the end of its message at byte ${this.pos}`);
            const b = this.buf[this.pos++];
            result += (b & 0x7f) * scale;
            if ((b & 0x80) === 0) return result;
            scale *= 128;
        }
        throw new Malformed(`a number at byte ${this.pos - 10} is longer than 10 bytes`);
    }

    /** a varint that must fit a JavaScript number (tags, lengths) */
    smallVarint(): number {
        const v = this.varint();
        if (v > Number.MAX_SAFE_INTEGER) throw new Malformed(`a length or tag at byte ${this.pos} is out of range`);
        return v;
    }

    /** the next field's number and wire type, or null at the end */
    tag(): {field: number; wire: number; at: number} | null {
        if (this.done()) return null;
        const at = this.pos;
        const key = this.smallVarint();
        const field = Math.floor(key / 8),
            wire = key % 8;
        if (field === 0) throw new Malformed(`field number 0 at byte ${at}`);
        return {field, wire, at};
    }

    /** a length-delimited field's [start, end) */
    span(): [number, number] {
        const n = this.smallVarint();
        if (n > this.end - this.pos)
            throw new Malformed(`a field of ${n} bytes at byte ${this.pos} runs past the end of its message`);
        const start = this.pos;
        this.pos += n;
        return [start, this.pos];
    }

    float32(): number {
        if (this.end - this.pos < 4) throw new Malformed(`a float at byte ${this.pos} runs past the end of its message`);
        const v = new DataView(this.buf.buffer, this.buf.byteOffset + this.pos, 4).getFloat32(0, true);
        this.pos += 4;
        return v;
    }

    skip(wire: number, at: number): void {
        switch (wire) {
            case WIRE_VARINT:
                this.varint();
                return;
            case WIRE_I64:
            case WIRE_I32: {
                const n = wire === WIRE_I64 ? 8 : 4;
                if (this.end - this.pos < n) throw new Malformed(`a field at byte ${at} runs past the end of its message`);
                this.pos += n;
                return;
            }
            case WIRE_LEN:
                this.span();
                return;
            default:
                // 3 and 4 are proto2 groups, which sentencepiece_model.proto has none of; 6 and 7 do not exist
                throw new Malformed(`wire type ${wire} at byte ${at} is not one SentencePiece models use`);
        }
    }
}

const utf8 = new TextDecoder("utf-8", {fatal: true});

function expectWire(got: number, want: number, what: string, at: number): void {
    if (got !== want) throw new Malformed(`${what} at byte ${at} has wire type ${got}, expected ${want}`);
}

function readString(r: Reader, what: string, at: number): string {
    const [s, e] = r.span();
    try {
        return utf8.decode(r.buf.subarray(s, e));
    } catch {
        throw new Malformed(`${what} at byte ${at} is not UTF-8 text`);
    }
}

function readBool(r: Reader): boolean {
    return r.varint() !== 0;
}

/** an enum value; protobuf writes negative ones as 10-byte two's complement, which no valid enum value here is */
function readEnum(r: Reader, what: string, at: number): number {
    const v = r.varint();
    if (v > 0x7fffffff) throw new Malformed(`${what} at byte ${at} is ${v}, not an enum value`);
    return v;
}

function readPiece(r: Reader, index: number): SentencePiece {
    let piece: string | null = null,
        score = 0,
        type: number = PieceType.NORMAL;
    for (let t = r.tag(); t; t = r.tag()) {
        if (t.field === 1) {
            expectWire(t.wire, WIRE_LEN, `pieces[${index}].piece`, t.at);
            piece = readString(r, `pieces[${index}].piece`, t.at);
        } else if (t.field === 2) {
            expectWire(t.wire, WIRE_I32, `pieces[${index}].score`, t.at);
            score = r.float32();
        } else if (t.field === 3) {
            expectWire(t.wire, WIRE_VARINT, `pieces[${index}].type`, t.at);
            type = readEnum(r, `pieces[${index}].type`, t.at);
        } else r.skip(t.wire, t.at);
    }
    if (piece === null) throw new Malformed(`pieces[${index}] has no piece text`);
    if (!Object.values(PieceType).includes(type as never))
        throw new Malformed(`pieces[${index}] (${JSON.stringify(piece)}) has type ${type}, not a SentencePiece type (1 to 6)`);
    if (!Number.isFinite(score)) throw new Malformed(`pieces[${index}] (${JSON.stringify(piece)}) has score ${score}`);
    return {piece, score, type};
}

/** parses the bytes of a tokenizer.model; `file` names it in errors */
export function parseSentencePieceModel(buf: Uint8Array, file: string): SentencePieceModel {
    const model: SentencePieceModel = {
        pieces: [],
        // the proto's defaults
        trainerSpec: {modelType: SpmModelType.UNIGRAM, byteFallback: false}
    };
    try {
        const r = new Reader(buf, 0, buf.length);
        for (let t = r.tag(); t; t = r.tag()) {
            if (t.field >= 1 && t.field <= 5) expectWire(t.wire, WIRE_LEN, `ModelProto field ${t.field}`, t.at);
            if (t.field === 1) {
                const [s, e] = r.span();
                model.pieces.push(readPiece(new Reader(buf, s, e), model.pieces.length));
            } else if (t.field === 2) {
                const [s, e] = r.span();
                const spec = new Reader(buf, s, e);
                for (let f = spec.tag(); f; f = spec.tag()) {
                    if (f.field === 3) {
                        expectWire(f.wire, WIRE_VARINT, "trainer_spec.model_type", f.at);
                        model.trainerSpec.modelType = readEnum(spec, "trainer_spec.model_type", f.at);
                    } else if (f.field === 35) {
                        expectWire(f.wire, WIRE_VARINT, "trainer_spec.byte_fallback", f.at);
                        model.trainerSpec.byteFallback = readBool(spec);
                    } else spec.skip(f.wire, f.at);
                }
            } else r.skip(t.wire, t.at);
        }
    } catch (err) {
        if (!(err instanceof Malformed)) throw err;
        throw new QloraError(`is not a readable SentencePiece model (${err.message}); is it the model's tokenizer.model?`, {
            file
        });
    }
    if (model.pieces.length === 0)
        throw new QloraError("is not a SentencePiece model: it has no pieces; is it the model's tokenizer.model?", {file});
    return model;
}

/** reads a tokenizer.model file */
export async function readSentencePieceModel(file: string): Promise<SentencePieceModel> {
    const buf = await readRegularFile(file, {what: "SentencePiece model", maxBytes: MAX_SENTENCEPIECE_BYTES});
    return parseSentencePieceModel(buf, file);
}
