// schedule.ts: transformers' learning-rate schedules (optimization.py), each a multiplier λ(t) on the peak lr as
// torch's LambdaLR applies it: t = optimizer steps already taken, so the first update uses λ(0) and the
// scheduler steps after each update (docs: SPEC-training.md §10). The formulas follow transformers line by line,
// in double precision like Python's floats.
import {QloraError} from "../errors.js";

export const SCHEDULER_TYPES = [
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "polynomial",
    "inverse_sqrt",
    "warmup_stable_decay"
] as const;
export type SchedulerType = (typeof SCHEDULER_TYPES)[number];

export type WarmupShape = "linear" | "cosine" | "1-sqrt";

/** `lr_scheduler_kwargs`: which keys each schedule accepts is listed in SCHEDULER_KWARGS */
export interface SchedulerKwargs {
    /** cosine family: 0.5 (one half-wave down) by default; cosine_with_restarts: 1 */
    num_cycles?: number;
    /** polynomial: final lr, default 1e-7 */
    lr_end?: number;
    /** polynomial: default 1.0 (linear) */
    power?: number;
    /** inverse_sqrt: default W, or 10,000 when W = 0 */
    timescale?: number;
    /** cosine_with_min_lr / cosine_warmup_with_min_lr: one of min_lr (absolute) or min_lr_rate (of the peak) */
    min_lr?: number;
    min_lr_rate?: number;
    /** cosine_warmup_with_min_lr: warmup from this fraction of the peak instead of (t + 1) / W */
    warmup_lr_rate?: number;
    /** warmup_stable_decay */
    num_decay_steps?: number;
    num_stable_steps?: number;
    warmup_type?: WarmupShape;
    decay_type?: WarmupShape;
    min_lr_ratio?: number;
}

export const SCHEDULER_KWARGS: Readonly<Record<SchedulerType, readonly (keyof SchedulerKwargs)[]>> = {
    constant: [],
    constant_with_warmup: [],
    linear: [],
    cosine: ["num_cycles"],
    cosine_with_restarts: ["num_cycles"],
    cosine_with_min_lr: ["num_cycles", "min_lr", "min_lr_rate"],
    cosine_warmup_with_min_lr: ["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"],
    polynomial: ["lr_end", "power"],
    inverse_sqrt: ["timescale"],
    warmup_stable_decay: ["num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"]
};

export function isSchedulerType(type: string): type is SchedulerType {
    return (SCHEDULER_TYPES as readonly string[]).includes(type);
}

function fail(message: string): never {
    throw new QloraError(message, {file: "lr_scheduler_kwargs"});
}

function checkType(type: string): SchedulerType {
    if (type === "reduce_lr_on_plateau")
        throw new QloraError("reduce_lr_on_plateau is not supported; choose one of " + SCHEDULER_TYPES.join(", "), {
            file: "lr_scheduler_type"
        });
    if (!isSchedulerType(type))
        throw new QloraError(`unknown schedule "${type}"; expected one of ${SCHEDULER_TYPES.join(", ")}`, {
            file: "lr_scheduler_type"
        });
    return type;
}

function checkKwargs(type: SchedulerType, kwargs: SchedulerKwargs): void {
    const allowed = SCHEDULER_KWARGS[type];
    for (const key of Object.keys(kwargs)) {
        if ((kwargs as Record<string, unknown>)[key] === undefined) continue;
        if (!(allowed as readonly string[]).includes(key))
            fail(
                `"${key}" is not an argument of the ${type} schedule` +
                    (allowed.length ? ` (it takes ${allowed.join(", ")})` : " (it takes none)")
            );
    }
}

/** min_lr_rate from min_lr or min_lr_rate (transformers: exactly one of them) */
function minLrRate(kwargs: SchedulerKwargs, baseLr: number | undefined): number {
    if (kwargs.min_lr !== undefined && kwargs.min_lr_rate !== undefined) fail("set only one of min_lr and min_lr_rate");
    if (kwargs.min_lr !== undefined) {
        if (baseLr === undefined || !(baseLr > 0)) fail("min_lr needs the peak learning rate (baseLr > 0)");
        return kwargs.min_lr / baseLr;
    }
    if (kwargs.min_lr_rate === undefined) fail("set min_lr or min_lr_rate in lr_scheduler_kwargs");
    return kwargs.min_lr_rate;
}

const warmupLinear = (t: number, W: number) => t / Math.max(1, W);

