// csv.ts: RFC 4180 CSV (as Python's csv module and pandas write it): quoted fields may hold commas, quotes ("")
// and line breaks; CRLF or LF line ends; a UTF-8 BOM is dropped. The benchmark files (MMLU, CMMLU) are CSV.
import {QloraError} from "../errors.js";

/** the rows of a CSV text; `file` names it in messages. Blank lines are skipped. */
export function parseCsv(text: string, file: string): string[][] {
    const rows: string[][] = [];
    let row: string[] = [];
    let cell = "";
    let line = 1;
    let quotedAt = 0; // the line a quoted field started on, for the error message
    let i = text.charCodeAt(0) === 0xfeff ? 1 : 0;
    const endRow = () => {
        row.push(cell);
        cell = "";
        if (!(row.length === 1 && row[0] === "")) rows.push(row);
        row = [];
    };
    while (i < text.length) {
        const c = text[i];
        if (c === '"' && cell === "") {
            // a quoted field: up to the quote not doubled
            quotedAt = line;
            i++;
            for (;;) {
                if (i >= text.length)
                    throw new QloraError(`line ${quotedAt}: a quoted field is never closed (a missing '"')`, {file});
                const q = text[i];
                if (q === '"') {
                    if (text[i + 1] === '"') {
                        cell += '"';
                        i += 2;
                        continue;
                    }
                    i++;
                    break;
                }
                if (q === "\n") line++;
                cell += q;
                i++;
            }
            const next = text[i];
            if (next !== undefined && next !== "," && next !== "\n" && next !== "\r")
                throw new QloraError(`line ${line}: text after a closing quote (expected a comma or the end of the line)`, {
                    file
                });
            continue;
        }
        if (c === ",") {
            row.push(cell);
            cell = "";
        } else if (c === "\n" || c === "\r") {
            endRow();
            if (c === "\r" && text[i + 1] === "\n") i++;
            line++;
        } else cell += c;
        i++;
    }
    if (cell !== "" || row.length > 0) endRow();
    return rows;
}
