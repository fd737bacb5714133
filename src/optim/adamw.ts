// adamw.ts: AdamW over named float32 parameters: torch's AdamW (`adamw_torch`), bitsandbytes' 32-bit AdamW and
// its 8-bit blockwise AdamW (`adamw_8bit`, `paged_adamw_8bit`, ...), with transformers' `optim=` names, state
// save/load for exact resume, and transformers' weight-decay exclusions (docs: SPEC-quant.md §9-§11,
// SPEC-training.md §11). The arithmetic runs in the native addon (native/cpu/optim.cpp).
//
// "Paged" on the CPU: bitsandbytes pages the states of large tensors (>= 1e5 elements) through CUDA unified
// memory so the driver can evict them to host memory when the GPU runs out. On the CPU the states already live
// in host memory, so a paged optimizer here is the same math with the flag recorded (in `options.paged`, per
// tensor in `paramInfo()` and in the saved state); the CUDA backend is the one that pages.
import {QloraError} from "../errors.js";
import {loadOptimOps, type OptimAddon} from "../backend/native-optim-types.js";

/** one trainable tensor: the optimizer updates `param` in place from `grad` (same length) */
export interface NamedParam {
    name: string;
    param: Float32Array;
    grad: Float32Array;
    /** whether weight decay applies (see weightDecayFor) */
    weightDecay: boolean;
    /** keep 32-bit state even under 8-bit optimizers (transformers does this for nn.Embedding weights) */
    fp32State?: boolean;
}

/** "torch": torch.optim.AdamW (decay, then Adam); "bnb": bitsandbytes (Adam, then decay; 8-bit capable) */
export type AdamWVariant = "torch" | "bnb";

export interface AdamWOptions {
    betas?: readonly [number, number];
    eps?: number;
    weightDecay?: number;
    optimBits?: 32 | 8;
    paged?: boolean;
    /** tensors with fewer elements keep 32-bit state under optimBits 8 (bnb's min_8bit_size) */
    min8bitSize?: number;
    /** elements per absmax scale of the 8-bit states (bnb >= 0.44: 256) */
    blocksize?: number;
    /** default: "torch" for 32-bit non-paged, "bnb" otherwise */
    variant?: AdamWVariant;
}

export interface ResolvedAdamWOptions {
    betas: [number, number];
    eps: number;
    weightDecay: number;
    optimBits: 32 | 8;
    paged: boolean;
    min8bitSize: number;
    blocksize: number;
    variant: AdamWVariant;
}

/** how one tensor's state is kept: torch fp32 (exp_avg/exp_avg_sq), bnb fp32 or bnb 8-bit blockwise */
export type StateKind = "torch32" | "bnb32" | "bnb8";

export interface ParamInfo {
    name: string;
    numel: number;
    state: StateKind;
    weightDecay: boolean;
    /** bnb pages tensors of >= 1e5 elements when the optimizer is paged (a no-op on the CPU) */
    paged: boolean;
}

/** JSON-able part of the saved state; the tensors go to safetensors beside it */
export interface AdamWStateMetadata {
    format: "qlora.adamw";
    version: 1;
    /** optimizer steps taken so far (the next step uses step + 1 for bias correction) */
    step: number;
    options: ResolvedAdamWOptions;
    params: ParamInfo[];
}

export type OptimizerStateTensor = Float32Array | Uint8Array;

export interface OptimizerStateDict {
    /**
     * `state.<param>.exp_avg` / `.exp_avg_sq` (torch32), `state.<param>.state1` / `.state2` (bnb32: F32;
     * bnb8: U8 codes, plus `.absmax1` / `.absmax2` F32), and `qmap1` / `qmap2` (F32[256]) when any state is 8-bit
     */
    tensors: Record<string, OptimizerStateTensor>;
    metadata: AdamWStateMetadata;
}

