// prepare.ts: the preparation pipeline of SPEC-training §2 — records → format → tokens and labels → truncation →
// drop examples with nothing to train → optional shuffle → optional packing — and the dataset summary that
// `qlora inspect dataset` prints.

import {Rng} from "../backend/rng.js";
import {QloraError} from "../errors.js";
import {detectFormat, formatRecord, TemplateVariableCheck} from "./formats.js";
import type {DatasetFormat, FormatOptions, RecordWhere} from "./formats.js";
import {packSequences} from "./packing.js";
import type {PackingStrategy, TokenizedRow} from "./packing.js";
import {locateRecord, streamRecords} from "./readers.js";
import type {DataRecord, FileFormat, ReadOptions, ReadResult} from "./readers.js";
import {GrowableInt32Array, RowStore} from "./row-store.js";
import {countTargets, hasTrainableLabel, resolveEosToken, tokenizeExample, truncateExample} from "./tokenize.js";
import type {DataTokenizer, TokenizedExample, TruncationMode} from "./tokenize.js";

export const DEFAULT_MAX_SEQ_LENGTH = 1024;

/** The data options of a training config (SFTConfig names, snake_case). */
export interface DataOptions extends FormatOptions {
    /** tokens per example (and per packed row); default 1024; null: no truncation (not with packing) */
    max_seq_length?: number | null;
    /** TRL's newer name for max_seq_length; used when max_seq_length is not given */
    max_length?: number | null;
    /** "keep_start" (default): keep the first max_seq_length tokens; "keep_end": the last ones */
    truncation_mode?: TruncationMode;
    /** pack examples into rows of max_seq_length tokens (best-fit decreasing), attention kept per example */
    packing?: boolean;
    /** "bfd" (default): overflow of long examples discarded; "bfd_split": long examples split into pieces */
    packing_strategy?: PackingStrategy;
    /**
     * train only on completions of prompt/completion data (alpaca and templates included); null/undefined: on for
     * those formats. Ignored for text and chat data.
     */
    completion_only_loss?: boolean | null;
    /**
     * train only on assistant turns (with their end-of-turn token) of chat data (messages, ShareGPT);
     * null/undefined: ON for chat data — unlike TRL, whose default is off — because training on user turns
     * rarely helps and is what users of this project ask about; false trains on the whole conversation.
     * Ignored for other data (TRL raises instead; here the config's default `true` must not break alpaca data).
     */
    assistant_only_loss?: boolean | null;
    /** the EOS appended to text and completions; default the tokenizer's eos token */
    eos_token?: string | null;
    /** shuffle examples once before packing (TRL's shuffle_dataset, default false) */
    shuffle_dataset?: boolean;
    /** seed of shuffle_dataset (default 42) */
    seed?: number;
}

/** DataOptions with every default filled in (the format resolved from the data) */
export interface ResolvedDataOptions {
    format: DatasetFormat;
    maxSeqLength: number | null;
    truncationMode: TruncationMode;
    packing: boolean;
    packingStrategy: PackingStrategy;
    completionOnlyLoss: boolean;
    assistantOnlyLoss: boolean;
    eosToken: string | null;
    /** texts are clipped to this many characters before they are tokenized (null: never); see clipBudget */
    maxChars: number | null;
    shuffleDataset: boolean;
    seed: number;
}

export interface PrepareStats {
    /** records read */
    records: number;
    format: DatasetFormat;
    fileFormat: FileFormat | null;
    /** examples longer than max_seq_length (cut; with bfd_split: split) */
    truncated: number;
    /** examples dropped because no label is left to train (e.g. a prompt that fills max_seq_length) */
    dropped: number;
    /** examples kept */
    examples: number;
    /** training rows (= examples unless packed) */
    rows: number;
    /** tokens in the rows */
    tokens: number;
    /** label positions that are targets after the shift, over all rows */
    targets: number;
    /** prompt/completion examples whose full ids did not start with the prompt's ids (the mask rule still applied) */
    prefixMismatches: number;
    /** the token length of every record before truncation (dropped ones included), in record order */
    lengths: Int32Array;
}

