// server.ts: `qlora serve`, an OpenAI-compatible HTTP server (the API of llama.cpp's server, vLLM and
// LLaMA-Factory's `api`): GET /v1/models, POST /v1/chat/completions and POST /v1/completions, streamed as
// server-sent events or not; the request's `model` picks the base or one of its adapters.
//
// Requests wait in arrival order; the first in line runs with the others waiting for the same model as one batch
// (one forward per step for all of them, each row with its own settings, each answered as soon as it ends), then
// the next. The loop yields to the event loop after every step: other clients are accepted, queued and answered
// with a 503 when the queue is full, streams flush, and a client that goes away stops its row at the next step.
// Bodies are capped; every bad request gets OpenAI's error object with a 4xx status.
import http from "node:http";
import {randomBytes, randomInt} from "node:crypto";
import {isQloraError} from "../errors.js";
import {type DecodeRow, SlotDecoder} from "../model/generate.js";
import {kvBlocksFor} from "../model/graph.js";
import {StopMatcher} from "../model/stop-strings.js";
import type {LoadedModel} from "../api/models.js";
import type {ChatMessage} from "../tokenizer/index.js";

export interface ServedModel {
    /** the name clients pass as `model` */
    id: string;
    loaded: LoadedModel;
}

export interface ServerOptions {
    /** the base first (the default when a request names no model), then its adapters */
    models: ServedModel[];
    /** requests waiting or running at once; more get 503 */
    maxQueue: number;
    /** the largest request body, in bytes; larger get 413 */
    maxBodyBytes: number;
    /** requests for the same model decoded together, each with its own settings (default 8) */
    maxBatch?: number;
    /** positions per request, prompt and answer (default 4096, at most the model's context): each of the
     * --max-batch rows of a model's KV cache holds this many */
    ctxSize?: number;
    /**
     * positions in each model's KV cache, shared by its running requests in blocks of 64 (default: --max-batch
     * x --ctx-size): a request joins when a row is free and the blocks of its prompt and max_tokens are, so many
     * short requests can run where a few long ones fit. A request is also capped at this many positions
     */
    kvCacheTokens?: number;
    /** called with one line per finished request (the CLI logs them on stderr) */
    log?: (line: string) => void;
}

/** a client's mistake: the status and OpenAI's error fields */
export class RequestError extends Error {
    constructor(
        readonly status: number,
        message: string,
        readonly param: string | null = null,
        readonly code: string | null = null,
        readonly type = status === 404 ? "not_found_error" : "invalid_request_error"
    ) {
        super(message);
    }
}

/** at most this many stop strings, as OpenAI allows */
const MAX_STOP = 4;

/** what one request asks of the model, checked */
interface Job {
    served: ServedModel;
    promptIds: number[];
    maxTokens: number;
    greedy: boolean;
    temperature: number;
    topP: number;
    topK: number;
    repetitionPenalty: number;
    seed: number;
    stop: string[];
    stream: boolean;
    includeUsage: boolean;
}

export function createServer(opts: ServerOptions): http.Server {
    const server = http.createServer(createRequestHandler(opts));
    // Node closes an idle kept-alive connection after 5 s, racing a client that reuses it right then (the client
    // sees ECONNRESET); clients (the openai package's undici among them) keep connections for longer, so the
    // server keeps them for a minute, as common HTTP servers do
    server.keepAliveTimeout = 65_000;
    server.headersTimeout = 66_000;
    return server;
}

/**
 * the server's request handling alone, for a server that mounts it under its own routes (`qlora ui` chats with a
 * run's adapter through it): the request's path must be one of the routes above, /v1/... or /...
 */
