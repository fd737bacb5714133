// stats.ts: means and their standard errors as lm-evaluation-harness reports them: `acc_stderr` is the sample
// standard deviation (n - 1) over sqrt(n), which for 0/1 scores is sqrt(p (1 - p) / (n - 1)); undefined (null,
// the harness's "N/A") for fewer than two values.
export interface MeanStderr {
    mean: number;
    stderr: number | null;
}

export function meanStderr(values: readonly number[]): MeanStderr {
    const n = values.length;
    if (n === 0) return {mean: Number.NaN, stderr: null};
    let sum = 0;
    for (const v of values) sum += v;
    const mean = sum / n;
    if (n < 2) return {mean, stderr: null};
    let squares = 0;
    for (const v of values) squares += (v - mean) ** 2;
    return {mean, stderr: Math.sqrt(squares / (n - 1) / n)};
}

/**
 * The unweighted mean of group means (each subject counts once, whatever its size) and its standard error,
 * sqrt(sum of the squared group errors) / groups; null when a group has none.
 */
export function macroMean(groups: readonly MeanStderr[]): MeanStderr {
    const k = groups.length;
    if (k === 0) return {mean: Number.NaN, stderr: null};
    const mean = groups.reduce((s, g) => s + g.mean, 0) / k;
    if (groups.some((g) => g.stderr === null)) return {mean, stderr: null};
    return {mean, stderr: Math.sqrt(groups.reduce((s, g) => s + (g.stderr as number) ** 2, 0)) / k};
}
