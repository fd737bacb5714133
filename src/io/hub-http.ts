// hub-http.ts: the Hugging Face Hub's HTTP endpoints as huggingface_hub uses them (file_download.py, hf_api.py):
// the revision API, the HEAD of a file's resolve URL (its commit, ETag and size), and the download of one file
// into a `.incomplete` file that a later run continues with a Range request, checked against its size and its
// content hash before it is renamed into place. Errors are one line that says what to do.
import {createHash, type Hash} from "node:crypto";
import {constants, promises as fs} from "node:fs";
import {QloraError} from "../errors.js";
import {openRegularFile} from "./files.js";

export interface HubSettings {
    /** HF_ENDPOINT without a trailing slash (default https://huggingface.co) */
    endpoint: string;
    /** HF_HUB_CACHE, or $HF_HOME/hub, or ~/.cache/huggingface/hub */
    cacheDir: string;
    /** HF_TOKEN, or the token file; never printed */
    token: string | null;
    /** where the token came from, for messages ("HF_TOKEN", or the token file's path) */
    tokenSource: string | null;
    /** HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): no network at all */
    offline: boolean;
    /** seconds to wait for the API and the HEAD requests (HF_HUB_ETAG_TIMEOUT, default 10) */
    metadataTimeoutSeconds: number;
}

/** what a request and its messages need: the repo, the revision (or commit), the settings */
export interface RequestContext {
    repoId: string;
    revision: string;
    settings: HubSettings;
    /** the file in the repo, for file requests */
    file?: string;
}

/** huggingface_hub's headers: the token as a bearer token, and no compression so sizes are the files' own */
export function hubHeaders(settings: HubSettings): Record<string, string> {
    const headers: Record<string, string> = {"user-agent": "qlora; node/" + process.versions.node, "accept-encoding": "identity"};
    if (settings.token) headers.authorization = `Bearer ${settings.token}`;
    return headers;
}

/** the fetch error's reason in a few words: the system error code, or the message */
function networkReason(err: unknown): string {
    const cause = (err as {cause?: {code?: string; message?: string}}).cause;
    if (cause?.code) return cause.code;
    if ((err as Error).name === "TimeoutError") return "timed out";
    return cause?.message ?? (err as Error).message;
}

/** the one line for a request that got no answer: the URL and what to try */
export function networkError(url: string, err: unknown): QloraError {
    return new QloraError(
        `cannot reach ${url} (${networkReason(err)}): check the network, or set HF_ENDPOINT to a mirror ` +
            "(e.g. HF_ENDPOINT=https://hf-mirror.com); a model downloaded before is used with HF_HUB_OFFLINE=1",
        {cause: err}
    );
}

/** true for errors of the network (no answer, a cut connection), as opposed to an HTTP status */
export function isNetworkError(err: unknown): boolean {
    return err instanceof HubNetworkError;
}

/** a request that got no answer: the message is networkError's; resolution may fall back to the cache */
export class HubNetworkError extends QloraError {}

/** the Hub has no such model (or hides it), or the offline cache lacks it: ORG/NAME may be a mistyped folder too */
export class HubNotFoundError extends QloraError {}

const RETRY_STATUSES = new Set([408, 429, 500, 502, 503, 504]);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** fetch with huggingface_hub's retries of busy or failing servers (408, 429, 5xx), a few times with backoff */
async function hubFetch(url: string, init: RequestInit, timeoutSeconds: number | null): Promise<Response> {
    for (let attempt = 0; ; attempt++) {
        let res: Response;
        try {
            res = await fetch(url, {
                ...init,
                signal: timeoutSeconds === null ? undefined : AbortSignal.timeout(timeoutSeconds * 1000)
            });
        } catch (err) {
            throw new HubNetworkError(networkError(url, err).message, {cause: err});
        }
        if (!RETRY_STATUSES.has(res.status) || attempt >= 3) return res;
        await res.body?.cancel().catch(() => undefined);
        await sleep(500 * 2 ** attempt);
    }
}