export function createRequestHandler(opts: ServerOptions): (req: http.IncomingMessage, res: http.ServerResponse) => void {
    if (opts.models.length === 0) throw new Error("createServer: no model to serve");
    const created = Math.floor(Date.now() / 1000);
    let queued = 0;
    // requests waiting for a free row of their model's batch, in arrival order
    const waiting: Request[] = [];
    // the models decoding now, each with its batch
    const lanes = new Map<ServedModel, Lane>();
    let running = false;
    const maxBatch = opts.maxBatch ?? 8;
    const ctxSize = opts.ctxSize ?? DEFAULT_CTX_SIZE;
    /** positions a request may take on a model: its context, --ctx-size and the KV cache's size */
    const positionsFor = (served: ServedModel) =>
        Math.min(served.loaded.lm.config.maxPositionEmbeddings, ctxSize, opts.kvCacheTokens ?? Number.POSITIVE_INFINITY);

    const findModel = (name: unknown): ServedModel => {
        if (name === undefined || name === null) return opts.models[0];
        if (typeof name !== "string") throw new RequestError(400, "`model` must be a string", "model");
        const m = opts.models.find((x) => x.id === name);
        if (!m)
            throw new RequestError(
                404,
                `The model \`${name}\` does not exist; this server has: ${opts.models.map((x) => x.id).join(", ")}`,
                "model",
                "model_not_found"
            );
        return m;
    };

    const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
        const url = new URL(req.url ?? "/", "http://localhost");
        const route = url.pathname.replace(/\/+$/, "");
        if (req.method === "GET" && (route === "/v1/models" || route === "/models")) {
            sendJson(res, 200, {
                object: "list",
                data: opts.models.map((m) => ({id: m.id, object: "model", created, owned_by: "qlora"}))
            });
            return;
        }
        if (req.method === "GET" && route === "/health") {
            sendJson(res, 200, {status: "ok", queued, max_queue: opts.maxQueue});
            return;
        }
        const chat = route === "/v1/chat/completions" || route === "/chat/completions";
        const completion = route === "/v1/completions" || route === "/completions";
        if (!chat && !completion) throw new RequestError(404, `no route ${req.method} ${url.pathname}`, null, "unknown_route");
        if (req.method !== "POST") throw new RequestError(405, `${url.pathname} takes POST`, null, "method_not_allowed");
        const body = await readJsonBody(req, opts.maxBodyBytes);
        const served = findModel(body.model);
        const positions = positionsFor(served);
        const job = chat ? chatJob(body, served, positions) : completionJob(body, served, positions);
        if (queued >= opts.maxQueue)
            throw new RequestError(
                503,
                `the server is busy: ${queued} requests are waiting or running (--max-queue ${opts.maxQueue}); retry later`,
                null,
                "server_busy",
                "server_error"
            );
        queued++;
        try {
            await new Promise<void>((resolve, reject) => {
                waiting.push({job, chat, res, resolve, reject});
                void pump();
            });
        } finally {
            queued--;
        }
    };

    /**
     * Continuous batching: each model decodes its requests as rows of one SlotDecoder (up to --max-batch). A
     * request joins its model's running batch as soon as a row is free (its prompt prefilled, its first token
     * streamed), every step gives each row its next token, and a row that ends frees its place for the next
     * request at once. Models take turns step by step; between steps the event loop serves connections and
     * streams.
     */
    const pump = async (): Promise<void> => {
        if (running) return;
        running = true;
        try {
            while (waiting.length > 0 || lanes.size > 0) {
                admit();
                for (const lane of [...lanes.values()]) {
                    if (lane.rows.size > 0) {
                        const step = lane.decoder.step();
                        for (const [handle, id] of step) deliver(lane, handle, id);
                        // a row that ran out of positions ends without a token
                        for (const [handle, row] of lane.rows) if (handle.done) finish(lane, handle, row, "length");
                    }
                    if (lane.rows.size === 0 && !waiting.some((r) => r.job.served === lane.served)) {
                        lane.decoder.release(); // the KV cache is freed while the model has nothing to do
                        lanes.delete(lane.served);
                    }
                }
                // other requests, new connections and the streams' bytes get their turn
                await new Promise((resolve) => setImmediate(resolve));
                for (const lane of lanes.values())
                    for (const [handle, row] of lane.rows)
                        if (row.gone) {
                            lane.decoder.leave(handle, "cancelled");
                            finish(lane, handle, row, "client_gone");
                        }
            }
        } finally {
            running = false;
        }
    };

    /** the waiting requests that have a free row and the cache blocks they need in their model's batch join it, in arrival order */
    const admit = (): void => {
        for (let i = 0; i < waiting.length; ) {
            const r = waiting[i];
            if (r.res.destroyed) {
                waiting.splice(i, 1);
                r.resolve(); // the client left while waiting
                continue;
            }
            const lane = laneFor(r.job.served);
            if (!lane.decoder.canJoin(r.job.promptIds.length, r.job.maxTokens)) {
                i++;
                continue;
            }
            waiting.splice(i, 1);
            const {loaded} = r.job.served;
            const row = new Row(r, loaded.tokenizer.createStreamDecoder({skipSpecialTokens: true}));
            let handle: DecodeRow;
            try {
                handle = lane.decoder.join(r.job.promptIds, {
                    maxNewTokens: r.job.maxTokens,
                    greedy: r.job.greedy,
                    temperature: r.job.temperature,
                    topK: r.job.topK,
                    topP: r.job.topP,
                    repetitionPenalty: r.job.repetitionPenalty,
                    seed: r.job.seed
                });
            } catch (err) {
                r.reject(err);
                continue;
            }
            row.start();
            lane.rows.set(handle, row);
            for (const other of lane.rows.values()) other.batch = Math.max(other.batch, lane.rows.size);
            deliver(lane, handle, handle.result.newIds[0]);
        }
    };

    const laneFor = (served: ServedModel): Lane => {
        let lane = lanes.get(served);
        if (!lane) {
            const blocks = opts.kvCacheTokens === undefined ? undefined : kvBlocksFor(opts.kvCacheTokens);
            const decoder = new SlotDecoder(served.loaded.lm, maxBatch, positionsFor(served), served.loaded.eosTokenIds, blocks);
            lane = {served, decoder, rows: new Map()};
            lanes.set(served, lane);
        }
        return lane;
    };

    /** a row's new token: streamed, unless it is the end of the sequence or completes a stop string */
    const deliver = (lane: Lane, handle: DecodeRow, id: number | undefined): void => {
        const row = lane.rows.get(handle);
        if (!row || id === undefined) return;
        row.generated++;
        const reason = handle.result.stopReason;
        if (handle.done && reason === "eos") finish(lane, handle, row, "stop");
        else if (row.push(id)) {
            lane.decoder.leave(handle, "cancelled");
            finish(lane, handle, row, "stop");
        } else if (handle.done) finish(lane, handle, row, "length");
    };

    const finish = (lane: Lane, handle: DecodeRow, row: Row, how: Finish): void => {
        lane.rows.delete(handle);
        const line = row.end(how);
        if (line) opts.log?.(line);
    };

    return (req, res) => {
        handle(req, res).catch((err: unknown) => sendError(res, err));
    };
}

