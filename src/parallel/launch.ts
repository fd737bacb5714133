// launch.ts: `qlora train --nproc_per_node N` as torchrun's standalone mode does it: N worker processes of the
// same command on this machine, each with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
// MASTER_PORT set. Rank 0's output is the command's; the other ranks' stdout is dropped (they report nothing: rank
// 0 speaks for the run) and their stderr comes prefixed with "[rank N]". A signal (Ctrl+C, SIGTERM) is forwarded
// to every rank, which stop together after their step with rank 0's checkpoint; a rank that dies ends the others
// and the command, naming the rank and its last error. The workers run in their own process group, so the
// terminal's Ctrl+C reaches them once, through here.
import {spawn, type ChildProcess} from "node:child_process";
import net from "node:net";
import {QloraError} from "../errors.js";
import {envOf, type DistContext} from "./context.js";

export interface LaunchOptions {
    nproc: number;
    /** the program and its arguments: each worker runs `execPath ...args` */
    execPath: string;
    args: string[];
    env?: NodeJS.ProcessEnv;
    masterAddr?: string;
    /** default: MASTER_PORT of env, else a free port */
    masterPort?: number;
    /** where rank 0's IPC messages go (`qlora ui` runs train with an IPC channel) */
    onMessage?: (msg: unknown) => void;
    /** the lines of the other ranks' stderr and the launcher's own lines (default: process.stderr) */
    log?: (line: string) => void;
}

export interface LaunchResult {
    /** the command's exit status: rank 0's, or 1 when a rank died */
    exitCode: number;
    /** the rank that died first, with its last error (null when none did) */
    failure: {rank: number; pid: number; how: string; lastError: string | null} | null;
}

/** the `--nproc_per_node N` / `--nproc-per-node=N` flag of `args` (null without one), and the arguments without it */
export function takeNprocFlag(args: readonly string[]): {nproc: number | null; rest: string[]} {
    const rest: string[] = [];
    let nproc: number | null = null;
    for (let i = 0; i < args.length; i++) {
        const m = /^--nproc[-_]per[-_]node(?:=(.*))?$/.exec(args[i]);
        if (!m) {
            rest.push(args[i]);
            continue;
        }
        const value = m[1] ?? args[++i];
        if (value === undefined || !/^\d+$/.test(value) || Number(value) < 1 || Number(value) > 1024)
            throw new QloraError(
                `--nproc_per_node ${value === undefined ? "(no value)" : JSON.stringify(value)}: expected the number of worker processes, a whole number from 1 to 1024`
            );
        nproc = Number(value);
    }
    return {nproc, rest};
}

/** a port no one listens on now (torchrun --standalone picks one the same way) */
export async function freePort(host: string): Promise<number> {
    return new Promise((resolve, reject) => {
        const server = net.createServer();
        server.once("error", reject);
        server.listen(0, host, () => {
            const port = (server.address() as net.AddressInfo).port;
            server.close(() => resolve(port));
        });
    });
}

