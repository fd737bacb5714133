// files.ts: the one way qlora opens a file it reads. A path that names a FIFO, a device or a folder is refused
// instead of hanging (opening a FIFO for reading blocks until a writer appears: O_NONBLOCK makes the open return,
// and fstat on the opened handle then tells what it is, with no window between check and open). Whole-file reads
// are capped, so a 40 GB "config.json" is an error, not an out-of-memory abort. Symlinks are followed: the
// Hugging Face cache stores every file of a snapshot as a link into blobs/.
import {constants, promises as fs, type Stats} from "node:fs";
import {QloraError} from "../errors.js";

/** whole-file reads of JSON/text (configs, tokenizers, templates, datasets read at once) stop here */
export const DEFAULT_MAX_READ_BYTES = 1 << 30;

function describeKind(st: Stats): string {
    if (st.isDirectory()) return "a folder";
    if (st.isFIFO()) return "a FIFO (named pipe)";
    if (st.isSocket()) return "a socket";
    if (st.isCharacterDevice() || st.isBlockDevice()) return "a device";
    return "not a regular file";
}

/**
 * Opens `file` for reading and checks that it is a regular file. Errors are QloraErrors naming the file:
 * missing (ENOENT), not readable (EACCES), or not a regular file.
 */
export async function openRegularFile(file: string, what = "file"): Promise<{handle: fs.FileHandle; size: number}> {
    let handle: fs.FileHandle;
    try {
        handle = await fs.open(file, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === "ENOENT") throw new QloraError(`the ${what} does not exist`, {file, cause: err});
        if (code === "EACCES" || code === "EPERM")
            throw new QloraError(`the ${what} cannot be read (permission denied)`, {file, cause: err});
        if (code === "EISDIR") throw new QloraError(`expected a ${what}, found a folder`, {file, cause: err});
        throw new QloraError(`cannot open the ${what} (${code ?? (err as Error).message})`, {file, cause: err});
    }
    let st: Stats;
    try {
        st = await handle.stat();
    } catch (err) {
        await handle.close().catch(() => undefined);
        throw new QloraError(`cannot read the ${what} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
            file,
            cause: err
        });
    }
    if (!st.isFile()) {
        await handle.close().catch(() => undefined);
        throw new QloraError(`expected a regular ${what}, found ${describeKind(st)}`, {file});
    }
    return {handle, size: st.size};
}

/** reads a whole regular file, refusing one larger than maxBytes */
export async function readRegularFile(file: string, opts: {what?: string; maxBytes?: number} = {}): Promise<Buffer> {
    const what = opts.what ?? "file";
    const maxBytes = opts.maxBytes ?? DEFAULT_MAX_READ_BYTES;
    const {handle, size} = await openRegularFile(file, what);
    try {
        if (size > maxBytes)
            throw new QloraError(
                `the ${what} is ${size} bytes, more than the ${maxBytes} a ${what} may have; ` + "is this the right file?",
                {file}
            );
        const buf = Buffer.allocUnsafe(size);
        let done = 0;
        while (done < size) {
            const {bytesRead} = await handle.read(buf, done, size - done, done);
            if (bytesRead === 0) break; // the file shrank while being read
            done += bytesRead;
        }
        return done === size ? buf : buf.subarray(0, done);
    } catch (err) {
        if (err instanceof QloraError) throw err;
        throw new QloraError(`cannot read the ${what} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
            file,
            cause: err
        });
    } finally {
        await handle.close().catch(() => undefined);
    }
}

/** reads a whole regular file as UTF-8 text */
export async function readTextFile(file: string, opts: {what?: string; maxBytes?: number} = {}): Promise<string> {
    return (await readRegularFile(file, opts)).toString("utf8");
}

/** an optional file's text: null when it does not exist; anything else that stops reading it is an error */
export async function readOptionalTextFile(file: string, opts: {what?: string; maxBytes?: number} = {}): Promise<string | null> {
    try {
        return await readTextFile(file, opts);
    } catch (err) {
        if (((err as Error).cause as NodeJS.ErrnoException | undefined)?.code === "ENOENT") return null;
        throw err;
    }
}

/** true when `file` exists (following links), whatever it is; for optional files whose absence is fine */
export async function pathExists(file: string): Promise<boolean> {
    try {
        await fs.stat(file);
        return true;
    } catch {
        return false;
    }
}
