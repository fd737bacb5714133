// fake-hub.ts: a local stand-in for the Hugging Face Hub (node:http, started by a test) serving the endpoints
// huggingface_hub uses, from files in memory: the revision API (sha, siblings), HEAD/GET of resolve URLs with
// X-Repo-Commit, ETag (git blob sha1) or X-Linked-Etag/X-Linked-Size (sha256) and, for LFS files, a redirect to a
// second server playing the CDN; Range requests; gated repos (401/403 with X-Error-Code: GatedRepo). Every request
// is logged with its headers; a file can be cut after N bytes once, or served corrupted.
import {createHash} from "node:crypto";
import http from "node:http";
import type {AddressInfo} from "node:net";

export interface FakeRepo {
    id: string;
    /** branch or tag name → the files of its commit (path in the repo → bytes) */
    revisions: Record<string, Record<string, Buffer>>;
    /** a gated repo: files need this bearer token (the API answers anyway, as the Hub does) */
    gatedToken?: string;
}

export interface LoggedRequest {
    server: "hub" | "cdn";
    method: string;
    url: string;
    headers: http.IncomingHttpHeaders;
    status?: number;
}

export const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");
/** git's blob hash, the Hub's ETag of a file that is not in LFS */
export const gitBlobSha1 = (b: Buffer) => createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex");
/** a commit hash for a revision of a repo */
export const commitOf = (repo: string, revision: string) => createHash("sha1").update(`${repo}@${revision}`).digest("hex");
/** the Hub stores large files and weights in LFS */
export const isLfs = (name: string, bytes: Buffer) =>
    name.endsWith(".safetensors") || name.endsWith(".bin") || bytes.length > 1_000_000;

export interface FakeHub {
    endpoint: string;
    requests: LoggedRequest[];
    /** the next GET of `file` (any repo) is cut after `bytes` bytes */
    cutOnce(file: string, bytes: number): void;
    /** GETs of `file` serve wrong bytes (one flipped) */
    corrupt(file: string): void;
    /** GETs of `file` serve the right bytes again */
    repair(file: string): void;
    close(): Promise<void>;
}

function listen(server: http.Server): Promise<string> {
    return new Promise((resolve) =>
        server.listen(0, "127.0.0.1", () => resolve(`http://127.0.0.1:${(server.address() as AddressInfo).port}`))
    );
}