const ANSI = /\x1b\[[0-9;]*m/g;
/** the connection error a rank reports when another rank died first: not the cause */
const PEER_LOST = /the connection to rank \d+ (closed|failed)/;

export async function launchWorkers(opts: LaunchOptions): Promise<LaunchResult> {
    const env = opts.env ?? process.env;
    if (env.WORLD_SIZE !== undefined && env.WORLD_SIZE !== "" && env.WORLD_SIZE !== "1")
        throw new QloraError(
            `--nproc_per_node inside a run that already has WORLD_SIZE=${env.WORLD_SIZE}: leave out --nproc_per_node under torchrun`
        );
    const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
    const masterAddr = opts.masterAddr ?? (env.MASTER_ADDR || "127.0.0.1");
    const masterPort = opts.masterPort ?? (env.MASTER_PORT ? Number(env.MASTER_PORT) : await freePort(masterAddr));
    const N = opts.nproc;
    const children: ChildProcess[] = [];
    const lastError: (string | null)[] = new Array(N).fill(null);
    const exits: ({code: number | null; signal: NodeJS.Signals | null; order: number} | undefined)[] = new Array(N);
    let exitOrder = 0;
    let forwarded = false;
    let killing = false;
    const killedHere = new Set<number>();

    const onSignal = (signal: NodeJS.Signals) => {
        forwarded = true;
        for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill(signal);
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    try {
        const done = new Promise<void>((resolve) => {
            let left = N;
            for (let rank = 0; rank < N; rank++) {
                const ctx: DistContext = {rank, worldSize: N, localRank: rank, localWorldSize: N, masterAddr, masterPort};
                const ipc = rank === 0 && opts.onMessage !== undefined;
                const child = spawn(opts.execPath, opts.args, {
                    env: {...env, ...envOf(ctx)},
                    stdio: [
                        rank === 0 ? "inherit" : "ignore",
                        rank === 0 ? "inherit" : "ignore",
                        "pipe",
                        ...(ipc ? ["ipc" as const] : [])
                    ],
                    detached: true
                });
                children.push(child);
                if (ipc) child.on("message", (m) => opts.onMessage!(m));
                let partial = "";
                child.stderr!.setEncoding("utf8");
                child.stderr!.on("data", (text: string) => {
                    if (rank === 0) process.stderr.write(text);
                    const lines = (partial + text).split("\n");
                    partial = lines.pop()!;
                    for (const line of lines) {
                        if (rank !== 0) log(`[rank ${rank}] ${line}`);
                        const plain = line.replace(ANSI, "").trim();
                        if (plain !== "") lastError[rank] = plain;
                    }
                });
                child.on("error", (err) => {
                    lastError[rank] = `could not start: ${err.message}`;
                });
                child.on("close", (code, signal) => {
                    exits[rank] = {code, signal, order: exitOrder++};
                    const plain = partial.replace(ANSI, "").trim();
                    if (plain !== "") lastError[rank] = plain;
                    const stopped = forwarded && (code === 130 || code === 143);
                    if (code !== 0 && !stopped && !killing) {
                        // the others cannot finish a step without this rank: end them (every write is atomic, so
                        // a kill leaves complete checkpoints or none)
                        killing = true;
                        setTimeout(() => {
                            children.forEach((c, r) => {
                                if (c.exitCode !== null || c.signalCode !== null) return;
                                killedHere.add(r);
                                c.kill("SIGKILL");
                            });
                        }, 500).unref();
                    }
                    if (--left === 0) resolve();
                });
            }
        });
        await done;
    } finally {
        process.removeListener("SIGINT", onSignal);
        process.removeListener("SIGTERM", onSignal);
    }
    // the rank that died first: among the failed ranks (not those ended here), one whose error is not a lost
    // connection to another rank, which is what the others report when one dies
    const failed = exits
        .map((e, rank) => ({rank, e: e!}))
        .filter(({rank, e}) => e.code !== 0 && !(forwarded && (e.code === 130 || e.code === 143)) && !killedHere.has(rank))
        .sort((a, b) => a.e.order - b.e.order);
    const cause = failed.find(({rank}) => !PEER_LOST.test(lastError[rank] ?? "")) ?? failed[0];
    if (!cause) return {exitCode: exits[0]!.code ?? 1, failure: null};
    const how = cause.e.signal ? `was killed by ${cause.e.signal}` : `exited with code ${cause.e.code}`;
    return {
        exitCode: 1,
        failure: {rank: cause.rank, pid: children[cause.rank].pid ?? -1, how, lastError: lastError[cause.rank]}
    };
}

/** the line that says which rank died and why */
export function failureLine(f: NonNullable<LaunchResult["failure"]>): string {
    return (
        `rank ${f.rank} (pid ${f.pid}) ${f.how}${f.lastError ? `: ${f.lastError}` : ""}; the other ranks were stopped ` +
        "(checkpoints are written atomically: resume from the last one with --resume_from_checkpoint true)"
    );
}
