// plan-memory.ts: the device memory of a training run, predicted before anything is loaded: the trainer's preflight
// and `qlora plan` (src/api/plan.ts) both ask it. It replays what the code allocates, in the order it does,
// through a model of the CUDA caching allocator: the CudaModel and CudaAdamW constructors (frozen weights as
// src/quant stores them, bf16 embeddings, fp32 LoRA masters with bf16 copies and fp32 gradients, optimizer states),
// then one micro-batch of model/graph.ts over backend/cuda-backend.ts (bf16 activations, block inputs kept or
// offloaded under gradient checkpointing, the recomputed block, the backward's temporaries, the attention
// backward's workspace, the loss in chunks of rows of bf16 logits). The peak is the allocator's peakAllocated,
// which excludes the CUDA context and managed (paged) memory; both are reported beside it.
//
// When the graph or the backend change what they allocate, change the replay below (bench/plan-check.ts measures
// the difference on a GPU).
import {QloraError} from "../errors.js";
import {cpuBackend} from "../backend/cpu-backend.js";
import {cudaBackend} from "../backend/cuda-backend.js";
import type {DeviceChoice} from "../backend/cuda.js";
import {loadModelConfig, type ModelConfig} from "../io/hf-config.js";
import {LORA_DEFAULTS, validateLoraConfig, type LoraConfig} from "../lora/config.js";
import {matchTargets} from "../lora/targets.js";
import {embedOnHostByDefault} from "../model/cuda-model.js";
import {mlpChunkRows} from "../model/graph.js";
import {projHasBias, projShape, type ProjName} from "../model/weights.js";
import {optimizerOptionsFor, stateKindFor} from "../optim/adamw.js";
import {linearModules, trainTargets} from "../peft/inject.js";
import {NESTED_BLOCKSIZE} from "../quant/nf4.js";
import type {TrainConfig} from "./config.js";

export const GiB = 2 ** 30;

/** the train config keys the memory of a step depends on */
export type MemorySettings = Pick<
    TrainConfig,
    | "load_in_4bit"
    | "bnb_4bit_use_double_quant"
    | "r"
    | "target_modules"
    | "lora_dropout"
    | "bias"
    | "use_dora"
    | "modules_to_save"
    | "per_device_train_batch_size"
    | "per_device_eval_batch_size"
    | "max_seq_length"
    | "packing"
    | "gradient_checkpointing"
    | "gradient_checkpointing_offload"
    | "optim"
>;

/** how the checkpoint stores the frozen projections when they are 4-bit already (a bitsandbytes checkpoint) */
export interface PreQuantized {
    blocksize: number;
    doubleQuant: boolean;
}

export interface MemoryPlanOptions {
    /** an evaluation pass (per_device_eval_batch_size rows) runs between steps */
    evaluation?: boolean;
    /** the checkpoint's projections are 4-bit already: they load as stored whatever load_in_4bit says */
    preQuantized?: PreQuantized | null;
}

/** what the memory goes to; each term is one line of `qlora plan` */
export type MemoryTerm =
    | "base_4bit"
    | "base_4bit_state"
    | "base_bf16"
    | "embed"
    | "lm_head"
    | "norms"
    | "dequant_scratch"
    | "lora_params"
    | "lora_copies"
    | "lora_grads"
    | "full_params"
    | "full_grads"
    | "optimizer"
    | "gemm_workspace"
    | "batch"
    | "block_inputs"
    | "block_activations"
    | "backward_temporaries"
    | "loss";

export const MEMORY_TERM_LABELS: Record<MemoryTerm, string> = {
    base_4bit: "frozen projections: 4-bit codes",
    base_4bit_state: "frozen projections: absmax + double-quant constants",
    base_bf16: "frozen projections (bf16)",
    embed: "embed_tokens (bf16)",
    lm_head: "lm_head (bf16)",
    norms: "norms, RoPE frequencies, frozen biases",
    dequant_scratch: "dequantization scratch (largest projection, bf16)",
    lora_params: "LoRA weights (fp32 masters)",
    lora_copies: "LoRA bf16 copies for the GEMMs",
    lora_grads: "LoRA gradients (fp32)",
    full_params: "modules_to_save copies (fp32)",
    full_grads: "modules_to_save gradients (fp32)",
    optimizer: "optimizer states (device memory)",
    gemm_workspace: "cuBLASLt workspace",
    batch: "token ids, positions, targets",
    block_inputs: "block inputs (kept for the backward)",
    block_activations: "block activations (saved, or the recomputed block)",
    backward_temporaries: "backward temporaries (a block's gradients, attention workspace)",
    loss: "loss: final norm, logits chunk, their gradients"
};

/** the terms that exist before the first micro-batch (weights, trainable tensors, optimizer) */
const STATIC_TERMS: readonly MemoryTerm[] = [
    "base_4bit",
    "base_4bit_state",
    "base_bf16",
    "embed",
    "lm_head",
    "norms",
    "dequant_scratch",
    "lora_params",
    "lora_copies",
    "lora_grads",
    "full_params",
    "full_grads",
    "optimizer",
    "gemm_workspace"
];

/** the CUDA context of the process (kernels, cuBLASLt handle): outside the allocator, roughly this much */
export const CUDA_CONTEXT_BYTES = 0.5 * GiB;
/** the cuBLASLt workspace allocated at the first GEMM (native/cuda/gemm.cpp kWorkspaceBytes) */
const GEMM_WORKSPACE_BYTES = 32 << 20;
/** quantize4bit's block size (src/quant/nf4.ts), what `load_in_4bit` quantizes with */
const NF4_BLOCKSIZE = 64;

