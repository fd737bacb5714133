// cuda-adamw.ts: AdamW on the GPU over device tensors (fp32 params and grads): the transformers optim names
// (torch AdamW, bnb 32-bit, bnb 8-bit blockwise states for tensors of >= min_8bit_size elements, paged states in
// managed memory), bit-identical to the CPU optimizer's functions (native/include/qlora_adamw.h), with states
// saved in the CPU optimizer's format (adamw.ts) so a checkpoint resumes on either device.
import {QloraError} from "../errors.js";
import {cuda, DeviceBuffer} from "../backend/cuda.js";
import {cudaKernelOps} from "../backend/cuda-kernels-types.js";
import {stateKindFor, type OptimizerStateDict} from "./adamw.js";

/** AdamW over device tensors (the transformers optim names; 8-bit states for >= 4096 elements) */
export class CudaAdamW {
    private readonly slots: {
        name: string;
        param: DeviceBuffer;
        grad: DeviceBuffer;
        kind: "torch32" | "bnb32" | "bnb8";
        s1: number;
        s2: number;
        a1: number;
        a2: number;
        decay: boolean;
        n: number;
    }[] = [];
    private readonly qmaps: {signed: DeviceBuffer; unsigned: DeviceBuffer} | null = null;
    private steps = 0;
    private readonly sumsq: DeviceBuffer;

    constructor(
        tensors: {name: string; param: DeviceBuffer; grad: DeviceBuffer; decay: boolean; fp32State?: boolean}[],
        readonly opts: {
            optimBits: 32 | 8;
            paged: boolean;
            variant: "torch" | "bnb";
            betas: [number, number];
            eps: number;
            weightDecay: number;
            min8bitSize: number;
            blocksize: number;
        },
        maps: {signed: Float32Array; unsigned: Float32Array}
    ) {
        const k = cudaKernelOps();
        const alloc = (bytes: number) => {
            const ptr = opts.paged ? k.allocPagedState(bytes) : cuda().alloc(bytes);
            cuda().memset(ptr, 0, bytes);
            return ptr;
        };
        for (const t of tensors) {
            const n = t.param.length;
            const kind = stateKindFor(n, t.fp32State ?? false, opts);
            const bytes = kind === "bnb8" ? n : n * 4;
            const blocks = Math.ceil(n / opts.blocksize);
            this.slots.push({
                name: t.name,
                param: t.param,
                grad: t.grad,
                kind,
                s1: alloc(bytes),
                s2: alloc(bytes),
                a1: kind === "bnb8" ? alloc(blocks * 4) : 0,
                a2: kind === "bnb8" ? alloc(blocks * 4) : 0,
                decay: t.decay,
                n
            });
        }
        if (this.slots.some((s) => s.kind === "bnb8"))
            this.qmaps = {signed: DeviceBuffer.from("f32", maps.signed), unsigned: DeviceBuffer.from("f32", maps.unsigned)};
        this.sumsq = DeviceBuffer.alloc("f32", 2); // one double
    }

    /** clips to maxNorm (0: no clipping) and returns the norm before clipping */
    clipGradNorm(maxNorm: number): number {
        const k = cudaKernelOps();
        const bufs = this.slots.map((s) => s.grad.ptr),
            lens = this.slots.map((s) => s.n);
        k.optimSumSquares(this.sumsq.ptr, bufs, lens);
        const host = new Float64Array(1);
        cuda().download(host, this.sumsq.ptr);
        const norm = Math.sqrt(host[0]);
        if (maxNorm > 0) k.optimClipScale(bufs, lens, this.sumsq.ptr, maxNorm);
        return norm;
    }

