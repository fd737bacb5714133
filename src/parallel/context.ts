// context.ts: which process of a data-parallel run this is, read from torchrun's environment variables (RANK,
// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `qlora train --nproc_per_node N` sets them
// for its workers (launch.ts); torchrun-style launchers on several machines set them too. Without WORLD_SIZE (or
// with WORLD_SIZE=1) the run is one process, as before.
import {QloraError} from "../errors.js";

export interface DistContext {
    /** this process's rank in [0, worldSize) */
    rank: number;
    worldSize: number;
    /** the rank on this machine: the GPU this process takes */
    localRank: number;
    localWorldSize: number;
    /** where rank 0 listens */
    masterAddr: string;
    masterPort: number;
}

/** a one-process run */
export const SINGLE_PROCESS: DistContext = {
    rank: 0,
    worldSize: 1,
    localRank: 0,
    localWorldSize: 1,
    masterAddr: "127.0.0.1",
    masterPort: 29500
};

type Env = Readonly<Record<string, string | undefined>>;

function intVar(env: Env, name: string, min: number, max: number, fallback?: number): number {
    const text = env[name];
    if (text === undefined || text === "") {
        if (fallback !== undefined) return fallback;
        throw new QloraError(
            `${name} is not set; a data-parallel run (WORLD_SIZE > 1) needs it: set it, or run with qlora train --nproc_per_node N`
        );
    }
    if (!/^\d+$/.test(text.trim()) || Number(text) < min || Number(text) > max)
        throw new QloraError(
            `${name}=${JSON.stringify(text)} must be a whole number from ${min} to ${max}; set it as torchrun does (RANK in [0, WORLD_SIZE))`
        );
    return Number(text);
}

/**
 * The run's context from torchrun's variables. WORLD_SIZE unset or 1 is a one-process run (the other variables are
 * not needed then, and not read). Every variable is checked; an error names the variable, what it must be and what
 * to do. MASTER_ADDR defaults to 127.0.0.1 and MASTER_PORT to 29500, as torchrun's --standalone gives.
 */
export function distContextFromEnv(env: Env = process.env): DistContext {
    const worldSize = intVar(env, "WORLD_SIZE", 1, 65536, 1);
    if (worldSize === 1) return SINGLE_PROCESS;
    const rank = intVar(env, "RANK", 0, worldSize - 1);
    const localWorldSize = intVar(env, "LOCAL_WORLD_SIZE", 1, worldSize, worldSize);
    const localRank = intVar(env, "LOCAL_RANK", 0, localWorldSize - 1, localWorldSize === worldSize ? rank : undefined);
    const masterAddr = (env.MASTER_ADDR ?? "127.0.0.1").trim();
    if (masterAddr === "" || /\s/.test(masterAddr))
        throw new QloraError(
            `MASTER_ADDR=${JSON.stringify(env.MASTER_ADDR)} must be a host name or IP address (rank 0's machine)`
        );
    const masterPort = intVar(env, "MASTER_PORT", 1, 65535, 29500);
    return {rank, worldSize, localRank, localWorldSize, masterAddr, masterPort};
}

/** the variables a worker of `ctx` is started with (launch.ts) */
export function envOf(ctx: DistContext): Record<string, string> {
    return {
        RANK: String(ctx.rank),
        WORLD_SIZE: String(ctx.worldSize),
        LOCAL_RANK: String(ctx.localRank),
        LOCAL_WORLD_SIZE: String(ctx.localWorldSize),
        MASTER_ADDR: ctx.masterAddr,
        MASTER_PORT: String(ctx.masterPort)
    };
}
