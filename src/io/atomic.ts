// atomic.ts: nothing half-written under a final name. Files are written to a temporary name and renamed;
// folders are filled under a temporary name and renamed into place (replacing an older folder of that name).
import {promises as fs} from "node:fs";
import path from "node:path";
import {QloraError} from "../errors.js";

export async function writeFileAtomic(file: string, data: string | Uint8Array): Promise<void> {
    const tmp = `${file}.tmp-${process.pid}`;
    try {
        await fs.writeFile(tmp, data);
        await fs.rename(tmp, file);
    } catch (err) {
        await fs.rm(tmp, {force: true}).catch(() => undefined);
        throw new QloraError(`cannot write the file: ${(err as Error).message}`, {file, cause: err});
    }
}

/**
 * Calls fill(tmpDir) to write a folder's contents, then renames tmpDir to dir. An existing dir is moved aside
 * first and removed after the swap, so a crash at any point leaves either the old folder or the new one.
 */
export async function writeDirAtomic(dir: string, fill: (tmpDir: string) => Promise<void>): Promise<void> {
    const parent = path.dirname(dir);
    try {
        await fs.mkdir(parent, {recursive: true});
    } catch (err) {
        throw new QloraError(`cannot create the folder: ${(err as Error).message}`, {file: parent, cause: err});
    }
    const tmp = path.join(parent, `.${path.basename(dir)}.tmp-${process.pid}`);
    await fs.rm(tmp, {recursive: true, force: true});
    try {
        await fs.mkdir(tmp);
        await fill(tmp);
    } catch (err) {
        await fs.rm(tmp, {recursive: true, force: true}).catch(() => undefined);
        if (err instanceof QloraError) throw err;
        throw new QloraError(`cannot write the folder: ${(err as Error).message}`, {file: dir, cause: err});
    }
    const old = path.join(parent, `.${path.basename(dir)}.old-${process.pid}`);
    let hadOld = false;
    try {
        await fs.rename(dir, old);
        hadOld = true;
    } catch {
        // no previous folder
    }
    await fs.rename(tmp, dir);
    if (hadOld) await fs.rm(old, {recursive: true, force: true});
}
