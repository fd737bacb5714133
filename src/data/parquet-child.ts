// parquet-child.ts: the child process that decodes a Parquet file (see parquet.ts for why it is a child).
// argv[2] is the file; each row group goes back over IPC, then "done", or the one-line error.
import {isQloraError} from "../errors.js";
import {decodeParquetInProcess, type ParquetChildMessage} from "./parquet.js";

function send(m: ParquetChildMessage): Promise<void> {
    return new Promise((resolve, reject) => process.send!(m, (err: Error | null) => (err ? reject(err) : resolve())));
}

try {
    for await (const group of decodeParquetInProcess(process.argv[2])) await send({kind: "group", group});
    await send({kind: "done"});
} catch (err) {
    await send({kind: "error", message: (err as Error).message ?? String(err), user: isQloraError(err)});
}
process.disconnect();
