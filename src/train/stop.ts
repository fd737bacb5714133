// stop.ts: Ctrl+C (SIGINT) and SIGTERM during training. The first signal asks the loop to finish its step and
// save a checkpoint, so no work is lost; a second one exits at once (every write is atomic, so that is safe:
// the run resumes from its last checkpoint). The handlers exist only while train() runs: train() is also a
// library function and leaves the process's signal handling as it found it.
import {QloraError} from "../errors.js";

export type StopSignal = "SIGINT" | "SIGTERM";

/** the shell's exit status for a process ended by the signal: 128 + its number */
export function exitCodeFor(signal: StopSignal): number {
    return signal === "SIGINT" ? 130 : 143;
}

/** thrown by train() when a signal stopped it; the CLI exits with `exitCode` */
export class TrainingInterrupted extends QloraError {
    readonly signal: StopSignal;
    readonly exitCode: number;
    /** the checkpoint that holds the work so far (null when nothing was trained yet) */
    readonly checkpointDir: string | null;
    readonly step: number;
    constructor(signal: StopSignal, step: number, checkpointDir: string | null) {
        super(
            `training stopped by ${signal} ` +
                (checkpointDir
                    ? `after step ${step}; the work so far is in ${checkpointDir}: run again with resume_from_checkpoint true to continue`
                    : "before the first step; nothing was trained")
        );
        this.name = "TrainingInterrupted";
        this.signal = signal;
        this.exitCode = exitCodeFor(signal);
        this.checkpointDir = checkpointDir;
        this.step = step;
    }
}

export class StopRequest {
    /** the first signal received, or null */
    signal: StopSignal | null = null;
    private readonly handler = (signal: NodeJS.Signals) => this.onSignal(signal as StopSignal);

    /** `onFirst` tells the user what happens now */
    constructor(private readonly onFirst: (signal: StopSignal) => void) {
        process.on("SIGINT", this.handler);
        process.on("SIGTERM", this.handler);
    }

    private onSignal(signal: StopSignal): void {
        if (this.signal === null) {
            this.signal = signal;
            this.onFirst(signal);
            return;
        }
        // the second signal: at once ("exit" listeners still run: the output folder's lock is released)
        process.exit(exitCodeFor(signal));
    }

    dispose(): void {
        process.removeListener("SIGINT", this.handler);
        process.removeListener("SIGTERM", this.handler);
    }
}
