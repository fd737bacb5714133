// cache.ts: evaluation results cached per (model, adapter, 4-bit, device, task file, data files, subject,
// settings), so a rerun, or a comparison that changes one of these, recomputes only what changed. A model or
// adapter folder is identified by its path and the names, sizes and modification times of its files (weights are
// never hashed: that would cost as much as loading them). One JSON file per subject: <dir>/<task>/<sha256>.json,
// holding its own key, checked when read (a damaged or foreign file is recomputed and replaced). The batch size is
// not in the key: it changes a score only through the float summation order.
import {createHash} from "node:crypto";
import {promises as fs} from "node:fs";
import os from "node:os";
import path from "node:path";
import {writeFileAtomic} from "../io/atomic.js";
import {readOptionalTextFile} from "../io/files.js";

/** bump when the scoring changes what a cached result holds or means */
export const EVAL_CACHE_VERSION = 1;

/** what identifies the model an evaluation ran */
export interface ModelIdentity {
    modelDir: string;
    adapterDir: string | null;
    loadIn4bit: boolean;
    device: "cpu" | "cuda";
    /**
     * what was made of model + adapter before it ran: "merged" (a 16-bit merge) or "gguf:TYPE" (that merge
     * exported to GGUF and run by llama.cpp); absent for the model as loaded
     */
    form?: string;
}

/** the cache folder: $QLORA_CACHE/eval, else $XDG_CACHE_HOME/qlora/eval, else ~/.cache/qlora/eval */
export function defaultCacheDir(): string {
    if (process.env.QLORA_CACHE) return path.join(path.resolve(process.env.QLORA_CACHE), "eval");
    const base = process.env.XDG_CACHE_HOME ? path.resolve(process.env.XDG_CACHE_HOME) : path.join(os.homedir(), ".cache");
    return path.join(base, "qlora", "eval");
}

/**
 * A file's or folder's identity: its real path and, per regular file, name, size and modification time. A model or
 * adapter folder holds its files at the top; a data folder (unpacked benchmark CSVs) is walked `depth` levels down.
 */
export async function fingerprint(p: string, depth = 0): Promise<unknown> {
    const real = await fs.realpath(p);
    const st = await fs.stat(real);
    if (!st.isDirectory()) return {path: real, size: st.size, mtime: st.mtimeMs};
    const files: [string, number, number][] = [];
    const walk = async (dir: string, rel: string, level: number) => {
        for (const name of (await fs.readdir(dir)).sort()) {
            const s = await fs.stat(path.join(dir, name)).catch(() => null);
            if (s?.isFile()) files.push([rel + name, s.size, s.mtimeMs]);
            else if (s?.isDirectory() && level < depth) await walk(path.join(dir, name), `${rel}${name}/`, level + 1);
        }
    };
    await walk(real, "", 0);
    return {path: real, files};
}

export class EvalCache {
    constructor(readonly dir: string = defaultCacheDir()) {}

    /** the file of a key */
    fileOf(task: string, key: string): string {
        return path.join(this.dir, task, `${createHash("sha256").update(key).digest("hex")}.json`);
    }

    /** the cached value of `key` (canonical JSON of the key object), or null */
    async get<T>(task: string, key: string): Promise<T | null> {
        const text = await readOptionalTextFile(this.fileOf(task, key), {what: "cache file", maxBytes: 256 << 20}).catch(
            () => null
        );
        if (text === null) return null;
        try {
            const entry = JSON.parse(text) as {version?: unknown; key?: unknown; value?: T};
            return entry.version === EVAL_CACHE_VERSION && entry.key === key && entry.value !== undefined ? entry.value : null;
        } catch {
            return null;
        }
    }

    async put(task: string, key: string, value: unknown): Promise<void> {
        const file = this.fileOf(task, key);
        await fs.mkdir(path.dirname(file), {recursive: true});
        await writeFileAtomic(file, JSON.stringify({version: EVAL_CACHE_VERSION, key, value}));
    }
}
