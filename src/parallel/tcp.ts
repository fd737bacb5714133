// tcp.ts: the Collective over TCP sockets between the ranks, a star around rank 0, which listens on
// MASTER_ADDR:MASTER_PORT. An all-reduce sends every rank's buffer to rank 0, which sums them in rank order
// (((r0 + r1) + r2) + ...: one fixed order, so a run's sums are the same bits every time) and sends the one result
// back, so every rank holds the same bits. Messages are framed (operation, byte length) and checked against what
// the receiver expects: ranks that run different steps fail with the difference named instead of hanging.
import net from "node:net";
import {QloraError} from "../errors.js";
import type {BroadcastBuffer, Collective, ReduceBuffer} from "./collective.js";
import type {DistContext} from "./context.js";

enum Op {
    Hello = 1,
    Welcome = 2,
    Reduce = 3,
    Result = 4,
    Broadcast = 5
}
const OP_NAMES: Record<number, string> = {1: "hello", 2: "welcome", 3: "all-reduce", 4: "all-reduce result", 5: "broadcast"};
const HEADER = 12;

/** one peer's socket: writes framed messages, reads them in order */
class Peer {
    private chunks: Buffer[] = [];
    private buffered = 0;
    private header: {op: number; length: number} | null = null;
    private readonly messages: {op: number; payload: Buffer}[] = [];
    private waiter: {resolve: (b: Buffer) => void; reject: (e: Error) => void; op: Op; length: number} | null = null;
    private failure: Error | null = null;
    closing = false;

    constructor(
        readonly socket: net.Socket,
        public peerRank: number,
        private readonly selfRank: number
    ) {
        socket.setNoDelay(true);
        socket.on("data", (chunk: Buffer) => {
            this.chunks.push(chunk);
            this.buffered += chunk.length;
            this.parse();
        });
        socket.on("error", (err) => this.fail(err));
        socket.on("close", () => this.fail(null));
    }

    private who(): string {
        return this.peerRank >= 0 ? `rank ${this.peerRank}` : "a rank that has not said which it is";
    }

    private fail(err: Error | null): void {
        if (this.failure || this.closing) return;
        this.failure = new QloraError(
            `rank ${this.selfRank}: the connection to ${this.who()} ${err ? `failed (${err.message})` : "closed"}: ` +
                `did ${this.who()} stop? (its error says why)`
        );
        this.deliver();
    }

    private take(n: number): Buffer {
        const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.buffered);
        const out = all.subarray(0, n);
        const rest = all.subarray(n);
        this.chunks = rest.length > 0 ? [rest] : [];
        this.buffered = rest.length;
        return out;
    }

    private parse(): void {
        for (;;) {
            if (!this.header) {
                if (this.buffered < HEADER) return;
                const h = this.take(HEADER);
                this.header = {op: h.readUInt32LE(0), length: h.readUInt32LE(4) + h.readUInt32LE(8) * 2 ** 32};
            }
            if (this.buffered < this.header.length) return;
            // a copy: the payload outlives the chunk it came in
            this.messages.push({op: this.header.op, payload: Buffer.from(this.take(this.header.length))});
            this.header = null;
            this.deliver();
        }
    }

    private deliver(): void {
        const w = this.waiter;
        if (!w) return;
        const m = this.messages.shift();
        if (!m) {
            if (this.failure) {
                this.waiter = null;
                w.reject(this.failure);
            }
            return;
        }
        this.waiter = null;
        if (m.op !== w.op || (w.length >= 0 && m.payload.length !== w.length))
            w.reject(
                new QloraError(
                    `rank ${this.selfRank}: ${this.who()} sent ${OP_NAMES[m.op] ?? `operation ${m.op}`} of ${m.payload.length} bytes ` +
                        `where ${OP_NAMES[w.op]}${w.length >= 0 ? ` of ${w.length} bytes` : ""} was expected: the ranks run different ` +
                        "steps (were they started with different settings or data?)"
                )
            );
        else w.resolve(m.payload);
    }

    send(op: Op, payload: Uint8Array): void {
        const h = Buffer.alloc(HEADER);
        h.writeUInt32LE(op, 0);
        h.writeUInt32LE(payload.length % 2 ** 32, 4);
        h.writeUInt32LE(Math.floor(payload.length / 2 ** 32), 8);
        this.socket.write(h);
        if (payload.length > 0) this.socket.write(payload);
    }

    /** the next message, which must be `op` of `length` bytes (-1: any length) */
    recv(op: Op, length: number): Promise<Buffer> {
        if (this.waiter) throw new Error("Peer.recv: one receive at a time");
        return new Promise((resolve, reject) => {
            this.waiter = {resolve, reject, op, length};
            this.deliver();
        });
    }
}