type Finish = "stop" | "length" | "client_gone";

/** positions per request when --ctx-size is not given (llama.cpp's server default) */
export const DEFAULT_CTX_SIZE = 4096;

/** a model's running batch: its requests as rows of one SlotDecoder */
interface Lane {
    served: ServedModel;
    decoder: SlotDecoder;
    rows: Map<DecodeRow, Row>;
}

/** a request waiting for, or in, a batch */
interface Request {
    job: Job;
    chat: boolean;
    res: http.ServerResponse;
    resolve: () => void;
    reject: (err: unknown) => void;
}

/** one request's row of a batch: its text so far, its stream, and its answer when it ends */
class Row {
    readonly id: string;
    generated = 0;
    ended = false;
    /** the most rows its batch had while it ran (logged) */
    batch = 1;
    /** the client closed the connection before the answer was complete */
    gone = false;
    private text = "";
    private readonly stops: StopMatcher;
    /** generation ended at a stop string (the text after it is dropped) */
    private stoppedByString = false;

    constructor(
        readonly request: Request,
        private readonly decoder: {push(id: number): string; flush(): string}
    ) {
        this.id = `${request.chat ? "chatcmpl" : "cmpl"}-${randomBytes(12).toString("hex")}`;
        this.stops = new StopMatcher(request.job.stop);
        request.res.on("close", () => {
            if (!request.res.writableFinished) this.gone = true;
        });
    }

