// atomic.ts: the one way qlora writes its outputs, so that nothing half-written ever sits under a final name and
// nothing the user did not ask qlora to replace is ever replaced.
//
// Files: written to an exclusively created temporary with a random name beside the final one (O_EXCL refuses a
// planted file or symlink, and a random name cannot be guessed in advance), fsynced, renamed over the final name
// (rename replaces a symlink there instead of writing through it), and the folder is fsynced.
//
// Folders: filled under `.NAME.tmp-R`, renamed to `.NAME.new-R` once complete and durable, the old folder (if any)
// moved to `.NAME.old-R`, the new one moved into place, the old one removed. A kill at any point leaves names from
// which recoverInterruptedWrites() restores the newest complete folder. An existing folder is replaced only when
// qlora wrote it (QLORA_MARKER_FILE of the same kind) and the caller asked for that.
import {randomBytes} from "node:crypto";
import {constants, promises as fs, type Stats} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";
import {packageRoot} from "../backend/native.js";
import {openRegularFile, readTextFile} from "./files.js";

/** a marker qlora writes into every folder it creates as an output; replacing only ever replaces such folders */
export const QLORA_MARKER_FILE = ".qlora.json";

export interface QloraMarker {
    written_by: "qlora";
    /** what the folder holds, e.g. "merged-model", "checkpoint", "adapter" */
    kind: string;
    version: string;
}

export type FileHandle = fs.FileHandle;

/** `.NAME.tmp-R` (being filled), `.NAME.new-R` (complete, not yet in place), `.NAME.old-R` (being replaced); R is
 * 16 hex digits, or a pid in the names of qlora versions before the random suffix */
const LEFTOVER = /^\.(.+)\.(tmp|new|old)-([0-9a-f]{16}|\d+)$/;

function randomSuffix(): string {
    return randomBytes(8).toString("hex");
}

function leftoverName(finalPath: string, stage: "tmp" | "new" | "old", suffix: string): string {
    return path.join(path.dirname(finalPath), `.${path.basename(finalPath)}.${stage}-${suffix}`);
}

function errorCode(err: unknown): string {
    return (err as NodeJS.ErrnoException).code ?? (err as Error).message;
}

/** a QloraError for a failed write of `file` (a full disk says so); QloraErrors pass through */
function writeError(err: unknown, file: string, what = "file"): QloraError {
    if (err instanceof QloraError) return err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOSPC" || code === "EDQUOT")
        return new QloraError(
            `the disk is full (${code}) while writing the ${what}; free some space or write to another ` +
                "disk. Nothing was left under this name",
            {file, cause: err}
        );
    if (code === "EACCES" || code === "EPERM" || code === "EROFS")
        return new QloraError(
            `cannot write the ${what} (${code}: permission denied or read-only); choose a folder ` + "you can write to",
            {file, cause: err}
        );
    return new QloraError(`cannot write the ${what}: ${(err as Error).message}`, {file, cause: err});
}

async function lstatOrNull(p: string): Promise<Stats | null> {
    try {
        return await fs.lstat(p);
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
        throw new QloraError(`cannot inspect the path (${errorCode(err)})`, {file: p, cause: err});
    }
}

/** makes a rename or creation inside `dir` durable; platforms that cannot fsync a folder (Windows) skip it */
async function fsyncDir(dir: string): Promise<void> {
    let handle: fs.FileHandle | undefined;
    try {
        handle = await fs.open(dir, constants.O_RDONLY);
        await handle.sync();
    } catch {
        // EISDIR/EPERM/EINVAL where folders cannot be opened or synced: the renames are still atomic
    } finally {
        await handle?.close().catch(() => undefined);
    }
}

/** fsyncs every file and folder under `dir` (files the fill callback wrote without fsync, e.g. copies) */
async function fsyncTree(dir: string): Promise<void> {
    for (const entry of await fs.readdir(dir, {withFileTypes: true})) {
        const p = path.join(dir, entry.name);
        if (entry.isDirectory()) await fsyncTree(p);
        else if (entry.isFile()) {
            const handle = await fs.open(p, constants.O_RDONLY);
            try {
                await handle.sync();
            } finally {
                await handle.close();
            }
        }
    }
    await fsyncDir(dir);
}

