// docs.ts: a task's data as documents (one question each, its fields as strings), grouped by subject, with the
// few-shot examples of each group. mmlu_csv and cmmlu_csv read per-subject CSV files from a .tar(.gz) archive or a
// folder; jsonl reads any file qlora train reads (JSON Lines, JSON, gzipped) through the data layer.
import {promises as fs, type Stats} from "node:fs";
import path from "node:path";
import {QloraError, quoteValue} from "../errors.js";
import {locateRecord, readRecords} from "../data/readers.js";
import {readRegularFile} from "../io/files.js";
import {readTarArchive} from "../io/tar.js";
import {parseCsv} from "./csv.js";
import type {LoadedTask} from "./task.js";

/** one question: its fields as the templates see them */
export type Doc = Record<string, string>;

/** the questions of one subject (or of the whole task) and the examples shown before each */
export interface DocGroup {
    /** the subject key (mmlu_csv, cmmlu_csv), null for jsonl */
    subject: string | null;
    docs: Doc[];
    /** where each doc comes from, for messages ("file:line" or "archive:member row N") */
    where: string[];
    /** the few-shot examples, in order (the first num_fewshot of the few-shot split, as the harness's first_n) */
    shots: Doc[];
}

export interface DocOptions {
    numFewshot: number;
    /** mmlu_csv/cmmlu_csv: per subject; jsonl: in all */
    limit?: number;
    /** only these subjects (mmlu_csv, cmmlu_csv) */
    subjects?: string[];
}

const LETTERS = ["A", "B", "C", "D"];
/** a folder of CSV files is searched this deep (an archive's own layout is mmlu/test/x.csv) */
export const MAX_FOLDER_DEPTH = 4;

/** a file of an archive or a folder, read when needed */
interface DataFile {
    name: string;
    where: string;
    read(): Promise<Buffer>;
}

async function statOrNull(p: string): Promise<Stats | null> {
    try {
        return await fs.stat(p);
    } catch {
        return null;
    }
}

/** the missing-data message: which task, which file, where to get it */
function missingData(task: LoadedTask, file: string, key: string): QloraError {
    return new QloraError(
        `the data of task ${task.name} (${key} in ${task.file}) does not exist` +
            (task.spec.source ? `; get it from ${task.spec.source}` : "") +
            (task.spec.data.includes("${")
                ? "; or pass --data-dir DIR (or set QLORA_EVAL_DATA) to the folder that holds it"
                : ""),
        {file}
    );
}

/** the files of an archive or a folder (recursively, not following links out of it) */
async function listFiles(root: string): Promise<DataFile[]> {
    const st = await fs.stat(root);
    if (!st.isDirectory()) {
        const entries = await readTarArchive(root);
        return entries.map((e) => ({name: e.name, where: `${root}:${e.name}`, read: async () => e.data}));
    }
    const out: DataFile[] = [];
    const walk = async (dir: string, rel: string, depth: number) => {
        for (const entry of await fs.readdir(dir, {withFileTypes: true})) {
            const p = path.join(dir, entry.name);
            const name = rel ? `${rel}/${entry.name}` : entry.name;
            if (entry.isDirectory() && depth < MAX_FOLDER_DEPTH) await walk(p, name, depth + 1);
            else if (entry.isFile())
                out.push({name, where: p, read: () => readRegularFile(p, {what: "data file", maxBytes: 256 << 20})});
        }
    };
    await walk(root, "", 0);
    return out;
}

/** per subject, the CSV file of one split: mmlu_csv names them <split>/<subject>_<split>.csv, cmmlu_csv <split>/<subject>.csv */
function splitFiles(files: DataFile[], format: "mmlu_csv" | "cmmlu_csv", split: string): Map<string, DataFile> {
    const escaped = split.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const pattern =
        format === "mmlu_csv"
            ? new RegExp(`(?:^|/)${escaped}/([^/]+)_${escaped}\\.csv$`)
            : new RegExp(`(?:^|/)${escaped}/([^/]+)\\.csv$`);
    const out = new Map<string, DataFile>();
    for (const f of files) {
        const m = pattern.exec(f.name);
        if (m && !out.has(m[1])) out.set(m[1], f);
    }
    return out;
}

/**
 * The rows of one subject's CSV as docs. mmlu_csv: question, A, B, C, D, answer by position (Hendrycks' files
 * have no header; cais/mmlu exports have "question,choice0,...,answer"; the answer is a letter or an index 0-3,
 * given to templates as the letter). cmmlu_csv: the header names the fields (",Question,A,B,C,D,Answer"; the
 * unnamed index column is dropped). The question is stripped of surrounding whitespace, as the harness's
 * `{{question.strip()}}` / `{{Question.strip()}}` do.
 */
