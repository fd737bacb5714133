// runs.ts: the runs of `qlora ui`: the folders of the output root with a metrics.jsonl, and the ones this UI
// starts, stops and resumes.
//
// A run is `qlora train` in a child process rather than train() in this process or a worker thread: a crash of
// the native code or the GPU driver, or the kernel's OOM killer, ends the run and not the UI; Stop is SIGINT, the
// very path of Ctrl+C (train/stop.ts: finish the step, save a checkpoint, exit 130), which a worker could not get
// on its own since signals are the process's; the log is the CLI's own output; and a run behaves exactly as the
// command line shown for it. The child sends each metrics record over its IPC channel as it is written
// (trainer.ts's onRecord, cli/commands/train.ts), and the UI forwards it to the pages as server-sent events.
import {type ChildProcess, spawn} from "node:child_process";
import {type FSWatcher, promises as fs, watch} from "node:fs";
import os from "node:os";
import path from "node:path";
import type http from "node:http";
import {folderLockHolder} from "../io/lock.js";
import {CHECKPOINT_PREFIX, listCheckpoints} from "../train/checkpoint.js";
import {readMetrics, readMetricsForResume} from "../train/trainer.js";
import {RequestError, writeEvent} from "../serve/server.js";
import {shellCommand} from "./form.js";
import type {MetricRecord, RunEvent, RunStatus, RunSummary} from "./api-types.js";

export interface RunManagerOptions {
    /** the folder whose subfolders are the runs */
    outputRoot: string;
    /** the argv that runs the qlora command line: node, its flags, the entry script */
    qloraCommand: string[];
    /** the working folder of the runs (relative dataset paths in the form are relative to it) */
    cwd: string;
}

/** log lines kept per run */
const MAX_LOG_LINES = 2000;
/** runs listed at most (the most recent) */
const MAX_RUNS = 500;

/** what this UI knows of a run besides its folder: the child, its log, the pages watching it */
class RunHub {
    child: ChildProcess | null = null;
    status: RunStatus | null = null;
    command: string | null = null;
    exitCode: number | null = null;
    error: string | null = null;
    /** the records of a run this UI started or resumed (null: read metrics.jsonl when asked) */
    records: MetricRecord[] | null = null;
    logs: string[] = [];
    readonly pages = new Set<http.ServerResponse>();
    /** the child exited (resolves at once when there is none) */
    exited: Promise<void> = Promise.resolve();
    /** a run that another process trains (the CLI): its metrics.jsonl followed while pages watch it */
    tail: {watcher: FSWatcher; sent: number; timer: NodeJS.Timeout | null} | null = null;

    constructor(
        readonly name: string,
        readonly dir: string
    ) {}

    send(event: RunEvent): void {
        for (const res of this.pages) writeEvent(res, event);
    }

    log(line: string): void {
        this.logs.push(line);
        if (this.logs.length > MAX_LOG_LINES) this.logs.splice(0, this.logs.length - MAX_LOG_LINES);
        this.send({type: "log", line});
    }
}

/** a run's name as it comes in a URL: one folder name of the output root */
export function checkRunName(name: string): string {
    if (name === "" || name === "." || name === ".." || /[/\\\0]/.test(name))
        throw new RequestError(400, `${JSON.stringify(name)} is not a run name (a folder name in the output root)`, "name");
    return name;
}

export class RunManager {
    private readonly hubs = new Map<string, RunHub>();

    constructor(readonly opts: RunManagerOptions) {}

    private hub(name: string): RunHub {
        let hub = this.hubs.get(name);
        if (!hub) {
            hub = new RunHub(name, path.join(this.opts.outputRoot, name));
            this.hubs.set(name, hub);
        }
        return hub;
    }

    /** the run's folder exists (a run of the output root), else 404 */
    private async existing(name: string): Promise<RunHub> {
        const hub = this.hub(checkRunName(name));
        const stat = await fs.stat(hub.dir).catch(() => null);
        // a run this UI started is known even when it failed before its folder was made (its log says why)
        if (!stat?.isDirectory() && hub.status === null)
            throw new RequestError(404, `no run ${JSON.stringify(name)} in ${this.opts.outputRoot}`, "name", "run_not_found");
        return hub;
    }

