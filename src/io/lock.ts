// lock.ts: one qlora process at a time in a folder (a training run's output_dir). The lock is a small JSON file
// created exclusively (written under a random temporary name, then hard-linked to the lock name: link fails when
// the name exists, so the lock appears complete or not at all) naming the owner: pid, host, start time, command.
//
// A lock left by a killed process is stale when its owner is on this host and is gone: the pid is not alive, or it
// is alive but is another process (its start time in /proc differs, or the host rebooted). Taking over a stale lock
// is guarded by an exclusive file named after the stale lock's random token, so of two processes racing to take
// over the same stale lock, only one removes it, and the exclusive link decides who gets the new one.
import {randomBytes} from "node:crypto";
import {closeSync, constants, fstatSync, openSync, promises as fs, readFileSync, readSync, unlinkSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {QloraError} from "../errors.js";
import {readTextFile} from "./files.js";

/** the lock file's name inside the locked folder; names starting with it belong to the lock */
export const LOCK_FILE = ".qlora.lock";

export interface LockOwner {
    pid: number;
    hostname: string;
    /** ISO time the lock was taken */
    started: string;
    /** what holds it, e.g. "qlora train" */
    command: string;
    /** the process's command line, to help a user find it */
    argv: string;
    /** random, unique to this lock: tells a lock from a later one of the same pid */
    token: string;
    /** Linux: the boot and the process start time (clock ticks since boot), so a reused pid is not taken for the owner */
    boot_id: string | null;
    start_ticks: string | null;
}

export interface FolderLock {
    readonly file: string;
    readonly owner: LockOwner;
    /** removes the lock file (only if it is still this lock); safe to call twice */
    release(): Promise<void>;
}

/** tokens of the locks this process holds: a lock with this pid but another token was left by an earlier process */
const heldTokens = new Set<string>();

function readProcFile(file: string): string | null {
    try {
        return readFileSync(file, "utf8").trim();
    } catch {
        return null;
    }
}

/** field 22 of /proc/PID/stat (start time in clock ticks after boot), or null off Linux */
function processStartTicks(pid: number): string | null {
    const stat = readProcFile(`/proc/${pid}/stat`);
    if (!stat) return null;
    // the command name (field 2) is in parentheses and may hold spaces: count fields after the last ")"
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return rest[19] ?? null;
}

function bootId(): string | null {
    return readProcFile("/proc/sys/kernel/random/boot_id");
}

function parseOwner(text: string): LockOwner | null {
    try {
        const o = JSON.parse(text) as Partial<LockOwner>;
        if (
            typeof o !== "object" ||
            o === null ||
            !Number.isSafeInteger(o.pid) ||
            (o.pid as number) <= 0 ||
            typeof o.hostname !== "string" ||
            typeof o.token !== "string" ||
            !/^[0-9a-f]{32}$/.test(o.token)
        )
            return null;
        return {
            pid: o.pid!,
            hostname: o.hostname,
            started: String(o.started ?? "?"),
            command: String(o.command ?? "qlora"),
            argv: String(o.argv ?? ""),
            token: o.token,
            boot_id: typeof o.boot_id === "string" ? o.boot_id : null,
            start_ticks: typeof o.start_ticks === "string" ? o.start_ticks : null
        };
    } catch {
        return null;
    }
}

type ReadResult = {state: "gone"} | {state: "unreadable"; why: string} | {state: "held"; owner: LockOwner};

async function readLock(file: string): Promise<ReadResult> {
    let text: string;
    try {
        // qlora's lock is a regular file: a link under its name is not followed (a dangling one would read as gone)
        if ((await fs.lstat(file)).isSymbolicLink()) return {state: "unreadable", why: "a symbolic link, not a qlora lock file"};
        text = await readTextFile(file, {what: "lock file", maxBytes: 1 << 16});
    } catch (err) {
        const code = (err as NodeJS.ErrnoException).code ?? ((err as Error).cause as NodeJS.ErrnoException | undefined)?.code;
        if (code === "ENOENT") return {state: "gone"};
        return {state: "unreadable", why: (err as Error).message};
    }
    const owner = parseOwner(text);
    return owner ? {state: "held", owner} : {state: "unreadable", why: "not a qlora lock file"};
}

/** "dead": the owner is certainly gone; "alive": it runs; "unknown": another host, nothing can be said */
function ownerLiveness(owner: LockOwner): "alive" | "dead" | "unknown" {
    if (owner.hostname !== os.hostname()) return "unknown";
    if (owner.pid === process.pid) return heldTokens.has(owner.token) ? "alive" : "dead";
    const boot = bootId();
    if (owner.boot_id && boot && owner.boot_id !== boot) return "dead"; // the host restarted since
    try {
        process.kill(owner.pid, 0);
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ESRCH") return "dead";
        // EPERM: a process of another user has this pid; it may be the owner
    }
    const ticks = processStartTicks(owner.pid);
    if (owner.start_ticks && ticks && ticks !== owner.start_ticks) return "dead"; // the pid was reused
    return "alive";
}

/** the process that holds `dir`'s lock, when one does (a lock whose owner is certainly gone is no holder) */
export async function folderLockHolder(dir: string): Promise<LockOwner | null> {
    const lock = await readLock(path.join(dir, LOCK_FILE));
    return lock.state === "held" && ownerLiveness(lock.owner) !== "dead" ? lock.owner : null;
}

/** creates the lock file with the owner's JSON in one step; false when a lock file exists */
async function tryCreate(file: string, owner: LockOwner): Promise<boolean> {
    const tmp = `${file}.${randomBytes(8).toString("hex")}.tmp`;
    await fs.writeFile(tmp, JSON.stringify(owner, null, 2) + "\n", {flag: "wx"});
    try {
        await fs.link(tmp, file);
        return true;
    } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "EEXIST") return false;
        if (code !== "EPERM" && code !== "ENOTSUP" && code !== "EOPNOTSUPP" && code !== "ENOSYS") throw err;
        // file systems without hard links: exclusive create (a reader may briefly see it empty and retries)
        try {
            await fs.writeFile(file, JSON.stringify(owner, null, 2) + "\n", {flag: "wx"});
            return true;
        } catch (err2) {
            if ((err2 as NodeJS.ErrnoException).code === "EEXIST") return false;
            throw err2;
        }
    } finally {
        await fs.rm(tmp, {force: true}).catch(() => undefined);
    }
}