type ParamState =
    | {kind: "torch32"; expAvg: Float32Array; expAvgSq: Float32Array}
    | {kind: "bnb32"; state1: Float32Array; state2: Float32Array}
    | {kind: "bnb8"; state1: Uint8Array; state2: Uint8Array; absmax1: Float32Array; absmax2: Float32Array};

interface Slot {
    info: ParamInfo;
    param: Float32Array;
    grad: Float32Array;
    state: ParamState;
}

/** bnb pages the state of tensors with at least this many elements (SPEC-quant §10) */
export const PAGED_MIN_NUMEL = 100_000;

const DEFAULTS = {
    betas: [0.9, 0.999] as [number, number],
    eps: 1e-8,
    weightDecay: 0.01,
    optimBits: 32 as const,
    paged: false,
    min8bitSize: 4096,
    blocksize: 256
};

let dynamicMaps: {signed: Float32Array; unsigned: Float32Array} | undefined;

/** bnb's dynamic 8-bit maps: signed (first moment) and unsigned (second moment), 256 float32 entries each */
export function optimizerDynamicMaps(): {signed: Float32Array; unsigned: Float32Array} {
    if (!dynamicMaps) {
        const ops = loadOptimOps();
        const signed = new Float32Array(256),
            unsigned = new Float32Array(256);
        ops.optimDynamicMap(signed, true);
        ops.optimDynamicMap(unsigned, false);
        dynamicMaps = {signed, unsigned};
    }
    return dynamicMaps;
}

/** transformers' rule (SPEC-training §11): names containing bias, layernorm or rmsnorm (any case) get no decay */
export function weightDecayFor(name: string): boolean {
    return !/bias|layernorm|rmsnorm/i.test(name);
}

function resolveOptions(options: AdamWOptions): ResolvedAdamWOptions {
    const optimBits = options.optimBits ?? DEFAULTS.optimBits;
    const paged = options.paged ?? DEFAULTS.paged;
    const resolved: ResolvedAdamWOptions = {
        betas: [...(options.betas ?? DEFAULTS.betas)] as [number, number],
        eps: options.eps ?? DEFAULTS.eps,
        weightDecay: options.weightDecay ?? DEFAULTS.weightDecay,
        optimBits,
        paged,
        min8bitSize: options.min8bitSize ?? DEFAULTS.min8bitSize,
        blocksize: options.blocksize ?? DEFAULTS.blocksize,
        variant: options.variant ?? (optimBits === 32 && !paged ? "torch" : "bnb")
    };
    const [beta1, beta2] = resolved.betas;
    const check = (ok: boolean, key: string, what: string) => {
        if (!ok) throw new QloraError(`expected ${what}`, {file: key});
    };
    check(
        resolved.betas.length === 2 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
        "betas",
        `two numbers in [0, 1), got [${resolved.betas.join(", ")}]`
    );
    check(Number.isFinite(resolved.eps) && resolved.eps >= 0, "eps", `a number >= 0, got ${resolved.eps}`);
    check(
        Number.isFinite(resolved.weightDecay) && resolved.weightDecay >= 0,
        "weight_decay",
        `a number >= 0, got ${resolved.weightDecay}`
    );
    check(optimBits === 32 || optimBits === 8, "optim_bits", `32 or 8, got ${String(optimBits)}`);
    check(
        Number.isSafeInteger(resolved.min8bitSize) && resolved.min8bitSize >= 0,
        "min_8bit_size",
        `an integer >= 0, got ${resolved.min8bitSize}`
    );
    check(
        Number.isSafeInteger(resolved.blocksize) && resolved.blocksize >= 1,
        "blocksize",
        `an integer >= 1, got ${resolved.blocksize}`
    );
    check(
        resolved.variant === "torch" || resolved.variant === "bnb",
        "variant",
        `"torch" or "bnb", got ${String(resolved.variant)}`
    );
    if (resolved.variant === "torch" && optimBits === 8)
        throw new QloraError(
            '8-bit states exist only in the bitsandbytes variant; use variant "bnb" ' +
                "(or an optimizer name such as adamw_8bit)",
            {file: "variant"}
        );
    return resolved;
}