const bytesOf = (buf: BroadcastBuffer) => new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);

export interface TcpOptions {
    /** how long rank 0 waits for every rank and the others keep trying to reach rank 0 (default 300 s) */
    connectTimeoutMs?: number;
}

export class TcpCollective implements Collective {
    private constructor(
        readonly rank: number,
        readonly worldSize: number,
        /** rank 0: peers[r] for r >= 1; the others: peers[0] is rank 0 */
        private readonly peers: (Peer | undefined)[]
    ) {}

    /** forms the group: rank 0 accepts every other rank, the others connect to it */
    static async connect(ctx: DistContext, opts: TcpOptions = {}): Promise<TcpCollective> {
        const timeoutMs = opts.connectTimeoutMs ?? 300_000;
        return ctx.rank === 0 ? TcpCollective.accept(ctx, timeoutMs) : TcpCollective.dial(ctx, timeoutMs);
    }

    private static async accept(ctx: DistContext, timeoutMs: number): Promise<TcpCollective> {
        const W = ctx.worldSize;
        const peers: (Peer | undefined)[] = new Array(W);
        const server = net.createServer();
        const where = `${ctx.masterAddr}:${ctx.masterPort}`;
        await new Promise<void>((resolve, reject) => {
            server.once("error", (err: NodeJS.ErrnoException) =>
                reject(
                    new QloraError(
                        err.code === "EADDRINUSE"
                            ? `MASTER_PORT ${ctx.masterPort} on ${ctx.masterAddr} is in use (another run?): set MASTER_PORT to a free port`
                            : `rank 0 cannot listen on ${where} (MASTER_ADDR:MASTER_PORT): ${err.message}`
                    )
                )
            );
            server.listen(ctx.masterPort, ctx.masterAddr, () => resolve());
        });
        try {
            await new Promise<void>((resolve, reject) => {
                let joined = 0;
                const timer = setTimeout(() => {
                    const missing = [...Array(W).keys()].filter((r) => r > 0 && !peers[r]);
                    reject(
                        new QloraError(
                            `rank 0: rank${missing.length > 1 ? "s" : ""} ${missing.join(", ")} did not connect to ${where} within ` +
                                `${timeoutMs / 1000} s: did ${missing.length > 1 ? "they" : "it"} start, with the same MASTER_ADDR and MASTER_PORT?`
                        )
                    );
                }, timeoutMs);
                server.on("connection", (socket) => {
                    const peer = new Peer(socket, -1, 0);
                    peer.recv(Op.Hello, 8).then(
                        (hello) => {
                            const rank = hello.readUInt32LE(0),
                                world = hello.readUInt32LE(4);
                            if (world !== W || rank < 1 || rank >= W || peers[rank]) {
                                clearTimeout(timer);
                                socket.destroy();
                                reject(
                                    new QloraError(
                                        `rank 0: a process joined as rank ${rank} of WORLD_SIZE ${world}, but this run has WORLD_SIZE ${W}` +
                                            `${peers[rank] ? ` and rank ${rank} already joined` : ""}: give every rank the same WORLD_SIZE and its own RANK`
                                    )
                                );
                                return;
                            }
                            peer.peerRank = rank;
                            peers[rank] = peer;
                            if (++joined === W - 1) {
                                clearTimeout(timer);
                                resolve();
                            }
                        },
                        () => socket.destroy()
                    );
                });
            });
        } catch (err) {
            for (const p of peers) p?.socket.destroy();
            throw err;
        } finally {
            server.close();
        }
        for (const p of peers) p?.send(Op.Welcome, new Uint8Array(0));
        return new TcpCollective(0, W, peers);
    }

