// data-preview.ts: what training will see of a dataset, before training: the detected format, counts (truncated,
// dropped), a token-length histogram and the first samples as the model gets them, with the trained tokens marked.
import {checkMapSetting} from "../data/column-map.js";
import {describeDataset, loadDataset, type DataOptions, type DatasetDescription} from "../data/index.js";
import {promptFormatTemplate} from "../data/prompt-format.js";
import {HfTokenizer} from "../tokenizer/index.js";
import {resolveModel} from "./models.js";

export interface PreviewOptions extends DataOptions {
    /** the model folder whose tokenizer (and chat template) the data is prepared with (default: the embedded model) */
    model?: string;
    /** how many samples to show */
    samples?: number;
}

/** a stretch of a sample's text, trained (its tokens have labels) or not */
export interface PreviewSegment {
    text: string;
    trained: boolean;
}

export interface PreviewSample {
    inputIds: number[];
    /** 1 where the token is trained (its label is not -100) */
    labelMask: number[];
    segments: PreviewSegment[];
}

export interface DataPreview {
    description: DatasetDescription;
    /** the chat template the adapter will carry (data/prompt-format.ts), or null for plain text data */
    promptFormat: string | null;
    samples: PreviewSample[];
}

export async function previewDataset(dataset: string, opts: PreviewOptions = {}): Promise<DataPreview> {
    // a mapping from a caller is checked as the train config checks it: a misspelt key would map nothing
    opts = {...opts, columns: checkMapSetting("columns", opts.columns), tags: checkMapSetting("tags", opts.tags)};
    const tokenizer = await HfTokenizer.load(await resolveModel(opts.model, {weights: false}));
    const prepared = await loadDataset(dataset, tokenizer, opts);
    const samples = prepared.rows.slice(0, opts.samples ?? 5).map((row): PreviewSample => {
        const labelMask = Array.from(row.labels, (l) => (l === -100 ? 0 : 1));
        const segments: PreviewSegment[] = [];
        let start = 0;
        for (let i = 1; i <= labelMask.length; i++) {
            if (i < labelMask.length && labelMask[i] === labelMask[start]) continue;
            segments.push({text: tokenizer.decode(Array.from(row.inputIds.subarray(start, i))), trained: labelMask[start] === 1});
            start = i;
        }
        return {inputIds: Array.from(row.inputIds), labelMask, segments};
    });
    const format = promptFormatTemplate({
        format: prepared.options.format,
        eosToken: prepared.options.eosToken,
        template: opts.template,
        responseField: opts.response_field,
        tokenizerTemplate: tokenizer.chatTemplateText()
    });
    return {description: describeDataset(prepared), promptFormat: format?.source ?? null, samples};
}
