// colors.ts: the CLI's colours, on a terminal only. picocolors alone also colours pipes whenever CI is set,
// which puts escape codes into logs, files and anything that parses qlora's output. FORCE_COLOR and NO_COLOR
// keep their usual meaning.
import picocolors from "picocolors";

function colorWanted(): boolean {
    const env = process.env;
    if ("NO_COLOR" in env || process.argv.includes("--no-color")) return false;
    if ("FORCE_COLOR" in env) return env.FORCE_COLOR !== "0";
    return process.stdout.isTTY === true && process.stderr.isTTY === true && env.TERM !== "dumb";
}

export const pc = picocolors.createColors(colorWanted());