/**
 * The one line for an HTTP error of the Hub, from its X-Error-Code header as hf_raise_for_status reads it: a gated
 * model (401/403: accept the licence, set HF_TOKEN), a refused token, a missing repo or revision or file.
 */
export function hubHttpError(res: Response, url: string, ctx: RequestContext): QloraError {
    const code = res.headers.get("x-error-code");
    const serverMessage = res.headers.get("x-error-message");
    const {endpoint, token, tokenSource} = ctx.settings;
    const page = `${endpoint}/${ctx.repoId}`;
    if (code === "GatedRepo" || ((res.status === 401 || res.status === 403) && /gated/i.test(serverMessage ?? "")))
        return new QloraError(
            token
                ? `${ctx.repoId} is a gated model and the token from ${tokenSource} has no access to it (HTTP ${res.status}): ` +
                      `accept its licence on ${page} with that token's account (and wait for the approval), or use a token of an account that has access`
                : `${ctx.repoId} is a gated model (HTTP ${res.status}): accept its licence on ${page} while logged in, then set ` +
                      `HF_TOKEN to an access token of that account (${endpoint}/settings/tokens)`
        );
    if (res.status === 401 && token && serverMessage === "Invalid credentials in Authorization header")
        return new QloraError(
            `the Hub refused the token from ${tokenSource} (HTTP 401: invalid credentials): create a new one at ` +
                `${endpoint}/settings/tokens and set HF_TOKEN to it`
        );
    if (code === "RevisionNotFound")
        return new QloraError(
            `${ctx.repoId} has no revision "${ctx.revision}" on ${endpoint} (HTTP ${res.status}): give a branch, a tag or a ` +
                `commit hash of ${page}`
        );
    if (code === "EntryNotFound")
        return new QloraError(`${ctx.file} is not in ${ctx.repoId} at revision "${ctx.revision}" (HTTP ${res.status})`);
    if (code === "RepoNotFound" || res.status === 404 || res.status === 401)
        return new HubNotFoundError(
            `${ctx.repoId}: no such model on ${endpoint} (HTTP ${res.status}): check the name` +
                (token ? ` (the token from ${tokenSource} was sent)` : "; a private or gated model needs HF_TOKEN")
        );
    return new QloraError(
        `${url} answered HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ""}` +
            (serverMessage ? ` (${serverMessage})` : "") +
            (res.status >= 500 ? ": the Hub (or the mirror in HF_ENDPOINT) has a problem; try again later" : "")
    );
}

export interface RepoRevisionInfo {
    /** the commit the revision points to */
    sha: string;
    /** the repo's files, paths relative to its root */
    files: string[];
}

const COMMIT_HASH = /^[0-9a-f]{40}$/;
export const isCommitHash = (revision: string): boolean => COMMIT_HASH.test(revision);

/** GET {endpoint}/api/models/{repo}/revision/{revision}: the commit ("sha") and the file list ("siblings") */
export async function fetchRevisionInfo(ctx: RequestContext): Promise<RepoRevisionInfo> {
    const url = `${ctx.settings.endpoint}/api/models/${ctx.repoId}/revision/${encodeURIComponent(ctx.revision)}`;
    const res = await hubFetch(url, {headers: hubHeaders(ctx.settings)}, ctx.settings.metadataTimeoutSeconds);
    if (!res.ok) {
        await res.body?.cancel().catch(() => undefined);
        throw hubHttpError(res, url, ctx);
    }
    let body: {sha?: unknown; siblings?: unknown};
    try {
        body = (await res.json()) as typeof body;
    } catch (err) {
        throw new QloraError(`${url} did not answer JSON (${(err as Error).message}): is HF_ENDPOINT a Hugging Face Hub?`, {
            cause: err
        });
    }
    const siblings = Array.isArray(body?.siblings) ? body.siblings : null;
    if (typeof body?.sha !== "string" || !COMMIT_HASH.test(body.sha) || siblings === null)
        throw new QloraError(
            `${url} answered without a commit hash ("sha") and a file list ("siblings"): is HF_ENDPOINT a Hugging Face Hub?`
        );
    const files = siblings
        .map((s) => (s as {rfilename?: unknown})?.rfilename)
        .filter((name): name is string => typeof name === "string");
    return {sha: body.sha, files};
}