    /** metrics.jsonl of runs this UI does not run, by file, while its size and time stay the same (the list is polled) */
    private readonly fileRecords = new Map<string, {key: string; records: MetricRecord[]}>();

    private async records(hub: RunHub): Promise<MetricRecord[]> {
        if (hub.records) return hub.records;
        const file = path.join(hub.dir, "metrics.jsonl");
        const stat = await fs.stat(file).catch(() => null);
        if (!stat) return [];
        const key = `${stat.size}:${stat.mtimeMs}`;
        const cached = this.fileRecords.get(file);
        if (cached?.key === key) return cached.records;
        const records = await readMetrics(file, () => undefined);
        this.fileRecords.set(file, {key, records});
        return records;
    }

    /** every run of the output root, the most recent first */
    async list(): Promise<RunSummary[]> {
        const entries = await fs.readdir(this.opts.outputRoot, {withFileTypes: true}).catch(() => []);
        const found: {name: string; mtime: number}[] = [];
        for (const e of entries) {
            if (!e.isDirectory() || e.name.startsWith(".")) continue;
            const stat = await fs.stat(path.join(this.opts.outputRoot, e.name, "metrics.jsonl")).catch(() => null);
            if (stat?.isFile()) found.push({name: e.name, mtime: stat.mtimeMs});
        }
        for (const hub of this.hubs.values())
            if (hub.status !== null && !found.some((f) => f.name === hub.name)) found.push({name: hub.name, mtime: Date.now()});
        found.sort((a, b) => b.mtime - a.mtime);
        return Promise.all(found.slice(0, MAX_RUNS).map((f) => this.summary(f.name)));
    }

    async summary(name: string): Promise<RunSummary> {
        const hub = await this.existing(name);
        return this.summaryOf(hub, await this.records(hub));
    }

    async metrics(name: string): Promise<MetricRecord[]> {
        return this.records(await this.existing(name));
    }

    private async summaryOf(hub: RunHub, records: MetricRecord[]): Promise<RunSummary> {
        const checkpoints = await listCheckpoints(hub.dir);
        const hasFinal = await fs
            .stat(path.join(hub.dir, "final", "adapter_model.safetensors"))
            .then((s) => s.isFile())
            .catch(() => false);
        const last = (type: string) => records.filter((r) => r.type === type).at(-1);
        const start = last("start"),
            train = last("train"),
            evalRec = last("eval"),
            end = last("end");
        const step = Math.max(0, ...records.map((r) => (typeof r.step === "number" ? r.step : 0)));
        let status: RunStatus = hub.status ?? (end ? "finished" : checkpoints.length > 0 ? "stopped" : "incomplete");
        // a run this UI saw end, then finished or resumed elsewhere: the folder says more than the memory
        if (!hub.child && end && status !== "finished") status = "finished";
        const latest = checkpoints.at(-1);
        // a run trained by another process (`qlora train` in a terminal): running, and not this UI's to resume
        const holder = hub.child ? null : await folderLockHolder(hub.dir);
        if (holder) status = "running";
        return {
            name: hub.name,
            dir: hub.dir,
            status,
            step,
            totalSteps: typeof train?.total_steps === "number" ? train.total_steps : num(start?.total_steps),
            lastLoss: num(train?.loss),
            evalLoss: num(evalRec?.eval_loss),
            adapter: hasFinal ? path.join(hub.dir, "final") : (latest?.dir ?? null),
            resumable: !hub.child && !holder && !end && latest !== undefined && start !== undefined,
            live: hub.child !== null || hub.status !== null,
            command: hub.command,
            exitCode: hub.exitCode,
            error: hub.error,
            started: typeof start?.time === "string" ? start.time : null,
            elsewhere: holder ? `pid ${holder.pid} (${holder.command})` : null
        };
    }

    /** starts `qlora train FLAGS` for the run `name` (its output_dir) */
    async start(name: string, flags: string[]): Promise<RunSummary> {
        const hub = this.hub(checkRunName(name));
        if (hub.child) throw this.busy(hub);
        hub.records = [];
        hub.logs = [];
        await this.spawn(hub, ["train", ...flags]);
        return this.announce(hub);
    }

