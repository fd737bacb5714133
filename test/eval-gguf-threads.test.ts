// The gguf column's llama.cpp threads: llama.cpp's own default (the cores useful for math, at most the CPUs the
// process may use), not node-llama-cpp
// 3.21.1's (at least 4 whatever the machine has: on 2 cores a decoded token of the embedded model took 983 ms with
// 4 threads, 2 ms with 1), or the number asked for. Read from the live llama.cpp context.
import {after, test} from "node:test";
import assert from "node:assert/strict";
import {mkdtempSync, rmSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {exportGguf} from "../src/api/export-gguf.js";
import {openGgufLm} from "../src/eval/llama-cpp.js";
import {loadModelConfig} from "../src/io/hf-config.js";
import {testLlama} from "./helpers/llama-cpp.js";
import {MODEL_DIR} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-eval-gguf-threads-"));
after(() => rmSync(tmp, {recursive: true, force: true}));

test("a GGUF model is evaluated with llama.cpp's default threads (the math cores) or the threads asked for", async () => {
    const file = path.join(tmp, "tiny-f16.gguf");
    await exportGguf({modelDir: MODEL_DIR, outtype: "f16", out: file});
    const config = await loadModelConfig(MODEL_DIR);
    const cores = (await testLlama()).cpuMathCores;
    const row = {ids: [1, 2, 3, 4, 5], reads: [{at: 4, token: 6}]};
    for (const [threads, expected] of [
        [undefined, Math.max(1, Math.min(cores, os.availableParallelism()))],
        [1, 1]
    ] as const) {
        const lm = await openGgufLm(file, config, {device: "cpu", threads});
        try {
            const [[score]] = await lm.tokenLogprobs([row]);
            assert.ok(Number.isFinite(score.logprob) && score.logprob < 0);
            assert.equal(lm.threads, expected, `threads: ${threads ?? "default"}`);
            assert.ok(lm.threads <= os.availableParallelism(), `${lm.threads} threads on ${os.availableParallelism()} cores`);
        } finally {
            await lm.dispose();
        }
    }
});
