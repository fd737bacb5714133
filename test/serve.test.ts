// qlora serve through the official `openai` client (CPU backend, the embedded model): models, chat and completions
// streamed and not, equal to `generate` greedy; two adapters on one base; stop strings; bad requests; a full queue;
// a client that disconnects mid-stream; and the CLI command itself.
import {after, before, describe, test} from "node:test";
import assert from "node:assert/strict";
import {spawn} from "node:child_process";
import {mkdtempSync, rmSync} from "node:fs";
import type {AddressInfo} from "node:net";
import os from "node:os";
import path from "node:path";
import OpenAI from "openai";
import {loadModel, withAdapter, type LoadedModel} from "../src/api/models.js";
import {generate} from "../src/model/generate.js";
import {applyLora} from "../src/peft/inject.js";
import {saveAdapter} from "../src/peft/adapter-files.js";
import {DecoderModel} from "../src/model/decoder.js";
import {Rng} from "../src/backend/rng.js";
import {StopMatcher} from "../src/model/stop-strings.js";
import {createServer, type ServedModel} from "../src/serve/server.js";
import {FIXTURES, MODEL_DIR, REPO_ROOT} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-serve-"));
after(() => rmSync(tmp, {recursive: true, force: true}));

/** what `generate --greedy` gives for these chat messages (the reference the server must match) */
function greedyChat(m: LoadedModel, content: string, maxTokens: number): {text: string; promptTokens: number; tokens: number} {
    const prompt = m.tokenizer.applyChatTemplate([{role: "user", content}], {addGenerationPrompt: true});
    const ids = m.tokenizer.encode(prompt);
    const r = generate(m.lm, ids, {maxNewTokens: maxTokens, greedy: true, eosTokenIds: m.eosTokenIds});
    const eos = new Set(m.eosTokenIds);
    return {
        text: m.tokenizer.decode(
            r.newIds.filter((id) => !eos.has(id)),
            {skipSpecialTokens: true}
        ),
        promptTokens: ids.length,
        tokens: r.newIds.length
    };
}

/** a server of its own for the tiny base (closed after the test), the lines it logs and a client for it */
async function ownServer(
    limits: {maxBatch?: number; kvCacheTokens?: number},
    base: LoadedModel
): Promise<{lines: string[]; client: OpenAI}> {
    const lines: string[] = [];
    const own = createServer({
        models: [{id: "tiny", loaded: base}],
        maxQueue: 8,
        maxBodyBytes: 64 << 10,
        ...limits,
        log: (line) => lines.push(line)
    });
    await new Promise<void>((resolve) => own.listen(0, "127.0.0.1", resolve));
    after(() => {
        own.closeAllConnections();
        own.close();
    });
    const client = new OpenAI({
        baseURL: `http://127.0.0.1:${(own.address() as AddressInfo).port}/v1`,
        apiKey: "unused",
        maxRetries: 0
    });
    return {lines, client};
}