/**
 * Removes the stale lock `stale` if the lock file still is that lock. Only the process that creates the guard named
 * after its token may remove it, so two takers never remove a lock that one of them has just taken.
 * Returns false when another process is taking it over right now.
 */
async function removeStale(file: string, stale: LockOwner): Promise<boolean> {
    const guard = `${file}.takeover-${stale.token}`;
    try {
        await fs.writeFile(guard, JSON.stringify({pid: process.pid, hostname: os.hostname()}), {flag: "wx"});
    } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
        // a taker that died holding the guard would block the folder for good: its guard is stale too (a dead pid on
        // this host, or a guard that a kill left empty and that stayed so for seconds)
        const holder = parseGuard(readSmallFileSync(guard));
        const age = Date.now() - ((await fs.lstat(guard).catch(() => null))?.mtimeMs ?? Date.now());
        if (holder ? holder.hostname === os.hostname() && holder.pid !== process.pid && !pidAlive(holder.pid) : age > 10_000)
            await fs.rm(guard, {force: true});
        return false;
    }
    try {
        const now = await readLock(file);
        if (now.state === "held" && now.owner.token === stale.token) await fs.rm(file, {force: true});
    } finally {
        await fs.rm(guard, {force: true}).catch(() => undefined);
    }
    return true;
}