export interface PreparedDataset {
    rows: TokenizedRow[];
    options: ResolvedDataOptions;
    stats: PrepareStats;
    /** things worth telling the user (dropped examples, prefix mismatches…) */
    warnings: string[];
}

export interface PrepareOptions {
    /** called now and then while tokenizing with the records done and their total (null while a file is streamed) */
    onProgress?: (done: number, total: number | null) => void;
}

/** Fills in the defaults for data in `format`, checking combinations that cannot work. */
export function resolveDataOptions(options: DataOptions, format: DatasetFormat, tokenizer: DataTokenizer): ResolvedDataOptions {
    const chat = format === "messages" || format === "sharegpt";
    const promptCompletion = format === "alpaca" || format === "prompt_completion" || format === "template";
    const maxSeqLength =
        options.max_seq_length !== undefined
            ? options.max_seq_length
            : options.max_length !== undefined
              ? options.max_length
              : DEFAULT_MAX_SEQ_LENGTH;
    if (maxSeqLength !== null && (!Number.isInteger(maxSeqLength) || maxSeqLength < 2)) {
        throw new QloraError(`max_seq_length must be an integer ≥ 2 (or null for no limit), got ${maxSeqLength}`);
    }
    const packing = options.packing ?? false;
    if (packing && maxSeqLength === null) throw new QloraError("packing needs max_seq_length (the length of a packed row)");
    const strategy = options.packing_strategy ?? "bfd";
    if (strategy !== "bfd" && strategy !== "bfd_split") {
        throw new QloraError(
            `packing_strategy "${strategy}" is not supported; use "bfd" or "bfd_split" ("wrapped" would let examples attend to each other)`
        );
    }
    const mode = options.truncation_mode ?? "keep_start";
    if (mode !== "keep_start" && mode !== "keep_end")
        throw new QloraError(`truncation_mode must be "keep_start" or "keep_end", got "${mode}"`);
    return {
        format,
        maxSeqLength,
        truncationMode: mode,
        packing,
        packingStrategy: strategy,
        completionOnlyLoss: promptCompletion ? (options.completion_only_loss ?? true) : false,
        assistantOnlyLoss: chat ? (options.assistant_only_loss ?? true) : false,
        eosToken: resolveEosToken(tokenizer, options.eos_token),
        maxChars: mode === "keep_start" && !(packing && strategy === "bfd_split") ? clipBudget(maxSeqLength, tokenizer) : null,
        shuffleDataset: options.shuffle_dataset ?? false,
        seed: options.seed ?? 42
    };
}

/**
 * Characters past which a text cannot reach the first max_seq_length tokens: a token spans at most the longest
 * vocabulary entry's characters, so a text longer than max_seq_length x that has more tokens than are kept.
 * Clipping there first makes a multi-megabyte record cost what its kept tokens cost (encoding is linear, about
 * 2 us a character). Twice the bound, so that only a single word longer than half the budget could tokenize
 * differently near the cut, and such a word lies far beyond the kept tokens. Only where the start is kept and
 * nothing past max_seq_length is used (keep_start, no bfd_split).
 */
export function clipBudget(maxSeqLength: number | null, tokenizer: DataTokenizer): number | null {
    const longest = tokenizer.longestTokenChars;
    if (maxSeqLength === null || !longest) return null;
    return 2 * maxSeqLength * longest + 64;
}

/**
 * The preparation pipeline, one record at a time: records go in as they are read (add) and only their tokens are
 * kept, in a RowStore; shuffling and packing run at the end (finish). Every failure is a QloraError that names the
 * record (and its file and line).
 */