// ------------------------------------------------------------------------------------------------ files

/**
 * Opens an exclusive temporary file with a random name beside `file` for a streaming write (safetensors, GGUF).
 * commit() fsyncs it and renames it over `file`; abort() removes it. Errors are QloraErrors naming `file`.
 */
export async function createAtomicFile(
    file: string
): Promise<{handle: FileHandle; path: string; commit(): Promise<void>; abort(): Promise<void>}> {
    const tmp = leftoverName(file, "tmp", randomSuffix());
    let handle: fs.FileHandle;
    try {
        // O_EXCL: never open something planted under the name (a symlink to another user's file included)
        handle = await fs.open(
            tmp,
            constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | (constants.O_NOFOLLOW ?? 0),
            0o666
        );
    } catch (err) {
        throw writeError(err, file);
    }
    let open = true;
    const abort = async () => {
        if (open) await handle.close().catch(() => undefined);
        open = false;
        await fs.rm(tmp, {force: true}).catch(() => undefined);
    };
    const commit = async () => {
        try {
            await handle.sync();
            await handle.close();
            open = false;
            await fs.rename(tmp, file);
        } catch (err) {
            await abort();
            throw writeError(err, file);
        }
        await fsyncDir(path.dirname(file));
    };
    return {handle, path: tmp, commit, abort};
}

async function writeAll(handle: fs.FileHandle, data: Uint8Array): Promise<void> {
    let done = 0;
    while (done < data.length) {
        const {bytesWritten} = await handle.write(data, done, data.length - done);
        if (bytesWritten <= 0) throw Object.assign(new Error("the write made no progress"), {code: "EIO"});
        done += bytesWritten;
    }
}

/** writes a whole file atomically: exclusive random temporary, fsync, rename over `file` */
export async function writeFileAtomic(file: string, data: string | Uint8Array): Promise<void> {
    const out = await createAtomicFile(file);
    try {
        await writeAll(out.handle, typeof data === "string" ? Buffer.from(data, "utf8") : data);
    } catch (err) {
        await out.abort();
        throw writeError(err, file);
    }
    await out.commit();
}

// ------------------------------------------------------------------------------------------------ folders

/** the marker of a folder qlora wrote, or null (no marker, or not one qlora wrote) */
export async function readQloraMarker(dir: string): Promise<QloraMarker | null> {
    const file = path.join(dir, QLORA_MARKER_FILE);
    try {
        const st = await fs.lstat(file);
        if (!st.isFile() || st.size > 65536) return null;
        const parsed = JSON.parse(await readTextFile(file, {what: "qlora marker"})) as Partial<QloraMarker>;
        if (parsed?.written_by !== "qlora" || typeof parsed.kind !== "string") return null;
        return {written_by: "qlora", kind: parsed.kind, version: String(parsed.version ?? "")};
    } catch {
        return null;
    }
}

let versionCache: string | undefined;
async function qloraVersion(): Promise<string> {
    if (versionCache === undefined) {
        try {
            versionCache = String(
                (JSON.parse(await readTextFile(path.join(packageRoot, "package.json"))) as {version?: unknown}).version ?? ""
            );
        } catch {
            versionCache = "";
        }
    }
    return versionCache;
}

/** marks `dir` as a qlora output of `kind` (writeDirAtomic does this for the folders it writes) */
export async function writeQloraMarker(dir: string, kind: string): Promise<void> {
    const marker: QloraMarker = {written_by: "qlora", kind, version: await qloraVersion()};
    await writeFileAtomic(path.join(dir, QLORA_MARKER_FILE), JSON.stringify(marker) + "\n");
}

export interface DirOutputOptions {
    /** "never": an existing non-empty folder is refused; "owned": replaced when it carries a marker of this kind */
    replace: "never" | "owned";
    /** what the folder holds; goes into the marker, and "owned" replaces only a folder of the same kind */
    kind: string;
    /** how the user asks for a replacement, e.g. "--overwrite" or "--overwrite_output_dir true" */
    overwriteHint?: string;
}

