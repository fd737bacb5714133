// health.ts: warnings with advice when a run stops training or starts to blow up, from what each logging step
// records (transformers' Trainer has none; users find out from the final loss, or from a NaN hours in). Each kind
// is said once, and again only after its condition has cleared and come back.
//
// The thresholds are chosen so that a healthy run, even one logged every step with small noisy batches (the
// default `qlora train` with --logging_steps 1, whose step losses range 1.4-9.8), fires none; docs: README's
// "Health warnings".

export type HealthKind = "grad_norm_zero" | "loss_flat" | "grad_norm_spike" | "loss_diverging";

/** what one logging step records */
export interface HealthSample {
    step: number;
    /** the mean loss over the logging interval */
    loss: number;
    /** the logged step's gradient norm before clipping */
    gradNorm: number;
    learningRate: number;
    /** the logged step's label tokens (null or absent: not known, e.g. history from a checkpoint) */
    targets?: number | null;
}

/** the run's settings the advice names */
export interface HealthSettings {
    learningRate: number;
    maxGradNorm: number;
    warmupSteps: number;
}

export interface HealthWarning {
    kind: HealthKind;
    step: number;
    message: string;
}

export const HEALTH_THRESHOLDS = {
    /** a gradient norm below this is zero */
    zeroGradNorm: 1e-8,
    /** ... for this many logging intervals in a row */
    zeroGradIntervals: 3,
    /** the loss is flat when (max - min) / mean of the last flatIntervals logged losses is below this */
    flatRelativeChange: 1e-3,
    flatIntervals: 5,
    /** below this loss the data is learned: a flat loss there is no collapse */
    flatMinLoss: 0.01,
    /** a gradient norm this many times the median of the last spikeWindow logged norms (or not finite) */
    spikeFactor: 10,
    spikeWindow: 20,
    /** logged norms needed before a median means anything */
    spikeMinHistory: 2,
    /**
     * the loss (median of the last divergeSmoothing logs) above divergeFactor x the lowest median of
     * divergeBaseline logs so far ...
     */
    divergeFactor: 1.5,
    divergeSmoothing: 5,
    divergeBaseline: 20,
    /** ... and above that lowest median by more than divergeNoise x the median change between logs ... */
    divergeNoise: 4,
    noiseWindow: 50,
    /** ... for this many logging intervals in a row */
    divergeIntervals: 4
} as const;

const T = HEALTH_THRESHOLDS;

