// chat.ts: trying a run's adapter from `qlora ui`: /api/runs/NAME/v1/... is `qlora serve`'s request handling
// (serve/server.ts) for the run's base model with its adapter (final/, or the latest checkpoint of a stopped run),
// so the chat panel and any OpenAI client get what `qlora serve --adapter` would answer.
import {promises as fs} from "node:fs";
import type http from "node:http";
import path from "node:path";
import {loadModel, withAdapter, type LoadedModel} from "../api/models.js";
import {createRequestHandler, RequestError} from "../serve/server.js";
import type {MetricRecord, RunSummary} from "./api-types.js";

type Handler = (req: http.IncomingMessage, res: http.ServerResponse) => void;

export interface ChatOptions {
    /** the largest request body, bytes */
    maxBodyBytes: number;
    log?: (line: string) => void;
}

export class RunChats {
    /** base models by folder and quantization, each loaded once */
    private readonly bases = new Map<string, Promise<LoadedModel>>();
    /** handlers by adapter folder and the time its weights were written (a resumed run's new final/ is loaded again) */
    private readonly handlers = new Map<string, Promise<Handler>>();

    constructor(private readonly opts: ChatOptions) {}

    /** the serve handler for a run's adapter */
    async handlerFor(run: RunSummary, records: MetricRecord[]): Promise<Handler> {
        if (!run.adapter)
            throw new RequestError(
                409,
                `run ${JSON.stringify(run.name)} has no adapter yet (no final/ and no checkpoint): train it first`,
                "model",
                "no_adapter"
            );
        const config = records.find((r) => r.type === "start")?.config as Record<string, unknown> | undefined;
        if (!config || typeof config.model !== "string")
            throw new RequestError(409, `run ${JSON.stringify(run.name)} has no start record in metrics.jsonl`, "model");
        const weights = await fs.stat(path.join(run.adapter, "adapter_model.safetensors"));
        const key = `${run.adapter}\0${weights.mtimeMs}`;
        let handler = this.handlers.get(key);
        if (!handler) {
            for (const k of this.handlers.keys()) if (k.startsWith(`${run.adapter}\0`)) this.handlers.delete(k);
            handler = this.load(run, config, run.adapter);
            this.handlers.set(key, handler);
            handler.catch(() => this.handlers.delete(key));
        }
        return handler;
    }

    private async load(run: RunSummary, config: Record<string, unknown>, adapterDir: string): Promise<Handler> {
        const model = config.model as string;
        const loadIn4bit = config.load_in_4bit === true;
        const device = config.device === "cpu" || config.device === "cuda" ? config.device : "auto";
        const baseKey = `${model}\0${loadIn4bit}\0${device}`;
        let base = this.bases.get(baseKey);
        if (!base) {
            base = loadModel(model, {loadIn4bit, device});
            this.bases.set(baseKey, base);
            base.catch(() => this.bases.delete(baseKey));
        }
        const loaded = await withAdapter(await base, adapterDir);
        return createRequestHandler({
            models: [{id: run.name, loaded}],
            maxQueue: 16,
            maxBodyBytes: this.opts.maxBodyBytes,
            maxBatch: 4,
            ctxSize: 2048,
            log: this.opts.log
        });
    }
}