class DatasetBuilder {
    private format: DatasetFormat | null = null;
    private resolved: ResolvedDataOptions | null = null;
    private fileFormat: FileFormat | null = null;
    private readonly store = new RowStore();
    private readonly kept: TokenizedRow[] = [];
    private readonly lengths = new GrowableInt32Array();
    private truncated = 0;
    private dropped = 0;
    private prefixMismatches = 0;
    private templateCheck: TemplateVariableCheck | null = null;

    constructor(
        private readonly tokenizer: DataTokenizer,
        private readonly options: DataOptions,
        private readonly prepareOptions: PrepareOptions,
        private readonly total: number | null
    ) {}

    get records(): number {
        return this.lengths.length;
    }

    add(record: DataRecord, where: RecordWhere, fileFormat: FileFormat | null): void {
        if (this.format === null) {
            this.format = detectFormat(record, this.options, where);
            this.resolved = resolveDataOptions(this.options, this.format, this.tokenizer);
            this.fileFormat = fileFormat;
            this.templateCheck = TemplateVariableCheck.of(this.format, this.options);
        }
        this.templateCheck?.see(record);
        const resolved = this.resolved!;
        let tokenized: TokenizedExample;
        try {
            tokenized = tokenizeExample(formatRecord(record, this.format, this.options, where), this.tokenizer, resolved);
        } catch (err) {
            throw recordError(err, where);
        }
        if (tokenized.prefixMismatch) this.prefixMismatches++;
        this.lengths.push(tokenized.inputIds.length);
        const max = resolved.maxSeqLength;
        if (max !== null && tokenized.inputIds.length > max) this.truncated++;
        if (resolved.packing && resolved.packingStrategy === "bfd_split") {
            // pieces are packed as independent sequences: keep the example when any piece has something to train
            if (!piecesTrainable(tokenized.labels, max!)) this.dropped++;
            else this.kept.push(this.store.add(tokenized.inputIds, tokenized.labels));
        } else {
            const cut = truncateExample(tokenized, max, resolved.truncationMode).example;
            if (!hasTrainableLabel(cut.labels)) this.dropped++;
            else this.kept.push(this.store.add(cut.inputIds, cut.labels));
        }
        const done = this.records;
        if (this.prepareOptions.onProgress && (done % 256 === 0 || done === this.total))
            this.prepareOptions.onProgress(done, this.total);
    }

    finish(): PreparedDataset {
        const records = this.records;
        if (records === 0 || this.resolved === null || this.format === null)
            throw new QloraError("the dataset is empty (no records)");
        // a Jinja template's misspelt field renders as empty in every record: refused before anything else is said
        this.templateCheck?.finish();
        const resolved = this.resolved;
        const {truncated, dropped, prefixMismatches, kept} = this;
        const warnings: string[] = [];
        if (dropped > 0) {
            warnings.push(
                `${dropped} of ${records} examples have no label left to train ` +
                    (resolved.maxSeqLength !== null
                        ? `(empty responses, or prompts that fill max_seq_length ${resolved.maxSeqLength}) `
                        : "(empty responses) ") +
                    "and were dropped"
            );
        }
        if (truncated > 0)
            warnings.push(
                `${truncated} of ${records} examples are longer than max_seq_length ${resolved.maxSeqLength} and were ${resolved.packing && resolved.packingStrategy === "bfd_split" ? "split" : "truncated"}`
            );
        if (prefixMismatches > 0) {
            warnings.push(
                `${prefixMismatches} prompt/completion examples tokenize differently at the prompt/completion boundary ` +
                    "(the prompt's last token merges with the completion's first); the prompt's token count was masked anyway, as TRL does"
            );
        }
        if (kept.length === 0) {
            throw new QloraError(
                `no example of the ${records} has a label to train (all dropped); check that records have responses` +
                    (resolved.maxSeqLength !== null ? ` and that prompts fit in max_seq_length ${resolved.maxSeqLength}` : "")
            );
        }
        if (resolved.shuffleDataset) new Rng(resolved.seed).shuffle(kept);

        const rows: TokenizedRow[] = resolved.packing
            ? packSequences(kept, resolved.maxSeqLength!, resolved.packingStrategy)
            : kept;
        let tokens = 0;
        let targets = 0;
        for (const row of rows) {
            tokens += row.inputIds.length;
            targets += countTargets(row.labels);
        }
        return {
            rows,
            options: resolved,
            stats: {
                records,
                format: this.format,
                fileFormat: this.fileFormat,
                truncated,
                dropped,
                examples: kept.length,
                rows: rows.length,
                tokens,
                targets,
                prefixMismatches,
                lengths: this.lengths.toArray()
            },
            warnings
        };
    }
}