function median(values: readonly number[]): number {
    const s = [...values].sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const fmt = (x: number) => (Number.isFinite(x) ? Number(x.toPrecision(4)).toString() : String(x));

export class TrainingHealth {
    private readonly samples: HealthSample[] = [];
    private readonly lossChanges: number[] = [];
    private lowestBaseline = Infinity;
    private zeroGradRun = 0;
    private zeroGradSince = 0;
    private divergeRun = 0;
    /** kinds said and not cleared since */
    private readonly announced = new Set<HealthKind>();

    constructor(private readonly settings: HealthSettings) {}

    /**
     * feeds logged steps of an earlier session (a resumed run's log_history) so medians and minima continue; warns
     * of nothing, and a condition still holding is said again at the next log of this session
     */
    replay(history: readonly HealthSample[]): void {
        for (const s of history) this.observe(s);
        this.announced.clear();
    }

    /** the warnings this logged step raises (each kind once until its condition clears) */
    observe(s: HealthSample): HealthWarning[] {
        const previous = this.samples.slice(-T.spikeWindow);
        this.samples.push(s);
        if (this.samples.length > Math.max(T.spikeWindow, T.flatIntervals, T.divergeBaseline) + 1) this.samples.shift();
        const found: [HealthKind, string | null][] = [
            ["grad_norm_zero", this.zeroGrad(s)],
            ["loss_flat", this.flatLoss(s)],
            ["grad_norm_spike", this.gradSpike(s, previous)],
            ["loss_diverging", this.diverging(s)]
        ];
        const out: HealthWarning[] = [];
        for (const [kind, message] of found) {
            if (message === null) this.announced.delete(kind);
            else if (!this.announced.has(kind)) {
                this.announced.add(kind);
                out.push({kind, step: s.step, message});
            }
        }
        return out;
    }

    private zeroGrad(s: HealthSample): string | null {
        this.zeroGradRun = s.gradNorm < T.zeroGradNorm ? this.zeroGradRun + 1 : 0;
        if (this.zeroGradRun === 1) this.zeroGradSince = s.step;
        if (this.zeroGradRun < T.zeroGradIntervals) return null;
        const head = `the gradient norm has been 0 (< ${T.zeroGradNorm}) since step ${this.zeroGradSince}: nothing trains`;
        // what the logged step shows: its labels; the learning rate cannot zero a gradient
        if (s.targets === 0)
            return (
                `${head}. Step ${s.step} had no label tokens (every label masked): check completion_only_loss / ` +
                "assistant_only_loss and the data's responses, and that max_seq_length does not cut them off"
            );
        return (
            `${head}${s.targets ? `, though step ${s.step} had ${s.targets} label tokens` : ""} and the learning rate ` +
            "does not zero a gradient: the adapter does not reach the loss. Check target_modules (modules the " +
            "forward pass uses), lora_dropout, and that the adapter is trainable (a loaded adapter with both A and B " +
            "at 0 gets no gradient)"
        );
    }

    private flatLoss(s: HealthSample): string | null {
        const last = this.samples.slice(-T.flatIntervals);
        if (last.length < T.flatIntervals || last.some((x) => !(x.learningRate > 0))) return null;
        const losses = last.map((x) => x.loss);
        const lo = Math.min(...losses),
            hi = Math.max(...losses),
            mean = losses.reduce((a, b) => a + b, 0) / losses.length;
        if (!(mean >= T.flatMinLoss) || (hi - lo) / mean >= T.flatRelativeChange) return null;
        return (
            `the loss has stayed at ${fmt(mean)} (within ${T.flatRelativeChange * 100}%) for ${T.flatIntervals} ` +
            `logging intervals (steps ${last[0].step}-${s.step}) while the learning rate is ${fmt(s.learningRate)}: ` +
            `the model is not learning. Raise learning_rate (now ${this.settings.learningRate}) if it is tiny, and ` +
            "check the data (the same few examples over and over, or labels that carry no signal)"
        );
    }

    private gradSpike(s: HealthSample, previous: readonly HealthSample[]): string | null {
        const norms = previous.map((x) => x.gradNorm).filter((x) => Number.isFinite(x));
        if (Number.isFinite(s.gradNorm)) {
            if (norms.length < T.spikeMinHistory) return null;
            const typical = median(norms);
            // after a stretch of zero gradients any gradient is a recovery, not a spike
            if (typical < T.zeroGradNorm || !(s.gradNorm > T.spikeFactor * typical)) return null;
            return `the gradient norm is ${fmt(s.gradNorm)} at step ${s.step}, ${fmt(s.gradNorm / typical)}x its recent median (${fmt(typical)}): ${this.tuning()}`;
        }
        return `the gradient norm is ${s.gradNorm} at step ${s.step}: ${this.tuning()}`;
    }

    private diverging(s: HealthSample): string | null {
        const prev = this.samples[this.samples.length - 2];
        if (prev && Number.isFinite(s.loss) && Number.isFinite(prev.loss)) {
            this.lossChanges.push(Math.abs(s.loss - prev.loss));
            if (this.lossChanges.length > T.noiseWindow) this.lossChanges.shift();
        }
        const recent = this.samples.slice(-T.divergeSmoothing).map((x) => x.loss);
        if (recent.length < T.divergeSmoothing) return null;
        const level = median(recent);
        // the reference is the lowest median of a longer window: the lowest of the short medians would sink with
        // every noisy log of a long run until ordinary noise looked like a rise
        const lowest = this.lowestBaseline;
        this.lowestBaseline = Math.min(lowest, median(this.samples.slice(-T.divergeBaseline).map((x) => x.loss)));
        const noise = median(this.lossChanges);
        const rising = !(level <= T.divergeFactor * lowest) && !(level - lowest <= T.divergeNoise * noise);
        this.divergeRun = rising ? this.divergeRun + 1 : 0;
        if (this.divergeRun < T.divergeIntervals) return null;
        return (
            `the loss is rising: ${fmt(level)} (median of the last ${T.divergeSmoothing} logs) against a lowest ` +
            `${fmt(lowest)} (median of ${T.divergeBaseline}), for ${this.divergeRun} logging intervals; training is diverging before any NaN. ${this.tuning()}`
        );
    }

    private tuning(): string {
        const {learningRate, maxGradNorm, warmupSteps} = this.settings;
        return (
            `lower learning_rate (now ${learningRate}); ` +
            (maxGradNorm > 0
                ? `clip harder with a smaller max_grad_norm (now ${maxGradNorm}; the QLoRA recipe uses 0.3); `
                : "turn clipping on with max_grad_norm 0.3 (now 0: off); ") +
            (warmupSteps > 0
                ? `lengthen the warmup (now ${warmupSteps} step${warmupSteps === 1 ? "" : "s"}); `
                : "add a warmup (warmup_ratio 0.03); ") +
            "check the data around this step for broken examples"
        );
    }
}