export interface FileMetadata {
    /** X-Linked-Etag or ETag, normalized: the sha256 of an LFS file, the git blob hash of another */
    etag: string;
    /** X-Linked-Size, or Content-Length when not redirected */
    size: number;
    commit: string;
    /** where to GET it: the CDN's signed URL for LFS files (the HEAD's Location), else the resolve URL */
    location: string;
}

/** huggingface_hub's _normalize_etag: `W/"x"` and `"x"` are both x */
function normalizeEtag(etag: string | null): string | null {
    return etag === null ? null : etag.replace(/^[W/]+/, "").replace(/^"+|"+$/g, "");
}

/** the path of a file in a URL: each segment percent-encoded, the slashes kept (as Python's quote does) */
function quotePath(file: string): string {
    return file.split("/").map(encodeURIComponent).join("/");
}

/**
 * HEAD {endpoint}/{repo}/resolve/{revision}/{file}, following only relative redirects (a renamed repo), as
 * get_hf_file_metadata does: an LFS file answers a redirect to the CDN whose headers carry the metadata.
 */
export async function fetchFileMetadata(ctx: RequestContext & {file: string}): Promise<FileMetadata> {
    let url = `${ctx.settings.endpoint}/${ctx.repoId}/resolve/${encodeURIComponent(ctx.revision)}/${quotePath(ctx.file)}`;
    const first = url;
    for (let hops = 0; ; hops++) {
        const res = await hubFetch(
            url,
            {method: "HEAD", headers: hubHeaders(ctx.settings), redirect: "manual"},
            ctx.settings.metadataTimeoutSeconds
        );
        const location = res.headers.get("location");
        const redirect = res.status >= 300 && res.status < 400 && location !== null;
        // huggingface_hub follows relative redirects only (a renamed repo); an absolute one is the CDN's
        if (redirect && hops < 10 && !/^([a-z][a-z0-9+.-]*:|\/\/)/i.test(location)) {
            url = new URL(location, url).toString();
            continue;
        }
        if (!redirect && !res.ok) throw hubHttpError(res, first, ctx);
        const commit = res.headers.get("x-repo-commit");
        const etag = normalizeEtag(res.headers.get("x-linked-etag") ?? res.headers.get("etag"));
        const sizeText = res.headers.get("x-linked-size") ?? (redirect ? null : res.headers.get("content-length"));
        const size = sizeText !== null && /^\d+$/.test(sizeText) ? Number(sizeText) : null;
        if (commit === null || !COMMIT_HASH.test(commit))
            throw new QloraError(
                `${first} answered without a commit hash (X-Repo-Commit): is HF_ENDPOINT a Hugging Face Hub (a proxy or firewall in between?)`
            );
        // the etag names the blob in the cache: a hash, never a path
        if (etag === null || !/^[0-9A-Za-z_-]{8,128}$/.test(etag))
            throw new QloraError(`${first} answered without a usable ETag (${etag ?? "none"}); cannot check the download`);
        if (size === null) throw new QloraError(`${first} answered without the file's size (X-Linked-Size / Content-Length)`);
        return {etag, size, commit, location: redirect ? new URL(location, url).toString() : url};
    }
}

export interface ProgressSink {
    /** bytes of the file that are here: fromNetwork false for a partial file found on disk, n < 0 when it starts over */
    bytes?(n: number, fromNetwork: boolean): void;
    /** a retry after a cut connection, in words */
    note?(message: string): void;
}