/** a failure while formatting or tokenizing a record, as a QloraError that names the record */
function recordError(err: unknown, where: RecordWhere): QloraError {
    // formatRecord's own errors name the record already
    if (err instanceof QloraError && err.file === where.file && err.message.includes(`record ${where.index}: `)) return err;
    let message = err instanceof Error ? err.message : String(err);
    // e.g. a value nested so deeply that rendering it overflows the stack
    if (err instanceof RangeError) message = `cannot be formatted (${message}); the record nests too deeply or is too large`;
    return new QloraError(`record ${where.index}: ${message}`, {file: where.file, cause: err});
}

/** Runs the preparation pipeline over records already read (a ReadResult keeps file/line for errors). */
export function prepareRecords(
    input: ReadResult | readonly DataRecord[],
    tokenizer: DataTokenizer,
    options: DataOptions = {},
    prepareOptions: PrepareOptions = {}
): PreparedDataset {
    const read: ReadResult | null = Array.isArray(input) ? null : (input as ReadResult);
    const records: readonly DataRecord[] = read ? read.records : (input as readonly DataRecord[]);
    if (records.length === 0) throw new QloraError("the dataset is empty (no records)");
    const whereOf = (index: number): RecordWhere => {
        const location = read ? locateRecord(read, index) : null;
        if (!location) return {index};
        return {
            file: location.line !== undefined ? `${location.file}:${location.line}` : location.file,
            index: location.indexInFile
        };
    };
    const builder = new DatasetBuilder(tokenizer, options, prepareOptions, records.length);
    for (let i = 0; i < records.length; i++) builder.add(records[i], whereOf(i), read ? read.format : null);
    return builder.finish();
}

function piecesTrainable(labels: number[], max: number): boolean {
    for (let start = 0; start < labels.length; start += max) {
        // the first label of each piece is masked when packed
        for (let i = start + 1; i < Math.min(labels.length, start + max); i++) if (labels[i] !== -100) return true;
    }
    return false;
}

/**
 * Reads a dataset file or folder and prepares it. Records are formatted and tokenized as they are read, so only
 * the token rows stay in memory (a JSON array is parsed whole first, since JSON gives no record before the end).
 */
export async function loadDataset(
    pathOrDir: string,
    tokenizer: DataTokenizer,
    options: DataOptions & ReadOptions = {},
    prepareOptions: PrepareOptions = {}
): Promise<PreparedDataset> {
    const builder = new DatasetBuilder(tokenizer, options, prepareOptions, null);
    let lastTurn = Date.now();
    for await (const batch of streamRecords(pathOrDir, options)) {
        const {records, lines, file, format, start} = batch;
        for (let i = 0; i < records.length; i++) {
            builder.add(records[i], {file: lines ? `${file}:${lines[i]}` : file, index: start + i}, format);
        }
        // batches of an array already in memory arrive without I/O: give the event loop a turn now and then, so
        // signal handlers (Ctrl+C) run during minutes of tokenization
        if (Date.now() - lastTurn > 100) {
            await new Promise((resolve) => setImmediate(resolve));
            lastTurn = Date.now();
        }
    }
    return builder.finish();
}

