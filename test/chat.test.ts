// qlora chat through a pipe: one answer per input line, /reset and /exit.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import path from "node:path";
import {loadModel} from "../src/api/models.js";
import {generate} from "../src/model/generate.js";
import {REPO_ROOT} from "./helpers/paths.js";

test("chat answers each piped line with the greedy continuation of the chat template, streamed", async () => {
    const r = spawnSync(
        process.execPath,
        ["--import", "tsx", path.join(REPO_ROOT, "src", "cli", "main.ts"), "chat", "--greedy", "-n", "12"],
        {input: "hello\n/reset\nhello\n/exit\nnot read\n", encoding: "utf8", cwd: REPO_ROOT}
    );
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.split("\n");
    // the expected first answer, computed through the API
    const {model, tokenizer, eosTokenIds} = await loadModel();
    const ids = tokenizer.encode(tokenizer.applyChatTemplate([{role: "user", content: "hello"}], {addGenerationPrompt: true}));
    const res = generate(model, ids, {maxNewTokens: 12, greedy: true, eosTokenIds});
    const answer = tokenizer.decode(res.stopReason === "eos" ? res.newIds.slice(0, -1) : res.newIds, {skipSpecialTokens: true});
    assert.ok(
        r.stdout.startsWith(answer + "\n"),
        `stdout: ${JSON.stringify(r.stdout)}\nexpected start: ${JSON.stringify(answer)}`
    );
    // after /reset the same question gets the same answer; nothing after /exit is answered
    assert.equal(r.stdout, `${answer}\n(history cleared)\n${answer}\n`, JSON.stringify(lines));
});