async function csvDocs(
    file: DataFile,
    format: "mmlu_csv" | "cmmlu_csv",
    subject: string
): Promise<{docs: Doc[]; where: string[]}> {
    const rows = parseCsv((await file.read()).toString("utf8"), file.where);
    const docs: Doc[] = [];
    const where: string[] = [];
    if (format === "mmlu_csv") {
        const headed =
            rows.length > 0 && rows[0][0]?.trim().toLowerCase() === "question" && rows[0][5]?.trim().toLowerCase() === "answer";
        rows.forEach((row, i) => {
            if (headed && i === 0) return;
            const at = `${file.where} row ${i + 1}`;
            if (row.length !== 6)
                throw new QloraError(`${at}: expected 6 columns (question, A, B, C, D, answer), found ${row.length}`);
            const raw = row[5].trim();
            const answer = LETTERS.includes(raw) ? raw : /^[0-3]$/.test(raw) ? LETTERS[Number(raw)] : null;
            if (answer === null) throw new QloraError(`${at}: the answer is ${quoteValue(raw)}, expected A-D or 0-3`);
            docs.push({question: row[0].trim(), A: row[1], B: row[2], C: row[3], D: row[4], answer, subject});
            where.push(at);
        });
        return {docs, where};
    }
    const header = rows[0] ?? [];
    if (!header.includes("Question"))
        throw new QloraError(`${file.where}: expected a header row naming the columns (",Question,A,B,C,D,Answer")`);
    rows.slice(1).forEach((row, i) => {
        const at = `${file.where} row ${i + 2}`;
        if (row.length !== header.length) throw new QloraError(`${at}: ${row.length} columns, the header has ${header.length}`);
        const doc: Doc = {subject};
        header.forEach((name, c) => {
            if (name !== "") doc[name] = row[c];
        });
        doc.Question = doc.Question.trim();
        docs.push(doc);
        where.push(at);
    });
    return {docs, where};
}

/** a record's value as template text: strings as they are, other values as JSON */
function fieldText(value: unknown): string {
    if (typeof value === "string") return value;
    if (value === null || value === undefined) return "";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
}

async function jsonlDocs(file: string): Promise<{docs: Doc[]; where: string[]}> {
    const read = await readRecords(file);
    const docs = read.records.map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, fieldText(v)])));
    const where = read.records.map((_, i) => {
        const at = locateRecord(read, i);
        return at?.line ? `${at.file}:${at.line}` : `${at?.file ?? file}: record ${i + 1}`;
    });
    return {docs, where};
}

/** the task's questions, grouped by subject, with their few-shot examples; limit and subjects applied */
export async function loadDocGroups(task: LoadedTask, opts: DocOptions): Promise<DocGroup[]> {
    const {spec} = task;
    if (!(await statOrNull(task.dataPath))) throw missingData(task, task.dataPath, "data");
    const k = opts.numFewshot;
    if (spec.format === "jsonl" || spec.format === undefined) {
        const all = await jsonlDocs(task.dataPath);
        let shots: Doc[];
        let skip = 0;
        if (task.fewshotPath) {
            if (!(await statOrNull(task.fewshotPath))) throw missingData(task, task.fewshotPath, "fewshot_data");
            shots = k > 0 ? (await jsonlDocs(task.fewshotPath)).docs.slice(0, k) : [];
        } else {
            // no separate examples: the first k records are the examples and are not scored
            shots = all.docs.slice(0, k);
            skip = k;
        }
        if (shots.length < k)
            throw new QloraError(`num_fewshot is ${k} but only ${shots.length} examples are available for task ${task.name}`, {
                file: task.fewshotPath ?? task.dataPath
            });
        const end = opts.limit === undefined ? undefined : skip + opts.limit;
        return [{subject: null, docs: all.docs.slice(skip, end), where: all.where.slice(skip, end), shots}];
    }
    const format = spec.format;
    const files = await listFiles(task.dataPath);
    const tests = splitFiles(files, format, spec.test_split);
    if (tests.size === 0)
        throw new QloraError(
            `holds no ${format === "mmlu_csv" ? `${spec.test_split}/<subject>_${spec.test_split}.csv` : `${spec.test_split}/<subject>.csv`} ` +
                `files (the layout of format ${format}); is this the data of task ${task.name}?`,
            {file: task.dataPath}
        );
    const available = [...tests.keys()].sort();
    let subjects = available;
    if (opts.subjects) {
        const unknown = opts.subjects.filter((s) => !tests.has(s));
        if (unknown.length > 0)
            throw new QloraError(
                `task ${task.name} has no subject ${quoteValue(unknown[0])}; its subjects are ${available.join(", ")}`
            );
        subjects = opts.subjects;
    }
    const shotFiles = k > 0 ? splitFiles(files, format, spec.fewshot_split) : new Map<string, DataFile>();
    const groups: DocGroup[] = [];
    for (const subject of subjects) {
        const test = await csvDocs(tests.get(subject)!, format, subject);
        let shots: Doc[] = [];
        if (k > 0) {
            const shotFile = shotFiles.get(subject);
            if (!shotFile)
                throw new QloraError(
                    `task ${task.name}: subject ${subject} has no ${spec.fewshot_split} split for its ${k} few-shot examples ` +
                        "(pass --num_fewshot 0, or add the file)",
                    {file: task.dataPath}
                );
            shots = (await csvDocs(shotFile, format, subject)).docs.slice(0, k);
            if (shots.length < k)
                throw new QloraError(`num_fewshot is ${k} but subject ${subject} has only ${shots.length} examples`, {
                    file: shotFile.where
                });
        }
        const end = opts.limit;
        groups.push({subject, docs: test.docs.slice(0, end), where: test.where.slice(0, end), shots});
    }
    return groups;
}