export interface LengthBin {
    /** token lengths in [from, to) */
    from: number;
    to: number;
    count: number;
}

export interface DatasetDescription {
    /** records read */
    records: number;
    /** training rows after dropping and packing */
    rows: number;
    format: DatasetFormat;
    fileFormat: FileFormat | null;
    packed: boolean;
    maxSeqLength: number | null;
    truncated: number;
    dropped: number;
    tokens: number;
    targets: number;
    /** statistics of the token lengths of the records before truncation */
    lengths: {min: number; max: number; mean: number; median: number; p95: number};
    /** histogram of those lengths over power-of-two bins */
    histogram: LengthBin[];
    warnings: string[];
}

/** Summarises a prepared dataset: counts, the detected format and a token-length histogram. */
export function describeDataset(prepared: PreparedDataset): DatasetDescription {
    const {stats, options} = prepared;
    const sorted = stats.lengths.slice().sort(); // a typed array sorts numerically
    const at = (q: number): number => sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1) + 0.5))];
    return {
        records: stats.records,
        rows: stats.rows,
        format: stats.format,
        fileFormat: stats.fileFormat,
        packed: options.packing,
        maxSeqLength: options.maxSeqLength,
        truncated: stats.truncated,
        dropped: stats.dropped,
        tokens: stats.tokens,
        targets: stats.targets,
        lengths: {
            min: sorted[0],
            max: sorted[sorted.length - 1],
            mean: sum(sorted) / sorted.length,
            median: at(0.5),
            p95: at(0.95)
        },
        histogram: lengthHistogram(stats.lengths),
        warnings: prepared.warnings
    };
}

/** Counts lengths in power-of-two bins [0,16), [16,32), [32,64), … up to the longest. */
export function lengthHistogram(lengths: ArrayLike<number>): LengthBin[] {
    let max = 0;
    for (let i = 0; i < lengths.length; i++) max = Math.max(max, lengths[i]);
    const bins: LengthBin[] = [{from: 0, to: 16, count: 0}];
    while (bins[bins.length - 1].to <= max) {
        const from = bins[bins.length - 1].to;
        bins.push({from, to: from * 2, count: 0});
    }
    for (let i = 0; i < lengths.length; i++) {
        const v = lengths[i];
        const bin = v < 16 ? 0 : Math.floor(Math.log2(v)) - 3;
        bins[Math.min(bin, bins.length - 1)].count++;
    }
    return bins;
}

/** The description as text lines for a terminal. */
export function formatDatasetDescription(d: DatasetDescription): string[] {
    const lines = [
        `format      ${d.format}${d.fileFormat ? ` (${d.fileFormat})` : ""}`,
        `records     ${d.records}`,
        `rows        ${d.rows}${d.packed ? ` (packed into ${d.maxSeqLength}-token rows)` : ""}`,
        `tokens      ${d.tokens} (${d.targets} trained)`,
        `length      min ${d.lengths.min}, median ${d.lengths.median}, mean ${d.lengths.mean.toFixed(1)}, p95 ${d.lengths.p95}, max ${d.lengths.max}`,
        `truncated   ${d.truncated}${d.maxSeqLength !== null ? ` (longer than ${d.maxSeqLength})` : ""}`,
        `dropped     ${d.dropped} (nothing to train)`
    ];
    let widest = 1;
    for (const bin of d.histogram) widest = Math.max(widest, bin.count);
    for (const bin of d.histogram) {
        const bar = "#".repeat(Math.round((bin.count / widest) * 40));
        lines.push(`  ${String(bin.from).padStart(6)}–${String(bin.to - 1).padEnd(6)} ${String(bin.count).padStart(7)} ${bar}`);
    }
    return lines;
}

function sum(values: ArrayLike<number>): number {
    let total = 0;
    for (let i = 0; i < values.length; i++) total += values[i];
    return total;
}
