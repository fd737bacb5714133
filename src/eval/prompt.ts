// prompt.ts: the text a task shows the model, built as lm-evaluation-harness builds it (its fewshot_context):
//   description + (shot + target_delimiter + shot's answer + fewshot_delimiter) * k + doc_to_text(question)
// The continuations scored (choice tasks) are target_delimiter + each choice. Templates are `{field}` strings
// filled from the document (the data layer's parseTemplate: `{{`/`}}` are literal braces).
import {QloraError, quoteValue} from "../errors.js";
import {parseTemplate} from "../data/formats.js";
import type {Doc, DocGroup} from "./docs.js";
import type {TaskFile} from "./task.js";

/** fills a template from a document; a placeholder the document lacks is an error naming the task key */
export function renderTemplate(template: string, doc: Doc, key: string, where: string): string {
    let out = "";
    for (const part of parseTemplate(template)) {
        if (part.field === undefined) {
            out += part.text ?? "";
            continue;
        }
        const value = doc[part.field];
        if (value === undefined)
            throw new QloraError(
                `${where}: ${key} needs the field ${quoteValue(part.field)}, which this record lacks ` +
                    `(its fields: ${Object.keys(doc).join(", ")})`
            );
        out += value;
    }
    return out;
}

/** the subject as {subject} shows it: subject_names' entry, else the key with _ as spaces (the harness's MMLU) */
export function subjectName(spec: TaskFile, subject: string | null): string {
    if (subject === null) return "";
    return spec.subject_names?.[subject] ?? subject.replace(/_/g, " ");
}

/** the index of the right choice: doc_to_target renders to one of the choices or to its index */
export function choiceTarget(spec: TaskFile, doc: Doc, where: string): number {
    const choices = spec.doc_to_choice ?? [];
    const target = renderTemplate(spec.doc_to_target ?? "", doc, "doc_to_target", where).trim();
    const byText = choices.indexOf(target);
    if (byText >= 0) return byText;
    if (/^\d+$/.test(target) && Number(target) < choices.length) return Number(target);
    throw new QloraError(
        `${where}: doc_to_target gives ${quoteValue(target)}, which is neither one of the choices ` +
            `(${choices.map((c) => quoteValue(c)).join(", ")}) nor an index of one`
    );
}

/** what follows an example's question in a few-shot prompt: the right choice, or doc_to_target */
function shotAnswer(spec: TaskFile, doc: Doc, where: string): string {
    if (spec.metric === "choice_loglik") return (spec.doc_to_choice ?? [])[choiceTarget(spec, doc, where)];
    return renderTemplate(spec.doc_to_target ?? "", doc, "doc_to_target", where);
}

/** the few-shot part of the prompt (description and examples), the same for every question of a group */
export function fewshotPrefix(spec: TaskFile, group: DocGroup, where: string): string {
    const description = renderTemplate(spec.description, {subject: subjectName(spec, group.subject)}, "description", where);
    let out = description;
    group.shots.forEach((shot, i) => {
        const at = `${where} (few-shot example ${i + 1})`;
        out +=
            renderTemplate(spec.doc_to_text ?? "", shot, "doc_to_text", at) +
            spec.target_delimiter +
            shotAnswer(spec, shot, at) +
            spec.fewshot_delimiter;
    });
    return out;
}

/** the whole prompt of one question */
export function questionPrompt(spec: TaskFile, prefix: string, doc: Doc, where: string): string {
    return prefix + renderTemplate(spec.doc_to_text ?? "", doc, "doc_to_text", where);
}