/** the optimizer state a tensor gets: 8-bit blockwise only under 8-bit optimizers, for large tensors not kept in fp32 */
export function stateKindFor(
    numel: number,
    fp32State: boolean,
    options: Pick<ResolvedAdamWOptions, "variant" | "optimBits" | "min8bitSize">
): StateKind {
    if (options.variant === "torch") return "torch32";
    if (options.optimBits === 8 && !fp32State && numel >= options.min8bitSize) return "bnb8";
    return "bnb32";
}

function newState(kind: StateKind, numel: number, blocksize: number): ParamState {
    switch (kind) {
        case "torch32":
            return {kind, expAvg: new Float32Array(numel), expAvgSq: new Float32Array(numel)};
        case "bnb32":
            return {kind, state1: new Float32Array(numel), state2: new Float32Array(numel)};
        case "bnb8": {
            const nblocks = Math.ceil(numel / blocksize);
            return {
                kind,
                state1: new Uint8Array(numel),
                state2: new Uint8Array(numel),
                absmax1: new Float32Array(nblocks),
                absmax2: new Float32Array(nblocks)
            };
        }
    }
}

/** the state tensors of one parameter, by their suffix in the state dict */
function stateTensors(state: ParamState): Record<string, OptimizerStateTensor> {
    switch (state.kind) {
        case "torch32":
            return {exp_avg: state.expAvg, exp_avg_sq: state.expAvgSq};
        case "bnb32":
            return {state1: state.state1, state2: state.state2};
        case "bnb8":
            return {state1: state.state1, state2: state.state2, absmax1: state.absmax1, absmax2: state.absmax2};
    }
}

/**
 * AdamW over a list of named parameters. `step(lr)` updates every parameter in place from its gradient; the
 * learning rate comes from the scheduler each step, the other hyperparameters from the options.
 */
export class AdamW {
    readonly options: ResolvedAdamWOptions;
    private readonly slots: Slot[];
    private readonly ops: OptimAddon;
    private steps = 0;

    constructor(params: readonly NamedParam[], options: AdamWOptions = {}) {
        this.options = resolveOptions(options);
        this.ops = loadOptimOps();
        const seen = new Set<string>();
        this.slots = params.map((p) => {
            if (seen.has(p.name)) throw new QloraError(`parameter "${p.name}" is listed twice`, {file: "optimizer"});
            seen.add(p.name);
            if (!(p.param instanceof Float32Array) || !(p.grad instanceof Float32Array) || p.param.length !== p.grad.length)
                throw new QloraError(
                    `parameter "${p.name}": param and grad must be Float32Arrays of the same ` +
                        `length (got ${p.param.length} and ${p.grad.length})`,
                    {file: "optimizer"}
                );
            const numel = p.param.length;
            const kind = stateKindFor(numel, p.fp32State ?? false, this.options);
            return {
                info: {
                    name: p.name,
                    numel,
                    state: kind,
                    weightDecay: p.weightDecay,
                    paged: this.options.paged && numel >= PAGED_MIN_NUMEL
                },
                param: p.param,
                grad: p.grad,
                state: newState(kind, numel, this.options.blocksize)
            };
        });
        if (this.slots.some((s) => s.state.kind === "bnb8")) optimizerDynamicMaps();
    }

    /** optimizer steps taken so far */
    get stepCount(): number {
        return this.steps;
    }

    paramInfo(): ParamInfo[] {
        return this.slots.map((s) => ({...s.info}));
    }

    /** bytes of optimizer state (8-bit: 2 bytes an element + 8 bytes a block; 32-bit: 8 bytes an element) */
    stateBytes(): number {
        let bytes = 0;
        for (const s of this.slots) for (const t of Object.values(stateTensors(s.state))) bytes += t.byteLength;
        return bytes;
    }