    private chunk(delta: string | null, finish: string | null): Record<string, unknown> {
        const {job, chat} = this.request;
        return chat
            ? {
                  id: this.id,
                  object: "chat.completion.chunk",
                  created: now(),
                  model: job.served.id,
                  choices: [{index: 0, delta: delta === null ? {} : {content: delta}, logprobs: null, finish_reason: finish}]
              }
            : {
                  id: this.id,
                  object: "text_completion",
                  created: now(),
                  model: job.served.id,
                  choices: [{index: 0, text: delta ?? "", logprobs: null, finish_reason: finish}]
              };
    }

    /** the stream's headers and its first event */
    start(): void {
        const {job, chat, res} = this.request;
        if (!job.stream) return;
        res.writeHead(200, {"content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive"});
        if (chat)
            writeEvent(res, {
                ...this.chunk(null, null),
                choices: [{index: 0, delta: {role: "assistant", content: ""}, logprobs: null, finish_reason: null}]
            });
    }

    /** a new token that is not an end of sequence; true when a stop string ended the answer */
    push(id: number): boolean {
        const piece = this.stops.push(this.decoder.push(id));
        this.send(piece.text);
        if (piece.stopped) this.stoppedByString = true;
        return piece.stopped;
    }

    private send(text: string): void {
        this.text += text;
        if (this.request.job.stream && text) writeEvent(this.request.res, this.chunk(text, null));
    }

    /** answers the request (unless its client is gone) and returns the log line */
    end(finish: Finish): string {
        this.ended = true;
        const {job, chat, res, resolve} = this.request;
        const line = `${chat ? "chat" : "completion"} model=${job.served.id} batch=${this.batch} prompt=${job.promptIds.length} completion=${this.generated} finish=${finish}`;
        resolve();
        if (finish === "client_gone") return line;
        if (!this.stoppedByString) this.send(this.stops.flush(this.decoder.flush()));
        const usage = {
            prompt_tokens: job.promptIds.length,
            completion_tokens: this.generated,
            total_tokens: job.promptIds.length + this.generated
        };
        if (job.stream) {
            writeEvent(res, this.chunk(null, finish));
            if (job.includeUsage) writeEvent(res, {...this.chunk(null, null), choices: [], usage});
            if (!res.destroyed) res.end("data: [DONE]\n\n");
            return line;
        }
        sendJson(res, 200, {
            id: this.id,
            object: chat ? "chat.completion" : "text_completion",
            created: now(),
            model: job.served.id,
            choices: [
                chat
                    ? {index: 0, message: {role: "assistant", content: this.text}, logprobs: null, finish_reason: finish}
                    : {index: 0, text: this.text, logprobs: null, finish_reason: finish}
            ],
            usage
        });
        return line;
    }
}

function now(): number {
    return Math.floor(Date.now() / 1000);
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
    const data = JSON.stringify(body);
    res.writeHead(status, {"content-type": "application/json", "content-length": Buffer.byteLength(data)});
    res.end(data);
}

export function writeEvent(res: http.ServerResponse, body: unknown): void {
    if (!res.destroyed) res.write(`data: ${JSON.stringify(body)}\n\n`);
}

/** OpenAI's error object; what qlora itself refuses (a template, a prompt past the context) is a 400 too */
export function sendError(res: http.ServerResponse, err: unknown): void {
    let status = 500,
        body: {message: string; type: string; param: string | null; code: string | null};
    if (err instanceof RequestError) body = {message: err.message, type: err.type, param: err.param, code: err.code};
    else if (isQloraError(err)) {
        status = 400;
        body = {message: err.message, type: "invalid_request_error", param: null, code: null};
    } else {
        body = {
            message: `internal error: ${err instanceof Error ? err.message : String(err)}`,
            type: "server_error",
            param: null,
            code: null
        };
    }
    if (err instanceof RequestError) status = err.status;
    if (res.headersSent) {
        // a stream already started: the error is its last event
        if (!res.destroyed) res.end(`data: ${JSON.stringify({error: body})}\n\n`);
        return;
    }
    const data = JSON.stringify({error: body});
    res.writeHead(status, {"content-type": "application/json", "content-length": Buffer.byteLength(data), connection: "close"});
    res.end(data);
}

