// collate.ts: rows to one right-padded micro-batch (SPEC-training §6). Packed rows get position ids that restart
// at every sequence and segment ids that keep attention inside a sequence.

import {IGNORE_INDEX} from "./tokenize.js";
import type {TokenizedRow} from "./packing.js";

export interface Batch {
    /** rows */
    B: number;
    /** tokens per row (the longest row, rounded up to pad_to_multiple_of) */
    T: number;
    /** [B*T] row-major; padding is the pad id */
    inputIds: Int32Array;
    /** [B*T] NOT shifted: the model's loss uses labels[t+1] as the target of position t; -100 is ignored */
    labels: Int32Array;
    /** [B*T] 1 for real tokens, 0 for padding */
    attentionMask: Uint8Array;
    /** [B*T] position of each token in its sequence (restarting at 0 in every packed sequence); padding continues counting */
    positionIds: Int32Array;
    /**
     * [B*T] packed batches: index of the packed sequence each token belongs to (0, 1, … within a row; -1 for
     * padding); attention must stay within a segment (and be causal). null when no row is packed.
     */
    segIds: Int32Array | null;
    /** label positions that are targets after the shift: Σ over rows of count(labels[t] != -100, t ≥ 1) */
    numTargets: number;
}

export interface CollateOptions {
    /** the pad id for input ids: the tokenizer's pad token, else its EOS (see padTokenIdOf) */
    padTokenId: number;
    /** round T up to a multiple of this */
    padToMultipleOf?: number | null;
    /** pad every batch to at least this many tokens (fixed shapes) */
    padToLength?: number | null;
}

/** the id to pad input ids with: the tokenizer's pad token, else its EOS, else 0 */
export function padTokenIdOf(tokenizer: {padTokenId: number | null; eosTokenId: number | null}): number {
    return tokenizer.padTokenId ?? tokenizer.eosTokenId ?? 0;
}

/** Right-pads rows into one batch: input ids with the pad id, labels with -100, attention mask 0. */
export function collate(rows: readonly TokenizedRow[], options: CollateOptions): Batch {
    const B = rows.length;
    if (B === 0) throw new RangeError("collate needs at least one row");
    // a loop, not Math.max(...lengths): spreading a large array overflows the call stack
    let T = Math.max(1, options.padToLength ?? 0);
    for (const row of rows) T = Math.max(T, row.inputIds.length);
    const multiple = options.padToMultipleOf ?? 0;
    if (multiple > 1) T = Math.ceil(T / multiple) * multiple;
    const packed = rows.some((r) => r.seqLengths !== undefined);
    const inputIds = new Int32Array(B * T).fill(options.padTokenId);
    const labels = new Int32Array(B * T).fill(IGNORE_INDEX);
    const attentionMask = new Uint8Array(B * T);
    const positionIds = new Int32Array(B * T);
    const segIds = packed ? new Int32Array(B * T).fill(-1) : null;
    let numTargets = 0;
    for (let b = 0; b < B; b++) {
        const row = rows[b];
        const n = row.inputIds.length;
        const base = b * T;
        inputIds.set(row.inputIds, base);
        labels.set(row.labels, base);
        attentionMask.fill(1, base, base + n);
        for (let t = 1; t < n; t++) if (row.labels[t] !== IGNORE_INDEX) numTargets++;
        const lengths = row.seqLengths ?? [n];
        let t = 0;
        lengths.forEach((length, segment) => {
            for (let p = 0; p < length; p++, t++) {
                positionIds[base + t] = p;
                if (segIds) segIds[base + t] = segment;
            }
        });
        for (let p = 0; t < T; t++, p++) positionIds[base + t] = row.seqLengths ? p : t;
    }
    return {B, T, inputIds, labels, attentionMask, positionIds, segIds, numTargets};
}