    /** one update of every parameter with learning rate `lr` */
    step(lr: number): void {
        if (!Number.isFinite(lr) || lr < 0)
            throw new QloraError(`expected a learning rate >= 0, got ${lr}`, {file: "learning_rate"});
        const t = this.steps + 1;
        const {
            betas: [beta1, beta2],
            eps,
            blocksize
        } = this.options;
        const maps = this.slots.some((s) => s.state.kind === "bnb8") ? optimizerDynamicMaps() : undefined;
        for (const slot of this.slots) {
            const {param, grad, state, info} = slot;
            const wd = info.weightDecay ? this.options.weightDecay : 0;
            const n = info.numel;
            if (n === 0) continue;
            switch (state.kind) {
                case "torch32":
                    this.ops.adamwTorchStep(param, state.expAvg, state.expAvgSq, grad, lr, beta1, beta2, eps, wd, t, n);
                    break;
                case "bnb32":
                    this.ops.adamwBnb32Step(param, state.state1, state.state2, grad, lr, beta1, beta2, eps, wd, t, n);
                    break;
                case "bnb8":
                    this.ops.adamwBnb8Step(
                        param,
                        state.state1,
                        state.state2,
                        state.absmax1,
                        state.absmax2,
                        grad,
                        maps!.signed,
                        maps!.unsigned,
                        lr,
                        beta1,
                        beta2,
                        eps,
                        wd,
                        t,
                        blocksize,
                        n
                    );
                    break;
            }
        }
        this.steps = t;
    }

    /** set every gradient to zero */
    zeroGrad(): void {
        for (const s of this.slots) s.grad.fill(0);
    }

    /** copies of the state tensors plus JSON-able metadata; loadStateDict of it continues bit-identically */
    stateDict(): OptimizerStateDict {
        const tensors: Record<string, OptimizerStateTensor> = {};
        for (const s of this.slots)
            for (const [suffix, t] of Object.entries(stateTensors(s.state)))
                tensors[`state.${s.info.name}.${suffix}`] = t.slice();
        if (this.slots.some((s) => s.state.kind === "bnb8")) {
            const maps = optimizerDynamicMaps();
            tensors.qmap1 = maps.signed.slice();
            tensors.qmap2 = maps.unsigned.slice();
        }
        return {
            tensors,
            metadata: {
                format: "qlora.adamw",
                version: 1,
                step: this.steps,
                options: {...this.options, betas: [...this.options.betas]},
                params: this.paramInfo()
            }
        };
    }