describe("qlora serve (OpenAI API)", () => {
    let base: LoadedModel, a1: LoadedModel, a2: LoadedModel;
    let server: ReturnType<typeof createServer>;
    let client: OpenAI;
    let url: string;
    const logs: string[] = [];

    before(async () => {
        base = await loadModel(MODEL_DIR);
        // a second adapter, random (B != 0), so each adapter answers differently
        const donor = await DecoderModel.load(MODEL_DIR);
        const lora = applyLora(
            donor,
            {r: 4, lora_alpha: 32, target_modules: ["q_proj", "v_proj", "down_proj"], init_lora_weights: false},
            {initRng: new Rng(11)}
        );
        await saveAdapter(path.join(tmp, "second"), lora);
        a1 = await withAdapter(base, path.join(FIXTURES, "adapter"));
        a2 = await withAdapter(base, path.join(tmp, "second"));
        const models: ServedModel[] = [
            {id: "tiny", loaded: base},
            {id: "fixture", loaded: a1},
            {id: "second", loaded: a2}
        ];
        server = createServer({models, maxQueue: 2, maxBodyBytes: 64 << 10, log: (line) => logs.push(line)});
        await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
        url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1`;
        client = new OpenAI({baseURL: url, apiKey: "unused", maxRetries: 0});
    });
    after(() => {
        server.closeAllConnections();
        server.close();
    });

    test("GET /v1/models lists the base and each adapter", async () => {
        const ids: string[] = [];
        for await (const m of client.models.list()) ids.push(m.id);
        assert.deepEqual(ids, ["tiny", "fixture", "second"]);
    });

    test("a chat completion (temperature 0) is generate's greedy answer, with usage counts", async () => {
        const want = greedyChat(base, "Name three colours.", 12);
        const r = await client.chat.completions.create({
            model: "tiny",
            messages: [{role: "user", content: "Name three colours."}],
            temperature: 0,
            max_tokens: 12
        });
        assert.equal(r.object, "chat.completion");
        assert.equal(r.choices[0].message.role, "assistant");
        assert.equal(r.choices[0].message.content, want.text);
        assert.equal(r.choices[0].finish_reason, want.tokens === 12 ? "length" : "stop");
        assert.deepEqual(r.usage, {
            prompt_tokens: want.promptTokens,
            completion_tokens: want.tokens,
            total_tokens: want.promptTokens + want.tokens
        });
    });

    test("streamed, the deltas add up to the same answer, and include_usage sends the counts last", async () => {
        const want = greedyChat(base, "Name three colours.", 12);
        const stream = await client.chat.completions.create({
            model: "tiny",
            messages: [{role: "user", content: "Name three colours."}],
            temperature: 0,
            max_tokens: 12,
            stream: true,
            stream_options: {include_usage: true}
        });
        let text = "",
            finish: string | null = null,
            usage: OpenAI.CompletionUsage | null | undefined = null,
            chunks = 0;
        for await (const c of stream) {
            chunks++;
            if (c.choices[0]?.delta?.content) text += c.choices[0].delta.content;
            if (c.choices[0]?.finish_reason) finish = c.choices[0].finish_reason;
            if (c.usage) usage = c.usage;
        }
        assert.equal(text, want.text);
        assert.ok(chunks >= 3, `${chunks} chunks`);
        assert.equal(finish, want.tokens === 12 ? "length" : "stop");
        assert.equal(usage?.completion_tokens, want.tokens);
    });

    test("the request's model picks the adapter: each answers as generate does with that adapter", async () => {
        const answers = new Map<string, string>();
        for (const [name, m] of [
            ["tiny", base],
            ["fixture", a1],
            ["second", a2]
        ] as const) {
            const r = await client.chat.completions.create({
                model: name,
                messages: [{role: "user", content: "Hello"}],
                temperature: 0,
                max_tokens: 10
            });
            assert.equal(r.choices[0].message.content, greedyChat(m, "Hello", 10).text, name);
            answers.set(name, r.choices[0].message.content ?? "");
        }
        // the adapters change the answer, and the base stayed the base (the adapters share it without touching it)
        assert.notEqual(answers.get("second"), answers.get("tiny"));
        const again = await client.chat.completions.create({
            model: "tiny",
            messages: [{role: "user", content: "Hello"}],
            temperature: 0,
            max_tokens: 10
        });
        assert.equal(again.choices[0].message.content, answers.get("tiny"));
    });

    test("completions continue a raw prompt (16 tokens by default, as OpenAI's)", async () => {
        const ids = base.tokenizer.encode("The capital of France is");
        const want = generate(base.lm, ids, {maxNewTokens: 16, greedy: true, eosTokenIds: base.eosTokenIds});
        const r = await client.completions.create({model: "tiny", prompt: "The capital of France is", temperature: 0});
        const eos = new Set(base.eosTokenIds);
        assert.equal(
            r.choices[0].text,
            base.tokenizer.decode(
                want.newIds.filter((id) => !eos.has(id)),
                {skipSpecialTokens: true}
            )
        );
        assert.equal(r.usage?.completion_tokens, want.newIds.length);
        // repetition_penalty (vLLM's extension of the API) is generate's repetitionPenalty
        const penalized = generate(base.lm, ids, {
            maxNewTokens: 16,
            greedy: true,
            repetitionPenalty: 1.8,
            eosTokenIds: base.eosTokenIds
        });
        const request = {model: "tiny", prompt: "The capital of France is", temperature: 0, repetition_penalty: 1.8};
        const p = await client.completions.create(request);
        assert.equal(
            p.choices[0].text,
            base.tokenizer.decode(
                penalized.newIds.filter((id) => !eos.has(id)),
                {skipSpecialTokens: true}
            )
        );
        assert.notDeepEqual(penalized.newIds, want.newIds, "the penalty changed nothing");
    });

    test("a stop string ends the answer before it, streamed or not", async () => {
        const full = greedyChat(base, "Name three colours.", 24).text;
        // a stop string from the middle of the greedy answer
        const stop = full.slice(Math.floor(full.length / 2), Math.floor(full.length / 2) + 3);
        assert.ok(stop.length === 3 && full.indexOf(stop) > 0, `answer ${JSON.stringify(full)}`);
        const expected = full.slice(0, full.indexOf(stop));
        const body = {
            model: "tiny",
            messages: [{role: "user" as const, content: "Name three colours."}],
            temperature: 0,
            max_tokens: 24,
            stop: [stop, "\u0000never"]
        };
        const r = await client.chat.completions.create(body);
        assert.equal(r.choices[0].message.content, expected);
        assert.equal(r.choices[0].finish_reason, "stop");
        let text = "";
        for await (const c of await client.chat.completions.create({...body, stream: true}))
            text += c.choices[0]?.delta?.content ?? "";
        assert.equal(text, expected);
    });

    test("continuous batching: requests join a running batch when a row is free, each answered as it would be alone", async () => {
        const {lines, client: ownClient} = await ownServer({maxBatch: 2}, base);
        const ask = (content: string, max: number) =>
            ownClient.chat.completions
                .create({model: "tiny", messages: [{role: "user", content}], temperature: 0, max_tokens: max})
                .then((r) => ({text: r.choices[0].message.content, at: performance.now()}));
        const long = greedyChat(base, "写一首诗", 40);
        assert.ok(long.tokens >= 25, `the long answer runs ${long.tokens} tokens`);
        // the long request streams; once it is under way, two short ones arrive: the first joins its batch at
        // once, the second waits for a free row (--max-batch 2) and joins when the first leaves
        const stream = await ownClient.chat.completions.create({
            model: "tiny",
            messages: [{role: "user", content: "写一首诗"}],
            temperature: 0,
            max_tokens: 40,
            stream: true
        });
        let longText = "",
            chunks = 0;
        let shorts: Promise<{text: string | null; at: number}[]> | null = null;
        for await (const c of stream) {
            longText += c.choices[0]?.delta?.content ?? "";
            if (++chunks === 4) shorts = Promise.all([ask("1, 2, 3, 4,", 5), ask("Name three colours.", 4)]);
        }
        const longEnd = performance.now();
        const [first, second] = await shorts!;
        assert.equal(longText, long.text);
        assert.deepEqual(
            [first.text, second.text],
            [greedyChat(base, "1, 2, 3, 4,", 5).text, greedyChat(base, "Name three colours.", 4).text]
        );
        // both short answers came while the long one was still running: neither waited for its batch to end
        assert.ok(first.at < longEnd && second.at < longEnd, lines.join("\n"));
        assert.ok(
            lines.some((l) => l.includes(`completion=${long.tokens} finish=stop`) && l.includes("batch=2")),
            lines.join("\n")
        );
    });

    test("--kv-cache-tokens: requests share the cache in blocks; one waits for the blocks of its answer, none is cut short", async () => {
        // 2 rows but a cache of 2 blocks (128 positions): a request of prompt + max_tokens <= 64 takes 1 block
        const {client: ownClient} = await ownServer({maxBatch: 2, kvCacheTokens: 128}, base);
        const ask = (content: string, max: number) =>
            ownClient.chat.completions
                .create({model: "tiny", messages: [{role: "user", content}], temperature: 0, max_tokens: max})
                .then((r) => ({text: r.choices[0].message.content, at: performance.now()}));
        const promptTokens = greedyChat(base, "写一首诗", 1).promptTokens;
        // the long request reserves both blocks (its prompt and 60 tokens pass 64 positions)
        const longMax = 60;
        assert.ok(promptTokens + longMax > 64 && promptTokens + longMax <= 128, `prompt ${promptTokens} tokens`);
        const long = greedyChat(base, "写一首诗", longMax);
        // long enough that the short answer, had it not waited, would have ended first
        assert.ok(long.tokens >= 20, `the long answer runs ${long.tokens} tokens`);
        const stream = await ownClient.chat.completions.create({
            model: "tiny",
            messages: [{role: "user", content: "写一首诗"}],
            temperature: 0,
            max_tokens: longMax,
            stream: true
        });
        let longText = "",
            chunks = 0;
        let short: Promise<{text: string | null; at: number}> | null = null;
        for await (const c of stream) {
            longText += c.choices[0]?.delta?.content ?? "";
            // a row is free but no block: the short request waits for the long one to end
            if (++chunks === 3) short = ask("1, 2, 3, 4,", 5);
        }
        const longEnd = performance.now();
        const answer = await short!;
        assert.equal(longText, long.text);
        assert.equal(answer.text, greedyChat(base, "1, 2, 3, 4,", 5).text);
        assert.ok(answer.at > longEnd - 1, "the short request waited for the blocks");
        // a request is capped at the cache's size, with the flag named
        await assert.rejects(
            ask("写一首诗", 200),
            (err: unknown) => err instanceof OpenAI.APIError && err.status === 400 && /--kv-cache-tokens/.test(err.message)
        );
    });

    test("concurrent requests for one model are decoded as one batch, each answered as it would be alone", async () => {
        const asks = [
            {content: "Name three colours.", max: 12, model: "tiny"},
            {content: "1, 2, 3, 4,", max: 5, model: "tiny"},
            {content: "写一首诗", max: 9, model: "tiny"}
        ];
        const alone = asks.map((a) => greedyChat(base, a.content, a.max).text);
        // a server of its own with room for all three at once
        const {lines, client: ownClient} = await ownServer({}, base);
        const answers = await Promise.all(
            asks.map((a) =>
                ownClient.chat.completions.create({
                    model: a.model,
                    messages: [{role: "user", content: a.content}],
                    temperature: 0,
                    max_tokens: a.max
                })
            )
        );
        assert.deepEqual(
            answers.map((r) => r.choices[0].message.content),
            alone
        );
        console.log(lines.join("\n"));
        // the first request may start alone; the two behind it then share a batch
        assert.ok(
            lines.some((l) => /batch=[23] /.test(l)),
            lines.join("\n")
        );
    });

    test("bad requests get OpenAI's error object with a 4xx status", async () => {
        const bad = async (body: Record<string, unknown>, status: number, match: RegExp) => {
            await assert.rejects(client.chat.completions.create(body as never), (err: InstanceType<typeof OpenAI.APIError>) => {
                assert.equal(err.status, status);
                assert.match(err.message, match);
                return true;
            });
        };
        const hi = [{role: "user", content: "hi"}];
        await bad({model: "nope", messages: hi}, 404, /model `nope` does not exist.*tiny, fixture, second/);
        await bad({model: "tiny", messages: hi, temperature: 5}, 400, /temperature` must be a number in \[0, 2\]/);
        await bad({model: "tiny", messages: hi, repetition_penalty: 0}, 400, /repetition_penalty` must be a number in/);
        await bad({model: "tiny", messages: []}, 400, /messages` must be a non-empty list/);
        await bad({model: "tiny", messages: [{role: "wizard", content: "x"}]}, 400, /messages\[0\]\.role must be/);
        await bad({model: "tiny", messages: hi, max_tokens: 10 ** 9}, 400, /exceed the \d+ positions a request holds here/);
        await bad({model: "tiny", messages: hi, n: 2}, 400, /`n` must be/);
        await bad({model: "tiny", messages: hi, stop: ["a", "b", "c", "d", "e"]}, 400, /at most 4 strings/);
        // not JSON, and a body over --max-body-bytes
        const post = (body: string) =>
            fetch(`${url}/chat/completions`, {method: "POST", body, headers: {"content-type": "application/json"}});
        const notJson = await post("{");
        assert.equal(notJson.status, 400);
        assert.match(((await notJson.json()) as {error: {message: string}}).error.message, /not valid JSON/);
        const huge = await post(JSON.stringify({model: "tiny", messages: [{role: "user", content: "x".repeat(70 << 10)}]}));
        assert.equal(huge.status, 413);
        assert.equal(((await huge.json()) as {error: {code: string}}).error.code, "request_too_large");
        const route = await fetch(`${url}/embeddings`, {method: "POST", body: "{}"});
        assert.equal(route.status, 404);
    });

    test("a client that disconnects mid-stream frees the server at once; a full queue answers 503", async () => {
        // a long answer, dropped after its first chunk
        const controller = new AbortController();
        const stream = await client.chat.completions.create(
            {
                model: "tiny",
                messages: [{role: "user", content: "Tell me a long story."}],
                temperature: 0,
                max_tokens: 400,
                stream: true
            },
            {signal: controller.signal}
        );
        try {
            for await (const _ of stream) controller.abort();
        } catch {
            // the client's own abort
        }
        // the next request is served right after, and the dropped one stopped long before its 400 tokens
        const t0 = Date.now();
        const r = await client.chat.completions.create({
            model: "tiny",
            messages: [{role: "user", content: "hi"}],
            temperature: 0,
            max_tokens: 2
        });
        assert.ok(r.choices[0].message.content !== null);
        const waited = Date.now() - t0;
        const gone = logs.find((l) => l.endsWith("finish=client_gone"));
        assert.ok(gone, logs.join("\n"));
        const stoppedAt = Number(/completion=(\d+)/.exec(gone)![1]);
        assert.ok(stoppedAt < 400, gone);
        // two long requests fill the queue (--max-queue 2): a third is refused, not queued without bound
        // (the embedded model answers "story 2" with 300 tokens, about a second, and no end of turn)
        const long = () =>
            client.chat.completions.create({
                model: "tiny",
                messages: [{role: "user", content: "story 2"}],
                temperature: 0,
                max_tokens: 300
            });
        const first = long(),
            second = long();
        // both are in the queue (GET /health counts them) before the third is sent
        for (let tries = 0; ; tries++) {
            const health = (await (await fetch(`${url.replace(/\/v1$/, "")}/health`)).json()) as {queued: number};
            if (health.queued === 2) break;
            assert.ok(tries < 500, "the two requests reach the server");
            await new Promise((resolve) => setTimeout(resolve, 10));
        }
        await assert.rejects(long(), (err: InstanceType<typeof OpenAI.APIError>) => {
            assert.equal(err.status, 503);
            assert.match(err.message, /busy.*--max-queue 2/);
            return true;
        });
        for (const r of await Promise.all([first, second])) assert.equal(r.usage?.completion_tokens, 300);
        console.log(
            `a client gone after its first chunk stopped generation at token ${stoppedAt}; the next request took ${waited} ms`
        );
        assert.ok(waited < 2000, `${waited} ms`);
    });
});

