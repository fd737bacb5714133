// hub.ts: models from the Hugging Face Hub, in the cache that huggingface_hub shares with every Python tool
// (transformers, peft, trl): `$HF_HUB_CACHE` or `$HF_HOME/hub` or `~/.cache/huggingface/hub`, one folder per repo
// `models--{org}--{name}` with blobs/{etag} (the files' contents, named by their hash), snapshots/{commit}/{file}
// (relative symlinks into blobs/) and refs/{revision} (the commit a branch or tag pointed to). A model downloaded
// here is found by Python and the other way round.
//
// Only the files qlora reads are fetched: config.json, the tokenizer's files, chat_template.jinja and the
// safetensors weights; never pickles (*.bin, *.pt, *.pth), other frameworks' weights or code (*.py): qlora runs no
// code from a model folder. Every blob is downloaded to blobs/{etag}.incomplete (continued by the next run with a
// Range request), checked against its size and hash, renamed into place; the snapshot's links and the ref are made
// only when every file of the selection is there, so a snapshot never holds a half-written file.
import {createHash} from "node:crypto";
import {promises as fs, lstatSync, readFileSync, statSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {QloraError} from "../errors.js";
import {writeFileAtomic} from "./atomic.js";
import {pathExists, readOptionalTextFile, readTextFile} from "./files.js";
import {acquireFolderLock} from "./lock.js";
import {SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE} from "./safetensors.js";
import {
    downloadToIncomplete,
    type FileMetadata,
    fetchFileMetadata,
    fetchRevisionInfo,
    HubNotFoundError,
    type HubSettings,
    isCommitHash,
    isNetworkError,
    type RequestContext
} from "./hub-http.js";

export {HubNotFoundError, type HubSettings} from "./hub-http.js";

export const DEFAULT_HUB_ENDPOINT = "https://huggingface.co";
export const DEFAULT_REVISION = "main";

// ------------------------------------------------------------------------------------------------ settings

/** huggingface_hub's constants._is_true */
const isTrue = (value: string | undefined) => value !== undefined && ["1", "ON", "YES", "TRUE"].includes(value.toUpperCase());

/** Python's os.path.expanduser + expandvars, which huggingface_hub applies to its paths */
function expandPath(p: string, env: NodeJS.ProcessEnv): string {
    const home = p === "~" || p.startsWith("~/") ? path.join(os.homedir(), p.slice(1)) : p;
    return home.replace(/\$(\w+|\{[^}]*\})/g, (m, name: string) => env[name.replace(/^\{|\}$/g, "")] ?? m);
}

/** $HF_HOME, or $XDG_CACHE_HOME/huggingface, or ~/.cache/huggingface */
function hfHome(env: NodeJS.ProcessEnv): string {
    return expandPath(env.HF_HOME ?? path.join(env.XDG_CACHE_HOME ?? path.join(os.homedir(), ".cache"), "huggingface"), env);
}

/** the hub cache as huggingface_hub finds it: HF_HUB_CACHE, the legacy HUGGINGFACE_HUB_CACHE, or $HF_HOME/hub */
export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
    return path.resolve(expandPath(env.HF_HUB_CACHE ?? env.HUGGINGFACE_HUB_CACHE ?? path.join(hfHome(env), "hub"), env));
}

/** HF_HUB_OFFLINE=1 (or transformers' TRANSFORMERS_OFFLINE=1) */
export function hubOffline(env: NodeJS.ProcessEnv = process.env): boolean {
    return isTrue(env.HF_HUB_OFFLINE || env.TRANSFORMERS_OFFLINE);
}

