// qlora download: a model's files from the Hugging Face Hub into the Hugging Face cache that Python tools share
// (huggingface-cli download, restricted to what qlora reads). Also the progress bar of every download, --model
// ORG/NAME included: registering the command sets it as the default progress of io/hub.ts.
import cliProgress from "cli-progress";
import type {Command} from "commander";
import {downloadModel} from "../../api/models.js";
import {type HubProgress, setDefaultHubProgress} from "../../io/hub.js";
import {pc} from "../colors.js";
import {action, escapeForTerminal} from "../run.js";

function formatBytes(n: number): string {
    if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
    if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
    if (n >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
    return `${n} B`;
}

/**
 * Downloads on stderr: a line naming what is fetched, then a byte progress bar on a terminal (a line per file
 * elsewhere, for logs); retries and fallbacks as dim lines.
 */
function stderrProgress(): HubProgress {
    const tty = () => process.stderr.isTTY === true;
    let bar: cliProgress.SingleBar | null = null;
    let active = false;
    let done = 0;
    let total = 0;
    let current = "";
    const stop = () => {
        bar?.stop();
        bar = null;
    };
    /** the bar, (re)drawn after a line was printed above it */
    const show = () => {
        if (bar || !active || !tty()) return;
        bar = new cliProgress.SingleBar(
            {
                format: " {bar} {percentage}% | {done} of {size} | {file} | {eta_formatted} left",
                hideCursor: true,
                clearOnComplete: true,
                stream: process.stderr
            },
            cliProgress.Presets.shades_classic
        );
        bar.start(Math.max(total, 1), Math.min(done, total), {done: formatBytes(done), size: formatBytes(total), file: current});
    };
    return {
        start(info) {
            stop();
            [active, done, total, current] = [true, 0, info.totalBytes, ""];
            const what = info.revision === info.commit ? "commit" : `${info.revision}, commit`;
            const files = `${info.files.length} file${info.files.length === 1 ? "" : "s"}`;
            console.error(
                pc.dim(
                    escapeForTerminal(
                        `downloading ${info.repoId} (${what} ${info.commit.slice(0, 7)}): ${files}, ${formatBytes(total)}`
                    )
                )
            );
            show();
        },
        bytes(file, n) {
            done += n;
            current = escapeForTerminal(file);
            show();
            bar?.update(Math.min(done, total), {done: formatBytes(done), file: current});
        },
        fileDone(file, size) {
            // a line per file for logs; a terminal has the bar
            if (!tty()) console.error(pc.dim(escapeForTerminal(`  ${file} (${formatBytes(size)})`)));
        },
        note(message) {
            stop();
            console.error(pc.dim(escapeForTerminal(message)));
            show();
        },
        end() {
            stop();
            active = false;
        }
    };
}

export function registerDownload(program: Command): void {
    setDefaultHubProgress(stderrProgress());
    program
        .command("download")
        .description(
            "fetch a model from the Hugging Face Hub into the Hugging Face cache (HF_HUB_CACHE, shared with Python tools): " +
                "config, tokenizer and safetensors weights only; prints the model folder"
        )
        .argument("<model>", "the model's Hub id, ORG/NAME (e.g. Qwen/Qwen2-0.5B)")
        .option("--revision <rev>", "a branch, tag or commit hash", "main")
        .option("--include <glob...>", "only these of the files qlora reads (fnmatch patterns, e.g. config.json '*.json')")
        .option("--local-dir <dir>", "write real files into this folder instead of the cache (huggingface_hub's local_dir)")
        .addHelpText(
            "after",
            "\nEnvironment: HF_TOKEN (gated or private models), HF_ENDPOINT (a mirror, e.g. https://hf-mirror.com), " +
                "HF_HUB_CACHE or HF_HOME (where the cache is), HF_HUB_OFFLINE=1 (no network: the cache only).\n" +
                "Any command's --model ORG/NAME fetches the same way.\n"
        )
        .action(
            action(async (model: string, flags: {revision: string; include?: string[]; localDir?: string}) => {
                const result = await downloadModel(model, {
                    revision: flags.revision,
                    include: flags.include,
                    localDir: flags.localDir
                });
                console.error(
                    pc.dim(
                        escapeForTerminal(
                            result.downloadedBytes > 0
                                ? `${model}: ${formatBytes(result.downloadedBytes)} downloaded`
                                : `${model}: already complete, nothing downloaded`
                        )
                    )
                );
                console.log(result.dir);
            })
        );
}
