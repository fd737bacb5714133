// plan-host.ts: the host RAM of a training run. The model is loaded on the host first (model/decoder.ts: fp32
// copies of the bf16 weights, or packed 4-bit projections) and stays there for the run on either device; the CPU
// backend adds its optimizer states and the fp32 activations of a step.
import type {ModelConfig} from "../io/hf-config.js";
import {projNames, projHasBias, projShape} from "../model/weights.js";
import {optimizerOptionsFor, stateKindFor} from "../optim/adamw.js";
import {NESTED_BLOCKSIZE} from "../quant/nf4.js";
import {GiB, embedOnHost, planHostStepBytes, type MemorySettings, type PreQuantized} from "../train/plan-memory.js";

/** Node.js itself, the native addon's thread pools, the tokenizer: measured on tiny-qwen2 runs, roughly */
const PROCESS_BASE_BYTES = 0.25 * GiB;

export interface HostPlan {
    bytes: number;
    terms: {label: string; bytes: number}[];
    note: string;
}

/** the host RAM of training `cfg` on `device` (an estimate of the live set; see the note) */
export function planHostMemory(
    cfg: ModelConfig,
    s: MemorySettings,
    device: "cuda" | "cpu",
    quant: PreQuantized | null
): HostPlan {
    const V = cfg.vocabSize,
        C = cfg.hiddenSize,
        L = cfg.numHiddenLayers;
    const saved = new Set(s.modules_to_save ?? []);
    let weights = 4 * V * C; // the embedding, fp32
    if (!cfg.tieWordEmbeddings) weights += 4 * V * C;
    weights += 4 * C * (2 * L + 1);
    let loraParams = 0,
        projWeights = 0;
    for (const p of projNames(cfg)) {
        const [out, inF] = projShape(cfg, p);
        const n = out * inF;
        if (quant) {
            const nblocks = Math.ceil(n / quant.blocksize);
            projWeights +=
                Math.ceil(n / 2) + (quant.doubleQuant ? nblocks + 4 * Math.ceil(nblocks / NESTED_BLOCKSIZE) : 4 * nblocks);
        } else projWeights += 4 * n;
        if (projHasBias(cfg, p)) projWeights += 4 * out;
        loraParams += s.r * (out + inF);
    }
    weights += projWeights * L;
    // an upper bound: every projection targeted (the default: all 7)
    loraParams *= L;
    const fullCopies = (saved.has("lm_head") ? 1 : 0) + (saved.has("embed_tokens") ? 1 : 0);
    const trainable = loraParams + fullCopies * V * C;
    const terms = [
        {label: `model weights (host copy: ${quant ? "4-bit projections" : "fp32"}, fp32 embeddings)`, bytes: weights},
        {label: "trainable weights and gradients (fp32)", bytes: 8 * trainable},
        {label: "Node.js, tokenizer, native thread pools (approx.)", bytes: PROCESS_BASE_BYTES}
    ];
    if (device === "cuda" && embedOnHost(cfg, saved))
        terms.splice(2, 0, {label: "input embedding (pinned host memory the GPU reads, bf16)", bytes: 2 * V * C});
    if (device === "cuda" && s.gradient_checkpointing && s.gradient_checkpointing_offload)
        // native/cuda/offload.cpp: every block input of a micro-batch in a pinned slot (bf16), kept for the next step
        terms.splice(2, 0, {
            label: "offloaded block inputs (pinned host memory, bf16)",
            bytes: L * s.per_device_train_batch_size * s.max_seq_length * C * 2
        });
    if (device === "cpu") {
        const o = optimizerOptionsFor(s.optim);
        const kind = stateKindFor(loraParams, false, o);
        const optimizer = (kind === "bnb8" ? 2 : 8) * loraParams + 8 * fullCopies * V * C;
        terms.splice(
            2,
            0,
            {label: "optimizer states", bytes: optimizer},
            {
                label: "activations of one step (fp32)",
                bytes: planHostStepBytes(cfg, s)
            }
        );
    }
    return {
        bytes: terms.reduce((a, t) => a + t.bytes, 0),
        terms,
        note:
            device === "cpu"
                ? "an estimate of what the training step keeps referenced; the garbage collector frees dropped " +
                  "activations late, so the process's peak (max RSS) can be well above it"
                : "the model is read into host memory before it is copied to the GPU, and stays there for the run"
    };
}