/** a hash that checks a file against its etag: sha256 for LFS files (64 hex), git's blob sha1 for the others */
function etagHash(etag: string, size: number): {hash: Hash; kind: string} | null {
    if (/^[0-9a-f]{64}$/.test(etag)) return {hash: createHash("sha256"), kind: "sha256"};
    if (/^[0-9a-f]{40}$/.test(etag)) return {hash: createHash("sha1").update(`blob ${size}\0`), kind: "git blob sha1"};
    return null;
}

/** bytes of an existing partial download, fed to the hash before the rest arrives */
async function hashExisting(file: string, hash: Hash, length: number): Promise<void> {
    const {handle} = await openRegularFile(file, "partial download");
    try {
        const buf = Buffer.allocUnsafe(1 << 20);
        for (let pos = 0; pos < length; ) {
            const {bytesRead} = await handle.read(buf, 0, Math.min(buf.length, length - pos), pos);
            if (bytesRead === 0) throw new QloraError("the partial download shrank while being read", {file});
            hash.update(buf.subarray(0, bytesRead));
            pos += bytesRead;
        }
    } finally {
        await handle.close().catch(() => undefined);
    }
}

/** attempts without a byte of progress before a cut connection is an error (huggingface_hub's http_get: 5) */
const MAX_RETRIES_WITHOUT_PROGRESS = 5;

/**
 * Downloads `url` into `incomplete`, continuing what an earlier run left there with a Range request, retrying a
 * connection cut mid-file from where it stopped; then checks the size and the hash against the etag. A wrong
 * hash deletes the partial file and names `ctx.file`; a partial file that cannot be finished is kept for the
 * next run. On success the complete file is fsynced at `incomplete` (the caller renames it into place).
 */