    /** continues a stopped run from its latest checkpoint, with the settings its start record holds */
    async resume(name: string): Promise<RunSummary> {
        const hub = await this.existing(name);
        if (hub.child) throw this.busy(hub);
        const holder = await folderLockHolder(hub.dir);
        if (holder)
            throw new RequestError(
                409,
                `run ${JSON.stringify(name)} is running in pid ${holder.pid} (${holder.command})`,
                "name",
                "run_busy"
            );
        const metricsFile = path.join(hub.dir, "metrics.jsonl");
        const records = await readMetrics(metricsFile, () => undefined);
        const start = records.find((r) => r.type === "start");
        const latest = (await listCheckpoints(hub.dir)).at(-1);
        if (!start || typeof start.config !== "object" || start.config === null || !latest)
            throw new RequestError(
                409,
                `run ${JSON.stringify(name)} has no ${latest ? "start record in metrics.jsonl" : `${CHECKPOINT_PREFIX}N folder`} to resume from`,
                "name",
                "not_resumable"
            );
        // the run's own resolved settings (model and data paths included), as a config file: a value keeps its
        // type (a template that looks like a number stays text), which flags would not guarantee
        const config: Record<string, unknown> = {
            ...(start.config as Record<string, unknown>),
            output_dir: hub.dir,
            overwrite_output_dir: false
        };
        delete config.resume_from_checkpoint;
        const tmp = await fs.mkdtemp(path.join(os.tmpdir(), "qlora-ui-"));
        const file = path.join(tmp, "config.json");
        await fs.writeFile(file, JSON.stringify(config, null, 2), {flag: "wx", mode: 0o600});
        // what the page shows until the child rewrites metrics.jsonl to the checkpoint: the same cut
        hub.records = await readMetricsForResume(metricsFile, latest.step, () => undefined);
        await this.spawn(hub, ["train", file, "--resume_from_checkpoint=true"], () => fs.rm(tmp, {recursive: true, force: true}));
        return this.announce(hub);
    }

    /** SIGINT: the run finishes its step, saves a checkpoint and exits (train/stop.ts); a second one ends it at once */
    async stop(name: string): Promise<RunSummary> {
        const hub = await this.existing(name);
        if (!hub.child) throw new RequestError(409, `run ${JSON.stringify(name)} is not running here`, "name", "not_running");
        // once: a second SIGINT would end the run at once, without its checkpoint
        if (hub.status === "running") {
            hub.child.kill("SIGINT");
            hub.status = "stopping";
        }
        const summary = await this.summaryOf(hub, await this.records(hub));
        hub.send({type: "status", run: summary});
        return summary;
    }

    /** a page follows the run: everything so far, then each event as it comes */
    async follow(name: string, res: http.ServerResponse): Promise<void> {
        const hub = await this.existing(name);
        res.writeHead(200, {"content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive"});
        const records = await this.records(hub);
        writeEvent(res, {
            type: "snapshot",
            run: await this.summaryOf(hub, records),
            records,
            logs: hub.logs
        } satisfies RunEvent);
        hub.pages.add(res);
        res.on("close", () => {
            hub.pages.delete(res);
            if (hub.pages.size === 0) this.untail(hub);
        });
        if (!hub.child && !hub.tail && (await folderLockHolder(hub.dir))) this.tailRun(hub, records.length);
    }

    /**
     * follows a run another process trains: the records appended to its metrics.jsonl (the file is the only channel
     * to a process this UI did not start) go to the pages, until its lock is released
     */
    private tailRun(hub: RunHub, sent: number): void {
        const file = path.join(hub.dir, "metrics.jsonl");
        const update = async () => {
            if (!hub.tail) return;
            hub.tail.timer = null;
            const records = await this.records(hub);
            for (const record of records.slice(hub.tail.sent)) hub.send({type: "record", record});
            hub.tail.sent = records.length;
            const summary = await this.summaryOf(hub, records);
            if (summary.status !== "running") {
                hub.send({type: "status", run: summary});
                this.untail(hub);
            }
        };
        try {
            const watcher = watch(file, () => {
                // one read per burst of appends
                if (hub.tail && !hub.tail.timer) hub.tail.timer = setTimeout(() => void update(), 200);
            });
            watcher.on("error", () => this.untail(hub));
            hub.tail = {watcher, sent, timer: null};
        } catch {
            // no metrics.jsonl yet: the page has the snapshot
        }
    }

