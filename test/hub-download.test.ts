// Models from the Hugging Face Hub: `qlora download` and --model ORG/NAME against a local fake Hub (no network):
// the cache layout huggingface_hub shares with Python, offline use, resumption, integrity, gated repos, revisions.
import {test, after} from "node:test";
import assert from "node:assert/strict";
import {spawn} from "node:child_process";
import {
    existsSync,
    lstatSync,
    mkdirSync,
    mkdtempSync,
    readFileSync,
    readdirSync,
    readlinkSync,
    rmSync,
    symlinkSync,
    writeFileSync
} from "node:fs";
import os from "node:os";
import path from "node:path";
import {downloadModel, resolveModel} from "../src/api/models.js";
import {hubIdOfSnapshot} from "../src/io/hub.js";
import {commitOf, type FakeRepo, gitBlobSha1, isLfs, type LoggedRequest, sha256, startFakeHub} from "./helpers/fake-hub.js";
import {MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-hub-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

const MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];
const tiny: Record<string, Buffer> = Object.fromEntries(MODEL_FILES.map((f) => [f, readFileSync(path.join(MODEL_DIR, f))]));
/** what a real repo holds beside the model: code, pickles, other frameworks' weights, copies in subfolders */
const extras: Record<string, Buffer> = {
    "README.md": Buffer.from("# tiny\n"),
    "modeling_tiny.py": Buffer.from("import os\nos.system('echo pwned')\n"),
    "pytorch_model.bin": Buffer.from("not a pickle"),
    "flax_model.msgpack": Buffer.from("msgpack"),
    "onnx/model.onnx": Buffer.from("onnx"),
    "original/consolidated.safetensors": Buffer.from("a second copy of the weights")
};
const oldConfig = Buffer.from(
    JSON.stringify({...JSON.parse(tiny["config.json"].toString()), max_position_embeddings: 1234}, null, 2)
);
const TOKEN = "hf_fakeTokenForTests123";

const repos: FakeRepo[] = [
    {id: "test-org/tiny-qwen2", revisions: {main: {...tiny, ...extras}, "v1.0": {...tiny, "config.json": oldConfig}}},
    {id: "test-org/gated", revisions: {main: tiny}, gatedToken: TOKEN},
    {
        id: "test-org/bin-only",
        revisions: {
            main: {
                "config.json": tiny["config.json"],
                "tokenizer.json": tiny["tokenizer.json"],
                "pytorch_model.bin": Buffer.from("pickle")
            }
        }
    },
    {
        id: "test-org/sharded",
        revisions: {
            main: {
                "config.json": tiny["config.json"],
                "model.safetensors.index.json": Buffer.from(
                    JSON.stringify({weight_map: {a: "model-00001-of-00002.safetensors", b: "model-00002-of-00002.safetensors"}})
                ),
                "model-00001-of-00002.safetensors": Buffer.from("shard one"),
                "model-00002-of-00002.safetensors": Buffer.from("shard two"),
                "consolidated.safetensors": Buffer.from("the same weights in another layout")
            }
        }
    }
];
const hub = await startFakeHub(repos);
after(() => hub.close());

/** a fresh HF_HOME (no token file) with its cache, pointed at the fake hub */
function hfEnv(name: string, extra: Record<string, string> = {}): Record<string, string> {
    const home = path.join(tmp, name);
    mkdirSync(home, {recursive: true});
    return {HF_HOME: home, HF_HUB_CACHE: path.join(home, "hub"), HF_ENDPOINT: hub.endpoint, ...extra};
}
const storage = (env: Record<string, string>, repo: string) => path.join(env.HF_HUB_CACHE, `models--${repo.replace("/", "--")}`);
const etagOf = (name: string, bytes: Buffer) => (isLfs(name, bytes) ? sha256(bytes) : gitBlobSha1(bytes));