export async function startFakeHub(repos: FakeRepo[]): Promise<FakeHub> {
    const requests: LoggedRequest[] = [];
    const cuts = new Map<string, number>();
    const corrupted = new Set<string>();
    // commit → files, and what each CDN blob holds
    const commits = new Map<string, Record<string, Buffer>>();
    const blobs = new Map<string, {name: string; bytes: Buffer}>();
    for (const repo of repos)
        for (const [rev, files] of Object.entries(repo.revisions)) {
            commits.set(commitOf(repo.id, rev), files);
            for (const [name, bytes] of Object.entries(files)) blobs.set(sha256(bytes), {name, bytes});
        }

    /** serves `bytes` with Range support, cut or corrupted when asked */
    function serveBytes(
        req: http.IncomingMessage,
        res: http.ServerResponse,
        name: string,
        bytes: Buffer,
        headers: Record<string, string>
    ) {
        let body = bytes;
        if (corrupted.has(name)) {
            body = Buffer.from(bytes);
            body[body.length >> 1] ^= 0xff;
        }
        let start = 0;
        const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
        if (range) start = Number(range[1]);
        if (start >= body.length && body.length > 0) {
            res.writeHead(416, {"Content-Range": `bytes */${body.length}`});
            res.end();
            return;
        }
        const part = body.subarray(start);
        res.writeHead(range ? 206 : 200, {
            ...headers,
            "Content-Length": String(part.length),
            "Accept-Ranges": "bytes",
            ...(range ? {"Content-Range": `bytes ${start}-${body.length - 1}/${body.length}`} : {})
        });
        if (req.method === "HEAD") return res.end();
        const cut = cuts.get(name);
        if (cut !== undefined) {
            cuts.delete(name);
            // the first `cut` bytes, then the connection ends before Content-Length is reached
            res.write(part.subarray(0, cut), () => res.socket?.end());
            return;
        }
        res.end(part);
    }

    const cdn = http.createServer((req, res) => {
        requests.push({server: "cdn", method: req.method ?? "", url: req.url ?? "", headers: req.headers});
        const blob = blobs.get(/^\/blobs\/([0-9a-f]{64})$/.exec(req.url ?? "")?.[1] ?? "");
        if (!blob) {
            res.writeHead(404);
            return res.end();
        }
        serveBytes(req, res, blob.name, blob.bytes, {});
    });
    const cdnUrl = await listen(cdn);

    const hub = http.createServer((req, res) => {
        const entry: LoggedRequest = {server: "hub", method: req.method ?? "", url: req.url ?? "", headers: req.headers};
        requests.push(entry);
        const fail = (status: number, code: string | null, message = "") => {
            entry.status = status;
            res.writeHead(status, {...(code ? {"X-Error-Code": code} : {}), ...(message ? {"X-Error-Message": message} : {})});
            res.end();
        };
        const url = new URL(req.url ?? "/", "http://x");
        const api = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/.exec(url.pathname);
        const resolve = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
        const repoId = api?.[1] ?? resolve?.[1];
        const repo = repos.find((r) => r.id === repoId);
        if (!repo) return fail(401, "RepoNotFound", "Repository not found");
        const rev = decodeURIComponent((api ?? resolve)![2]);
        const commit = rev in repo.revisions ? commitOf(repo.id, rev) : rev;
        const files = Object.values(repo.revisions).includes(commits.get(commit)!) ? commits.get(commit) : undefined;
        if (!files) return fail(404, "RevisionNotFound", "Invalid rev id");
        if (api) {
            const body = JSON.stringify({
                id: repo.id,
                sha: commit,
                gated: repo.gatedToken ? "manual" : false,
                siblings: Object.keys(files).map((rfilename) => ({rfilename}))
            });
            res.writeHead(200, {"Content-Type": "application/json"});
            return res.end(body);
        }
        if (repo.gatedToken && req.headers.authorization !== `Bearer ${repo.gatedToken}`)
            return req.headers.authorization
                ? fail(403, "GatedRepo", `Access to model ${repo.id} is restricted and you are not in the authorized list.`)
                : fail(
                      401,
                      "GatedRepo",
                      `Access to model ${repo.id} is restricted. You must have access to it and be authenticated to access it.`
                  );
        const name = decodeURIComponent(resolve![3]);
        const bytes = files[name];
        if (!bytes) return fail(404, "EntryNotFound", "Entry not found");
        if (isLfs(name, bytes)) {
            entry.status = 302;
            res.writeHead(302, {
                Location: `${cdnUrl}/blobs/${sha256(bytes)}`,
                "X-Repo-Commit": commit,
                "X-Linked-Etag": `"${sha256(bytes)}"`,
                "X-Linked-Size": String(bytes.length),
                ETag: `"${gitBlobSha1(Buffer.from(`version https://git-lfs.github.com/spec/v1\noid sha256:${sha256(bytes)}\n`))}"`
            });
            return res.end();
        }
        entry.status = 200;
        serveBytes(req, res, name, bytes, {"X-Repo-Commit": commit, ETag: `"${gitBlobSha1(bytes)}"`});
    });
    const endpoint = await listen(hub);
    const close = (s: http.Server) =>
        new Promise<void>((resolve) => {
            s.closeAllConnections();
            s.close(() => resolve());
        });
    return {
        endpoint,
        requests,
        cutOnce: (file, bytes) => cuts.set(file, bytes),
        corrupt: (file) => corrupted.add(file),
        repair: (file) => corrupted.delete(file),
        close: async () => {
            await close(hub);
            await close(cdn);
        }
    };
}