    private untail(hub: RunHub): void {
        if (!hub.tail) return;
        hub.tail.watcher.close();
        if (hub.tail.timer) clearTimeout(hub.tail.timer);
        hub.tail = null;
    }

    /** stops every run this UI started (each saves a checkpoint) and waits for them */
    async close(): Promise<void> {
        for (const hub of this.hubs.values()) {
            if (hub.child && hub.status === "running") hub.child.kill("SIGINT");
            this.untail(hub);
            for (const res of hub.pages) res.end();
        }
        await Promise.all([...this.hubs.values()].map((h) => h.exited));
    }

    private busy(hub: RunHub): RequestError {
        return new RequestError(
            409,
            `run ${JSON.stringify(hub.name)} is running; stop it first (or start another output_dir)`,
            "output_dir",
            "run_busy"
        );
    }

    private async announce(hub: RunHub): Promise<RunSummary> {
        const summary = await this.summaryOf(hub, hub.records ?? []);
        hub.send({type: "snapshot", run: summary, records: hub.records ?? [], logs: hub.logs});
        return summary;
    }

    private async spawn(hub: RunHub, args: string[], cleanup?: () => Promise<void>): Promise<void> {
        const [exe, ...pre] = this.opts.qloraCommand;
        hub.command = shellCommand(["qlora", ...args]);
        hub.status = "running";
        hub.exitCode = null;
        hub.error = null;
        // colors off: the log is shown as text
        const env: NodeJS.ProcessEnv = {...process.env, NO_COLOR: "1"};
        delete env.FORCE_COLOR;
        // its own process group: Ctrl+C in the UI's terminal reaches the UI alone, which stops each run with one SIGINT
        const child = spawn(exe, [...pre, ...args], {
            cwd: this.opts.cwd,
            env,
            stdio: ["ignore", "pipe", "pipe", "ipc"],
            detached: true
        });
        hub.child = child;
        let lastError: string | null = null;
        let wrote = false;
        const lines = (stream: NodeJS.ReadableStream) => {
            let rest = "";
            stream.setEncoding("utf8");
            stream.on("data", (chunk: string) => {
                const parts = (rest + chunk).split(/\r?\n/);
                rest = parts.pop() ?? "";
                for (const line of parts) {
                    if (line.startsWith("error: ")) lastError = line.slice("error: ".length);
                    hub.log(line);
                }
            });
            stream.on("end", () => {
                if (rest) hub.log(rest);
            });
        };
        lines(child.stdout!);
        lines(child.stderr!);
        child.on("message", (msg: {type?: string; record?: MetricRecord; step?: number; total?: number}) => {
            if (msg.type === "record" && msg.record) {
                wrote = true;
                hub.records ??= [];
                hub.records.push(msg.record);
                hub.send({type: "record", record: msg.record});
            } else if (msg.type === "step" && typeof msg.step === "number" && typeof msg.total === "number")
                hub.send({type: "step", step: msg.step, total: msg.total, time: Date.now()});
        });
        hub.exited = new Promise<void>((resolve) => {
            const done = async (code: number | null, signal: NodeJS.Signals | null) => {
                hub.child = null;
                hub.exitCode = code;
                // 130/143: stopped by SIGINT/SIGTERM after saving a checkpoint (train/stop.ts)
                hub.status = code === 0 ? "finished" : code === 130 || code === 143 ? "stopped" : "failed";
                if (hub.status === "failed")
                    hub.error = lastError ?? (signal ? `the training process was killed by ${signal}` : `exit status ${code}`);
                // refused before it wrote anything (an earlier run in the folder, a bad dataset): the folder's own
                // records and status stand, with the refusal as the run's error
                if (!wrote) {
                    hub.records = null;
                    if (hub.status === "failed" && (await fs.stat(path.join(hub.dir, "metrics.jsonl")).catch(() => null)))
                        hub.status = null;
                }
                await cleanup?.().catch(() => undefined);
                hub.send({type: "status", run: await this.summaryOf(hub, await this.records(hub))});
                resolve();
            };
            child.once("error", (err) => {
                hub.log(`error: ${err.message}`);
                lastError = err.message;
            });
            child.once("close", (code, signal) => void done(code, signal));
        });
    }
}

function num(v: unknown): number | null {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
}