/** the CLI in a child process (async: the fake hub answers from this process), with only our HF_* variables */
function qlora(args: string[], env: Record<string, string>): Promise<{code: number | null; stdout: string; stderr: string}> {
    const base = Object.fromEntries(
        Object.entries(process.env).filter(([k]) => !k.startsWith("HF_") && !k.startsWith("HUGGING"))
    );
    const child = spawn(process.execPath, ["--import", "tsx", path.join(REPO_ROOT, "src", "cli", "main.ts"), ...args], {
        cwd: REPO_ROOT,
        env: {...base, ...env}
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    return new Promise((resolve) => child.on("close", (code) => resolve({code, stdout, stderr})));
}

/** exit 1 and a last stderr line `error: ...` with every fragment; progress lines before it, never a stack trace */
function expectError(r: {code: number | null; stderr: string}, ...fragments: (string | RegExp)[]): string {
    assert.equal(r.code, 1, `exit code (stderr: ${r.stderr})`);
    const lines = r.stderr.trim().split("\n");
    const last = lines[lines.length - 1];
    assert.match(last, /^error: /);
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
    for (const line of lines.slice(0, -1))
        assert.match(line, /^(downloading | {2}\S)/, `only progress lines before the error: ${line}`);
    for (const f of fragments) typeof f === "string" ? assert.ok(last.includes(f), `${f} in: ${last}`) : assert.match(last, f);
    return last;
}

const since = (n: number) => hub.requests.slice(n);
const resolveRequests = (reqs: LoggedRequest[]) =>
    reqs.filter((r) => r.url.includes("/resolve/")).map((r) => decodeURIComponent(r.url.split("/").slice(5).join("/")));

const mainEnv = hfEnv("main");
const mainCommit = commitOf("test-org/tiny-qwen2", "main");

test("qlora download: the Hugging Face cache layout, file by file, and only the files qlora reads", async () => {
    const before = hub.requests.length;
    const r = await qlora(["download", "test-org/tiny-qwen2"], mainEnv);
    assert.equal(r.code, 0, r.stderr);
    const repoDir = storage(mainEnv, "test-org/tiny-qwen2");
    const snapshot = path.join(repoDir, "snapshots", mainCommit);
    assert.equal(r.stdout.trim(), snapshot);
    assert.equal(hubIdOfSnapshot(snapshot), "test-org/tiny-qwen2");
    assert.equal(readFileSync(path.join(repoDir, "refs", "main"), "utf8"), mainCommit, "refs/main holds the commit, no newline");
    assert.deepEqual(readdirSync(snapshot).sort(), MODEL_FILES);
    for (const f of MODEL_FILES) {
        const link = path.join(snapshot, f);
        assert.ok(lstatSync(link).isSymbolicLink(), `${f} is a symlink`);
        assert.equal(readlinkSync(link), `../../blobs/${etagOf(f, tiny[f])}`, `${f} links relatively to its blob`);
        assert.ok(readFileSync(link).equals(tiny[f]), `${f} has the served bytes`);
    }
    assert.deepEqual(
        readdirSync(path.join(repoDir, "blobs")).sort(),
        MODEL_FILES.map((f) => etagOf(f, tiny[f])).sort(),
        "no .incomplete left"
    );
    // neither code, nor pickles, nor other frameworks' weights, nor subfolders were even asked for
    assert.deepEqual(
        resolveRequests(since(before)).filter((f) => !MODEL_FILES.includes(f)),
        []
    );
    assert.match(r.stderr, /downloading test-org\/tiny-qwen2 \(main, commit [0-9a-f]{7}\): 5 files/);
});

test("a complete model in the cache: one API request online, none with HF_HUB_OFFLINE=1", async () => {
    let before = hub.requests.length;
    const result = await downloadModel("test-org/tiny-qwen2", {env: mainEnv});
    assert.equal(result.downloadedBytes, 0);
    assert.deepEqual(
        since(before).map((r) => r.url),
        [`/api/models/test-org/tiny-qwen2/revision/main`]
    );
    before = hub.requests.length;
    const offline = await downloadModel("test-org/tiny-qwen2", {env: {...mainEnv, HF_HUB_OFFLINE: "1"}});
    assert.equal(offline.dir, path.join(storage(mainEnv, "test-org/tiny-qwen2"), "snapshots", mainCommit));
    assert.equal(since(before).length, 0, "offline: no request");
});

test("generate --model ORG/NAME with HF_HUB_OFFLINE=1 runs the cached model, as the same folder does", async () => {
    const before = hub.requests.length;
    const args = ["--prompt", "床前明月光，", "--greedy", "-n", "2", "--json"];
    const fromHub = await qlora(["generate", "--model", "test-org/tiny-qwen2", ...args], {...mainEnv, HF_HUB_OFFLINE: "1"});
    assert.equal(fromHub.code, 0, fromHub.stderr);
    assert.equal(since(before).length, 0, "no request in offline mode");
    const fromFolder = await qlora(["generate", "--model", MODEL_DIR, ...args], mainEnv);
    assert.equal(fromFolder.code, 0, fromFolder.stderr);
    const a = JSON.parse(fromHub.stdout);
    assert.equal(a.output_ids.length, a.prompt_ids.length + 2);
    assert.deepEqual(a, JSON.parse(fromFolder.stdout));
});

test("offline, a model that is not in the cache is one clear line and no request", async () => {
    const before = hub.requests.length;
    const r = await qlora(["generate", "--model", "test-org/absent", "--prompt", "x"], {
        ...hfEnv("offline"),
        HF_HUB_OFFLINE: "1"
    });
    expectError(r, "test-org/absent is not in the Hugging Face cache", "HF_HUB_OFFLINE=1 forbids downloading it");
    assert.equal(since(before).length, 0);
});

test("a connection cut mid-file is resumed with a Range request, and the blob is right", async () => {
    const env = hfEnv("cut");
    const size = tiny["model.safetensors"].length;
    hub.cutOnce("model.safetensors", 3_000_000);
    const before = hub.requests.length;
    const result = await downloadModel("test-org/tiny-qwen2", {env});
    const gets = since(before).filter((r) => r.server === "cdn" && r.url === `/blobs/${sha256(tiny["model.safetensors"])}`);
    // the second request continues from what reached the disk (at most the 3,000,000 bytes sent)
    assert.equal(gets.length, 2);
    assert.equal(gets[0].headers.range, undefined);
    const resumedAt = Number(/^bytes=(\d+)-$/.exec(String(gets[1].headers.range))?.[1]);
    assert.ok(resumedAt > 0 && resumedAt <= 3_000_000, `resumed at ${gets[1].headers.range}`);
    const blob = path.join(storage(env, "test-org/tiny-qwen2"), "blobs", sha256(tiny["model.safetensors"]));
    assert.equal(sha256(readFileSync(blob)), sha256(tiny["model.safetensors"]));
    const total = MODEL_FILES.reduce((n, f) => n + tiny[f].length, 0);
    assert.equal(result.downloadedBytes, total, `every byte once (${size} of the weights)`);
});

test("a partial file a killed run left (.incomplete) is continued from where it stopped", async () => {
    const env = hfEnv("resume");
    const weights = tiny["model.safetensors"];
    const blobs = path.join(storage(env, "test-org/tiny-qwen2"), "blobs");
    mkdirSync(blobs, {recursive: true});
    writeFileSync(path.join(blobs, `${sha256(weights)}.incomplete`), weights.subarray(0, 1_000_000));
    const before = hub.requests.length;
    const result = await downloadModel("test-org/tiny-qwen2", {env});
    const gets = since(before).filter((r) => r.server === "cdn" && r.url === `/blobs/${sha256(weights)}`);
    assert.deepEqual(
        gets.map((r) => r.headers.range),
        ["bytes=1000000-"]
    );
    assert.equal(sha256(readFileSync(path.join(blobs, sha256(weights)))), sha256(weights));
    assert.ok(!existsSync(path.join(blobs, `${sha256(weights)}.incomplete`)));
    const total = MODEL_FILES.reduce((n, f) => n + tiny[f].length, 0);
    assert.equal(result.downloadedBytes, total - 1_000_000, "the first million bytes were not fetched again");
});

test("a corrupted file is detected: the error names it, it is deleted, and no snapshot is made", async () => {
    const env = hfEnv("corrupt");
    hub.corrupt("model.safetensors");
    try {
        const r = await qlora(["download", "test-org/tiny-qwen2"], env);
        expectError(
            r,
            "model.safetensors of test-org/tiny-qwen2 is corrupted",
            `the Hub says ${sha256(tiny["model.safetensors"])}`
        );
    } finally {
        hub.repair("model.safetensors");
    }
    const repoDir = storage(env, "test-org/tiny-qwen2");
    assert.ok(!existsSync(path.join(repoDir, "snapshots")), "no snapshot");
    assert.ok(!existsSync(path.join(repoDir, "refs", "main")), "no ref");
    const blobs = readdirSync(path.join(repoDir, "blobs"));
    assert.ok(!blobs.some((b) => b.startsWith(sha256(tiny["model.safetensors"]))), `no blob or partial file of it: ${blobs}`);
});

test("a gated model: without a token the licence message, with HF_TOKEN the bearer header (never to the CDN)", async () => {
    const env = hfEnv("gated");
    let before = hub.requests.length;
    const denied = await qlora(["download", "test-org/gated"], env);
    expectError(
        denied,
        "test-org/gated is a gated model (HTTP 401)",
        `accept its licence on ${hub.endpoint}/test-org/gated`,
        "set HF_TOKEN"
    );
    before = hub.requests.length;
    const r = await qlora(["download", "test-org/gated"], {...env, HF_TOKEN: TOKEN});
    assert.equal(r.code, 0, r.stderr);
    const reqs = since(before);
    const hubReqs = reqs.filter((q) => q.server === "hub");
    assert.ok(hubReqs.length >= 5);
    for (const q of hubReqs) assert.equal(q.headers.authorization, `Bearer ${TOKEN}`, q.url);
    const cdnReqs = reqs.filter((q) => q.server === "cdn");
    assert.ok(cdnReqs.length >= 1);
    for (const q of cdnReqs) assert.equal(q.headers.authorization, undefined, "the token never goes to the CDN");
    assert.ok(!(r.stdout + r.stderr + denied.stderr).includes(TOKEN), "the token is never printed");
});

test("the token file of huggingface_hub ($HF_HOME/token) is used; a token without access says so", async () => {
    const env = hfEnv("token-file");
    writeFileSync(path.join(env.HF_HOME, "token"), `${TOKEN}\n`);
    const result = await downloadModel("test-org/gated", {env, include: ["config.json"]});
    assert.deepEqual(readdirSync(result.dir), ["config.json"]);
    await assert.rejects(downloadModel("test-org/gated", {env: {...hfEnv("bad-token"), HF_TOKEN: "hf_other"}}), (err: Error) => {
        assert.match(
            err.message,
            /test-org\/gated is a gated model and the token from HF_TOKEN has no access to it \(HTTP 403\)/
        );
        assert.ok(!err.message.includes("hf_other"));
        return true;
    });
});

test("--revision of a tag: refs/{tag} holds its commit and the snapshot that commit's files", async () => {
    const env = hfEnv("tag");
    const result = await downloadModel("test-org/tiny-qwen2", {env, revision: "v1.0"});
    const commit = commitOf("test-org/tiny-qwen2", "v1.0");
    assert.equal(result.dir, path.join(storage(env, "test-org/tiny-qwen2"), "snapshots", commit));
    assert.equal(readFileSync(path.join(storage(env, "test-org/tiny-qwen2"), "refs", "v1.0"), "utf8"), commit);
    assert.ok(!existsSync(path.join(storage(env, "test-org/tiny-qwen2"), "refs", "main")));
    assert.equal(JSON.parse(readFileSync(path.join(result.dir, "config.json"), "utf8")).max_position_embeddings, 1234);
    await assert.rejects(
        downloadModel("test-org/tiny-qwen2", {env, revision: "v9"}),
        /test-org\/tiny-qwen2 has no revision "v9"/
    );
});

test("a repo with only .bin weights is refused before any download, saying how to convert", async () => {
    const before = hub.requests.length;
    await assert.rejects(
        downloadModel("test-org/bin-only", {env: hfEnv("bin")}),
        /test-org\/bin-only has no safetensors weights, only pytorch_model\.bin: qlora reads safetensors only.*save_pretrained\("DIR", safe_serialization=True\)/
    );
    assert.deepEqual(resolveRequests(since(before)), []);
});

test("sharded weights: the index and the shards it lists, not other top-level safetensors; --include narrows", async () => {
    const env = hfEnv("sharded");
    const result = await downloadModel("test-org/sharded", {env, weights: true});
    assert.deepEqual(readdirSync(result.dir).sort(), [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"
    ]);
    const only = await downloadModel("test-org/tiny-qwen2", {env, include: ["*.json"]});
    assert.deepEqual(readdirSync(only.dir).sort(), [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json"
    ]);
    await assert.rejects(
        downloadModel("test-org/tiny-qwen2", {env, include: ["*.bin"]}),
        /--include \*\.bin matches none of the files/
    );
});

test("a missing repo, and a Hub that cannot be reached, are one line each; a complete cached copy is used then", async () => {
    await assert.rejects(downloadModel("test-org/nope", {env: hfEnv("nope")}), (err: Error) => {
        assert.match(
            err.message,
            /^test-org\/nope: no such model on http:\/\/127\.0\.0\.1:\d+ \(HTTP 401\): check the name; a private or gated model needs HF_TOKEN$/
        );
        return true;
    });
    const closed = await startFakeHub([]);
    const url = closed.endpoint;
    await closed.close();
    await assert.rejects(downloadModel("test-org/tiny-qwen2", {env: hfEnv("down", {HF_ENDPOINT: url})}), (err: Error) => {
        assert.match(
            err.message,
            new RegExp(`^cannot reach ${url}/api/models/test-org/tiny-qwen2/revision/main \\(ECONNREFUSED\\)`)
        );
        assert.match(err.message, /set HF_ENDPOINT to a mirror/);
        return true;
    });
    // huggingface_hub falls back to a complete copy in the cache when the Hub does not answer, and so does qlora
    const notes: string[] = [];
    const cached = await downloadModel("test-org/tiny-qwen2", {
        env: {...mainEnv, HF_ENDPOINT: url},
        progress: {note: (m) => notes.push(m)}
    });
    assert.equal(cached.dir, path.join(storage(mainEnv, "test-org/tiny-qwen2"), "snapshots", mainCommit));
    assert.deepEqual(notes, [
        `cannot reach ${url}/api/models/test-org/tiny-qwen2/revision/main; using the copy of test-org/tiny-qwen2 in the cache (commit ${mainCommit.slice(0, 7)})`
    ]);
});

test("a local folder of the same spelling wins over the Hub id", async () => {
    const cwd = process.cwd();
    const dir = path.join(tmp, "cwd");
    mkdirSync(path.join(dir, "test-org"), {recursive: true});
    symlinkSync(MODEL_DIR, path.join(dir, "test-org", "tiny-qwen2"));
    const before = hub.requests.length;
    process.chdir(dir);
    try {
        assert.equal(await resolveModel("test-org/tiny-qwen2"), path.join(dir, "test-org", "tiny-qwen2"));
    } finally {
        process.chdir(cwd);
    }
    assert.equal(since(before).length, 0);
});

test("--local-dir: real files and huggingface_hub's download metadata; an unrelated file there is never replaced", async () => {
    const env = hfEnv("local");
    const dir = path.join(tmp, "local-model");
    const result = await downloadModel("test-org/tiny-qwen2", {env, localDir: dir});
    assert.equal(result.dir, dir);
    for (const f of MODEL_FILES) {
        assert.ok(lstatSync(path.join(dir, f)).isFile(), `${f} is a real file`);
        assert.ok(readFileSync(path.join(dir, f)).equals(tiny[f]));
        const [commit, etag] = readFileSync(path.join(dir, ".cache", "huggingface", "download", `${f}.metadata`), "utf8").split(
            "\n"
        );
        assert.deepEqual([commit, etag], [mainCommit, etagOf(f, tiny[f])]);
    }
    assert.equal((await downloadModel("test-org/tiny-qwen2", {env, localDir: dir})).downloadedBytes, 0);
    const other = path.join(tmp, "local-other");
    mkdirSync(other);
    writeFileSync(path.join(other, "config.json"), "{}");
    await assert.rejects(
        downloadModel("test-org/tiny-qwen2", {env, localDir: other}),
        /config\.json: exists and is not a download/
    );
    assert.equal(readFileSync(path.join(other, "config.json"), "utf8"), "{}");
});
