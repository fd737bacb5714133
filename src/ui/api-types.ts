// api-types.ts: what `qlora ui`'s HTTP API sends, shared by the server (src/ui/*.ts) and the page
// (src/ui/client/*.ts). Types only: the page is compiled without Node's types.

/** a metrics.jsonl record (start, train, eval, warning, save, end), as the trainer writes it */
export interface MetricRecord {
    type: string;
    step?: number;
    [key: string]: unknown;
}

/** GET /api/schema: the train config's JSON Schema (zod's own conversion of the CLI's schema) and the form's layout */
export interface SchemaReply {
    /** JSON Schema (draft 2020-12) of the train config: every key with its type, default and description */
    schema: {properties: Record<string, JsonSchema>};
    /** the keys in groups, in the schema's order (every key is in one) */
    sections: {title: string; keys: string[]}[];
    /** the folder the runs are listed from; a form's output_dir is a folder in it */
    outputRoot: string;
    /** a run name not in use yet, for the form's output_dir */
    suggestedOutputDir: string;
}

export interface JsonSchema {
    type?: string | string[];
    enum?: unknown[];
    const?: unknown;
    default?: unknown;
    description?: string;
    anyOf?: JsonSchema[];
    items?: JsonSchema;
    minimum?: number;
    maximum?: number;
    exclusiveMinimum?: number;
    exclusiveMaximum?: number;
}

/**
 * What the form sends: the keys the user set, each as its text on the command line (`--key value`), so that they
 * are parsed and checked exactly as `qlora train` parses and checks them.
 */
export interface FormValues {
    values: Record<string, string>;
}

/** POST /api/config: the form checked */
export interface ConfigReply {
    /** the command that starts this run */
    command: string;
    /** the resolved config (defaults filled in) */
    config: Record<string, unknown>;
    /** output_dir, absolute: a folder in the output root */
    outputDir: string;
}

/** POST /api/preview: the data as training will see it (api/data-preview.ts) */
export interface PreviewReply {
    dataset: string;
    format: string;
    rows: number;
    tokens: number;
    truncated: number;
    dropped: number;
    /** lines of the data summary (counts, length histogram) as `qlora data preview` prints them */
    summary: string[];
    promptFormat: string | null;
    warnings: string[];
    samples: {tokens: number; trained: number; segments: {text: string; trained: boolean}[]}[];
}

/** POST /api/plan: the memory plan (api/plan.ts) for the form's values */
export interface PlanReply {
    device: "cuda" | "cpu";
    gpu: string | null;
    verdict: string | null;
    /** what the run needs on the GPU (peak + paged states + context), bytes */
    totalBytes: number;
    availableBytes: number | null;
    terms: {label: string; bytes: number}[];
    hostBytes: number;
    tokensPerSecond: number | null;
    suggestions: {change: string; totalBytes: number}[];
    notes: string[];
    /** GPUs this plan can be asked for */
    gpus: {name: string; label: string}[];
}

export type RunStatus = "running" | "stopping" | "finished" | "stopped" | "failed" | "incomplete";

export interface RunSummary {
    name: string;
    dir: string;
    status: RunStatus;
    /** the last step logged or saved */
    step: number;
    totalSteps: number | null;
    lastLoss: number | null;
    evalLoss: number | null;
    /** the adapter chat uses: final/, or the latest checkpoint of a stopped run; null: none yet */
    adapter: string | null;
    /** a stopped or failed run with a checkpoint: resume continues it */
    resumable: boolean;
    /** started by this UI (its logs are kept) */
    live: boolean;
    /** the command that runs it (runs this UI started) */
    command: string | null;
    /** the child's exit status and its error line, when it ended with one */
    exitCode: number | null;
    error: string | null;
    /** ISO time of the start record */
    started: string | null;
    /** the process that trains it when that is not this UI (`pid N (qlora train)`), else null */
    elsewhere: string | null;
}

/** GET /api/runs/NAME/events: server-sent events, one JSON object per `data:` line */
export type RunEvent =
    /** everything so far (sent first, and again when a resume rewinds the records to its checkpoint) */
    | {type: "snapshot"; run: RunSummary; records: MetricRecord[]; logs: string[]}
    | {type: "record"; record: MetricRecord}
    | {type: "step"; step: number; total: number; time: number}
    | {type: "log"; line: string}
    | {type: "status"; run: RunSummary};

/** every error: OpenAI's error object, as `qlora serve` answers */
export interface ErrorReply {
    error: {message: string; type: string; param: string | null; code: string | null};
}
