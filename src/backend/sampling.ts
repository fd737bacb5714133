// sampling.ts: choosing the next token from a row of logits, as transformers' logits processors do it (repetition
// penalty, then temperature, top-k, top-p), in a form a GPU computes with the same result: the probabilities are
// integers (exp(s - max) in f32, times 2^31, floored), so the top-p cut and the draw are exact integer sums that
// do not depend on the order they are added in. This is the CPU backend's pickTokens and the reference of the
// CUDA kernel (native/cuda/sampling.cu), which computes the same integers; the two differ only where a float exp
// rounds differently and the draw falls on that one unit.

/** how one row picks its token */
export interface TokenPick {
    /** 0: greedy (the first index of the largest logit); otherwise the logits are divided by it and sampled */
    temperature: number;
    /** keep the k largest logits, ties with the k-th kept (0: off) */
    topK: number;
    /** keep the most probable tokens whose mass reaches top_p, ties with the last kept (1: off) */
    topP: number;
    /** the draw: a uniform 32-bit integer (u / 2^32 in [0, 1)) */
    u32: number;
    /** transformers' repetition_penalty (1: off): a seen token's logit is divided by it, or multiplied when < 0 */
    repetitionPenalty: number;
    /** the distinct tokens the penalty applies to (the prompt and what was generated) */
    seen: Int32Array | null;
}

export const GREEDY_PICK: TokenPick = {temperature: 0, topK: 0, topP: 1, u32: 0, repetitionPenalty: 1, seen: null};

/** the weight scale: exp(s - max) <= 1, so a weight fits 31 bits and a row's total stays far below 2^53 */
export const WEIGHT_SCALE = 2 ** 31;

/** the penalty of transformers' RepetitionPenaltyLogitsProcessor, in f32, applied in place to a row */
export function applyRepetitionPenalty(row: Float32Array, pick: TokenPick): void {
    const p = Math.fround(pick.repetitionPenalty);
    if (p === 1 || !pick.seen) return;
    for (const t of pick.seen) if (t >= 0 && t < row.length) row[t] = row[t] < 0 ? row[t] * p : row[t] / p;
}

/** the token of one row of logits (penalized already) and how many of its logits are NaN or infinite */
export function pickFromRow(row: Float32Array, pick: TokenPick): {id: number; nonFinite: number} {
    const V = row.length;
    let nonFinite = 0,
        best = -Infinity,
        argmax = 0;
    for (let i = 0; i < V; i++) {
        const x = row[i];
        if (!Number.isFinite(x)) nonFinite++;
        else if (x > best) [best, argmax] = [x, i];
    }
    if (pick.temperature === 0 || nonFinite > 0) return {id: argmax, nonFinite};
    const t = Math.fround(pick.temperature);
    const s = new Float32Array(V);
    for (let i = 0; i < V; i++) s[i] = row[i] / t;
    const max = s[argmax];
    // top-k: the k-th largest scaled logit; every logit >= it is kept (transformers keeps ties)
    let kth = -Infinity;
    if (pick.topK > 0 && pick.topK < V) kth = s.slice().sort()[V - pick.topK];
    const q = new Float64Array(V);
    let total = 0;
    for (let i = 0; i < V; i++) {
        if (s[i] < kth) continue;
        q[i] = Math.floor(Math.fround(Math.exp(Math.fround(s[i] - max))) * WEIGHT_SCALE);
        total += q[i];
    }
    // top-p: the largest weight w such that the weights >= w hold at least top_p of the mass; ties with w are kept
    let cut = 0;
    if (pick.topP < 1) {
        const target = Math.fround(pick.topP) * total;
        const sorted = q.filter((x) => x > 0).sort();
        let mass = 0;
        for (let i = sorted.length - 1; i >= 0; i--) {
            mass += sorted[i];
            if (mass >= target) {
                cut = sorted[i];
                break;
            }
        }
    }
    let kept = 0;
    for (let i = 0; i < V; i++) if (q[i] >= cut) kept += q[i];
    const r = drawBelow(pick.u32, kept);
    let acc = 0;
    for (let i = 0; i < V; i++) {
        if (q[i] < cut || q[i] === 0) continue;
        acc += q[i];
        if (acc > r) return {id: i, nonFinite};
    }
    return {id: argmax, nonFinite};
}

/** floor(u32 · total / 2^32), exactly (total < 2^53) */
export function drawBelow(u32: number, total: number): number {
    return Number((BigInt(u32 >>> 0) * BigInt(total)) >> 32n);
}

/** the pick of every row of logits [R, V] (rows penalized in place) */
export function pickTokensHost(
    logits: Float32Array,
    V: number,
    picks: readonly TokenPick[] | null
): {ids: Int32Array; nonFinite: number} {
    const R = logits.length / V;
    const ids = new Int32Array(R);
    let nonFinite = 0;
    for (let r = 0; r < R; r++) {
        const row = logits.subarray(r * V, (r + 1) * V);
        const pick = picks?.[r] ?? GREEDY_PICK;
        applyRepetitionPenalty(row, pick);
        const got = pickFromRow(row, pick);
        ids[r] = got.id;
        nonFinite += got.nonFinite;
    }
    return {ids, nonFinite};
}

/**
 * the picks as the CUDA kernel takes them: params (i32 [R * 5]: temperature, top_k, top_p, u, penalty; floats as
 * their f32 bits) and the penalty's entries (i32 [2E]: the rows, then the tokens)
 */
export function pickArguments(R: number, picks: readonly TokenPick[] | null): {params: Int32Array; entries: Int32Array} {
    const params = new Int32Array(R * 5);
    const asFloat = new Float32Array(params.buffer);
    const rowsOf: number[] = [],
        tokens: number[] = [];
    for (let r = 0; r < R; r++) {
        const p = picks?.[r] ?? GREEDY_PICK;
        asFloat[r * 5] = p.temperature;
        params[r * 5 + 1] = p.topK;
        asFloat[r * 5 + 2] = p.topP;
        params[r * 5 + 3] = p.u32 | 0;
        asFloat[r * 5 + 4] = p.repetitionPenalty;
        if (p.repetitionPenalty !== 1 && p.seen)
            for (const t of p.seen) {
                rowsOf.push(r);
                tokens.push(t);
            }
    }
    return {params, entries: Int32Array.from([...rowsOf, ...tokens])};
}
