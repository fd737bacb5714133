// Issue 8, findings 1, 4 and 11: qlora never loses the user's files when it writes. merge/export refuse outputs
// that would replace something the user did not ask to replace (every pre-existing file is left byte for byte);
// temporaries are exclusive and random (a planted symlink is never followed); an interrupted folder swap is
// completed or rolled back to the newest complete folder.
import {describe, test} from "node:test";
import assert from "node:assert/strict";
import {createHash} from "node:crypto";
import {
    cpSync,
    lstatSync,
    mkdirSync,
    mkdtempSync,
    readdirSync,
    readFileSync,
    readlinkSync,
    rmSync,
    symlinkSync,
    writeFileSync
} from "node:fs";
import os from "node:os";
import path from "node:path";
import {exportGguf, exportGgufLora} from "../src/api/export-gguf.js";
import {isQloraError} from "../src/errors.js";
import {
    assertFileOutput,
    assertOutputSeparate,
    createAtomicFile,
    QLORA_MARKER_FILE,
    recoverInterruptedWrites,
    writeDirAtomic,
    writeFileAtomic
} from "../src/io/atomic.js";
import {GgufMetadata, hasGgufMagic, writeGguf} from "../src/io/gguf.js";
import {GgmlType} from "../src/io/gguf-quants.js";
import {writeShardedSafetensors} from "../src/io/safetensors.js";
import {mergeAdapter} from "../src/peft/merge.js";
import {FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";
import {expectOneLineError, runCli} from "./helpers/cli.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-outputs-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

const qlora = (args: string[], cwd = REPO_ROOT) => runCli(args, {cwd});

const expectError = expectOneLineError;

/** the same checks through the library calls (no process start): a QloraError with every fragment */
async function rejectsWith(promise: Promise<unknown>, ...fragments: string[]) {
    await assert.rejects(promise, (e: unknown) => {
        assert.ok(isQloraError(e), `a QloraError, got ${e}`);
        for (const f of fragments) assert.ok((e as Error).message.includes(f), `"${f}" in: ${(e as Error).message}`);
        return true;
    });
}

/** every entry under `root` (recursively) with a hash of its content, or its link target */
function treeState(root: string): Record<string, string> {
    const state: Record<string, string> = {};
    const walk = (dir: string) => {
        for (const name of readdirSync(dir).sort()) {
            const p = path.join(dir, name);
            const rel = path.relative(root, p);
            const st = lstatSync(p);
            if (st.isSymbolicLink()) state[rel] = `link ${readlinkSync(p)}`;
            else if (st.isDirectory()) {
                state[rel] = "dir";
                walk(p);
            } else state[rel] = `file ${createHash("sha256").update(readFileSync(p)).digest("hex")}`;
        }
    };
    walk(root);
    return state;
}

// inputs the commands read, copied so that a failure here could never harm the shared fixtures
const model = path.join(tmp, "model");
cpSync(MODEL_DIR, model, {recursive: true});
const adapter = path.join(tmp, "adapter");
cpSync(path.join(FIXTURES, "adapter"), adapter, {recursive: true});
const mergeArgs = (out: string, ...more: string[]) => ["merge", "--model", model, "--adapter", adapter, "--out", out, ...more];

describe("qlora merge never replaces what it was not asked to replace", () => {
    test("an unrelated non-empty folder is refused and left as it was", () => {
        const out = path.join(tmp, "photos");
        mkdirSync(path.join(out, "2024"), {recursive: true});
        writeFileSync(path.join(out, "2024", "beach.jpg"), "not really a photo");
        writeFileSync(path.join(out, "notes.txt"), "keep me");
        const before = treeState(tmp);
        expectError(qlora(mergeArgs(out)), out, "not empty", "choose another path");
        expectError(qlora(mergeArgs(out, "--overwrite")), out, "not written by qlora");
        assert.deepEqual(treeState(tmp), before);
    });

    test("a file is refused and left as it was", () => {
        const out = path.join(tmp, "thesis.tex");
        writeFileSync(out, "\\documentclass{article}");
        const before = treeState(tmp);
        expectError(qlora(mergeArgs(out, "--overwrite")), out, "not a folder");
        assert.deepEqual(treeState(tmp), before);
    });

    test("--out . in a working folder with files is refused", () => {
        const work = path.join(tmp, "project");
        mkdirSync(work);
        writeFileSync(path.join(work, "train.py"), "print('hello')\n");
        const before = treeState(tmp);
        expectError(qlora(mergeArgs("."), work), work, "not empty");
        assert.deepEqual(treeState(tmp), before);
    });

    test("the base model folder and the adapter folder are refused, even with --overwrite", async () => {
        const before = treeState(tmp);
        expectError(qlora(mergeArgs(model, "--overwrite")), "--out is the base model folder");
        expectError(qlora(mergeArgs(adapter, "--overwrite")), "--out is the adapter folder");
        // the same folders through a symlink, and a folder that contains them
        const link = path.join(os.tmpdir(), `qlora-outputs-link-${process.pid}`);
        symlinkSync(model, link);
        try {
            await rejectsWith(mergeAdapter({model, adapter, out: link, overwrite: true}), "--out is the base model folder");
        } finally {
            rmSync(link);
        }
        await rejectsWith(mergeAdapter({model, adapter, out: tmp, overwrite: true}), "--out contains the base model folder");
        assert.deepEqual(treeState(tmp), before);
    });

    test("a training output folder is refused with all its checkpoints", async () => {
        const run = path.join(tmp, "qlora_output");
        for (const sub of ["checkpoint-2", "checkpoint-4", "final"]) cpSync(adapter, path.join(run, sub), {recursive: true});
        writeFileSync(path.join(run, "metrics.jsonl"), '{"event":"start"}\n');
        const before = treeState(tmp);
        // the adapter of that run: --out contains it
        expectError(
            qlora(["merge", "--model", model, "--adapter", path.join(run, "final"), "--out", run, "--overwrite"]),
            "--out contains the adapter folder"
        );
        // another adapter: the folder is not empty
        expectError(qlora(mergeArgs(run)), run, "not empty");
        await rejectsWith(
            mergeAdapter({model, adapter, out: path.join(run, "checkpoint-4"), overwrite: true}),
            path.join(run, "checkpoint-4"),
            "not written by qlora"
        );
        assert.deepEqual(treeState(tmp), before);
    });

    test("a folder an earlier merge wrote: refused without --overwrite, replaced with it", () => {
        const out = path.join(tmp, "merged");
        const first = qlora(mergeArgs(out));
        assert.equal(first.code, 0, first.stderr);
        assert.deepEqual(JSON.parse(readFileSync(path.join(out, QLORA_MARKER_FILE), "utf8")).kind, "merged-model");
        const merged = treeState(out);
        writeFileSync(path.join(out, "left-by-the-user.txt"), "x");
        const before = treeState(tmp);
        expectError(qlora(mergeArgs(out)), out, "an earlier qlora merged-model", "pass --overwrite to replace it");
        assert.deepEqual(treeState(tmp), before);

        const again = qlora(mergeArgs(out, "--overwrite", "--dtype", "f16"));
        assert.equal(again.code, 0, again.stderr);
        assert.match(again.stdout, /merged 56 modules into .* \(f16\)/);
        const now = treeState(out);
        assert.ok(!("left-by-the-user.txt" in now), "the folder was replaced as a whole");
        assert.deepEqual(Object.keys(now).sort(), Object.keys(merged).sort());
        assert.notEqual(now["model.safetensors"], merged["model.safetensors"], "f16 weights replaced the bf16 ones");
        assert.equal(JSON.parse(readFileSync(path.join(out, "config.json"), "utf8")).torch_dtype, "float16");
        // no temporaries or replaced copies are left beside it
        assert.deepEqual(
            readdirSync(tmp).filter((n) => n.startsWith(".merged.")),
            []
        );
    });
});

describe("qlora export never writes over its inputs or a file that is not a GGUF", () => {
    test("--out naming an input file, a folder, a non-GGUF file or a symlink is refused, files unchanged", async () => {
        const victim = path.join(tmp, "victim.txt");
        writeFileSync(victim, "another user's file");
        const link = path.join(tmp, "link.gguf");
        symlinkSync(victim, link);
        const notGguf = path.join(tmp, "report.gguf");
        writeFileSync(notGguf, "plain text with a .gguf name");
        const before = treeState(tmp);
        expectError(
            qlora(["export", "gguf", "--model", model, "--out", path.join(model, "model.safetensors"), "--overwrite"]),
            "--out is the model.safetensors of the model folder"
        );
        expectError(qlora(["export", "gguf", "--model", model, "--out", notGguf, "--overwrite"]), notGguf, "not a GGUF file");
        const gguf = (out: string, overwrite = true) => exportGguf({modelDir: model, outtype: "f16", out, overwrite});
        await rejectsWith(gguf(path.join(model, "config.json")), "--out is the config.json of the model folder");
        await rejectsWith(gguf(model), "--out is the model folder");
        await rejectsWith(
            exportGguf({
                modelDir: model,
                adapterDir: adapter,
                outtype: "f16",
                overwrite: true,
                out: path.join(adapter, "adapter_model.safetensors")
            }),
            "--out is the adapter_model.safetensors of the adapter folder"
        );
        await rejectsWith(gguf(tmp), "--out contains the model folder");
        await rejectsWith(gguf(notGguf, false), notGguf, "already exists; pass --overwrite");
        await rejectsWith(gguf(link), link, "symbolic link");
        await rejectsWith(
            exportGgufLora({
                modelDir: model,
                adapterDir: adapter,
                overwrite: true,
                out: path.join(adapter, "adapter_config.json")
            }),
            "--out is the adapter_config.json of the adapter folder"
        );
        assert.deepEqual(treeState(tmp), before);
    });

    test("gguf-lora beside its inputs is fine; an existing GGUF needs --overwrite", async () => {
        const out = path.join(adapter, "adapter.gguf");
        try {
            await exportGgufLora({modelDir: model, adapterDir: adapter, out});
            assert.ok(hasGgufMagic(readFileSync(out)));
            await rejectsWith(
                exportGgufLora({modelDir: model, adapterDir: adapter, out}),
                out,
                "already exists; pass --overwrite"
            );
            writeFileSync(out, Buffer.concat([Buffer.from("GGUF"), Buffer.alloc(60)])); // an old (here: fake) GGUF
            const again = qlora(["export", "gguf-lora", "--model", model, "--adapter", adapter, "--out", out, "--overwrite"]);
            assert.equal(again.code, 0, again.stderr);
            assert.ok(readFileSync(out).length > 64);
        } finally {
            rmSync(out, {force: true});
        }
    });
});

describe("temporaries are exclusive and random; symlinks are never followed", () => {
    test("symlinks planted at the old predictable temporary names and at the final name leave their targets alone", async () => {
        const dir = path.join(tmp, "planted");
        mkdirSync(dir);
        const victim = path.join(tmp, "victim-file");
        writeFileSync(victim, "precious");
        // what earlier versions wrote to: `${file}.tmp-${process.pid}`, and `.write-test-${pid}`-style names
        for (const name of ["metrics.jsonl", "model.gguf", "weights.safetensors"])
            symlinkSync(victim, path.join(dir, `${name}.tmp-${process.pid}`));
        symlinkSync(victim, path.join(dir, "report.html")); // a link under the final name itself
        await writeFileAtomic(path.join(dir, "metrics.jsonl"), "one\n");
        await writeFileAtomic(path.join(dir, "report.html"), "<html></html>");
        const md = new GgufMetadata().string("general.architecture", "llama");
        await writeGguf(path.join(dir, "model.gguf"), {
            metadata: md,
            tensors: [{name: "w", type: GgmlType.F32, ne: [8], data: () => new Uint8Array(32)}]
        });
        assert.equal(readFileSync(victim, "utf8"), "precious");
        assert.ok(lstatSync(path.join(dir, "report.html")).isFile(), "the link was replaced, not written through");
        assert.equal(readFileSync(path.join(dir, "metrics.jsonl"), "utf8"), "one\n");
    });

    test("temporary names are random, exclusive, and removed on abort", async () => {
        const file = path.join(tmp, "stream.bin");
        const a = await createAtomicFile(file),
            b = await createAtomicFile(file);
        assert.match(path.basename(a.path), /^\.stream\.bin\.tmp-[0-9a-f]{16}$/);
        assert.notEqual(a.path, b.path);
        await a.handle.write(Buffer.from("a"));
        await b.handle.write(Buffer.from("b"));
        await a.abort();
        await b.commit();
        assert.equal(readFileSync(file, "utf8"), "b");
        assert.deepEqual(
            readdirSync(tmp).filter((n) => n.startsWith(".stream.bin")),
            []
        );
    });

    test("recovery does not follow a symlink planted under a leftover name", async () => {
        const parent = path.join(tmp, "recover-links");
        mkdirSync(parent);
        const victim = path.join(tmp, "victim-dir");
        mkdirSync(victim);
        writeFileSync(path.join(victim, "data"), "keep");
        symlinkSync(victim, path.join(parent, ".final.tmp-0123456789abcdef"));
        symlinkSync(victim, path.join(parent, ".final.old-0123456789abcdef"));
        assert.deepEqual(await recoverInterruptedWrites(parent), []);
        assert.equal(readFileSync(path.join(victim, "data"), "utf8"), "keep");
    });
});

describe("writers never delete or mix the user's files", () => {
    test("a sharded save into a folder that already holds weights is refused, nothing removed", async () => {
        const dir = path.join(tmp, "user-model");
        mkdirSync(dir);
        writeFileSync(path.join(dir, "model-00001-of-00002.safetensors"), "shard 1");
        writeFileSync(path.join(dir, "model-00002-of-00002.safetensors"), "shard 2");
        const before = treeState(dir);
        await assert.rejects(
            writeShardedSafetensors(dir, "model", [{name: "x", dtype: "F32", shape: [2], data: new Float32Array(2)}], 1e6),
            (e: unknown) => isQloraError(e) && /already holds model-00001-of-00002\.safetensors/.test((e as Error).message)
        );
        assert.deepEqual(treeState(dir), before);
    });

    test("writeDirAtomic: a file, a link, an unmarked or other-kind folder are refused; an empty folder is fine", async () => {
        const fill = (text: string) => async (d: string) => writeFileSync(path.join(d, "a.txt"), text);
        const file = path.join(tmp, "plain-file");
        writeFileSync(file, "x");
        await assert.rejects(writeDirAtomic(file, fill("1"), {replace: "owned", kind: "k"}), /not a folder/);
        const link = path.join(tmp, "dir-link");
        symlinkSync(adapter, link);
        await assert.rejects(writeDirAtomic(link, fill("1"), {replace: "owned", kind: "k"}), /symbolic link/);
        const empty = path.join(tmp, "empty");
        mkdirSync(empty);
        await writeDirAtomic(empty, fill("1"), {replace: "never", kind: "k"});
        assert.equal(readFileSync(path.join(empty, "a.txt"), "utf8"), "1");
        await assert.rejects(
            writeDirAtomic(empty, fill("2"), {replace: "never", kind: "k", overwriteHint: "--overwrite"}),
            /\(an earlier qlora k\); pass --overwrite to replace it/
        );
        await assert.rejects(writeDirAtomic(empty, fill("2"), {replace: "owned", kind: "other"}), /holds a qlora k, not a other/);
        // a failing fill leaves the old folder and no temporary
        await assert.rejects(
            writeDirAtomic(
                empty,
                async () => {
                    throw new Error("boom");
                },
                {replace: "owned", kind: "k"}
            ),
            /boom/
        );
        await writeDirAtomic(empty, fill("2"), {replace: "owned", kind: "k"});
        assert.equal(readFileSync(path.join(empty, "a.txt"), "utf8"), "2");
        assert.deepEqual(
            readdirSync(tmp).filter((n) => n.startsWith(".empty.")),
            []
        );
        await assert.rejects(writeDirAtomic(adapter, fill("3"), {replace: "owned", kind: "k"}), /not written by qlora/);
    });

    test("assertOutputSeparate and assertFileOutput", async () => {
        await assert.rejects(
            assertOutputSeparate(path.join(model, "..", "model"), [{path: model, what: "base model folder"}]),
            /--out is the base model folder/
        );
        await assertOutputSeparate(path.join(model, "sub", "new"), [{path: model, what: "base model folder"}]);
        await assertFileOutput(path.join(tmp, "does-not-exist.gguf"), {overwrite: false});
        await assert.rejects(
            assertFileOutput(path.join(model, "config.json"), {overwrite: true, looksOwned: hasGgufMagic, what: "a GGUF file"}),
            /not a GGUF file/
        );
    });
});

describe("an interrupted folder swap is completed or rolled back", () => {
    const K = "checkpoint";
    /** a complete folder as writeDirAtomic leaves it: content + marker */
    function folder(p: string, version: string, kind = K) {
        mkdirSync(p, {recursive: true});
        writeFileSync(path.join(p, "weights"), version);
        writeFileSync(path.join(p, QLORA_MARKER_FILE), JSON.stringify({written_by: "qlora", kind, version: "test"}));
    }
    const R = "00112233445566ff",
        S = "aabbccddeeff0011";
    const version = (p: string) => readFileSync(path.join(p, "weights"), "utf8");

    test("each kill point leaves the newest complete folder and no leftovers", async () => {
        const cases: {name: string; make: (parent: string) => void; expect: string}[] = [
            {
                name: "killed while filling",
                expect: "v1",
                make: (d) => {
                    folder(path.join(d, "final"), "v1");
                    mkdirSync(path.join(d, `.final.tmp-${R}`));
                    writeFileSync(path.join(d, `.final.tmp-${R}`, "weights"), "v2 (half");
                }
            },
            {
                name: "killed after the new folder was complete, before the old one moved aside",
                expect: "v2",
                make: (d) => {
                    folder(path.join(d, "final"), "v1");
                    folder(path.join(d, `.final.new-${R}`), "v2");
                }
            },
            {
                name: "killed between the two renames",
                expect: "v2",
                make: (d) => {
                    folder(path.join(d, `.final.old-${R}`), "v1");
                    folder(path.join(d, `.final.new-${R}`), "v2");
                }
            },
            {
                name: "killed before the old folder was removed",
                expect: "v2",
                make: (d) => {
                    folder(path.join(d, "final"), "v2");
                    folder(path.join(d, `.final.old-${R}`), "v1");
                }
            },
            {
                name: "an earlier version killed between its renames (pid names)",
                expect: "v1",
                make: (d) => {
                    folder(path.join(d, ".final.old-4242"), "v1");
                    folder(path.join(d, ".final.tmp-4242"), "v2 (never marked complete)");
                }
            },
            {
                name: "two kills: a swap left half-done, then a fill",
                expect: "v2",
                make: (d) => {
                    folder(path.join(d, `.final.old-${R}`), "v1");
                    folder(path.join(d, `.final.new-${R}`), "v2");
                    mkdirSync(path.join(d, `.final.tmp-${S}`));
                }
            }
        ];
        for (const c of cases) {
            const parent = path.join(tmp, "swap", c.name.replace(/\W+/g, "-"));
            mkdirSync(parent, {recursive: true});
            writeFileSync(path.join(parent, "user-notes.txt"), "mine");
            c.make(parent);
            const done = await recoverInterruptedWrites(parent);
            assert.ok(done.length > 0, c.name);
            assert.equal(version(path.join(parent, "final")), c.expect, c.name);
            assert.deepEqual(readdirSync(parent).sort(), ["final", "user-notes.txt"], c.name);
            assert.deepEqual(await recoverInterruptedWrites(parent), [], `${c.name}: a second pass has nothing to do`);
        }
    });

    test("a complete new folder never replaces a folder qlora did not write", async () => {
        const parent = path.join(tmp, "swap-foreign");
        mkdirSync(path.join(parent, "final"), {recursive: true});
        writeFileSync(path.join(parent, "final", "weights"), "the user's");
        folder(path.join(parent, `.final.new-${R}`), "v2");
        const done = await recoverInterruptedWrites(parent);
        assert.match(done.join("\n"), /left \.final\.new-/);
        assert.equal(version(path.join(parent, "final")), "the user's");
    });

    test("writeDirAtomic finishes an interrupted swap of its folder before replacing it", async () => {
        const parent = path.join(tmp, "swap-then-write");
        folder(path.join(parent, `.final.old-${R}`), "v1");
        folder(path.join(parent, `.final.new-${R}`), "v2");
        // the recovered v2 is an earlier qlora checkpoint: "never" refuses it, "owned" replaces it
        await assert.rejects(
            writeDirAtomic(path.join(parent, "final"), async () => undefined, {replace: "never", kind: K}),
            /an earlier qlora checkpoint/
        );
        assert.equal(version(path.join(parent, "final")), "v2");
        await writeDirAtomic(path.join(parent, "final"), async (d) => writeFileSync(path.join(d, "weights"), "v3"), {
            replace: "owned",
            kind: K
        });
        assert.equal(version(path.join(parent, "final")), "v3");
        assert.deepEqual(readdirSync(parent), ["final"]);
    });
});