/**
 * Refuses a folder output that must not be written: a file, a symlink or anything but a folder at `dir`; a
 * non-empty folder unless opts.replace is "owned" and it carries qlora's marker of opts.kind. An empty folder is
 * fine. Cheap: call it before the expensive work, writeDirAtomic checks again before the swap.
 */
export async function assertDirOutput(dir: string, opts: DirOutputOptions): Promise<void> {
    const st = await lstatOrNull(dir);
    if (!st) return;
    if (st.isSymbolicLink())
        throw new QloraError(
            "is a symbolic link; qlora does not replace links: give the real folder's path or choose " + "another path",
            {file: dir}
        );
    if (!st.isDirectory())
        throw new QloraError("already exists and is not a folder; choose another path (qlora never replaces it)", {file: dir});
    let entries: string[];
    try {
        entries = await fs.readdir(dir);
    } catch (err) {
        throw new QloraError(`cannot read the folder (${errorCode(err)})`, {file: dir, cause: err});
    }
    if (entries.length === 0) return;
    const marker = await readQloraMarker(dir);
    if (!marker)
        throw new QloraError(
            "already exists, is not empty and was not written by qlora (it has no " +
                `${QLORA_MARKER_FILE}); choose another path or empty it yourself (qlora only replaces folders it wrote)`,
            {file: dir}
        );
    if (marker.kind !== opts.kind)
        throw new QloraError(`already holds a qlora ${marker.kind}, not a ${opts.kind}; choose another path`, {file: dir});
    if (opts.replace === "never")
        throw new QloraError(
            `already exists and is not empty (an earlier qlora ${marker.kind}); ` +
                (opts.overwriteHint ? `pass ${opts.overwriteHint} to replace it, or choose another path` : "choose another path"),
            {file: dir}
        );
}

/**
 * Writes a folder atomically: fill(tmpDir) writes its contents under a temporary name beside `dir`, qlora's marker
 * is added, everything is fsynced, then the folder is swapped into place (recoverably, see the top of this file).
 * opts.replace "never": an existing non-empty `dir` is refused; "owned": replaced only when it carries
 * QLORA_MARKER_FILE of opts.kind. An empty existing folder is always fine. Without opts: {replace: "owned",
 * kind: "folder"}.
 */
export async function writeDirAtomic(
    dir: string,
    fill: (tmpDir: string) => Promise<void>,
    opts: DirOutputOptions = {replace: "owned", kind: "folder"}
): Promise<void> {
    dir = path.resolve(dir);
    const parent = path.dirname(dir);
    if (parent === dir) throw new QloraError("is the root of the file system; choose a folder path", {file: dir});
    try {
        await fs.mkdir(parent, {recursive: true});
    } catch (err) {
        throw new QloraError(`cannot create the folder (${errorCode(err)})`, {file: parent, cause: err});
    }
    // a swap of this very folder that a killed run left half-done is finished first, so the checks see it
    await recoverInterruptedWrites(parent, path.basename(dir));
    await assertDirOutput(dir, opts);

    const suffix = randomSuffix();
    const tmp = leftoverName(dir, "tmp", suffix);
    const fresh = leftoverName(dir, "new", suffix);
    const old = leftoverName(dir, "old", suffix);
    try {
        await fs.mkdir(tmp); // fails on anything already there: never fills a planted folder or link
        await fill(tmp);
        await writeQloraMarker(tmp, opts.kind);
        await fsyncTree(tmp);
        await fs.rename(tmp, fresh); // from here the new folder is complete: recovery puts it in place
        await fsyncDir(parent);
    } catch (err) {
        await fs.rm(tmp, {recursive: true, force: true}).catch(() => undefined);
        throw writeError(err, dir, "folder");
    }
    try {
        // the target may have changed while the folder was filled
        await assertDirOutput(dir, opts);
    } catch (err) {
        await fs.rm(fresh, {recursive: true, force: true}).catch(() => undefined);
        throw err;
    }
    let hadOld = false;
    try {
        await fs.rename(dir, old);
        hadOld = true;
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
            await fs.rm(fresh, {recursive: true, force: true}).catch(() => undefined);
            throw writeError(err, dir, "folder");
        }
    }
    try {
        await fs.rename(fresh, dir);
    } catch (err) {
        // put the old folder back and drop the new one (the command failed); if the old one cannot go back, both
        // stay under their leftover names for recoverInterruptedWrites
        const restored =
            !hadOld ||
            (await fs.rename(old, dir).then(
                () => true,
                () => false
            ));
        if (restored) await fs.rm(fresh, {recursive: true, force: true}).catch(() => undefined);
        throw writeError(err, dir, "folder");
    }
    await fsyncDir(parent);
    if (hadOld) await fs.rm(old, {recursive: true, force: true}).catch(() => undefined);
}