/** the settings of huggingface_hub's environment variables; the token: HF_TOKEN, else the token file */
export async function hubSettings(env: NodeJS.ProcessEnv = process.env): Promise<HubSettings> {
    const endpoint = (env.HF_ENDPOINT || DEFAULT_HUB_ENDPOINT).replace(/\/+$/, "");
    let url: URL | null = null;
    try {
        url = new URL(endpoint);
    } catch {
        // reported below
    }
    if (!url || (url.protocol !== "https:" && url.protocol !== "http:"))
        throw new QloraError(`HF_ENDPOINT is ${JSON.stringify(endpoint)}, expected an http(s) URL such as https://hf-mirror.com`);
    let token = (env.HF_TOKEN || env.HUGGING_FACE_HUB_TOKEN || "").trim() || null;
    let tokenSource: string | null = token ? (env.HF_TOKEN?.trim() ? "HF_TOKEN" : "HUGGING_FACE_HUB_TOKEN") : null;
    if (!token) {
        const file = expandPath(env.HF_TOKEN_PATH ?? path.join(hfHome(env), "token"), env);
        token = (await readOptionalTextFile(file, {what: "Hugging Face token file", maxBytes: 64 << 10}))?.trim() || null;
        tokenSource = token ? file : null;
    }
    const timeout = Number(env.HF_HUB_ETAG_TIMEOUT ?? 10);
    return {
        endpoint,
        cacheDir: hubCacheDir(env),
        token,
        tokenSource,
        offline: hubOffline(env),
        metadataTimeoutSeconds: Number.isFinite(timeout) && timeout > 0 ? timeout : 10
    };
}

// ------------------------------------------------------------------------------------------------ names

