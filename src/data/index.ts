// The data layer: dataset files → records → formatted examples → token ids and labels → (packed) rows →
// micro-batches. See prepare.ts for the pipeline and DataOptions for the config keys it reads.
export {readRecords, streamRecords, readJsonl, readParquet, locateRecord, lineColumnAt} from "./readers.js";
export type {DataRecord, FileFormat, RecordBatch, RecordSource, ReadResult, RecordLocation, ReadOptions} from "./readers.js";
export {
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    DATASET_FORMATS,
    detectFormat,
    formatRecord,
    mapShareGptRole,
    templateFields
} from "./formats.js";
export type {DatasetFormat, Example, FormatOptions, RecordWhere} from "./formats.js";
export {
    IGNORE_INDEX,
    assistantSpans,
    countTargets,
    hasTrainableLabel,
    resolveEosToken,
    tokenizeExample,
    truncateExample
} from "./tokenize.js";
export type {DataTokenizer, TokenizeOptions, TokenizedExample, TruncationMode} from "./tokenize.js";
export {bestFitDecreasing, packSequences} from "./packing.js";
export type {PackingStrategy, TokenizedRow} from "./packing.js";
export {collate, padTokenIdOf} from "./collate.js";
export type {Batch, CollateOptions} from "./collate.js";
export {DataLoader} from "./loader.js";
export type {DataLoaderOptions, LoadedBatch, LoaderPosition, ShardBatch} from "./loader.js";
export {
    DEFAULT_MAX_SEQ_LENGTH,
    clipBudget,
    describeDataset,
    formatDatasetDescription,
    lengthHistogram,
    loadDataset,
    prepareRecords,
    resolveDataOptions
} from "./prepare.js";
export type {
    DataOptions,
    DatasetDescription,
    LengthBin,
    PrepareOptions,
    PrepareStats,
    PreparedDataset,
    ResolvedDataOptions
} from "./prepare.js";
