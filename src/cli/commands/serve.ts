// qlora serve: the model (and its adapters, sharing one base) behind an OpenAI-compatible HTTP API.
import path from "node:path";
import type {Command} from "commander";
import {QloraError, quoteValue} from "../../errors.js";
import {loadModel, withAdapter} from "../../api/models.js";
import {createServer, DEFAULT_CTX_SIZE, type ServedModel} from "../../serve/server.js";
import {pc} from "../colors.js";
import {action, escapeForTerminal, parseIntOption, reportError} from "../run.js";

interface ServeFlags {
    model?: string;
    adapter: string[];
    servedModelName?: string;
    loadIn4bit?: boolean;
    device: "auto" | "cpu" | "cuda";
    template?: string;
    host: string;
    port: number;
    maxQueue: number;
    maxBatch: number;
    ctxSize: number;
    kvCacheTokens?: number;
    maxBodyBytes: number;
}

/** an adapter as NAME=DIR, or DIR (named after its folder) */
function parseAdapter(value: string, previous: string[]): string[] {
    return [...previous, value];
}

function adapterSpec(value: string): {name: string; dir: string} {
    const eq = value.indexOf("=");
    if (eq > 0) return {name: value.slice(0, eq), dir: value.slice(eq + 1)};
    if (eq === 0) throw new QloraError(`--adapter ${quoteValue(value)}: the name before = is empty (use NAME=DIR)`);
    return {name: path.basename(path.resolve(value)), dir: value};
}

export function registerServe(program: Command): void {
    program
        .command("serve")
        .description(
            "serve a model and its adapters over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)"
        )
        .option("-m, --model <dir>", "Hugging Face model folder (default: the embedded tiny-qwen2)")
        .option(
            "-a, --adapter <name=dir>",
            "a PEFT adapter to serve as model NAME (repeatable; DIR alone is named after its folder); all share one base",
            parseAdapter,
            []
        )
        .option("--served-model-name <name>", "the name of the base model in the API (default: its folder's name)")
        .option("--load-in-4bit", "quantize the base to NF4 as QLoRA trained it")
        .option(
            "--device <device>",
            "auto (default: the GPU when one is usable), cuda, or cpu",
            (v: string) => {
                if (v === "auto" || v === "cpu" || v === "cuda") return v;
                return reportError(new QloraError(`--device expects auto, cpu or cuda, got ${quoteValue(v)}`));
            },
            "auto"
        )
        .option(
            "--template <file|base>",
            "the base model's chat template: a Jinja file, or base (default); each adapter uses its training format when it has one"
        )
        .option("--host <host>", "the address to listen on (0.0.0.0: every interface)", "127.0.0.1")
        .option("--port <n>", "the port (0: any free one)", parseIntOption("--port", 0), 8000)
        .option(
            "--max-queue <n>",
            "requests waiting or running at once; more are answered 503",
            parseIntOption("--max-queue", 1),
            64
        )
        .option(
            "--max-batch <n>",
            "requests for one model decoded together (each with its own settings)",
            parseIntOption("--max-batch", 1),
            8
        )
        .option(
            "--ctx-size <n>",
            "positions per request, prompt and answer (at most the model's context); the KV cache holds --max-batch of them",
            parseIntOption("--ctx-size", 2),
            DEFAULT_CTX_SIZE
        )
        .option(
            "--kv-cache-tokens <n>",
            "positions in each model's KV cache, shared by its running requests in blocks of 64 (default: --max-batch x --ctx-size); a request waits until its prompt and max_tokens fit",
            parseIntOption("--kv-cache-tokens", 64)
        )
        .option("--max-body-bytes <n>", "the largest request body", parseIntOption("--max-body-bytes", 1024), 4 << 20)
        .action(
            action(async (flags: ServeFlags) => {
                if (flags.port > 65535) throw new QloraError(`--port must be at most 65535, got ${flags.port}`);
                const adapters = flags.adapter.map(adapterSpec);
                const base = await loadModel(flags.model, {
                    loadIn4bit: flags.loadIn4bit,
                    device: flags.device,
                    template: flags.template
                });
                if (base.deviceNote) console.error(pc.dim(escapeForTerminal(base.deviceNote)));
                const models: ServedModel[] = [{id: flags.servedModelName ?? path.basename(base.dir), loaded: base}];
                for (const a of adapters) {
                    if (models.some((m) => m.id === a.name))
                        throw new QloraError(
                            `--adapter ${quoteValue(a.name)}: two models would share that name; name them NAME=DIR`
                        );
                    models.push({id: a.name, loaded: await withAdapter(base, a.dir)});
                }
                const server = createServer({
                    models,
                    maxQueue: flags.maxQueue,
                    maxBodyBytes: flags.maxBodyBytes,
                    maxBatch: flags.maxBatch,
                    ctxSize: flags.ctxSize,
                    kvCacheTokens: flags.kvCacheTokens,
                    log: (line) => console.error(pc.dim(escapeForTerminal(line)))
                });
                await new Promise<void>((resolve, reject) => {
                    server.once("error", (err: NodeJS.ErrnoException) =>
                        reject(
                            err.code === "EADDRINUSE"
                                ? new QloraError(`port ${flags.port} on ${flags.host} is in use; pick another with --port`)
                                : err
                        )
                    );
                    server.listen(flags.port, flags.host, () => resolve());
                });
                const address = server.address();
                const port = typeof address === "object" && address ? address.port : flags.port;
                const host = flags.host.includes(":") ? `[${flags.host}]` : flags.host;
                // one line a script can wait for (the port when --port 0)
                console.error(
                    `qlora serve: listening on http://${host}:${port}/v1 (models: ${models.map((m) => m.id).join(", ")})`
                );
                await new Promise<void>((resolve) => {
                    const stop = () => {
                        server.close(() => resolve());
                        server.closeAllConnections(); // streams in progress end now
                    };
                    process.once("SIGINT", stop);
                    process.once("SIGTERM", stop);
                });
            })
        );
}