    /**
     * Restores a state saved by stateDict. The parameter list (names, sizes, state kinds) and the block size
     * must match; the step count and the hyperparameters (betas, eps, weight decay) come from the saved state,
     * as torch's load_state_dict restores its param groups.
     */
    loadStateDict(saved: OptimizerStateDict): void {
        const meta = saved.metadata;
        const where = {file: "optimizer state"};
        if (meta?.format !== "qlora.adamw" || meta.version !== 1)
            throw new QloraError(
                `not a qlora AdamW state (format ${String(meta?.format)}, version ` + `${String(meta?.version)})`,
                where
            );
        if (!Number.isSafeInteger(meta.step) || meta.step < 0) throw new QloraError(`bad step count ${String(meta.step)}`, where);
        if (meta.params.length !== this.slots.length)
            throw new QloraError(
                `the saved state has ${meta.params.length} parameters, the optimizer ` +
                    `${this.slots.length}; resume with the same trainable parameters`,
                where
            );
        const hasBnb8 = this.slots.some((s) => s.state.kind === "bnb8");
        if (hasBnb8 && meta.options.blocksize !== this.options.blocksize)
            throw new QloraError(
                `the saved 8-bit state has blocksize ${meta.options.blocksize}, the optimizer ` + `${this.options.blocksize}`,
                where
            );
        const restored: ParamState[] = [];
        for (let i = 0; i < this.slots.length; i++) {
            const slot = this.slots[i],
                info = meta.params[i];
            if (info.name !== slot.info.name || info.numel !== slot.info.numel || info.state !== slot.info.state)
                throw new QloraError(
                    `saved parameter ${i} is "${info.name}" (${info.numel} elements, ` +
                        `${info.state} state), the optimizer has "${slot.info.name}" (${slot.info.numel} elements, ` +
                        `${slot.info.state} state); resume with the same model, adapter and optimizer`,
                    where
                );
            const state = newState(slot.state.kind, slot.info.numel, this.options.blocksize);
            for (const [suffix, target] of Object.entries(stateTensors(state))) {
                const key = `state.${info.name}.${suffix}`;
                const source = saved.tensors[key];
                if (!source) throw new QloraError(`missing tensor "${key}"`, where);
                if (source.constructor !== target.constructor || source.length !== target.length)
                    throw new QloraError(
                        `tensor "${key}" is a ${source.constructor.name}[${source.length}], ` +
                            `expected a ${target.constructor.name}[${target.length}]`,
                        where
                    );
                target.set(source);
            }
            restored.push(state);
        }
        if (hasBnb8) {
            const maps = optimizerDynamicMaps();
            for (const [key, map] of [
                ["qmap1", maps.signed],
                ["qmap2", maps.unsigned]
            ] as const) {
                const source = saved.tensors[key];
                if (source && (source.length !== 256 || source.some((x, j) => x !== map[j])))
                    throw new QloraError(
                        `tensor "${key}" differs from bitsandbytes' dynamic map that this ` + "optimizer quantizes with",
                        where
                    );
            }
        }
        for (let i = 0; i < this.slots.length; i++) this.slots[i].state = restored[i];
        this.options.betas = [...meta.options.betas] as [number, number];
        this.options.eps = meta.options.eps;
        this.options.weightDecay = meta.options.weightDecay;
        this.steps = meta.step;
    }
}

// ------------------------------------------------------------------
// transformers `optim=` names

export const OPTIMIZER_NAMES = [
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw"
] as const;
export type OptimizerName = (typeof OPTIMIZER_NAMES)[number];

/** the TrainingArguments fields the optimizer reads (transformers' defaults when absent) */
export interface OptimizerArgs {
    adam_beta1?: number;
    adam_beta2?: number;
    adam_epsilon?: number;
    /** TrainingArguments default: 0.0 */
    weight_decay?: number;
}

export function isOptimizerName(name: string): name is OptimizerName {
    return (OPTIMIZER_NAMES as readonly string[]).includes(name);
}

/** the AdamW options a transformers `optim=` name stands for (SPEC-quant §11) */
export function optimizerOptionsFor(optimName: string, args: OptimizerArgs = {}): ResolvedAdamWOptions {
    if (!isOptimizerName(optimName))
        throw new QloraError(`unknown optimizer "${optimName}"; expected one of ${OPTIMIZER_NAMES.join(", ")}`, {file: "optim"});
    const common = {
        betas: [args.adam_beta1 ?? 0.9, args.adam_beta2 ?? 0.999] as [number, number],
        eps: args.adam_epsilon ?? 1e-8,
        weightDecay: args.weight_decay ?? 0.0
    };
    // adamw_torch_fused is torch's fused kernel on CUDA; on the CPU it is the same update as adamw_torch
    if (optimName === "adamw_torch" || optimName === "adamw_torch_fused")
        return resolveOptions({...common, optimBits: 32, paged: false, variant: "torch"});
    // bitsandbytes family: is_paged = "paged" in name, optim_bits = 8 if "8bit" in name else 32
    return resolveOptions({
        ...common,
        optimBits: optimName.includes("8bit") ? 8 : 32,
        paged: optimName.includes("paged"),
        variant: "bnb"
    });
}

/** the optimizer transformers' Trainer builds for `optim=optimName` */
export function createOptimizer(
    optimName: string,
    params: readonly NamedParam[],
    args: OptimizerArgs = {},
    overrides: Pick<AdamWOptions, "min8bitSize" | "blocksize"> = {}
): AdamW {
    return new AdamW(params, {...optimizerOptionsFor(optimName, args), ...overrides});
}