interface Leftover {
    name: string;
    stage: "tmp" | "new" | "old";
    mtimeMs: number;
}

/**
 * Finishes or rolls back the folder swaps a killed process left in `parent` (only those of the entry named
 * `only`, when given): a complete `.NAME.new-R` is moved into place (the folder it replaces is removed), an
 * `.NAME.old-R` is moved back when NAME is missing and removed when NAME exists, and incomplete `.NAME.tmp-R`
 * temporaries (folders and files) are removed. Returns one line per thing done. Run it only where no other
 * process is writing (the trainer holds the output folder's lock).
 */
export async function recoverInterruptedWrites(parent: string, only?: string): Promise<string[]> {
    let entries: string[];
    try {
        entries = await fs.readdir(parent);
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
        throw new QloraError(`cannot read the folder (${errorCode(err)})`, {file: parent, cause: err});
    }
    const groups = new Map<string, Leftover[]>();
    for (const name of entries) {
        const m = LEFTOVER.exec(name);
        if (!m || (only !== undefined && m[1] !== only)) continue;
        const st = await lstatOrNull(path.join(parent, name));
        if (!st || st.isSymbolicLink()) continue; // qlora never creates links under these names
        const list = groups.get(m[1]) ?? [];
        list.push({name, stage: m[2] as Leftover["stage"], mtimeMs: st.mtimeMs});
        groups.set(m[1], list);
    }
    const done: string[] = [];
    for (const [base, list] of groups) {
        try {
            await recoverSwap(parent, base, list, done);
        } catch (err) {
            if (err instanceof QloraError) throw err;
            throw new QloraError(
                `cannot finish an interrupted write of ${base} (${errorCode(err)}); ` +
                    `check the folder's permissions (${done.length} other leftovers were handled)`,
                {file: parent, cause: err}
            );
        }
    }
    if (done.length > 0) await fsyncDir(parent);
    return done;
}

/** recovery of the leftovers of one name (see recoverInterruptedWrites); appends what it did to `done` */
async function recoverSwap(parent: string, base: string, list: Leftover[], done: string[]): Promise<void> {
    const target = path.join(parent, base);
    const remove = async (name: string, why: string) => {
        await fs.rm(path.join(parent, name), {recursive: true, force: true});
        done.push(`removed ${name} (${why})`);
    };
    const newest = (stage: Leftover["stage"]) => list.filter((l) => l.stage === stage).sort((a, b) => b.mtimeMs - a.mtimeMs);
    for (const t of newest("tmp")) await remove(t.name, "an incomplete temporary of a killed write");
    const olds = newest("old");
    const news = newest("new");
    const winner = news[0];
    // writeDirAtomic renames a folder to .new only once it is complete and marked
    const winnerKind = winner && (await readQloraMarker(path.join(parent, winner.name)))?.kind;
    if (winner && winnerKind === undefined) done.push(`left ${winner.name}: not a complete folder qlora wrote`);
    else if (winner && winnerKind !== undefined) {
        const existing = await lstatOrNull(target);
        let replaceable = existing === null;
        if (existing?.isDirectory()) {
            const marker = await readQloraMarker(target);
            replaceable = (await fs.readdir(target)).length === 0 || (marker !== null && marker.kind === winnerKind);
        }
        if (replaceable) {
            if (existing) {
                const aside = `.${base}.old-${randomSuffix()}`;
                await fs.rename(target, path.join(parent, aside));
                olds.unshift({name: aside, stage: "old", mtimeMs: Date.now()});
            }
            await fs.rename(path.join(parent, winner.name), target);
            done.push(
                `moved ${winner.name} into place as ${base} (it was complete; the write was killed before the swap finished)`
            );
            for (const other of news.slice(1)) await remove(other.name, "an older complete copy, superseded");
        } else {
            done.push(`left ${winner.name}: ${base} exists and was not written by qlora as a ${winnerKind}`);
        }
    }
    if (olds.length > 0) {
        if (await lstatOrNull(target)) {
            for (const o of olds) await remove(o.name, `the folder ${base} replaced`);
        } else {
            await fs.rename(path.join(parent, olds[0].name), target);
            done.push(`moved ${olds[0].name} back to ${base} (the replacement never completed)`);
            for (const o of olds.slice(1)) await remove(o.name, "an older replaced copy");
        }
    }
}

