// tools.ts: what the run form asks about its values before a run starts: the data as training will see it
// (api/data-preview.ts, `qlora data preview`) and the memory plan (api/plan.ts, `qlora plan`).
import {previewDataset} from "../api/data-preview.js";
import {GPUS, planTraining} from "../api/plan.js";
import {EXAMPLE_TRAIN_DATA} from "../api/train.js";
import {dataOptionsOf, parseFlags, type TrainConfig} from "../api/train-config.js";
import {formatDatasetDescription} from "../data/index.js";
import {QloraError, quoteValue} from "../errors.js";
import type {PlanReply, PreviewReply} from "./api-types.js";

/** the first samples of the form's dataset (the example data when none is set), prepared as the run will prepare them */
export async function previewReply(config: TrainConfig, samples = 3): Promise<PreviewReply> {
    const dataset = config.dataset ?? EXAMPLE_TRAIN_DATA;
    const p = await previewDataset(dataset, {model: config.model ?? undefined, ...dataOptionsOf(config), samples});
    const d = p.description;
    return {
        dataset,
        format: d.format,
        rows: d.rows,
        tokens: d.tokens,
        truncated: d.truncated,
        dropped: d.dropped,
        summary: formatDatasetDescription(d),
        promptFormat: p.promptFormat,
        warnings: d.warnings,
        samples: p.samples.map((s) => ({
            tokens: s.inputIds.length,
            trained: s.labelMask.reduce((a, b) => a + b, 0),
            segments: s.segments
        }))
    };
}

/** the memory plan of the form's flags, for a GPU by name (or this machine's) */
export async function planReply(flags: string[], gpu: unknown): Promise<PlanReply> {
    if (gpu !== undefined && gpu !== null && gpu !== "" && (typeof gpu !== "string" || !GPUS.some((g) => g.name === gpu)))
        throw new QloraError(`gpu: expected one of ${GPUS.map((g) => g.name).join(", ")}, got ${quoteValue(gpu)}`);
    const p = await planTraining({config: parseFlags(flags), gpu: typeof gpu === "string" && gpu !== "" ? gpu : undefined});
    const onGpu = p.device === "cuda";
    return {
        device: p.device,
        gpu: p.gpu?.label ?? null,
        verdict: p.verdict,
        totalBytes: onGpu ? p.memory.totalBytes : p.host.bytes,
        availableBytes: p.gpu?.availableBytes ?? null,
        terms: (onGpu ? p.memory.terms : p.host.terms).map((t) => ({label: t.label, bytes: t.bytes})),
        hostBytes: p.host.bytes,
        tokensPerSecond: p.speed?.tokensPerSecond ?? null,
        suggestions: p.suggestions,
        notes: p.notes,
        gpus: GPUS.map((g) => ({name: g.name, label: g.label}))
    };
}