/** the caching allocator's size classes (native/cuda/runtime.cpp round_size): 512 B below 1 MiB, 2 MiB above */
export function allocatorRound(bytes: number): number {
    const b = Math.max(1, bytes);
    return b < 1 << 20 ? Math.ceil(b / 512) * 512 : Math.ceil(b / (2 << 20)) * (2 << 20);
}

const TERMS = Object.keys(MEMORY_TERM_LABELS) as MemoryTerm[];
const TERM_INDEX = new Map(TERMS.map((t, i) => [t, i]));

/**
 * The caching allocator as peakAllocated sees it: every block is its size class, a freed block stops counting at
 * once (it waits in the cache, which `allocated` excludes). Remembers what each term held at the peak.
 */
class AllocatorReplay {
    /**
     * `round`: the size class of a request (the GPU's caching allocator; exact sizes on the host); `trace`, when
     * given, receives +bytes for each request and -bytes for each free, in order (tests compare it with what the
     * backend allocates)
     */
    constructor(
        private readonly round: (bytes: number) => number = allocatorRound,
        private readonly trace?: number[]
    ) {}

    // live blocks by handle (handles are indices; a freed block's bytes are set to -1)
    private readonly bytes: number[] = [0];
    private readonly rounded: number[] = [0];
    private readonly term: number[] = [0];
    private readonly byTerm = new Float64Array(TERMS.length);
    private requested = 0;
    current = 0;
    peak = 0;
    readonly peakTerms = new Float64Array(TERMS.length);
    peakRequested = 0;
    peakPhase = "";
    phase = "";

    alloc(term: MemoryTerm, bytes: number): number {
        const rounded = this.round(bytes);
        const t = TERM_INDEX.get(term)!;
        this.bytes.push(bytes);
        this.rounded.push(rounded);
        this.term.push(t);
        this.byTerm[t] += bytes;
        this.trace?.push(bytes);
        this.requested += bytes;
        this.current += rounded;
        if (this.current > this.peak) {
            this.peak = this.current;
            this.peakTerms.set(this.byTerm);
            this.peakRequested = this.requested;
            this.peakPhase = this.phase;
        }
        return this.bytes.length - 1;
    }

    free(id: number | null | undefined): void {
        if (!id || this.bytes[id] < 0) return; // freed twice: harmless, as DeviceBuffer.free
        this.byTerm[this.term[id]] -= this.bytes[id];
        this.trace?.push(-this.bytes[id]);
        this.requested -= this.bytes[id];
        this.current -= this.rounded[id];
        this.bytes[id] = -1;
    }

    /** what `term` held at the peak */
    atPeak(term: MemoryTerm): number {
        return this.peakTerms[TERM_INDEX.get(term)!];
    }
}

/** one projection of a layer as the plan needs it */
interface ProjPlan {
    name: ProjName;
    out: number;
    in: number;
    lora: boolean;
    trainBias: boolean;
    bias: boolean;
}

/** the trainable tensors (name, numel, fp32State) in the order the engine hands them to the optimizer */
interface TrainableSize {
    numel: number;
    fp32State: boolean;
}

export interface MemoryPlan {
    /** the allocator's predicted peakAllocated, bytes */
    peakBytes: number;
    /** what each term held at the peak (requested bytes; rounding is its own line) */
    terms: {term: MemoryTerm; label: string; bytes: number}[];
    /** the allocator's rounding at the peak (blocks are size classes) */
    roundingBytes: number;
    /** where in the step the peak falls */
    peakPhase: string;
    /** bytes before the first micro-batch (weights, trainable tensors, optimizer, workspaces), rounded */
    staticBytes: number;
    /** the paged optimizer states: managed memory, outside the allocator's peak, on the device while resident */
    pagedOptimizerBytes: number;
    /** the CUDA context, outside the allocator */
    contextBytes: number;
    /** what must be free on the GPU: peak + paged states + context */
    totalBytes: number;
    trainableParameters: number;
    /** projections that get a LoRA branch */
    loraModules: number;
}

/** the projections of every layer with their LoRA and bias settings, as applyLora would make them */
function projectionPlans(cfg: ModelConfig, lora: LoraConfig): ProjPlan[][] {
    const modules = linearModules(cfg);
    const targets = new Set(
        matchTargets(
            modules.map((m) => m.name),
            {...lora, target_modules: trainTargets(cfg, lora.target_modules)},
            cfg.modelType
        )
    );
    const layers: ProjPlan[][] = Array.from({length: cfg.numHiddenLayers}, () => []);
    for (const m of modules) {
        const [out, inF] = projShape(cfg, m.proj);
        const isTarget = targets.has(m.name);
        const bias = projHasBias(cfg, m.proj);
        layers[m.layer].push({
            name: m.proj,
            out,
            in: inF,
            lora: isTarget,
            trainBias: bias && (lora.bias === "all" || (lora.bias === "lora_only" && isTarget)),
            bias
        });
    }
    return layers;
}

/** the LoraConfig a run's settings give (validated as applyLora validates it) */
/**
 * Whether the CUDA engine keeps the input embedding in pinned host memory (bf16) rather than on the device: when
 * it is frozen and not shared with the output layer (model/cuda-model.ts; QLORA_CUDA_EMBED_ON_HOST=0 turns it off)
 */