/** the request body as a JSON object, at most maxBytes (the rest is not read); `limitFlag` names the option that sets it */
export async function readJsonBody(
    req: http.IncomingMessage,
    maxBytes: number,
    limitFlag = "--max-body-bytes"
): Promise<Record<string, unknown>> {
    const declared = Number(req.headers["content-length"]);
    const tooLarge = () =>
        new RequestError(413, `the request body is larger than ${maxBytes} bytes (${limitFlag})`, null, "request_too_large");
    if (declared > maxBytes) throw tooLarge();
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const c of req as AsyncIterable<Buffer>) {
        size += c.length;
        if (size > maxBytes) throw tooLarge();
        chunks.push(c);
    }
    let body: unknown;
    try {
        body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch (err) {
        throw new RequestError(400, `the request body is not valid JSON: ${(err as Error).message}`);
    }
    if (typeof body !== "object" || body === null || Array.isArray(body))
        throw new RequestError(400, "the request body must be a JSON object");
    return body as Record<string, unknown>;
}

// ------------------------------------------------------------------
// request fields (OpenAI's names and defaults)

function optionalNumber(body: Record<string, unknown>, key: string, min: number, max: number): number | undefined {
    const v = body[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "number" || !Number.isFinite(v) || v < min || v > max)
        throw new RequestError(400, `\`${key}\` must be a number in [${min}, ${max}], got ${JSON.stringify(v)}`, key);
    return v;
}

function optionalInteger(body: Record<string, unknown>, key: string, min: number, max: number): number | undefined {
    const v = optionalNumber(body, key, min, max);
    if (v !== undefined && !Number.isInteger(v)) throw new RequestError(400, `\`${key}\` must be an integer, got ${v}`, key);
    return v;
}

function optionalBoolean(body: Record<string, unknown>, key: string): boolean | undefined {
    const v = body[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "boolean") throw new RequestError(400, `\`${key}\` must be true or false`, key);
    return v;
}

/** the fields both endpoints share; the prompt is tokenized by the caller */
function commonJob(
    body: Record<string, unknown>,
    served: ServedModel,
    promptIds: number[],
    defaultMaxTokens: number | null,
    /** positions a request may take: the model's context, or less with --ctx-size */
    context: number
): Job {
    const n = optionalInteger(body, "n", 1, 1);
    if (n !== undefined && n !== 1) throw new RequestError(400, "`n` must be 1", "n");
    if (promptIds.length === 0) throw new RequestError(400, "the prompt is empty", "prompt");
    if (promptIds.length >= context)
        throw new RequestError(
            400,
            `the prompt has ${promptIds.length} tokens; a request holds ${context} positions here (the model's context, --ctx-size or --kv-cache-tokens), which leaves no room to answer`,
            "messages",
            "context_length_exceeded"
        );
    const room = context - promptIds.length;
    const asked =
        optionalInteger(body, "max_completion_tokens", 1, Number.MAX_SAFE_INTEGER) ??
        optionalInteger(body, "max_tokens", 1, Number.MAX_SAFE_INTEGER);
    if (asked !== undefined && asked > room)
        throw new RequestError(
            400,
            `max_tokens ${asked} and the prompt's ${promptIds.length} tokens exceed the ${context} positions a request holds here (the model's context, --ctx-size or --kv-cache-tokens)`,
            "max_tokens",
            "context_length_exceeded"
        );
    const temperature = optionalNumber(body, "temperature", 0, 2) ?? 1;
    const stop = body.stop;
    let stops: string[] = [];
    if (typeof stop === "string") stops = [stop];
    else if (Array.isArray(stop) && stop.length <= MAX_STOP && stop.every((s) => typeof s === "string")) stops = stop as string[];
    else if (stop !== undefined && stop !== null)
        throw new RequestError(400, `\`stop\` must be a string or a list of at most ${MAX_STOP} strings`, "stop");
    if (stops.some((s) => s.length === 0)) throw new RequestError(400, "`stop` strings must not be empty", "stop");
    const streamOptions = body.stream_options;
    if (
        streamOptions !== undefined &&
        streamOptions !== null &&
        (typeof streamOptions !== "object" || Array.isArray(streamOptions))
    )
        throw new RequestError(400, "`stream_options` must be an object", "stream_options");
    return {
        served,
        promptIds,
        maxTokens: asked ?? (defaultMaxTokens === null ? room : Math.min(defaultMaxTokens, room)),
        // temperature 0 is argmax, as OpenAI-compatible servers read it
        greedy: temperature === 0,
        temperature: temperature === 0 ? 1 : temperature,
        topP: optionalNumber(body, "top_p", Number.MIN_VALUE, 1) ?? 1,
        topK: optionalInteger(body, "top_k", 0, Number.MAX_SAFE_INTEGER) ?? 0,
        // vLLM's and transformers' name (llama.cpp's server calls it repeat_penalty)
        repetitionPenalty: optionalNumber(body, "repetition_penalty", Number.MIN_VALUE, 100) ?? 1,
        seed: optionalInteger(body, "seed", 0, Number.MAX_SAFE_INTEGER) ?? randomInt(2 ** 47),
        stop: stops,
        stream: optionalBoolean(body, "stream") ?? false,
        includeUsage: (streamOptions as {include_usage?: unknown} | undefined)?.include_usage === true
    };
}

