// output-dir.ts: taking output_dir for a training run. One run at a time (a lock), never over the run's inputs,
// never into a folder qlora did not write, and never over an earlier run unless the user asked to continue it
// (resume_from_checkpoint) or to replace it (overwrite_output_dir, which removes only what a run writes).
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {
    assertOutputSeparate,
    QLORA_MARKER_FILE,
    readQloraMarker,
    recoverInterruptedWrites,
    writeQloraMarker
} from "../io/atomic.js";
import {acquireFolderLock, LOCK_FILE, type FolderLock} from "../io/lock.js";
import {finishInterruptedRemovals, removeRunFolder} from "./checkpoint.js";

/** the marker kind of a training run's output_dir */
export const TRAIN_OUTPUT_KIND = "training-output";
const RUN_FILES = new Set(["metrics.jsonl", "report.html"]);
const RUN_FOLDERS = /^(checkpoint-\d+|final)$/;

export interface OutputDir {
    dir: string;
    lock: FolderLock;
    /** what an earlier run left: checkpoint-N, final, metrics.jsonl, report.html */
    runEntries: string[];
    /** folder entries that are not qlora's (kept, whatever happens) */
    otherEntries: string[];
    /** the folder carries qlora's marker */
    marked: boolean;
    /** this run created the folder (removed again if the run fails before writing anything) */
    created: boolean;
    /** what recovering interrupted writes did */
    recovered: string[];
}

/** the entries of output_dir, split into an earlier run's files and everything else (the lock and marker aside) */
async function classifyEntries(dir: string): Promise<{run: string[]; other: string[]}> {
    const run: string[] = [],
        other: string[] = [];
    for (const entry of await fs.readdir(dir, {withFileTypes: true})) {
        const name = entry.name;
        if (name === QLORA_MARKER_FILE || name.startsWith(LOCK_FILE)) continue;
        if ((entry.isDirectory() && RUN_FOLDERS.test(name)) || (entry.isFile() && RUN_FILES.has(name))) run.push(name);
        else other.push(name);
    }
    const stepOf = (n: string) => (n.startsWith("checkpoint-") ? Number(n.slice(11)) : Infinity);
    run.sort((a, b) => stepOf(a) - stepOf(b) || a.localeCompare(b));
    return {run, other};
}

function writeFailure(dir: string, err: unknown): QloraError {
    if (err instanceof QloraError) return err;
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === "EEXIST" || code === "ENOTDIR" ? `${code}: a file is in the way` : (code ?? (err as Error).message);
    return new QloraError(`the output folder cannot be written (${why}); choose another output_dir`, {file: dir, cause: err});
}

/**
 * Takes output_dir: refuses one that is or contains an input, creates it, takes its lock (refused while another
 * run holds it), and finishes the writes a killed run left half-done. The caller applies the policy
 * (checkOutputPolicy) once it knows whether the run resumes, and must release the lock on every path.
 */
export async function openOutputDir(outputDir: string, inputs: {path: string | null; what: string}[]): Promise<OutputDir> {
    const dir = path.resolve(outputDir);
    await assertOutputSeparate(
        dir,
        inputs.filter((i): i is {path: string; what: string} => !!i.path),
        "output_dir"
    );
    let created = false;
    try {
        const st = await fs.stat(dir).catch(() => null);
        if (st && !st.isDirectory())
            throw new QloraError("output_dir is a file, not a folder; choose another output_dir", {file: dir});
        if (!st) created = (await fs.mkdir(dir, {recursive: true})) !== undefined;
    } catch (err) {
        throw writeFailure(dir, err);
    }
    let lock: FolderLock;
    try {
        lock = await acquireFolderLock(dir, "qlora train", "output_dir");
    } catch (err) {
        if (created) await fs.rmdir(dir).catch(() => undefined);
        throw writeFailure(dir, err);
    }
    try {
        const recovered = [...(await recoverInterruptedWrites(dir)), ...(await finishInterruptedRemovals(dir))];
        const {run, other} = await classifyEntries(dir);
        const marker = await readQloraMarker(dir);
        if (marker && marker.kind !== TRAIN_OUTPUT_KIND)
            throw new QloraError(`output_dir holds a qlora ${marker.kind}, not a training run; choose another output_dir`, {
                file: dir
            });
        return {dir, lock, runEntries: run, otherEntries: other, marked: marker !== null, created, recovered};
    } catch (err) {
        await lock.release();
        throw err;
    }
}

/** the user's choice for an output_dir that holds an earlier run */
const CHOICES =
    "pass --resume_from_checkpoint true to continue it, --overwrite_output_dir true to replace it, or choose another output_dir";

/**
 * The output folder policy (transformers' Trainer's, with overwrite_output_dir): an earlier run in output_dir is
 * continued only with resume_from_checkpoint and replaced only with overwrite_output_dir; a non-empty folder qlora
 * did not write is never used. Returns the entries to remove before the run writes (overwrite_output_dir).
 */
export function checkOutputPolicy(out: OutputDir, opts: {resumeDir: string | null; overwrite: boolean}): string[] {
    const {dir, runEntries, otherEntries, marked} = out;
    const shown = (names: string[]) => names.slice(0, 4).join(", ") + (names.length > 4 ? `, ... (${names.length} in all)` : "");
    if (runEntries.length === 0 && otherEntries.length > 0 && !marked)
        throw new QloraError(
            `output_dir is not empty and was not written by qlora (${shown(otherEntries)}); choose a new or ` +
                "empty output_dir (qlora never writes into a folder of other files)",
            {file: dir}
        );
    const resumeInside = opts.resumeDir !== null && path.dirname(path.resolve(opts.resumeDir)) === dir;
    if (opts.resumeDir !== null && opts.overwrite && resumeInside)
        throw new QloraError(
            "overwrite_output_dir would remove the checkpoint that resume_from_checkpoint continues " +
                `(${path.basename(opts.resumeDir)}); pass one of them`,
            {file: dir}
        );
    if (runEntries.length === 0 || resumeInside) return [];
    if (!opts.overwrite)
        throw new QloraError(
            `output_dir holds an earlier run (${shown(runEntries)}); ` +
                (opts.resumeDir === null
                    ? CHOICES
                    : `resume_from_checkpoint continues a checkpoint of another folder: pass --overwrite_output_dir true to replace ` +
                      "this folder's run, or choose another output_dir"),
            {file: dir}
        );
    return runEntries;
}

/** overwrite_output_dir: removes what an earlier run wrote (checkpoint-N, final, metrics.jsonl, report.html), nothing else */
export async function removeEarlierRun(dir: string, entries: string[]): Promise<void> {
    // final first: a kill part-way leaves checkpoints a later run can still resume from, never a stray final/
    const ordered = [...entries].sort((a, b) => (a === "final" ? -1 : b === "final" ? 1 : 0));
    for (const name of ordered) {
        if (RUN_FILES.has(name)) await fs.rm(path.join(dir, name), {force: true});
        else await removeRunFolder(path.join(dir, name));
    }
}

/** marks output_dir as a training run's folder (qlora's marker, as io/atomic.ts writes into the folders it creates) */
export async function markOutputDir(out: OutputDir): Promise<void> {
    if (out.marked) return;
    await writeQloraMarker(out.dir, TRAIN_OUTPUT_KIND);
    out.marked = true;
}
