// gguf-output.ts: what both GGUF exports do with their output file: refuse an output that is or sits inside an
// input, replace only an existing GGUF and only when asked, and write the file reporting progress per tensor.
import {promises as fs} from "node:fs";
import path from "node:path";
import {assertFileOutput, assertOutputSeparate} from "../io/atomic.js";
import {hasGgufMagic, writeGguf, type GgufContent, type WriteGgufResult} from "../io/gguf.js";
import {ggmlTypeName} from "../io/gguf-quants.js";

export interface ExportProgress {
    /** 0-based index of the tensor just written */
    index: number;
    count: number;
    name: string;
    type: string;
    bytes: number;
}

/**
 * `out` must not be, or contain, an input folder or any file in one but a GGUF (the weights, config.json, the
 * tokenizer: it may sit beside them), and an existing `out` is replaced only with `overwrite` and only when it is a
 * GGUF file. Checked before anything is read, so a refused export is quick.
 */
export async function assertGgufOutput(
    out: string,
    overwrite: boolean | undefined,
    folders: {path: string; what: string}[]
): Promise<void> {
    const inputs = [...folders];
    for (const folder of folders) {
        const names = await fs.readdir(folder.path).catch(() => [] as string[]); // a missing folder is reported later
        for (const name of names)
            if (!name.endsWith(".gguf")) inputs.push({path: path.join(folder.path, name), what: `${name} of the ${folder.what}`});
    }
    await assertOutputSeparate(out, inputs);
    await assertFileOutput(out, {overwrite: overwrite ?? false, looksOwned: hasGgufMagic, what: "a GGUF file"});
}

/** writes `content` to `out` (streamed, atomic: see io/gguf.ts), calling `onProgress` after each tensor */
export function writeGgufReporting(
    out: string,
    content: GgufContent,
    onProgress: ((p: ExportProgress) => void) | undefined
): Promise<WriteGgufResult> {
    const count = content.tensors.length;
    return writeGguf(out, content, {
        onTensor: (index, tensor, bytes) =>
            onProgress?.({index, count, name: tensor.name, type: ggmlTypeName(tensor.type), bytes})
    });
}