test("StopMatcher holds back text that could start a stop string, and cuts at the first one", () => {
    const m = new StopMatcher(["</s>", "END"]);
    assert.deepEqual(m.push("hello <"), {text: "hello ", stopped: false});
    assert.deepEqual(m.push("/"), {text: "", stopped: false});
    assert.deepEqual(m.push("x> E"), {text: "</x> ", stopped: false});
    assert.deepEqual(m.push("NDING"), {text: "", stopped: true});
    const n = new StopMatcher(["ab"]);
    assert.deepEqual(n.push("xa"), {text: "x", stopped: false});
    assert.equal(n.flush(""), "a");
    assert.deepEqual(new StopMatcher([]).push("anything"), {text: "anything", stopped: false});
});

test("qlora serve: listens, lists its models, answers, and exits 0 on SIGTERM", async () => {
    const child = spawn(
        process.execPath,
        [
            "--import",
            "tsx",
            path.join(REPO_ROOT, "src/cli/main.ts"),
            "serve",
            "--port",
            "0",
            "--adapter",
            `fx=${path.join(FIXTURES, "adapter")}`
        ],
        {cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"]}
    );
    let stderr = "";
    const listening = new Promise<string>((resolve, reject) => {
        child.stderr.on("data", (d: Buffer) => {
            stderr += d.toString();
            const m = /listening on (http:\/\/\S+\/v1) \(models: tiny-qwen2, fx\)/.exec(stderr);
            if (m) resolve(m[1]);
        });
        child.on("exit", (code) => reject(new Error(`exited ${code}: ${stderr}`)));
    });
    const base = await listening;
    const client = new OpenAI({baseURL: base, apiKey: "unused", maxRetries: 0});
    const ids: string[] = [];
    for await (const m of client.models.list()) ids.push(m.id);
    assert.deepEqual(ids, ["tiny-qwen2", "fx"]);
    const r = await client.chat.completions.create({
        model: "fx",
        messages: [{role: "user", content: "hi"}],
        max_tokens: 3,
        seed: 1
    });
    assert.equal(r.model, "fx");
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
    child.kill("SIGTERM");
    assert.equal(await exited, 0);
    assert.match(stderr, /chat model=fx batch=1 prompt=\d+ completion=\d+ finish=/);
});

test("qlora serve refuses two adapters with one name, and an adapter named with an empty NAME=", async () => {
    const run = (args: string[]) =>
        new Promise<{code: number | null; stderr: string}>((resolve) => {
            const child = spawn(
                process.execPath,
                ["--import", "tsx", path.join(REPO_ROOT, "src/cli/main.ts"), "serve", "--port", "0", ...args],
                {
                    cwd: REPO_ROOT,
                    stdio: ["ignore", "ignore", "pipe"]
                }
            );
            let stderr = "";
            child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
            child.on("exit", (code) => resolve({code, stderr}));
        });
    const dup = await run([
        "--adapter",
        `a=${path.join(FIXTURES, "adapter")}`,
        "--adapter",
        `a=${path.join(FIXTURES, "adapter")}`
    ]);
    assert.equal(dup.code, 1);
    assert.match(dup.stderr, /^error: --adapter "a": two models would share that name/m);
    const empty = await run(["--adapter", "=x"]);
    assert.equal(empty.code, 1);
    assert.match(empty.stderr, /the name before = is empty/);
});