export async function downloadToIncomplete(
    url: string,
    incomplete: string,
    meta: FileMetadata,
    ctx: RequestContext & {file: string},
    sink: ProgressSink = {}
): Promise<void> {
    // only the Hub gets the token: a signed CDN URL on another host must not see it (as huggingface_hub does)
    const headers = hubHeaders(ctx.settings);
    if (new URL(url).host !== new URL(ctx.settings.endpoint).host) delete headers.authorization;
    let handle: fs.FileHandle;
    try {
        // O_NOFOLLOW: never write through a link planted under the name; no O_TRUNC: the bytes there are kept
        handle = await fs.open(incomplete, constants.O_WRONLY | constants.O_CREAT | (constants.O_NOFOLLOW ?? 0), 0o644);
    } catch (err) {
        throw new QloraError(`cannot write the download (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
            file: incomplete,
            cause: err
        });
    }
    const check = etagHash(meta.etag, meta.size);
    let hash = check?.hash ?? null;
    try {
        const st = await handle.stat();
        if (!st.isFile()) throw new QloraError("is not a regular file; remove it", {file: incomplete});
        let have = st.size;
        if (have > meta.size) {
            await handle.truncate(0);
            have = 0;
        }
        if (hash && have > 0) await hashExisting(incomplete, hash, have);
        sink.bytes?.(have, false);
        let withoutProgress = 0;
        while (have < meta.size) {
            const rangeHeaders = have > 0 ? {...headers, range: `bytes=${have}-`} : headers;
            let res: Response;
            try {
                res = await fetch(url, {headers: rangeHeaders, redirect: "follow"});
            } catch (err) {
                if (++withoutProgress > MAX_RETRIES_WITHOUT_PROGRESS) throw new HubNetworkError(networkError(url, err).message);
                sink.note?.(`${ctx.file}: ${networkReason(err)}; retrying`);
                await sleep(200 * withoutProgress);
                continue;
            }
            if (res.status === 416 && have > 0) {
                // the server will not serve the rest: the partial file is not a prefix of this one, start over
                await res.body?.cancel().catch(() => undefined);
                await handle.truncate(0);
                sink.bytes?.(-have, false);
                have = 0;
                hash = etagHash(meta.etag, meta.size)?.hash ?? null;
                continue;
            }
            if (!res.ok || !res.body) {
                await res.body?.cancel().catch(() => undefined);
                if (RETRY_STATUSES.has(res.status) && ++withoutProgress <= MAX_RETRIES_WITHOUT_PROGRESS) {
                    await sleep(500 * withoutProgress);
                    continue;
                }
                throw hubHttpError(res, url, ctx);
            }
            const start =
                res.status === 206 ? Number(/^bytes (\d+)-/.exec(res.headers.get("content-range") ?? "")?.[1] ?? NaN) : 0;
            if (start !== have) {
                // a server that ignores Range (200) sends the whole file again (huggingface_hub resets too)
                await handle.truncate(0);
                sink.bytes?.(-have, false);
                have = 0;
                hash = etagHash(meta.etag, meta.size)?.hash ?? null;
                if (start !== 0) {
                    await res.body.cancel().catch(() => undefined);
                    continue;
                }
            }
            const before = have;
            try {
                for await (const chunk of res.body as AsyncIterable<Uint8Array>) {
                    if (have + chunk.length > meta.size)
                        throw new QloraError(
                            `${ctx.file} of ${ctx.repoId}: the server sent more than the ${meta.size} bytes the Hub announced; ` +
                                "the download is wrong (deleted): try again, or another HF_ENDPOINT",
                            {cause: "oversize"}
                        );
                    await writeAll(handle, chunk, have).catch((err: NodeJS.ErrnoException) => {
                        throw new QloraError(
                            `cannot write the download (${err.code ?? err.message}${err.code === "ENOSPC" ? ": the disk is full" : ""}); ` +
                                "free some space (or set HF_HUB_CACHE to another disk) and run the command again to continue",
                            {file: incomplete, cause: err}
                        );
                    });
                    hash?.update(chunk);
                    have += chunk.length;
                    sink.bytes?.(chunk.length, true);
                }
            } catch (err) {
                if (err instanceof QloraError) throw err;
                // a cut connection: continue from here (the bytes so far are on disk)
                if (have > before) withoutProgress = 0;
                if (++withoutProgress > MAX_RETRIES_WITHOUT_PROGRESS)
                    throw new QloraError(
                        `the download of ${ctx.file} of ${ctx.repoId} stopped at ${have} of ${meta.size} bytes ` +
                            `(${networkReason(err)}): run the command again to continue from there`,
                        {file: incomplete, cause: err}
                    );
                sink.note?.(
                    `${ctx.file}: the connection was cut at ${have} of ${meta.size} bytes (${networkReason(err)}); resuming`
                );
                await sleep(200 * withoutProgress);
                continue;
            }
            if (have < meta.size && have === before) withoutProgress++;
            if (withoutProgress > MAX_RETRIES_WITHOUT_PROGRESS)
                throw new QloraError(
                    `the download of ${ctx.file} of ${ctx.repoId} stopped at ${have} of ${meta.size} bytes: run the command again`,
                    {file: incomplete}
                );
        }
        if (hash && check) {
            const digest = hash.digest("hex");
            if (digest !== meta.etag) {
                await handle.close().catch(() => undefined);
                await fs.rm(incomplete, {force: true});
                throw new QloraError(
                    `${ctx.file} of ${ctx.repoId} is corrupted: its ${check.kind} is ${digest}, the Hub says ${meta.etag}; ` +
                        "the download was deleted: run the command again (if it happens again, the server or the mirror in HF_ENDPOINT sends wrong data)"
                );
            }
        }
        await handle.sync();
    } catch (err) {
        await handle.close().catch(() => undefined);
        // more bytes than announced cannot be resumed: drop them
        if (err instanceof QloraError && err.cause === "oversize") await fs.rm(incomplete, {force: true});
        throw err;
    }
    await handle.close();
}

async function writeAll(handle: fs.FileHandle, data: Uint8Array, position: number): Promise<void> {
    let done = 0;
    while (done < data.length) {
        const {bytesWritten} = await handle.write(data, done, data.length - done, position + done);
        if (bytesWritten <= 0) throw Object.assign(new Error("the write made no progress"), {code: "EIO"});
        done += bytesWritten;
    }
}