export function embedOnHost(cfg: ModelConfig, modulesToSave: ReadonlySet<string>): boolean {
    if (!embedOnHostByDefault()) return false;
    return (!cfg.tieWordEmbeddings || modulesToSave.has("lm_head")) && !modulesToSave.has("embed_tokens");
}

function loraConfigOf(s: MemorySettings): LoraConfig {
    return validateLoraConfig(
        {
            ...LORA_DEFAULTS,
            r: s.r,
            target_modules: s.target_modules,
            lora_dropout: s.lora_dropout,
            bias: s.bias,
            use_dora: s.use_dora,
            modules_to_save: s.modules_to_save
        },
        "config"
    );
}

/** the 4-bit layout of the frozen projections, or null when they stay bf16 */
export function quantLayout(s: MemorySettings, pre: PreQuantized | null | undefined): PreQuantized | null {
    if (pre) return pre;
    return s.load_in_4bit ? {blocksize: NF4_BLOCKSIZE, doubleQuant: s.bnb_4bit_use_double_quant} : null;
}

/**
 * The model of the run on the device, as the CudaModel and CudaAdamW constructors allocate it. Returns the
 * trainable tensors in the optimizer's order and the paged optimizer bytes (managed memory).
 */
function replayModel(
    mem: AllocatorReplay,
    cfg: ModelConfig,
    layers: ProjPlan[][],
    s: MemorySettings,
    lora: LoraConfig,
    quant: PreQuantized | null
): {trainable: TrainableSize[]; pagedBytes: number} {
    const V = cfg.vocabSize,
        C = cfg.hiddenSize;
    const saved = new Set(lora.modules_to_save ?? []);
    // CudaModel: the dequantization scratch (bf16, the largest projection) comes first, even for bf16 bases
    const maxW = Math.max(...layers.flat().map((p) => p.out * p.in));
    mem.alloc("dequant_scratch", 2 * maxW);
    // modules_to_save: fp32 masters and gradients on the device (embed first, as trainedOnBackend)
    const full: TrainableSize[] = [];
    const trainEmbed = saved.has("embed_tokens"),
        trainHead = saved.has("lm_head");
    for (const train of [trainEmbed, trainHead]) {
        if (!train) continue;
        mem.alloc("full_params", 4 * V * C);
        mem.alloc("full_grads", 4 * V * C);
    }
    // a frozen, untied input embedding lives in pinned host memory (CudaModel: embedOnHost)
    if (!embedOnHost(cfg, saved)) mem.alloc("embed", 2 * V * C);
    // a tied output layer shares the embedding unless lm_head trains (its copy unties it)
    if (!cfg.tieWordEmbeddings || trainHead) mem.alloc("lm_head", 2 * V * C);
    mem.alloc("norms", 2 * C);
    mem.alloc("norms", 4 * (cfg.rotaryDim / 2));
    const trainable: TrainableSize[] = [];
    for (const layer of layers) {
        for (const p of layer) {
            const n = p.out * p.in;
            if (quant) {
                // CudaWeight: packed codes, the 16-entry code table, then the scales as src/quant stores them
                const nblocks = Math.ceil(n / quant.blocksize);
                mem.alloc("base_4bit", Math.ceil(n / 2));
                mem.alloc("base_4bit_state", 4 * 16);
                if (quant.doubleQuant) {
                    mem.alloc("base_4bit_state", nblocks);
                    mem.alloc("base_4bit_state", 4 * Math.ceil(nblocks / NESTED_BLOCKSIZE));
                    mem.alloc("base_4bit_state", 4 * 256);
                } else mem.alloc("base_4bit_state", 4 * nblocks);
            } else mem.alloc("base_bf16", 2 * n);
            // Projection: each trainable tensor's fp32 master and gradient (LoraLinear.trainableTensors order)
            const tensors: number[] = [];
            if (p.lora) tensors.push(lora.r * p.in, p.out * lora.r);
            if (p.lora && lora.use_dora) tensors.push(p.out);
            if (p.trainBias) tensors.push(p.out);
            for (const t of tensors) {
                mem.alloc("lora_params", 4 * t);
                mem.alloc("lora_grads", 4 * t);
                trainable.push({numel: t, fp32State: false});
            }
            if (p.lora) {
                mem.alloc("lora_copies", 2 * lora.r * p.in);
                mem.alloc("lora_copies", 2 * p.out * lora.r);
            }
            if (p.bias) {
                if (p.trainBias) mem.alloc("lora_copies", 2 * p.out);
                else {
                    // a frozen bias goes up in fp32, is copied to bf16, and the fp32 copy is freed
                    const master = mem.alloc("norms", 4 * p.out);
                    mem.alloc("norms", 2 * p.out);
                    mem.free(master);
                }
            }
        }
        mem.alloc("norms", 2 * C);
        mem.alloc("norms", 2 * C);
    }
    // the engine's order: the projections' tensors, then lm_head, then the embedding (CudaModel.allTensors)
    if (trainHead) full.push({numel: V * C, fp32State: false});
    if (trainEmbed) full.push({numel: V * C, fp32State: true});
    trainable.push(...full);
    // CudaAdamW: two states per tensor (8-bit with a scale per block, or 32-bit); paged ones in managed memory
    const o = optimizerOptionsFor(s.optim);
    let pagedBytes = 0;
    let any8bit = false;
    for (const t of trainable) {
        const kind = stateKindFor(t.numel, t.fp32State, o);
        const stateBytes = kind === "bnb8" ? t.numel : 4 * t.numel;
        const parts =
            kind === "bnb8"
                ? [stateBytes, stateBytes, 4 * Math.ceil(t.numel / o.blocksize), 4 * Math.ceil(t.numel / o.blocksize)]
                : [stateBytes, stateBytes];
        any8bit ||= kind === "bnb8";
        for (const bytes of parts) {
            if (o.paged) pagedBytes += bytes;
            else mem.alloc("optimizer", bytes);
        }
    }
    if (any8bit) {
        mem.alloc("optimizer", 4 * 256);
        mem.alloc("optimizer", 4 * 256);
    }
    mem.alloc("optimizer", 8);
    // cuBLASLt's workspace comes with the first GEMM and stays
    mem.alloc("gemm_workspace", GEMM_WORKSPACE_BYTES);
    return {trainable, pagedBytes};
}

