// The tar reader (src/io/tar.ts) and the CSV parser (src/eval/csv.ts) the benchmark data goes through: archives
// built byte by byte here (ustar prefix, GNU long names, pax paths), path traversal refused, corruption and size
// caps reported by file; the shared MMLU archive read as the system's tar lists it.
import {test} from "node:test";
import assert from "node:assert/strict";
import {spawnSync} from "node:child_process";
import {mkdtempSync, rmSync, writeFileSync} from "node:fs";
import os from "node:os";
import path from "node:path";
import {gzipSync} from "node:zlib";
import {QloraError} from "../src/errors.js";
import {parseCsv} from "../src/eval/csv.js";
import {parseTar, readTarArchive} from "../src/io/tar.js";
import {DATASETS} from "./helpers/paths.js";

const tmp = mkdtempSync(path.join(os.tmpdir(), "qlora-eval-tar-"));
process.on("exit", () => rmSync(tmp, {recursive: true, force: true}));

/** one 512-byte header: ustar by default, "gnu" for GNU tar's magic (its prefix field holds times, not a name) */
function header(name: string, size: number, type = "0", opts: {prefix?: string; magic?: "ustar" | "gnu"} = {}): Buffer {
    const h = Buffer.alloc(512);
    h.write(name, 0, 100, "utf8");
    h.write("0000644\0", 100, "ascii");
    h.write("0000000\0", 108, "ascii");
    h.write("0000000\0", 116, "ascii");
    h.write(`${size.toString(8).padStart(11, "0")}\0`, 124, "ascii");
    h.write("00000000000\0", 136, "ascii");
    h.write(type, 156, "ascii");
    h.write(opts.magic === "gnu" ? "ustar  \0" : "ustar\u000000", 257, "latin1");
    if (opts.prefix) h.write(opts.prefix, 345, 155, "utf8");
    h.fill(0x20, 148, 156);
    let sum = 0;
    for (const b of h) sum += b;
    h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148, "ascii");
    return h;
}

function entry(name: string, data: string | Buffer, type = "0", opts: {prefix?: string; magic?: "ustar" | "gnu"} = {}): Buffer {
    const body = typeof data === "string" ? Buffer.from(data) : data;
    const pad = Buffer.alloc((512 - (body.length % 512)) % 512);
    return Buffer.concat([header(name, body.length, type, opts), body, pad]);
}

const END = Buffer.alloc(1024);

test("regular files of a gzipped archive, with ustar prefixes, GNU long names and pax paths; folders skipped", async () => {
    const longName = `mmlu/test/${"x".repeat(120)}_test.csv`;
    const paxRecord = (key: string, value: string) => {
        // "len key=value\n" where len counts itself
        const body = ` ${key}=${value}\n`;
        let len = body.length + 1;
        if (String(len).length + body.length !== len) len = String(len + 1).length + body.length;
        return `${len}${body}`;
    };
    const archive = Buffer.concat([
        entry("mmlu/", "", "5"),
        entry("mmlu/dev/a_dev.csv", "q,1,2,3,4,0\n"),
        entry("b_test.csv", "second", "0", {prefix: "mmlu/test"}),
        entry("././@LongLink", `${longName}\0`, "L", {magic: "gnu"}),
        entry(longName.slice(0, 99), "long", "0", {magic: "gnu"}),
        entry("PaxHeader/c", paxRecord("path", "mmlu/test/c_test.csv"), "x"),
        entry("mmlu/test/c_tes", "pax"),
        entry("link", "", "2"),
        END
    ]);
    const file = path.join(tmp, "a.tar.gz");
    writeFileSync(file, gzipSync(archive));
    const entries = await readTarArchive(file);
    assert.deepEqual(
        entries.map((e) => [e.name, e.data.toString()]),
        [
            ["mmlu/dev/a_dev.csv", "q,1,2,3,4,0\n"],
            ["mmlu/test/b_test.csv", "second"],
            [longName, "long"],
            ["mmlu/test/c_test.csv", "pax"]
        ]
    );
    // the GNU header's prefix area is not a name: a GNU entry with bytes there keeps its own name
    assert.deepEqual(
        parseTar(Buffer.concat([entry("plain.csv", "x", "0", {magic: "gnu", prefix: "junk"}), END]), "t").map((e) => e.name),
        ["plain.csv"]
    );
});