function shape(kind: WarmupShape, p: number, decay: boolean, numCycles: number): number {
    switch (kind) {
        case "linear":
            return decay ? 1 - p : p;
        case "cosine":
            return decay ? 0.5 * (1 + Math.cos(Math.PI * numCycles * 2 * p)) : 0.5 * (1 - Math.cos(Math.PI * p));
        case "1-sqrt":
            return decay ? 1 - Math.sqrt(p) : 1 - Math.sqrt(1 - p);
        default:
            return fail(`${decay ? "decay_type" : "warmup_type"} must be linear, cosine or 1-sqrt, got "${String(kind)}"`);
    }
}

/**
 * λ(t) of schedule `type`: t = optimizer steps taken, W = warmup steps, T = total steps. `baseLr` (the peak lr)
 * is needed by polynomial and by min_lr.
 */
export function lrLambda(
    type: SchedulerType | string,
    t: number,
    W: number,
    T: number,
    kwargs: SchedulerKwargs = {},
    baseLr?: number
): number {
    const kind = checkType(type);
    checkKwargs(kind, kwargs);
    switch (kind) {
        case "constant":
            return 1;
        case "constant_with_warmup":
            return t < W ? t / Math.max(1, W) : 1;
        case "linear":
            if (t < W) return warmupLinear(t, W);
            return Math.max(0, (T - t) / Math.max(1, T - W));
        case "cosine": {
            if (t < W) return warmupLinear(t, W);
            const numCycles = kwargs.num_cycles ?? 0.5;
            const progress = (t - W) / Math.max(1, T - W);
            return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * numCycles * 2 * progress)));
        }
        case "cosine_with_restarts": {
            if (t < W) return warmupLinear(t, W);
            const numCycles = kwargs.num_cycles ?? 1;
            const progress = (t - W) / Math.max(1, T - W);
            if (progress >= 1) return 0;
            return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * pyMod(numCycles * progress, 1))));
        }
        case "cosine_with_min_lr": {
            const rate = minLrRate(kwargs, baseLr);
            if (t < W) return warmupLinear(t, W);
            const numCycles = kwargs.num_cycles ?? 0.5;
            const progress = (t - W) / Math.max(1, T - W);
            const factor = 0.5 * (1 + Math.cos(Math.PI * numCycles * 2 * progress));
            return Math.max(0, factor * (1 - rate) + rate);
        }
        case "cosine_warmup_with_min_lr": {
            const rate = minLrRate(kwargs, baseLr);
            if (t < W) {
                if (kwargs.warmup_lr_rate === undefined) return (t + 1) / Math.max(1, W);
                const w = kwargs.warmup_lr_rate;
                return w + ((1 - w) * t) / Math.max(1, W - 1);
            }
            const numCycles = kwargs.num_cycles ?? 0.5;
            const progress = (t - W + 1) / Math.max(1, T - W);
            const factor = 0.5 * (1 + Math.cos(Math.PI * numCycles * 2 * progress));
            return Math.max(0, factor * (1 - rate) + rate);
        }
        case "polynomial": {
            const lrEnd = kwargs.lr_end ?? 1e-7;
            const power = kwargs.power ?? 1.0;
            if (baseLr === undefined) fail("the polynomial schedule needs the peak learning rate (baseLr)");
            if (!(baseLr > lrEnd)) fail(`lr_end (${lrEnd}) must be smaller than the learning rate (${baseLr})`);
            if (t < W) return warmupLinear(t, W);
            // transformers divides by T - W here (T = W is a ZeroDivisionError there); treat it as finished
            if (t > T || T - W <= 0) return lrEnd / baseLr;
            const pctRemaining = 1 - (t - W) / (T - W);
            return ((baseLr - lrEnd) * pctRemaining ** power + lrEnd) / baseLr;
        }
        case "inverse_sqrt": {
            if (t < W) return warmupLinear(t, W);
            const timescale = kwargs.timescale ?? (W || 10_000);
            const shift = timescale - W;
            return 1 / Math.sqrt((t + shift) / timescale);
        }
        case "warmup_stable_decay": {
            const decaySteps = kwargs.num_decay_steps;
            if (decaySteps === undefined) fail("the warmup_stable_decay schedule needs num_decay_steps");
            const stableSteps = kwargs.num_stable_steps ?? T - W - decaySteps;
            const minRatio = kwargs.min_lr_ratio ?? 0;
            const numCycles = kwargs.num_cycles ?? 0.5;
            const warmupType = kwargs.warmup_type ?? "linear";
            const decayType = kwargs.decay_type ?? "cosine";
            if (t < W) {
                const factor = shape(warmupType, t / Math.max(1, W), false, numCycles);
                return Math.max(0, factor * (1 - minRatio) + minRatio);
            }
            if (t < W + stableSteps) return 1;
            if (t < W + stableSteps + decaySteps) {
                const progress = (t - W - stableSteps) / Math.max(1, decaySteps);
                const factor = shape(decayType, progress, true, numCycles);
                return Math.max(0, factor * (1 - minRatio) + minRatio);
            }
            return minRatio;
        }
    }
}