/** one block's saved tensors (graph.ts BlockActs), by handle */
interface BlockReplay {
    intermediates: number[];
    saved: number[];
    /** null: a recomputation whose MLP is left to the backward */
    out: number | null;
}

/** what differs between the backends for the graph's allocations */
interface BackendFlavour {
    device: "cuda" | "cpu";
    /** bytes of an activation element: bf16 on the GPU, fp32 on the CPU */
    actBytes: number;
    /** rows of logits computed at a time (Backend.lossChunkRows) */
    lossChunkRows: number;
}

const CUDA_FLAVOUR: BackendFlavour = {device: "cuda", actBytes: 2, lossChunkRows: cudaBackend().lossChunkRows};
const CPU_FLAVOUR: BackendFlavour = {device: "cpu", actBytes: 4, lossChunkRows: cpuBackend().lossChunkRows};

/** one micro-batch of DecoderGraph.forwardBackward on a backend, allocation by allocation */
class StepReplay {
    private readonly C: number;
    private readonly I: number;
    private readonly Hq: number;
    private readonly Hkv: number;
    private readonly D: number;
    /** qwen3: q/k before their per-head norms are kept, with the norms' rstd */
    private readonly qkNorm: boolean;
    /** phi3: qkv_proj / gate_up_proj outputs land in a temporary before they are split */
    private readonly fused: boolean;
    /** gemma3: the attention's and the MLP's outputs are normalized before the residual adds (raw output and rstd kept) */
    private readonly sandwich: boolean;
    private readonly N: number;
    private readonly dropout: boolean;

    constructor(
        private readonly mem: AllocatorReplay,
        private readonly cfg: ModelConfig,
        private readonly layers: ProjPlan[][],
        private readonly lora: LoraConfig,
        private readonly B: number,
        private readonly T: number,
        private readonly train: boolean,
        private readonly flavour: BackendFlavour = CUDA_FLAVOUR
    ) {
        this.C = cfg.hiddenSize;
        this.I = cfg.intermediateSize;
        this.Hq = cfg.numAttentionHeads;
        this.Hkv = cfg.numKeyValueHeads;
        this.D = cfg.headDim;
        this.qkNorm = cfg.qkNorm;
        this.fused = cfg.fusedProjections;
        this.sandwich = cfg.sandwichNorms;
        this.N = B * T;
        this.dropout = train && lora.lora_dropout > 0;
    }

    private act(term: MemoryTerm, n: number): number {
        return this.mem.alloc(term, this.flavour.actBytes * n);
    }

    private proj(l: number, name: ProjName): ProjPlan {
        return this.layers[l].find((p) => p.name === name)!;
    }

    /**
     * Projection.forward of M rows: drop(x) for the LoRA branch (freed at once), xa [M, r] (and DoRA's inner) kept
     * for the backward into `saved` (freed at once when not training)
     */
    private projForward(l: number, name: ProjName, saved: number[], M = this.N): void {
        const p = this.proj(l, name);
        if (!p.lora) return;
        const xd = this.dropout ? this.act("block_activations", M * p.in) : null;
        const xa = this.act("block_activations", M * this.lora.r);
        let inner: number | null = null;
        if (this.lora.use_dora) {
            this.doraScale(l, name);
            inner = this.act("block_activations", M * p.out);
            if (xd !== null) this.mem.free(this.act("block_activations", M * p.out)); // lt
        }
        this.mem.free(xd);
        // Projection.release frees xa, then inner
        if (this.train) saved.push(xa, ...(inner === null ? [] : [inner]));
        else for (const t of [xa, inner]) this.mem.free(t);
    }

    /** Projection.saveForBackward of M rows: xa without the product (DoRA: the forward, into a freed output) */
    private projSaveForBackward(l: number, name: ProjName, saved: number[], M: number): void {
        const p = this.proj(l, name);
        if (!p.lora) return;
        if (this.lora.use_dora) {
            const y = this.act("block_activations", M * p.out);
            this.projForward(l, name, saved, M);
            this.mem.free(y);
            return;
        }
        const xd = this.dropout ? this.act("block_activations", M * p.in) : null;
        saved.push(this.act("block_activations", M * this.lora.r));
        this.mem.free(xd);
    }

    /**
     * the MLP's gate and up products of M rows (phi3: into one temporary, then split); `keep`: their backward states
     * go to `saved`, else each is freed as soon as its product is done (graph.ts projectRows)
     */
    private gateUpForward(l: number, saved: number[], M: number, keep = true): void {
        const project = (name: ProjName) => {
            const states: number[] = [];
            this.projForward(l, name, states, M);
            if (keep) saved.push(...states);
            else for (const x of states) this.mem.free(x);
        };
        if (!this.fused) {
            project("gate_proj");
            project("up_proj");
            return;
        }
        const both = this.act("block_activations", M * 2 * this.I);
        project("gate_up_proj");
        this.mem.free(both);
    }