    private static async dial(ctx: DistContext, timeoutMs: number): Promise<TcpCollective> {
        const deadline = Date.now() + timeoutMs;
        const where = `${ctx.masterAddr}:${ctx.masterPort}`;
        let lastError = "";
        for (;;) {
            const socket = await new Promise<net.Socket | null>((resolve) => {
                const s = net.connect(ctx.masterPort, ctx.masterAddr);
                s.once("connect", () => {
                    s.removeAllListeners("error");
                    resolve(s);
                });
                s.once("error", (err) => {
                    lastError = err.message;
                    s.destroy();
                    resolve(null);
                });
            });
            if (socket) {
                const peer = new Peer(socket, 0, ctx.rank);
                const hello = Buffer.alloc(8);
                hello.writeUInt32LE(ctx.rank, 0);
                hello.writeUInt32LE(ctx.worldSize, 4);
                peer.send(Op.Hello, hello);
                await peer.recv(Op.Welcome, 0);
                const peers: (Peer | undefined)[] = new Array(ctx.worldSize);
                peers[0] = peer;
                return new TcpCollective(ctx.rank, ctx.worldSize, peers);
            }
            if (Date.now() > deadline)
                throw new QloraError(
                    `rank ${ctx.rank}: cannot reach rank 0 at ${where} (MASTER_ADDR:MASTER_PORT) within ${timeoutMs / 1000} s ` +
                        `(${lastError}): did rank 0 start, and is the address right?`
                );
            await new Promise((r) => setTimeout(r, 100));
        }
    }

    async allReduceSum(buf: ReduceBuffer): Promise<void> {
        if (this.worldSize === 1) return;
        const bytes = bytesOf(buf);
        if (this.rank !== 0) {
            this.peers[0]!.send(Op.Reduce, bytes);
            bytes.set(await this.peers[0]!.recv(Op.Result, bytes.length));
            return;
        }
        const other = buf instanceof Float32Array ? new Float32Array(buf.length) : new Float64Array(buf.length);
        const otherBytes = bytesOf(other);
        for (let r = 1; r < this.worldSize; r++) {
            otherBytes.set(await this.peers[r]!.recv(Op.Reduce, bytes.length));
            // one addition per element and rank, rounded to the buffer's type: fp32 sums for Float32Array
            for (let i = 0; i < buf.length; i++) buf[i] += other[i];
        }
        for (let r = 1; r < this.worldSize; r++) this.peers[r]!.send(Op.Result, bytes);
    }

    async broadcast(buf: BroadcastBuffer, root = 0): Promise<void> {
        if (this.worldSize === 1) return;
        const bytes = bytesOf(buf);
        if (this.rank === 0) {
            if (root !== 0) bytes.set(await this.peers[root]!.recv(Op.Broadcast, bytes.length));
            for (let r = 1; r < this.worldSize; r++) if (r !== root) this.peers[r]!.send(Op.Broadcast, bytes);
        } else if (this.rank === root) this.peers[0]!.send(Op.Broadcast, bytes);
        else bytes.set(await this.peers[0]!.recv(Op.Broadcast, bytes.length));
    }

    async barrier(): Promise<void> {
        await this.allReduceSum(new Float32Array(1));
    }

    async close(): Promise<void> {
        await Promise.all(
            this.peers.map(
                (p) =>
                    p &&
                    new Promise<void>((resolve) => {
                        p.closing = true;
                        // a socket the other side already closed has nothing left to end
                        if (p.socket.destroyed) return resolve();
                        p.socket.end(() => resolve());
                        p.socket.once("close", () => resolve());
                    })
            )
        );
    }
}