/** Python's float % (the result takes the divisor's sign) */
function pyMod(a: number, b: number): number {
    return a - b * Math.floor(a / b);
}

/**
 * Warmup steps from TrainingArguments: `warmup_steps` >= 1 is a count, a value in (0, 1) a ratio of the total
 * (transformers 5), and when it is 0 `warmup_ratio` applies; ratios round up (math.ceil).
 */
export function resolveWarmupSteps(args: {warmup_steps?: number; warmup_ratio?: number}, totalSteps: number): number {
    const steps = args.warmup_steps ?? 0;
    const ratio = args.warmup_ratio ?? 0;
    if (!Number.isFinite(steps) || steps < 0)
        throw new QloraError(`expected a number >= 0, got ${steps}`, {file: "warmup_steps"});
    if (steps >= 1) {
        if (!Number.isInteger(steps))
            throw new QloraError(`expected an integer step count or a ratio in [0, 1), got ${steps}`, {file: "warmup_steps"});
        return steps;
    }
    if (steps > 0) return Math.ceil(totalSteps * steps);
    if (!Number.isFinite(ratio) || ratio < 0 || ratio > 1)
        throw new QloraError(`expected a ratio in [0, 1], got ${ratio}`, {file: "warmup_ratio"});
    return Math.ceil(totalSteps * ratio);
}

export interface LRSchedulerOptions {
    type: SchedulerType | string;
    /** the peak learning rate (TrainingArguments.learning_rate) */
    baseLr: number;
    warmupSteps: number;
    totalSteps: number;
    kwargs?: SchedulerKwargs;
}

/** JSON-able scheduler state, for checkpoints */
export interface LRSchedulerState {
    type: SchedulerType;
    baseLr: number;
    warmupSteps: number;
    totalSteps: number;
    kwargs: SchedulerKwargs;
    /** optimizer steps taken (torch's last_epoch) */
    step: number;
}

/** LambdaLR with one of the schedules above: getLr() is the lr of the next update; step() after each update */
export class LRScheduler {
    private state: LRSchedulerState;

    constructor(options: LRSchedulerOptions) {
        this.state = LRScheduler.validate({...options, kwargs: {...(options.kwargs ?? {})}, step: 0});
    }

    private static validate(s: Omit<LRSchedulerState, "type"> & {type: string}): LRSchedulerState {
        const type = checkType(s.type);
        const intAtLeast0 = (v: number, key: string) => {
            if (!Number.isSafeInteger(v) || v < 0) throw new QloraError(`expected an integer >= 0, got ${v}`, {file: key});
        };
        if (!Number.isFinite(s.baseLr) || s.baseLr < 0)
            throw new QloraError(`expected a number >= 0, got ${s.baseLr}`, {file: "learning_rate"});
        intAtLeast0(s.warmupSteps, "warmup_steps");
        intAtLeast0(s.totalSteps, "max_steps");
        intAtLeast0(s.step, "scheduler step");
        const state = {...s, type};
        lrLambda(type, 0, state.warmupSteps, state.totalSteps, state.kwargs, state.baseLr); // checks the kwargs
        return state;
    }

    /** optimizer steps taken so far */
    get stepCount(): number {
        return this.state.step;
    }

    get type(): SchedulerType {
        return this.state.type;
    }

    /** λ(t) for the next update */
    factor(): number {
        const s = this.state;
        return lrLambda(s.type, s.step, s.warmupSteps, s.totalSteps, s.kwargs, s.baseLr);
    }

    /** the learning rate of the next update: baseLr * λ(t) */
    getLr(): number {
        return this.state.baseLr * this.factor();
    }

    /** after each optimizer update */
    step(): void {
        this.state.step += 1;
    }

    stateDict(): LRSchedulerState {
        return {...this.state, kwargs: {...this.state.kwargs}};
    }

    loadStateDict(saved: LRSchedulerState): void {
        this.state = LRScheduler.validate({...saved, kwargs: {...(saved.kwargs ?? {})}});
    }
}