    /** graph.ts gateUpBackward of M rows: frees dgate and dup */
    private gateUpBackward(l: number, dgate: number, dup: number, M: number): void {
        if (this.fused) {
            const both = this.act("backward_temporaries", M * 2 * this.I);
            this.projBackward(l, "gate_up_proj", M);
            this.mem.free(both);
        } else {
            this.projBackward(l, "gate_proj", M);
            this.projBackward(l, "up_proj", M);
        }
        this.mem.free(dgate);
        this.mem.free(dup);
    }

    /** Projection.backward of M rows: its temporaries, all freed before it returns */
    private projBackward(l: number, name: ProjName, M = this.N): void {
        const p = this.proj(l, name);
        if (!p.lora) return;
        let scaled: number | null = null;
        if (this.lora.use_dora) {
            scaled = this.act("backward_temporaries", M * p.out);
            if (this.dropout) this.mem.free(this.act("backward_temporaries", M * p.in));
        }
        const dxa = this.act("backward_temporaries", M * this.lora.r);
        this.mem.free(scaled);
        const xd = this.dropout ? this.act("backward_temporaries", M * p.in) : null;
        this.mem.free(xd);
        this.mem.free(dxa);
    }

    /** graph.ts blockForward; `mode` as its MlpMode ("backward": the recomputation under checkpointing) */
    blockForward(l: number, mode: "keep" | "chunked" | "backward"): BlockReplay {
        const {N, C, I, Hq, Hkv, D, B, T} = this;
        // gemma3: a recomputation runs the MLP too (its output norm needs the MLP's output)
        const mlp = this.sandwich && mode === "backward" ? "chunked" : mode;
        const a = (n: number) => this.act("block_activations", n);
        const stats = (n: number) => this.mem.alloc("block_activations", 4 * n);
        // every tensor of BlockActs is allocated up front, in its order
        const intermediates = [
            a(N * C), // xn1
            stats(N), // rstd1
            ...(this.qkNorm ? [a(N * Hq * D), a(N * Hkv * D), stats(N * Hq), stats(N * Hkv)] : []), // qRaw kRaw rstdQ rstdK
            a(N * Hq * D), // q
            a(N * Hkv * D), // k
            a(N * Hkv * D), // v
            a(N * Hq * D), // att
            stats(B * Hq * T), // lse
            ...(this.sandwich ? [a(N * C), stats(N)] : []), // oRaw rstdO
            a(N * C), // h
            a(N * C), // xn2
            stats(N), // rstd2
            ...(mlp === "keep" ? [a(N * I), a(N * I), a(N * I)] : []), // gate, up, act
            ...(this.sandwich ? [a(N * C), stats(N)] : []) // mRaw rstdM
        ];
        const block: BlockReplay = {
            intermediates,
            saved: [],
            out: mlp === "backward" ? null : this.act("block_inputs", N * C)
        };
        const attention = this.fused ? (["qkv_proj", "o_proj"] as const) : (["q_proj", "k_proj", "v_proj", "o_proj"] as const);
        for (const name of attention) {
            // a fused projection's whole output exists while its forward runs, then is split and freed
            const fusedOut = name === "qkv_proj" ? a(N * (Hq + 2 * Hkv) * D) : null;
            this.projForward(l, name, block.saved);
            this.mem.free(fusedOut);
        }
        if (mlp === "keep") {
            this.gateUpForward(l, block.saved, N);
            this.projForward(l, "down_proj", block.saved);
        } else if (mlp === "chunked")
            for (const m of this.mlpChunks()) {
                const gate = a(m * I),
                    up = a(m * I);
                this.gateUpForward(l, [], m, false);
                const h = a(m * I);
                this.mem.free(gate);
                this.mem.free(up);
                const kept: number[] = [];
                this.projForward(l, "down_proj", kept, m);
                for (const t of kept) this.mem.free(t);
                this.mem.free(h);
            }
        return block;
    }

    /** rows of each MLP chunk (graph.ts chunksOf) */
    private mlpChunks(): number[] {
        const rows = mlpChunkRows(this.I),
            out: number[] = [];
        for (let r = 0; r < this.N; r += rows) out.push(Math.min(rows, this.N - r));
        return out;
    }

    /**
     * Projection.dora at a projection's first DoRA forward: k and the row norms from a transient fp32 W + s B A,
     * cached until the optimizer step
     */
    private readonly doraDone = new Set<string>();
    private doraScale(l: number, name: ProjName): void {
        const key = `${l}.${name}`;
        if (this.doraDone.has(key)) return;
        this.doraDone.add(key);
        const p = this.proj(l, name);
        const W = this.mem.alloc("block_activations", 4 * p.out * p.in);
        this.mem.alloc("lora_copies", 4 * p.out);
        this.mem.alloc("lora_copies", 4 * p.out);
        this.mem.free(W);
    }

    release(block: BlockReplay): void {
        for (const t of [...block.intermediates, ...block.saved]) this.mem.free(t);
        block.intermediates = [];
        block.saved = [];
    }

