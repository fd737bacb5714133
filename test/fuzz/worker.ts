// worker.ts: the long-lived child process that runs fuzz cases (forked by harness.ts with an IPC channel and a
// capped heap). One case at a time: {id, kind, params} in, {id, status, ...} out. A QloraError is a clean error;
// any other throw is an internal error, reported with its stack. An exception that escapes the case (a stray
// callback, an unhandled rejection) is reported, then the process exits: the harness counts it as a crash.
import {isQloraError} from "../../src/errors.js";
import {cpu} from "../../src/backend/cpu.js";
import type {TargetKind} from "./formats.js";
import {runTarget} from "./targets.js";

export interface WorkerRequest {
    id: number;
    kind: TargetKind;
    params: Record<string, unknown>;
}

export type WorkerReply =
    | {id: number; status: "ok"; nonFinite?: string}
    | {id: number; status: "error"; message: string}
    | {id: number; status: "internal"; name: string; message: string; stack: string}
    | {id: number; status: "escaped"; message: string; stack: string};

// one CPU thread: deterministic, and kind to a shared machine; reset after each case (a config may change it)
const THREADS = 1;
cpu().setNumThreads(THREADS);

let current = -1;

function send(reply: WorkerReply | {ready: true}): void {
    process.send?.(reply);
}

function escaped(err: unknown): void {
    const e = err instanceof Error ? err : new Error(String(err));
    send({id: current, status: "escaped", message: e.message, stack: e.stack ?? ""});
    // let the IPC message leave before exiting
    setTimeout(() => process.exit(70), 50);
}

process.on("uncaughtException", escaped);
process.on("unhandledRejection", escaped);

process.on("message", async (msg: WorkerRequest) => {
    current = msg.id;
    let reply: WorkerReply;
    try {
        const outcome = await runTarget(msg.kind, msg.params);
        reply = {id: msg.id, status: "ok", ...(outcome.nonFinite ? {nonFinite: outcome.nonFinite} : {})};
    } catch (err) {
        if (isQloraError(err)) reply = {id: msg.id, status: "error", message: err.message};
        else {
            const e = err instanceof Error ? err : new Error(String(err));
            reply = {id: msg.id, status: "internal", name: e.name, message: e.message, stack: e.stack ?? ""};
        }
    }
    try {
        cpu().setNumThreads(THREADS);
    } catch {
        // the reply matters more
    }
    send(reply);
});

process.on("disconnect", () => process.exit(0));
send({ready: true});