/** POST /v1/chat/completions: the messages through the model's chat template */
function chatJob(body: Record<string, unknown>, served: ServedModel, context: number): Job {
    const messages = body.messages;
    if (!Array.isArray(messages) || messages.length === 0)
        throw new RequestError(400, "`messages` must be a non-empty list of {role, content}", "messages");
    const chat: ChatMessage[] = messages.map((m, i) => {
        const where = `messages[${i}]`;
        if (typeof m !== "object" || m === null) throw new RequestError(400, `${where} must be an object`, where);
        const {role, content} = m as {role?: unknown; content?: unknown};
        if (typeof role !== "string" || !["system", "developer", "user", "assistant", "tool"].includes(role))
            throw new RequestError(400, `${where}.role must be system, developer, user, assistant or tool`, `${where}.role`);
        return {role: role === "developer" ? "system" : role, content: messageText(content, `${where}.content`)};
    });
    const tok = served.loaded.tokenizer;
    if (!tok.hasChatTemplate)
        throw new RequestError(
            400,
            `the model \`${served.id}\` has no chat template; use /v1/completions with a prompt`,
            "messages"
        );
    const prompt = tok.applyChatTemplate(chat, {addGenerationPrompt: true});
    return commonJob(body, served, tok.encode(prompt), null, context);
}

/** a message's content: a string, or OpenAI's list of text parts */
function messageText(content: unknown, where: string): string {
    if (typeof content === "string") return content;
    if (content === null || content === undefined) return "";
    if (Array.isArray(content))
        return content
            .map((part, i) => {
                const p = part as {type?: unknown; text?: unknown};
                if (typeof p !== "object" || p === null || p.type !== "text" || typeof p.text !== "string")
                    throw new RequestError(
                        400,
                        `${where}[${i}] must be {"type": "text", "text": ...} (only text is served)`,
                        where
                    );
                return p.text;
            })
            .join("");
    throw new RequestError(400, `${where} must be a string or a list of text parts`, where);
}

/** POST /v1/completions: a raw prompt, continued */
function completionJob(body: Record<string, unknown>, served: ServedModel, context: number): Job {
    let prompt = body.prompt;
    if (Array.isArray(prompt) && prompt.length === 1) prompt = prompt[0];
    if (typeof prompt !== "string") throw new RequestError(400, "`prompt` must be a string (one prompt per request)", "prompt");
    if (body.echo === true) throw new RequestError(400, "`echo` is not supported", "echo");
    // OpenAI's completions default to 16 tokens
    return commonJob(body, served, served.loaded.tokenizer.encode(prompt), 16, context);
}