    /** graph.ts blockBackward (`chunked`: the MLP recomputed chunk by chunk): returns the handle of d(block input) */
    blockBackward(l: number, chunked: boolean): number {
        const {N, C, I, Hq, Hkv, D, B, T} = this;
        const t = (n: number) => this.act("backward_temporaries", n);
        // gemma3: back through the MLP's output norm first
        const dmlp = this.sandwich ? t(N * C) : null;
        let dxn: number;
        if (!chunked) {
            const dact = t(N * I);
            this.projBackward(l, "down_proj");
            const dgate = t(N * I),
                dup = t(N * I);
            this.mem.free(dact);
            dxn = t(N * C);
            this.gateUpBackward(l, dgate, dup, N);
        } else {
            // graph.ts mlpBackwardChunked
            dxn = t(N * C);
            const a = (n: number) => this.act("block_activations", n);
            for (const m of this.mlpChunks()) {
                const saved: number[] = [];
                const gate = a(m * I),
                    up = a(m * I);
                this.gateUpForward(l, saved, m);
                const h = a(m * I);
                const downSaved: number[] = [];
                this.projSaveForBackward(l, "down_proj", downSaved, m);
                const dh = t(m * I);
                this.projBackward(l, "down_proj", m);
                for (const x of downSaved) this.mem.free(x);
                this.mem.free(h);
                const dgate = t(m * I),
                    dup = t(m * I);
                for (const x of [dh, gate, up]) this.mem.free(x);
                this.gateUpBackward(l, dgate, dup, m);
                for (const x of saved) this.mem.free(x);
            }
        }
        this.mem.free(dmlp);
        const dh = t(N * C);
        const datt = t(N * Hq * D);
        // gemma3: back through the attention output's norm into o_proj's output
        const doRaw = this.sandwich ? t(N * C) : null;
        this.projBackward(l, "o_proj");
        this.mem.free(doRaw);
        const dq = t(N * Hq * D),
            dk = t(N * Hkv * D),
            dv = t(N * Hkv * D);
        // the attention backward's workspace (native/cuda/attention.cu): delta rows and fp32 accumulators
        const align256 = (b: number) => Math.ceil(b / 256) * 256;
        const ws = align256(B * Hq * T * 4) + align256(N * Hq * D * 4) + 2 * align256(N * Hkv * D * 4);
        // (the CPU's attention keeps its workspace inside the native op)
        if (this.flavour.device === "cuda") this.mem.free(this.mem.alloc("backward_temporaries", ws));
        this.mem.free(datt);
        let dqRaw = dq,
            dkRaw = dk;
        if (this.qkNorm) {
            dqRaw = t(N * Hq * D);
            dkRaw = t(N * Hkv * D);
            this.mem.free(dq);
            this.mem.free(dk);
        }
        if (this.fused) {
            const dqkv = t(N * (Hq + 2 * Hkv) * D);
            this.projBackward(l, "qkv_proj");
            this.mem.free(dqkv);
        } else {
            this.projBackward(l, "q_proj");
            this.projBackward(l, "k_proj");
            this.projBackward(l, "v_proj");
        }
        for (const x of [dqRaw, dkRaw, dv]) this.mem.free(x);
        const dx = t(N * C);
        this.mem.free(dxn);
        this.mem.free(dh);
        return dx;
    }

    /** causalLmLoss: targets, per-row losses, a chunk of logits (and on the CPU its rows' gradients); all freed */
    loss(): void {
        const N = this.N,
            V = this.cfg.vocabSize,
            C = this.C;
        const rows = Math.min(this.flavour.lossChunkRows, N);
        const tmp = [
            this.mem.alloc("batch", 4 * N),
            this.mem.alloc("loss", 4 * N),
            this.mem.alloc("loss", 4),
            this.act("loss", rows * V)
        ];
        if (this.flavour.device === "cpu") tmp.push(this.act("loss", 2 * rows * C)); // the chunk's rows and their gradient
        for (const x of tmp) this.mem.free(x);
    }

    /** forwardBackward (or a forward only, when !train) of one micro-batch; returns when all is freed */
    run(opts: {checkpointing: boolean; offload: boolean; packing: boolean}): void {
        const {N, C} = this;
        const L = this.cfg.numHiddenLayers;
        const mem = this.mem;
        const checkpoint = opts.checkpointing && this.train;
        const offload = checkpoint && opts.offload;
        mem.phase = "forward";
        const ids = mem.alloc("batch", 4 * N);
        const ctx = [mem.alloc("batch", 4 * N), opts.packing ? mem.alloc("batch", 4 * N) : null];
        const x0 = this.act("block_inputs", N * C);
        // the CUDA embedding's out-of-range report (the CPU's is a return value)
        if (this.flavour.device === "cuda") mem.free(mem.alloc("batch", 8));
        // inputs[l]: a device handle, or null while offloaded to host memory
        const inputs: (number | null)[] = [x0];
        const acts: (BlockReplay | null)[] = [];
        let x = x0;
        for (let l = 0; l < L; l++) {
            mem.phase = `forward, block ${l}`;
            const a = this.blockForward(l, this.train && !checkpoint ? "keep" : "chunked");
            if (!this.train) mem.free(x);
            else if (offload) {
                mem.free(x);
                inputs[l] = null;
            }
            x = a.out!;
            inputs.push(x);
            if (checkpoint || !this.train) {
                this.release(a);
                acts.push(null);
            } else acts.push(a);
        }
        mem.phase = "loss";
        const xf = this.act("loss", N * C),
            rstdF = mem.alloc("loss", 4 * N);
        const dxf = this.train ? this.act("loss", N * C) : null;
        this.loss();
        mem.free(xf);
        if (!this.train || dxf === null) {
            for (const t of [x, rstdF, ids, ...ctx]) mem.free(t);
            return;
        }
        let dx = this.act("backward_temporaries", N * C);
        mem.free(dxf);
        mem.free(rstdF);
        // offloaded inputs come back one block ahead (graph.ts prefetches while the block before runs)
        if (offload) inputs[L - 1] = this.act("block_inputs", N * C);
        for (let l = L - 1; l >= 0; l--) {
            mem.phase = `backward, block ${l}`;
            if (offload && l > 0) inputs[l - 1] = this.act("block_inputs", N * C);
            const a = acts[l] ?? this.blockForward(l, "backward");
            const dPrev = this.blockBackward(l, acts[l] === null);
            mem.free(dx);
            dx = dPrev;
            this.release(a);
            mem.free(a.out);
            mem.free(inputs[l + 1]);
            acts[l] = null;
        }
        for (const t of [dx, inputs[0], ids, ...ctx]) mem.free(t);
    }
}