/** one part of a repo id as huggingface_hub's validate_repo_id accepts it (word characters, dots and dashes) */
const REPO_PART = /^[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?$/;

/** "org/name" as the Hub spells a model (the form qlora takes for --model; a bare name is a folder) */
export function isHubModelId(text: string): boolean {
    const parts = text.split("/");
    return (
        parts.length === 2 &&
        parts.every((p) => REPO_PART.test(p)) &&
        !text.includes("--") &&
        !text.includes("..") &&
        !text.endsWith(".git")
    );
}

function checkRepoId(repoId: string): void {
    if (!isHubModelId(repoId))
        throw new QloraError(
            `${JSON.stringify(repoId)} is not a Hugging Face model id: expected ORG/NAME (letters, digits, "_", "-" and ".", ` +
                `e.g. Qwen/Qwen2-0.5B)`
        );
}

/** a branch, tag or commit; refs/{revision} is a path in the cache, so no segment may climb out of it */
function checkRevision(revision: string): void {
    const segments = revision.split("/");
    if (revision.length === 0 || revision.length > 256 || segments.some((s) => s === "" || s === "." || s === ".."))
        throw new QloraError(`--revision ${JSON.stringify(revision)} is not a branch, tag or commit hash`);
}

/** models--{org}--{name}, huggingface_hub's repo_folder_name */
export function repoFolderName(repoId: string): string {
    return ["models", ...repoId.split("/")].join("--");
}

/** the repo id of a snapshot folder of the cache (…/models--org--name/snapshots/{commit}), else null */
export function hubIdOfSnapshot(dir: string): string | null {
    const m = /(?:^|[\\/])models--([^\\/]+?)--([^\\/]+)[\\/]snapshots[\\/][0-9a-f]{40}[\\/]?$/.exec(dir);
    return m ? `${m[1]}/${m[2]}` : null;
}

// ------------------------------------------------------------------------------------------------ which files

/** weights of other frameworks and pickles: never fetched */
const FOREIGN_WEIGHTS = /\.(bin|pt|pth|ckpt|h5|msgpack|onnx|gguf|pkl|pickle)$/i;

/** Python's fnmatch (as huggingface_hub's allow_patterns): * and ? match any character, [..] a class */
function globToRegExp(glob: string): RegExp {
    let re = "";
    for (let i = 0; i < glob.length; i++) {
        const c = glob[i];
        if (c === "*") re += ".*";
        else if (c === "?") re += ".";
        else if (c === "[" && glob.indexOf("]", i + 2) > 0) {
            const end = glob.indexOf("]", i + 2);
            const body = glob.slice(i + 1, end);
            re += `[${body.startsWith("!") ? "^" + body.slice(1) : body.replace(/^\^/, "\\^")}]`;
            i = end;
        } else re += c.replace(/[.+^${}()|\\/]/g, "\\$&");
    }
    return new RegExp(`^${re}$`, "s");
}

interface Selection {
    /** files to fetch first: config, tokenizer, the safetensors index */
    first: string[];
    /** the weights, when known before the index is read */
    weights: string[];
    /** true when the shards come from the index (read after `first`) */
    weightsFromIndex: boolean;
}

/**
 * What a model folder needs of the repo's files: `textFiles` (config.json, the tokenizer's) that exist, and the
 * weights the way transformers looks for them (model.safetensors, else the index and its shards). Only files
 * at the top of the repo (a subfolder such as original/ holds other copies). `include` narrows it (fnmatch).
 */
function selectFiles(
    repoId: string,
    repoFiles: readonly string[],
    opts: {textFiles: readonly string[]; include?: readonly string[]; weights: boolean}
): Selection {
    const top = repoFiles.filter((f) => !f.includes("/") && f !== "." && f !== "..");
    const safetensors = top.filter((f) => f.endsWith(".safetensors"));
    const patterns = opts.include?.map((p) => globToRegExp(p.endsWith("/") ? p + "*" : p));
    const wanted = (f: string) => !patterns || patterns.some((p) => p.test(f));
    const text = top.filter((f) => (opts.textFiles.includes(f) || f === SAFETENSORS_INDEX_FILE) && wanted(f));
    if (opts.include) {
        // --include chooses among the files qlora reads: config, tokenizer, index and any top-level safetensors
        const weights = safetensors.filter(wanted);
        if (text.length + weights.length === 0)
            throw new QloraError(
                `--include ${opts.include.join(" ")} matches none of the files of ${repoId} that qlora reads ` +
                    `(${[...top.filter((f) => opts.textFiles.includes(f) || f === SAFETENSORS_INDEX_FILE), ...safetensors].join(", ") || "none"}); ` +
                    "qlora never downloads code, pickles (*.bin, *.pt) or other frameworks' weights"
            );
        return {first: text, weights, weightsFromIndex: false};
    }
    if (!top.includes("config.json"))
        throw new QloraError(
            `${repoId} has no config.json at the top of the repo: it is not a transformers model qlora can load`
        );
    if (!opts.weights) return {first: text, weights: [], weightsFromIndex: false};
    if (top.includes(SAFETENSORS_SINGLE_FILE))
        return {
            first: text.filter((f) => f !== SAFETENSORS_INDEX_FILE),
            weights: [SAFETENSORS_SINGLE_FILE],
            weightsFromIndex: false
        };
    if (top.includes(SAFETENSORS_INDEX_FILE)) return {first: text, weights: [], weightsFromIndex: true};
    const foreign = top.filter((f) => FOREIGN_WEIGHTS.test(f));
    if (foreign.length > 0)
        throw new QloraError(
            `${repoId} has no safetensors weights, only ${foreign.slice(0, 3).join(", ")}${foreign.length > 3 ? ", …" : ""}: qlora reads ` +
                "safetensors only (a .bin/.pt file is a pickle, which can run code). Convert it with transformers: " +
                `AutoModelForCausalLM.from_pretrained("${repoId}").save_pretrained("DIR", safe_serialization=True), then pass --model DIR; ` +
                "or pass --revision of a safetensors conversion (a refs/pr/N branch of the repo)"
        );
    throw new QloraError(
        `${repoId} has neither ${SAFETENSORS_SINGLE_FILE} nor ${SAFETENSORS_INDEX_FILE} at the top of the repo` +
            (safetensors.length > 0 ? ` (it has ${safetensors.slice(0, 3).join(", ")}: pass --include to fetch them)` : "")
    );
}

/** the shard names an index lists (weight_map's values), each a plain file name at the top of the repo */
async function shardsOfIndex(indexFile: string, repoId: string): Promise<string[]> {
    let index: unknown;
    try {
        index = JSON.parse(await readTextFile(indexFile, {what: "safetensors index", maxBytes: 64 << 20}));
    } catch (err) {
        if (err instanceof QloraError) throw err;
        throw new QloraError(`${SAFETENSORS_INDEX_FILE} of ${repoId} is not valid JSON (${(err as Error).message})`, {
            cause: err
        });
    }
    const map = (index as {weight_map?: unknown} | null)?.weight_map;
    const shards = map && typeof map === "object" ? [...new Set(Object.values(map as Record<string, unknown>))] : [];
    if (shards.length === 0 || !shards.every((s) => typeof s === "string" && /^[^/\\]+\.safetensors$/.test(s) && s !== ".."))
        throw new QloraError(
            `${SAFETENSORS_INDEX_FILE} of ${repoId} has no usable "weight_map" (shard file names at the top of the repo)`
        );
    return shards as string[];
}

// ------------------------------------------------------------------------------------------------ progress

/** what a download reports; the CLI draws a progress bar on stderr from it */
export interface HubProgress {
    /** the files to fetch are known: their names and sizes, and how many bytes are already here */
    start?(info: {
        repoId: string;
        revision: string;
        commit: string;
        files: {name: string; size: number}[];
        totalBytes: number;
    }): void;
    /** bytes of `file` received (negative when a partial file starts over) */
    bytes?(file: string, n: number): void;
    /** `file` is complete and checked */
    fileDone?(file: string, size: number): void;
    /** a line worth telling: a retry, the cache used because the Hub cannot be reached */
    note?(message: string): void;
    /** the download ended (complete or not): a bar is taken down */
    end?(): void;
}

let defaultProgress: HubProgress = {};

/** the progress reporter of downloads that are not given one (the CLI sets its progress bar here once) */
export function setDefaultHubProgress(progress: HubProgress): void {
    defaultProgress = progress;
}

// ------------------------------------------------------------------------------------------------ the cache

/** the cache's folders for one repo */
function repoPaths(cacheDir: string, repoId: string) {
    const storage = path.join(cacheDir, repoFolderName(repoId));
    return {
        storage,
        blob: (etag: string) => path.join(storage, "blobs", etag),
        snapshot: (commit: string) => path.join(storage, "snapshots", commit),
        ref: (revision: string) => path.join(storage, "refs", ...revision.split("/")),
        lockDir: path.join(cacheDir, ".locks", repoFolderName(repoId))
    };
}

const COMMIT_FILE_MAX = 256;

/** refs/{revision}: the commit it last pointed to, or null (sync: a 40-byte file, checked to be a regular one) */
function readRefSync(file: string): string | null {
    try {
        const st = lstatSync(file);
        if (!st.isFile() || st.size > COMMIT_FILE_MAX) return null;
        const commit = readFileSync(file, "utf8").trim();
        return isCommitHash(commit) ? commit : null;
    } catch {
        return null;
    }
}

/** the snapshot folder a revision resolves to in the cache (a commit hash, or refs/{revision}), or null */
function cachedSnapshotDir(cacheDir: string, repoId: string, revision: string): string | null {
    const paths = repoPaths(cacheDir, repoId);
    const commit = isCommitHash(revision) ? revision : readRefSync(paths.ref(revision));
    if (!commit) return null;
    try {
        return statSync(paths.snapshot(commit)).isDirectory() ? paths.snapshot(commit) : null;
    } catch {
        return null;
    }
}

/** the files a snapshot (or local folder) lacks to be loaded: config.json, tokenizer.json, the weights */
async function missingModelFiles(dir: string, weights: boolean): Promise<string[]> {
    const missing: string[] = [];
    for (const f of ["config.json", "tokenizer.json"]) if (!(await pathExists(path.join(dir, f)))) missing.push(f);
    if (!weights || (await pathExists(path.join(dir, SAFETENSORS_SINGLE_FILE)))) return missing;
    const index = path.join(dir, SAFETENSORS_INDEX_FILE);
    if (!(await pathExists(index))) return [...missing, SAFETENSORS_SINGLE_FILE];
    for (const shard of await shardsOfIndex(index, dir)) if (!(await pathExists(path.join(dir, shard)))) missing.push(shard);
    return missing;
}

/**
 * The cached snapshot of `repoId` at `revision` (default main) when the ref exists and the snapshot has
 * config.json; null otherwise. Synchronous and without network: for callers that cannot wait (a complete model
 * is checked when it loads).
 */
export function cachedHubModelSync(
    repoId: string,
    revision = DEFAULT_REVISION,
    env: NodeJS.ProcessEnv = process.env
): string | null {
    if (!isHubModelId(repoId)) return null;
    const dir = cachedSnapshotDir(hubCacheDir(env), repoId, revision);
    try {
        return dir && statSync(path.join(dir, "config.json")).isFile() ? dir : null;
    } catch {
        return null;
    }
}

/** snapshots/{commit}/{file} → ../../blobs/{etag}, made under a temporary name and renamed (no window) */
async function linkIntoSnapshot(blob: string, pointer: string): Promise<void> {
    await fs.mkdir(path.dirname(pointer), {recursive: true});
    const tmp = `${pointer}.${process.pid}.${Math.random().toString(16).slice(2)}.tmp`;
    await fs.symlink(path.relative(path.dirname(pointer), blob), tmp);
    try {
        await fs.rename(tmp, pointer);
    } catch (err) {
        await fs.rm(tmp, {force: true});
        throw err;
    }
}

/** huggingface_hub's CACHEDIR.TAG, so backup tools skip the cache */
const CACHEDIR_TAG =
    "Signature: 8a477f597d28d172789f06886806bc55\n# This file is a cache directory tag created by huggingface_hub.\n" +
    "# For information about cache directory tags, see:\n#\thttps://bford.info/cachedir/\n";

async function tagCacheDir(dir: string): Promise<void> {
    const tag = path.join(dir, "CACHEDIR.TAG");
    if (!(await pathExists(tag))) await writeFileAtomic(tag, CACHEDIR_TAG).catch(() => undefined);
}

// ------------------------------------------------------------------------------------------------ --local-dir

/** huggingface_hub's _local_folder layout: DIR/.cache/huggingface/download/{file}.metadata (commit, etag, time) */
function localDirPaths(localDir: string, file: string) {
    const metaDir = path.join(localDir, ".cache", "huggingface", "download");
    const metadataName = `${file}.metadata`;
    // _short_hash: the urlsafe base64 (padded) of the sha1 of the metadata file's name
    const short = createHash("sha1").update(metadataName).digest("base64").replace(/\+/g, "-").replace(/\//g, "_");
    return {
        file: path.join(localDir, file),
        metadata: path.join(metaDir, metadataName),
        incomplete: (etag: string) => path.join(metaDir, `${short}.${etag}.incomplete`)
    };
}

async function readLocalMetadata(file: string): Promise<{commit: string; etag: string} | null> {
    const text = await readOptionalTextFile(file, {what: "download metadata", maxBytes: 4096}).catch(() => null);
    const [commit, etag] = (text ?? "").split("\n").map((l) => l.trim());
    return commit && etag ? {commit, etag} : null;
}

// ------------------------------------------------------------------------------------------------ downloading

export interface HubModelRequest {
    /** ORG/NAME */
    repoId: string;
    /** a branch, tag or commit hash (default main) */
    revision?: string;
    /** fnmatch patterns: only these of the files qlora reads */
    include?: readonly string[];
    /** real files in this folder (huggingface_hub's local_dir) instead of the cache */
    localDir?: string;
    /** the files besides the weights that a model folder holds: config.json and the tokenizer's */
    textFiles: readonly string[];
    /** false: the config and tokenizer files only (what reads no weights) */
    weights?: boolean;
    /** the environment to read HF_* from (default process.env) */
    env?: NodeJS.ProcessEnv;
    progress?: HubProgress;
}

export interface HubModelResult {
    /** the snapshot folder (or the --local-dir) */
    dir: string;
    /** the commit it holds */
    commit: string | null;
    /** bytes downloaded by this call (0: everything was here already) */
    downloadedBytes: number;
}

interface PlannedFile {
    name: string;
    meta: FileMetadata;
}

/**
 * Makes `repoId` at `revision` available as a model folder and returns it: with HF_HUB_OFFLINE=1 the cached
 * snapshot (no network; a missing or incomplete one is a one-line error); else the revision is resolved to its
 * commit (one API request), the selected files that are not in the cache yet are downloaded, and the snapshot
 * returned. When the Hub cannot be reached, a complete cached snapshot of the revision is used (as
 * huggingface_hub does) and progress.note says so.
 */
export async function fetchHubModel(req: HubModelRequest): Promise<HubModelResult> {
    const revision = req.revision ?? DEFAULT_REVISION;
    checkRepoId(req.repoId);
    checkRevision(revision);
    const settings = await hubSettings(req.env);
    const progress = req.progress ?? defaultProgress;
    const weights = req.weights ?? true;
    const ctx = {repoId: req.repoId, revision, settings};
    /** the copy already here (cache or --local-dir), or why it cannot be used */
    const fromCache = async (): Promise<HubModelResult | {problem: string}> => {
        const dir = req.localDir ? path.resolve(req.localDir) : cachedSnapshotDir(settings.cacheDir, req.repoId, revision);
        const where = req.localDir ? `--local-dir ${dir}` : `the Hugging Face cache (${settings.cacheDir})`;
        if (!dir || !(await pathExists(dir)))
            return {problem: `${req.repoId}${revision === DEFAULT_REVISION ? "" : ` (revision ${revision})`} is not in ${where}`};
        const missing = req.include ? [] : await missingModelFiles(dir, weights);
        if (missing.length > 0) return {problem: `the copy of ${req.repoId} in ${where} lacks ${missing.join(", ")}`};
        return {dir, commit: req.localDir ? null : path.basename(dir), downloadedBytes: 0};
    };
    if (settings.offline) {
        const cached = await fromCache();
        if ("problem" in cached)
            throw new HubNotFoundError(
                `${cached.problem} and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE, or run ` +
                    "`qlora download` where the Hub can be reached"
            );
        return cached;
    }

    let info: Awaited<ReturnType<typeof fetchRevisionInfo>>;
    try {
        info = await fetchRevisionInfo(ctx);
    } catch (err) {
        // no answer: a complete copy from before is used, as huggingface_hub does
        const cached = isNetworkError(err) ? await fromCache() : null;
        if (cached === null || "problem" in cached) throw err;
        progress.note?.(
            `${(err as Error).message.split(" (")[0]}; using the copy of ${req.repoId} in the cache (commit ${cached.commit?.slice(0, 7) ?? "?"})`
        );
        return cached;
    }
    const selection = selectFiles(req.repoId, info.files, {textFiles: req.textFiles, include: req.include, weights});
    const fileCtx = {...ctx, revision: info.sha};
    const paths = repoPaths(settings.cacheDir, req.repoId);
    const localDir = req.localDir ? path.resolve(req.localDir) : null;
    const snapshot = localDir ?? paths.snapshot(info.sha);
    let downloadedBytes = 0;
    const done: PlannedFile[] = [];
    /** fetches what of `names` the snapshot lacks; `quiet`: no progress bar (the index, read before the rest) */
    const fetchAll = async (names: string[], quiet = false) => {
        // a file already in the snapshot needs no request (huggingface_hub: a pointer of a known commit)
        const todo: PlannedFile[] = [];
        for (const name of names) {
            if (done.some((f) => f.name === name)) continue;
            const present = localDir
                ? await localFileCurrent(localDir, name, info.sha)
                : await pathExists(path.join(snapshot, name));
            if (!present) todo.push({name, meta: await fetchFileMetadata({...fileCtx, file: name})});
        }
        if (todo.length === 0) return;
        const report = quiet ? {} : progress;
        const total = todo.reduce((n, f) => n + f.meta.size, 0);
        report.start?.({
            repoId: req.repoId,
            revision,
            commit: info.sha,
            files: todo.map((f) => ({name: f.name, size: f.meta.size})),
            totalBytes: total
        });
        await warnIfDiskTooSmall(localDir ?? settings.cacheDir, total, progress);
        const lock = await lockDownloads(localDir, paths.lockDir);
        try {
            if (!localDir) await tagCacheDir(settings.cacheDir);
            for (const file of todo) {
                const options = {localDir, paths, fileCtx, progress: report, cacheDir: settings.cacheDir, repoId: req.repoId};
                downloadedBytes += await fetchOne(file, options);
                done.push(file);
            }
        } finally {
            report.end?.();
            await lock.release();
        }
    };
    let weightFiles = selection.weights;
    if (selection.weightsFromIndex) {
        // the index (a few kB) says which shards hold the weights
        await fetchAll([SAFETENSORS_INDEX_FILE], true);
        const index = done.find((f) => f.name === SAFETENSORS_INDEX_FILE);
        const indexPath = localDir
            ? path.join(localDir, SAFETENSORS_INDEX_FILE)
            : index
              ? paths.blob(index.meta.etag)
              : path.join(snapshot, SAFETENSORS_INDEX_FILE);
        weightFiles = await shardsOfIndex(indexPath, req.repoId);
        const absent = weightFiles.filter((s) => !info.files.includes(s));
        if (absent.length > 0)
            throw new QloraError(
                `${SAFETENSORS_INDEX_FILE} of ${req.repoId} lists ${absent.join(", ")}, which the repo does not have`
            );
    }
    await fetchAll([...selection.first, ...weightFiles]);
    // every blob is complete and checked: now the snapshot's links, then the ref (huggingface_hub's layout)
    if (!localDir) {
        for (const file of done) await linkIntoSnapshot(paths.blob(file.meta.etag), path.join(snapshot, file.name));
        if (revision !== info.sha) {
            const ref = paths.ref(revision);
            await fs.mkdir(path.dirname(ref), {recursive: true});
            if (readRefSync(ref) !== info.sha) await writeFileAtomic(ref, info.sha);
        }
    }
    return {dir: snapshot, commit: info.sha, downloadedBytes};
}

/**
 * One process at a time downloads into a repo's blobs (or a --local-dir): two would append to the same
 * .incomplete file. Taken only to download, so runs that find the model complete never wait for each other.
 */
async function lockDownloads(localDir: string | null, cacheLockDir: string) {
    const dir = localDir ? path.join(localDir, ".cache", "huggingface", "download") : cacheLockDir;
    try {
        await fs.mkdir(dir, {recursive: true});
    } catch (err) {
        throw new QloraError(
            `cannot create the folder (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); ` +
                (localDir ? "choose a --local-dir you can write to" : "set HF_HUB_CACHE to a folder you can write to"),
            {file: dir, cause: err}
        );
    }
    return acquireFolderLock(dir, "qlora download", localDir ? "--local-dir" : "HF_HUB_CACHE");
}

/** whether --local-dir already holds `name` of this commit (its metadata says so and the file is there) */
async function localFileCurrent(localDir: string, name: string, commit: string): Promise<boolean> {
    const p = localDirPaths(localDir, name);
    const meta = await readLocalMetadata(p.metadata);
    return meta !== null && meta.commit === commit && (await pathExists(p.file));
}

async function warnIfDiskTooSmall(dir: string, bytes: number, progress: HubProgress): Promise<void> {
    try {
        const st = await fs.statfs(dir);
        const free = st.bavail * st.bsize;
        if (free < bytes)
            progress.note?.(
                `the download needs ${(bytes / 2 ** 30).toFixed(2)} GiB and ${dir} has ${(free / 2 ** 30).toFixed(2)} GiB free ` +
                    "(set HF_HUB_CACHE to another disk)"
            );
    } catch {
        // statfs is only for the warning
    }
}

/** fetches one file into blobs/ (or --local-dir); returns the bytes downloaded */
async function fetchOne(
    file: PlannedFile,
    ctx: {
        localDir: string | null;
        paths: ReturnType<typeof repoPaths>;
        fileCtx: RequestContext;
        progress: HubProgress;
        cacheDir: string;
        repoId: string;
    }
): Promise<number> {
    const {meta, name} = file;
    const cachedBlob = ctx.paths.blob(meta.etag);
    let target: string;
    let incomplete: string;
    if (ctx.localDir) {
        const p = localDirPaths(ctx.localDir, name);
        target = p.file;
        incomplete = p.incomplete(meta.etag);
        const old = await readLocalMetadata(p.metadata);
        if (await pathExists(target)) {
            if (old?.etag === meta.etag) {
                await writeLocalMetadata(p.metadata, meta);
                ctx.progress.bytes?.(name, meta.size);
                ctx.progress.fileDone?.(name, meta.size);
                return 0;
            }
            // never replace a file that is not an earlier download of this repo
            if (!old)
                throw new QloraError(
                    `exists and is not a download qlora or huggingface_hub made (no ${path.relative(ctx.localDir, p.metadata)}); ` +
                        "move it away or choose another --local-dir",
                    {file: target}
                );
        }
        // the cache may have the blob already: copy it instead of downloading (huggingface_hub does too)
        if (await pathExists(cachedBlob)) await fs.copyFile(cachedBlob, incomplete);
    } else {
        target = cachedBlob;
        incomplete = `${cachedBlob}.incomplete`;
        if (await pathExists(target)) {
            ctx.progress.bytes?.(name, meta.size);
            ctx.progress.fileDone?.(name, meta.size);
            return 0;
        }
    }
    await fs.mkdir(path.dirname(incomplete), {recursive: true});
    let received = 0;
    await downloadToIncomplete(
        meta.location,
        incomplete,
        meta,
        {...ctx.fileCtx, file: name},
        {
            bytes: (n, fromNetwork) => {
                if (fromNetwork) received += n;
                ctx.progress.bytes?.(name, n);
            },
            note: (m) => ctx.progress.note?.(m)
        }
    );
    await fs.mkdir(path.dirname(target), {recursive: true});
    await fs.rename(incomplete, target);
    if (ctx.localDir) await writeLocalMetadata(localDirPaths(ctx.localDir, name).metadata, meta);
    ctx.progress.fileDone?.(name, meta.size);
    return received;
}

async function writeLocalMetadata(file: string, meta: FileMetadata): Promise<void> {
    await fs.mkdir(path.dirname(file), {recursive: true});
    await writeFileAtomic(file, `${meta.commit}\n${meta.etag}\n${Date.now() / 1000}\n`);
}