// ------------------------------------------------------------------------------------------------ checks

function isInside(child: string, parent: string): boolean {
    const rel = path.relative(parent, child);
    return rel !== "" && !rel.startsWith("..") && !path.isAbsolute(rel);
}

/** the real path of `p`: symlinks of its deepest existing ancestor resolved, the missing rest appended */
async function realPathDeep(p: string): Promise<string> {
    let existing = path.resolve(p);
    const rest: string[] = [];
    for (;;) {
        try {
            return path.join(await fs.realpath(existing), ...rest);
        } catch {
            const up = path.dirname(existing);
            if (up === existing) return path.resolve(p);
            rest.unshift(path.basename(existing));
            existing = up;
        }
    }
}

/**
 * Refuses an output path that is, or contains, one of the inputs (compared after resolving symlinks of the deepest
 * existing ancestor), naming both: e.g. "--out is the base model folder". Outputs inside an input folder are
 * allowed (llama.cpp users write GGUFs into the model folder).
 */
export async function assertOutputSeparate(out: string, inputs: {path: string; what: string}[], flag = "--out"): Promise<void> {
    const outReal = await realPathDeep(out);
    for (const input of inputs) {
        if (!input.path) continue;
        const inReal = await realPathDeep(input.path);
        if (inReal === outReal)
            throw new QloraError(
                `${flag} is the ${input.what}${path.resolve(input.path) === path.resolve(out) ? "" : ` (${input.path})`}; ` +
                    "qlora never writes over its inputs: choose another path",
                {file: out}
            );
        if (isInside(inReal, outReal))
            throw new QloraError(
                `${flag} contains the ${input.what} (${input.path}); qlora never writes over its inputs: ` +
                    "choose another path",
                {file: out}
            );
    }
}

/**
 * For single-file outputs (GGUF): a missing `file` is fine; an existing one is refused unless opts.overwrite, and
 * even then it must be a regular file that looksOwned(its first bytes) accepts (GGUF magic for GGUF outputs),
 * never a folder, a symlink or a device.
 */
export async function assertFileOutput(
    file: string,
    opts: {overwrite: boolean; flag?: string; looksOwned?: (head: Uint8Array) => boolean; what?: string; overwriteHint?: string}
): Promise<void> {
    const st = await lstatOrNull(file);
    if (!st) return;
    const hint = opts.overwriteHint ?? "--overwrite";
    if (st.isSymbolicLink())
        throw new QloraError("is a symbolic link; qlora does not write through or replace links: give a new file's path", {file});
    if (st.isDirectory())
        throw new QloraError(
            `is a folder; ${opts.flag ?? "--out"} takes the path of the file to write (e.g. ` +
                `${path.join(file, "model.gguf")})`,
            {file}
        );
    if (!st.isFile()) throw new QloraError("exists and is not a regular file; choose another path", {file});
    if (!opts.overwrite) throw new QloraError(`already exists; pass ${hint} to replace it, or choose another path`, {file});
    if (opts.looksOwned) {
        const {handle} = await openRegularFile(file);
        let head: Uint8Array;
        try {
            const buf = Buffer.alloc(64);
            const {bytesRead} = await handle.read(buf, 0, buf.length, 0);
            head = buf.subarray(0, bytesRead);
        } finally {
            await handle.close().catch(() => undefined);
        }
        if (!opts.looksOwned(head))
            throw new QloraError(
                `exists and is not ${opts.what ?? "a file qlora writes"}; ${hint} replaces only such ` +
                    "files: choose another path",
                {file}
            );
    }
}