test("entry names that leave the archive are refused, naming the entry", () => {
    for (const name of ["../evil.csv", "mmlu/../../evil.csv", "/etc/passwd"]) {
        assert.throws(
            () => parseTar(Buffer.concat([entry(name, "x"), END]), "bad.tar"),
            (err: unknown) =>
                err instanceof QloraError &&
                err.message ===
                    `bad.tar: holds an entry named ${JSON.stringify(name)}, which points outside the archive; refusing it`
        );
    }
    // the same through a GNU long name
    const evil = Buffer.concat([entry("././@LongLink", "../../x\0", "L", {magic: "gnu"}), entry("x", "x"), END]);
    assert.throws(() => parseTar(evil, "bad.tar"), /points outside the archive/);
});

test("corrupt, truncated and oversized archives are one-line errors naming the file", async () => {
    const good = Buffer.concat([entry("a.csv", "hello"), END]);
    const flipped = Buffer.from(good);
    flipped[0] ^= 1;
    assert.throws(
        () => parseTar(flipped, "f.tar"),
        /^QloraError: f\.tar: is not a tar archive, or is corrupt \(header checksum mismatch at byte 0\)$/
    );
    assert.throws(() => parseTar(good.subarray(0, 514), "f.tar"), /f\.tar: is truncated \(an entry of 5 bytes runs past the end/);
    assert.throws(() => parseTar(Buffer.from("not a tar"), "f.tar"), /f\.tar: is not a tar archive \(shorter than one header\)/);
    const big = path.join(tmp, "big.tar.gz");
    writeFileSync(big, gzipSync(Buffer.concat([entry("zeros.csv", Buffer.alloc(200_000)), END])));
    await assert.rejects(readTarArchive(big, {maxBytes: 100_000}), /big\.tar\.gz: decompresses to more than 100000 bytes/);
    const notGzip = path.join(tmp, "bad.tar.gz");
    writeFileSync(notGzip, Buffer.from([0x1f, 0x8b, 8, 0, 1, 2, 3]));
    await assert.rejects(readTarArchive(notGzip), /bad\.tar\.gz: is not a valid gzip file/);
});

test("the shared MMLU archive: the same files and sizes as the system's tar lists", async () => {
    const file = path.join(DATASETS, "eval", "mmlu.tar.gz");
    const listed = spawnSync("tar", ["-tvzf", file], {encoding: "utf8"});
    assert.equal(listed.status, 0, listed.stderr);
    const expected = listed.stdout
        .trim()
        .split("\n")
        .filter((line) => line.startsWith("-"))
        .map((line) => {
            const cols = line.trim().split(/\s+/);
            return `${cols[cols.length - 1]} ${cols[2]}`;
        });
    const entries = await readTarArchive(file);
    assert.equal(entries.length, 114);
    assert.deepEqual(
        entries.map((e) => `${e.name} ${e.data.length}`),
        expected
    );
});

test("CSV: quoted commas, doubled quotes, line breaks in fields, CRLF, a BOM, blank lines", () => {
    const text = '\ufeffquestion,A,answer\r\n"a, b","say ""hi""",1\r\n\r\n"two\nlines",x,2\nlast,,3';
    assert.deepEqual(parseCsv(text, "t.csv"), [
        ["question", "A", "answer"],
        ["a, b", 'say "hi"', "1"],
        ["two\nlines", "x", "2"],
        ["last", "", "3"]
    ]);
    assert.deepEqual(parseCsv('a,"",b\n', "t.csv"), [["a", "", "b"]]);
    assert.throws(() => parseCsv('a,b\n"open,\nmore', "t.csv"), /^QloraError: t\.csv: line 2: a quoted field is never closed/);
    assert.throws(() => parseCsv('a,"b"c\n', "t.csv"), /t\.csv: line 1: text after a closing quote/);
});