/** a small regular file's text, or null; never blocks on a FIFO planted under the name */
function readSmallFileSync(file: string): string | null {
    let fd: number;
    try {
        fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch {
        return null;
    }
    try {
        if (!fstatSync(fd).isFile()) return null;
        const buf = Buffer.alloc(1 << 16);
        return buf.subarray(0, readSync(fd, buf, 0, buf.length, 0)).toString("utf8");
    } catch {
        return null;
    } finally {
        closeSync(fd);
    }
}

function parseGuard(text: string | null): {pid: number; hostname: string} | null {
    try {
        const g = JSON.parse(text ?? "") as {pid?: unknown; hostname?: unknown};
        return Number.isSafeInteger(g.pid) && typeof g.hostname === "string"
            ? {pid: g.pid as number, hostname: g.hostname}
            : null;
    } catch {
        return null;
    }
}

function pidAlive(pid: number): boolean {
    try {
        process.kill(pid, 0);
        return true;
    } catch (err) {
        return (err as NodeJS.ErrnoException).code !== "ESRCH";
    }
}

/** temporaries of lock attempts that a kill interrupted (older than a minute, so none of a live attempt) */
async function removeOldTemporaries(dir: string): Promise<void> {
    const names = await fs.readdir(dir).catch(() => [] as string[]);
    for (const name of names) {
        if (!/^\.qlora\.lock\.([0-9a-f]{16}\.tmp|takeover-[0-9a-f]{32})$/.test(name)) continue;
        const st = await fs.lstat(path.join(dir, name)).catch(() => null);
        if (st?.isFile() && Date.now() - st.mtimeMs > 60_000)
            await fs.rm(path.join(dir, name), {force: true}).catch(() => undefined);
    }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Takes the lock of `dir` (which must exist) for `command`. A lock held by a live process is refused with a
 * one-line message naming it, e.g. "output_dir is in use by qlora train (pid 1234, started ...); wait for it or
 * choose another output_dir"; a stale lock (its process is gone) is taken over. `what` names the folder in
 * messages ("output_dir"). The lock is released by release(), and at the latest when the process exits.
 */
export async function acquireFolderLock(dir: string, command: string, what: string): Promise<FolderLock> {
    const file = path.join(dir, LOCK_FILE);
    const owner: LockOwner = {
        pid: process.pid,
        hostname: os.hostname(),
        started: new Date().toISOString(),
        command,
        argv: process.argv.slice(1).join(" "),
        token: randomBytes(16).toString("hex"),
        boot_id: bootId(),
        start_ticks: processStartTicks(process.pid)
    };
    // registered before the file exists, so an owner check in this process never takes the new lock for stale
    heldTokens.add(owner.token);
    try {
        for (let attempt = 0; attempt < 50; attempt++) {
            if (await tryCreate(file, owner)) {
                await removeOldTemporaries(dir);
                return holdLock(file, owner);
            }
            const current = await readLock(file);
            if (current.state === "gone") continue; // released meanwhile: try again
            if (current.state === "unreadable") {
                // a lock being written by the no-hard-link fallback is empty for an instant
                if (attempt < 5) {
                    await sleep(20);
                    continue;
                }
                throw new QloraError(
                    `${what} has a lock file that cannot be read (${current.why}); if no qlora process ` +
                        `is using ${what}, remove ${file}`,
                    {file: dir}
                );
            }
            const liveness = ownerLiveness(current.owner);
            if (liveness !== "dead") {
                const o = current.owner;
                const where = o.hostname === os.hostname() ? "" : ` on host ${o.hostname}`;
                throw new QloraError(
                    `${what} is in use by ${o.command} (pid ${o.pid}${where}, started ${o.started}); wait ` +
                        `for it or choose another ${what} (if that process is gone, remove ${file})`,
                    {file: dir}
                );
            }
            if (!(await removeStale(file, current.owner))) await sleep(10 + Math.random() * 40);
        }
        throw new QloraError(`could not take the lock of ${what}: other processes keep taking it; try again`, {file: dir});
    } catch (err) {
        heldTokens.delete(owner.token);
        throw err;
    }
}

function holdLock(file: string, owner: LockOwner): FolderLock {
    let released = false;
    // the token stays registered until the file is gone, so no other lock attempt in this process takes it for stale
    const done = () => {
        released = true;
        process.removeListener("exit", releaseSync);
    };
    // the last resort: process.exit() (e.g. a second Ctrl+C) skips finally blocks but runs "exit" listeners
    function releaseSync(): void {
        if (released) return;
        done();
        try {
            if (parseOwner(readSmallFileSync(file) ?? "")?.token === owner.token) unlinkSync(file);
        } catch {
            // already gone
        }
        heldTokens.delete(owner.token);
    }
    process.on("exit", releaseSync);
    return {
        file,
        owner,
        async release() {
            if (released) return;
            done();
            try {
                const now = await readLock(file);
                if (now.state === "held" && now.owner.token === owner.token) await fs.rm(file, {force: true});
            } finally {
                heldTokens.delete(owner.token);
            }
        }
    };
}