/**
 * The predicted device memory of training `cfg` with these settings: the allocator's peak over model setup, one
 * training micro-batch (per_device_train_batch_size x max_seq_length, every row full) and, with `evaluation`,
 * an evaluation forward (per_device_eval_batch_size rows).
 */
export function planDeviceMemory(cfg: ModelConfig, s: MemorySettings, opts: MemoryPlanOptions = {}): MemoryPlan {
    const lora = loraConfigOf(s);
    const layers = projectionPlans(cfg, lora);
    const quant = quantLayout(s, opts.preQuantized);
    const mem = new AllocatorReplay();
    mem.phase = "loading the model";
    const {trainable, pagedBytes} = replayModel(mem, cfg, layers, s, lora, quant);
    const staticBytes = mem.current;
    const T = s.max_seq_length;
    new StepReplay(mem, cfg, layers, lora, s.per_device_train_batch_size, T, true).run({
        checkpointing: s.gradient_checkpointing,
        offload: s.gradient_checkpointing_offload,
        packing: s.packing
    });
    if (opts.evaluation)
        new StepReplay(mem, cfg, layers, lora, s.per_device_eval_batch_size, T, false).run({
            checkpointing: false,
            offload: false,
            packing: false
        });
    const terms = TERMS.map((term) => ({term, label: MEMORY_TERM_LABELS[term], bytes: mem.atPeak(term)})).filter(
        (t) => t.bytes > 0
    );
    return {
        peakBytes: mem.peak,
        terms,
        roundingBytes: mem.peak - mem.peakRequested,
        peakPhase: mem.peakPhase,
        staticBytes,
        pagedOptimizerBytes: pagedBytes,
        contextBytes: CUDA_CONTEXT_BYTES,
        totalBytes: mem.peak + pagedBytes + CUDA_CONTEXT_BYTES,
        trainableParameters: trainable.reduce((a, t) => a + t.numel, 0),
        loraModules: layers.flat().filter((p) => p.lora).length
    };
}

/**
 * The host memory one CPU training micro-batch adds to the model (fp32 activations, the live set the graph keeps
 * referenced; the garbage collector frees what it drops later, so the process's peak is higher).
 */
export function planHostStepBytes(cfg: ModelConfig, s: MemorySettings, trace?: number[]): number {
    const lora = loraConfigOf(s);
    const layers = projectionPlans(cfg, lora);
    const mem = new AllocatorReplay((b) => b, trace);
    new StepReplay(mem, cfg, layers, lora, s.per_device_train_batch_size, s.max_seq_length, true, CPU_FLAVOUR).run({
        checkpointing: s.gradient_checkpointing,
        offload: false,
        packing: s.packing
    });
    return mem.peak;
}

/** the terms that stay for the whole run (to tell weights from activations in a breakdown) */
export function isStaticTerm(term: MemoryTerm): boolean {
    return STATIC_TERMS.includes(term);
}

/** a run's settings changed to fit `budgetBytes`, and what changed, or null when nothing fits */
export interface FitChange {
    settings: MemorySettings & {gradient_accumulation_steps: number};
    changes: string[];
    plan: MemoryPlan;
}

/**
 * transformers' auto_find_batch_size: halves per_device_train_batch_size (doubling gradient_accumulation_steps, so
 * the effective batch stays) until the plan's total fits `budgetBytes`; null when even batch 1 does not fit.
 */
export function halveBatchToFit(
    cfg: ModelConfig,
    s: MemorySettings & {gradient_accumulation_steps: number},
    budgetBytes: number,
    opts: MemoryPlanOptions = {}
): FitChange | null {
    let cur = {...s};
    for (;;) {
        const plan = planDeviceMemory(cfg, cur, opts);
        if (plan.totalBytes <= budgetBytes) {
            const changes =
                cur.per_device_train_batch_size === s.per_device_train_batch_size
                    ? []
                    : [
                          `per_device_train_batch_size ${s.per_device_train_batch_size} -> ${cur.per_device_train_batch_size}`,
                          `gradient_accumulation_steps ${s.gradient_accumulation_steps} -> ${cur.gradient_accumulation_steps}`
                      ];
            return {settings: cur, changes, plan};
        }
        if (cur.per_device_train_batch_size === 1) return null;
        const batch = Math.max(1, Math.floor(cur.per_device_train_batch_size / 2));
        cur = {
            ...cur,
            per_device_train_batch_size: batch,
            gradient_accumulation_steps: Math.ceil((s.per_device_train_batch_size * s.gradient_accumulation_steps) / batch)
        };
    }
}

/**
 * What to change so that a run fits `budgetBytes`, most effective first, each checked with the plan: a smaller
 * batch with more accumulation (the same effective batch), gradient checkpointing, its offload, 4-bit, a shorter
 * max_seq_length.
 */
