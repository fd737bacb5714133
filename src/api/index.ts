// The library API of qlora: what `import ... from "qlora"` gives.
export {QloraError} from "../errors.js";
export {DEFAULT_MODEL_DIR, loadModel, resolveModelDir} from "./models.js";
export type {LoadedModel, LoadModelOptions} from "./models.js";
export {fineTune, runTraining, TrainingInterrupted, EXAMPLE_EVAL_DATA, EXAMPLE_TRAIN_DATA} from "./train.js";
export {TrainConfigSchema, loadTrainConfig, resolveTrainConfig} from "./train-config.js";
export type {TrainConfig, TrainConfigInput} from "./train-config.js";
export {
    evaluateLoss,
    evaluateTasks,
    builtinTaskNames,
    loadTask,
    reportJson,
    reportMarkdown,
    writeResultsDir
} from "./evaluate.js";
export type {EvalResult, EvalReport, EvaluateTasksOptions, TaskResult} from "./evaluate.js";
export {inspectModel} from "./inspect.js";
export type {ModelDescription} from "./inspect.js";
export {generate, DEFAULT_SAMPLING} from "../model/generate.js";
export type {GenerateOptions, GenerateResult, SamplingOptions} from "../model/generate.js";
export {DecoderModel, KVCache} from "../model/decoder.js";
export {loadAdapter, saveAdapter} from "../peft/adapter-files.js";
export {applyLora, trainableParametersLine} from "../peft/inject.js";
export type {LoraModel} from "../peft/inject.js";
export type {LoraConfig} from "../lora/config.js";
export {mergeAdapter} from "../peft/merge.js";
export type {MergeOptions} from "../peft/merge.js";
export {bitsAndBytesConfig} from "../quant/config.js";
export type {BitsAndBytesConfig} from "../quant/config.js";
export {HfTokenizer} from "../tokenizer/index.js";
export type {TrainReporter, TrainResult, TrainLogRecord} from "../train/trainer.js";
export {chooseDevice, cudaAvailability, cudaMemoryStats, resolveDevice} from "../backend/cuda.js";
export type {CudaAvailability, DeviceChoice} from "../backend/cuda.js";
export {planTraining, writeRecipe, GPUS, KNOWN_ARCHITECTURES} from "./plan.js";
export type {PlanTrainingOptions, TrainingPlan, Recipe} from "./plan.js";
export {runDoctor} from "./doctor.js";
export type {DoctorCheck, DoctorReport} from "./doctor.js";
export type {CudaMemoryStats} from "../backend/native-types.js";
export {gpuMemory, printGpuMemory, hostMemory, memoryReport, type GpuMemory, type MemoryReport} from "../train/memory.js";
export {exportGguf, exportGgufLora} from "./export-gguf.js";
export type {ExportGgufOptions, ExportGgufResult, ExportGgufLoraOptions, ExportGgufLoraResult} from "./export-gguf.js";