    step(lr: number): void {
        const k = cudaKernelOps(),
            o = this.opts;
        this.steps++;
        for (const s of this.slots) {
            const wd = s.decay ? o.weightDecay : 0;
            if (s.kind === "torch32")
                k.adamwTorchStep(s.param.ptr, s.s1, s.s2, s.grad.ptr, lr, o.betas[0], o.betas[1], o.eps, wd, this.steps, s.n);
            else if (s.kind === "bnb32")
                k.adamwBnb32Step(s.param.ptr, s.s1, s.s2, s.grad.ptr, lr, o.betas[0], o.betas[1], o.eps, wd, this.steps, s.n);
            else
                k.adamwBnb8Step(
                    s.param.ptr,
                    s.s1,
                    s.s2,
                    s.a1,
                    s.a2,
                    s.grad.ptr,
                    this.qmaps!.signed.ptr,
                    this.qmaps!.unsigned.ptr,
                    lr,
                    o.betas[0],
                    o.betas[1],
                    o.eps,
                    wd,
                    this.steps,
                    o.blocksize,
                    s.n
                );
        }
    }

    /** the states in the CPU optimizer's format (src/optim/adamw.ts), so checkpoints resume on either device */
    stateDict(): OptimizerStateDict {
        const tensors: OptimizerStateDict["tensors"] = {};
        for (const s of this.slots) {
            const blocks = Math.ceil(s.n / this.opts.blocksize);
            const get = (ptr: number, kind: "f32" | "u8", n: number) => {
                const out = kind === "f32" ? new Float32Array(n) : new Uint8Array(n);
                cuda().download(out, ptr);
                return out;
            };
            if (s.kind === "torch32") {
                tensors[`state.${s.name}.exp_avg`] = get(s.s1, "f32", s.n);
                tensors[`state.${s.name}.exp_avg_sq`] = get(s.s2, "f32", s.n);
            } else if (s.kind === "bnb32") {
                tensors[`state.${s.name}.state1`] = get(s.s1, "f32", s.n);
                tensors[`state.${s.name}.state2`] = get(s.s2, "f32", s.n);
            } else {
                tensors[`state.${s.name}.state1`] = get(s.s1, "u8", s.n);
                tensors[`state.${s.name}.state2`] = get(s.s2, "u8", s.n);
                tensors[`state.${s.name}.absmax1`] = get(s.a1, "f32", blocks);
                tensors[`state.${s.name}.absmax2`] = get(s.a2, "f32", blocks);
            }
        }
        if (this.qmaps) {
            tensors.qmap1 = this.qmaps.signed.toHost() as Float32Array;
            tensors.qmap2 = this.qmaps.unsigned.toHost() as Float32Array;
        }
        return {
            tensors,
            metadata: {
                format: "qlora.adamw",
                version: 1,
                step: this.steps,
                options: {...this.opts, betas: [...this.opts.betas]},
                params: this.slots.map((s) => ({
                    name: s.name,
                    numel: s.n,
                    state: s.kind,
                    weightDecay: s.decay,
                    paged: this.opts.paged && s.n >= 100_000
                }))
            }
        };
    }

    loadStateDict(saved: OptimizerStateDict): void {
        const meta = saved.metadata;
        if (
            meta.params.length !== this.slots.length ||
            meta.params.some(
                (p, i) => p.name !== this.slots[i].name || p.numel !== this.slots[i].n || p.state !== this.slots[i].kind
            )
        )
            throw new QloraError(
                "the saved optimizer state does not match these trainable parameters; resume with the same config"
            );
        const put = (ptr: number, key: string) => {
            const t = saved.tensors[key];
            if (!t) throw new QloraError(`the saved optimizer state has no ${key}`);
            cuda().upload(ptr, t);
        };
        for (const s of this.slots) {
            if (s.kind === "torch32") {
                put(s.s1, `state.${s.name}.exp_avg`);
                put(s.s2, `state.${s.name}.exp_avg_sq`);
            } else {
                put(s.s1, `state.${s.name}.state1`);
                put(s.s2, `state.${s.name}.state2`);
                if (s.kind === "bnb8") {
                    put(s.a1, `state.${s.name}.absmax1`);
                    put(s.a2, `state.${s.name}.absmax2`);
                }
            }
        }
        this.steps = meta.step;
    }

    get stateBytes(): number {
        return this.slots.reduce(
            (a, s) => a + (s.kind === "bnb8" ? 2 * s.n + 8 * Math.ceil(s.n / this.opts.blocksize) : 8 * s.n),
            0
        );
    }
}