export function fitSuggestions(
    cfg: ModelConfig,
    s: MemorySettings & {gradient_accumulation_steps: number},
    budgetBytes: number,
    opts: MemoryPlanOptions = {}
): {change: string; totalBytes: number}[] {
    const out: {change: string; totalBytes: number}[] = [];
    const tryIt = (change: string, patch: Partial<MemorySettings & {gradient_accumulation_steps: number}>) => {
        const plan = planDeviceMemory(cfg, {...s, ...patch}, opts);
        if (plan.totalBytes <= budgetBytes) out.push({change, totalBytes: plan.totalBytes});
        return plan.totalBytes <= budgetBytes;
    };
    const smaller = halveBatchToFit(cfg, s, budgetBytes, opts);
    if (smaller && smaller.changes.length > 0)
        out.push({change: smaller.changes.join(", "), totalBytes: smaller.plan.totalBytes});
    if (!s.gradient_checkpointing) tryIt("gradient_checkpointing true", {gradient_checkpointing: true});
    if (!s.gradient_checkpointing_offload)
        tryIt("gradient_checkpointing true, gradient_checkpointing_offload true", {
            gradient_checkpointing: true,
            gradient_checkpointing_offload: true
        });
    if (!s.load_in_4bit && !opts.preQuantized) tryIt("load_in_4bit true (QLoRA)", {load_in_4bit: true});
    for (let len = Math.floor(s.max_seq_length / 2); len >= 128; len = Math.floor(len / 2))
        if (tryIt(`max_seq_length ${len}`, {max_seq_length: len})) break;
    return out;
}

/** a bitsandbytes checkpoint's 4-bit layout, from config.json's quantization_config (block 64 as bnb saves it) */
export function preQuantizedOf(cfg: ModelConfig): PreQuantized | null {
    const q = cfg.quantizationConfig;
    if (q?.load_in_4bit !== true) return null;
    return {blocksize: NF4_BLOCKSIZE, doubleQuant: q.bnb_4bit_use_double_quant === true};
}

/**
 * The trainer's preflight on the GPU, before any weight is read: a run whose plan exceeds the device's free memory
 * is refused with the settings that would fit; with auto_find_batch_size the batch is halved (accumulation
 * doubled) until the plan fits, and `log` says so. A batch is padded to its longest row, and a batch of the
 * longest rows can come at any step: the plan's rows are max_seq_length tokens, or the data's longest row
 * (`longestRow`, train or eval) when that is shorter. The settings come back as given but for the batch halving.
 */
export async function gpuPreflight<
    S extends MemorySettings & {
        model: string;
        gradient_accumulation_steps: number;
        eval_dataset: string | null;
        eval_strategy: string;
        auto_find_batch_size?: boolean;
    }
>(config: S, choice: DeviceChoice, log: (message: string) => void, longestRow?: number): Promise<S> {
    const free = choice.availability?.info?.devices[0]?.freeBytes;
    if (free === undefined) return config;
    const given = config;
    if (longestRow !== undefined && longestRow >= 1 && longestRow < config.max_seq_length)
        config = {...config, max_seq_length: longestRow};
    const cfg = await loadModelConfig(config.model);
    checkPlanInputs(config);
    const opts: MemoryPlanOptions = {
        evaluation: config.eval_dataset !== null && config.eval_strategy !== "no",
        preQuantized: preQuantizedOf(cfg)
    };
    // the free memory was measured with this process's CUDA context made: the plan's context is already spent
    const budget = free + CUDA_CONTEXT_BYTES;
    const plan = planDeviceMemory(cfg, config, opts);
    if (plan.totalBytes <= budget) return given;
    const gib = (b: number) => (b / GiB).toFixed(2);
    if (config.auto_find_batch_size) {
        const fit = halveBatchToFit(cfg, config, budget, opts);
        if (fit) {
            log(
                `auto_find_batch_size: ${fit.changes.join(", ")} (the plan needs ${gib(fit.plan.totalBytes)} GiB; ` +
                    `${gib(free)} GiB of the GPU are free)`
            );
            return {...given, ...fit.settings, max_seq_length: given.max_seq_length};
        }
    }
    const fixes = fitSuggestions(cfg, config, budget, opts);
    throw new QloraError(
        `this run (batches of ${config.per_device_train_batch_size} x ${config.max_seq_length} tokens) needs about ` +
            `${gib(plan.peakBytes + plan.pagedOptimizerBytes)} GiB of GPU memory (the allocator's peak ${gib(plan.peakBytes)} GiB ` +
            `at ${plan.peakPhase}` +
            (plan.pagedOptimizerBytes > 0 ? `, paged optimizer states ${gib(plan.pagedOptimizerBytes)} GiB` : "") +
            `) but the GPU has ${gib(free)} GiB free; ` +
            (fixes.length > 0
                ? `settings that fit: ${fixes.map((f) => f.change).join("; or ")} (qlora plan shows the breakdown)`
                : "no single change fits it: use a GPU with more memory or a smaller model (qlora plan shows the breakdown)")
    );
}

/** guards the planner's own inputs (a config from a file, a hand-typed size) */
export function checkPlanInputs(s: MemorySettings): void {
    for (const key of ["per_device_train_batch_size", "per_device_eval_batch_size", "max_seq_length", "r"] as const)
        if (!(Number.isSafeInteger(s[key]) && s[key] > 0))
            throw new QloraError(`${key} must be a positive integer (got ${s[key]})`);
}
