// qlora ui: the local web app (src/ui/): a run form from the train config's schema, runs started, watched live,
// stopped and resumed, the runs of an output folder compared, and a chat with a run's adapter.
import {promises as fs} from "node:fs";
import path from "node:path";
import type {Command} from "commander";
import {QloraError} from "../../errors.js";
import {createUiServer, tokenFor} from "../../ui/server.js";
import {pc} from "../colors.js";
import {action, escapeForTerminal, parseIntOption} from "../run.js";

interface UiFlags {
    host: string;
    port: number;
    outputRoot: string;
}

export function registerUi(program: Command): void {
    program
        .command("ui")
        .description("a local web app: start, watch, stop, resume and compare training runs, and chat with their adapters")
        .option(
            "--host <host>",
            "the address to listen on; other than 127.0.0.1/localhost, a token is required (printed)",
            "127.0.0.1"
        )
        .option("--port <n>", "the port (0: any free one)", parseIntOption("--port", 0), 7860)
        .option(
            "--output-root <dir>",
            "the folder of the runs: each subfolder with a metrics.jsonl is listed, new runs go there",
            "."
        )
        .action(
            action(async (flags: UiFlags) => {
                if (flags.port > 65535) throw new QloraError(`--port must be at most 65535, got ${flags.port}`);
                const outputRoot = path.resolve(flags.outputRoot);
                await fs.mkdir(outputRoot, {recursive: true});
                const token = tokenFor(flags.host);
                const ui = createUiServer({
                    outputRoot,
                    // the runs are this same command line: `qlora train` as a child process (src/ui/runs.ts says why)
                    qloraCommand: [process.execPath, ...process.execArgv, process.argv[1]],
                    token,
                    log: (line) => console.error(pc.dim(escapeForTerminal(line)))
                });
                await new Promise<void>((resolve, reject) => {
                    ui.server.once("error", (err: NodeJS.ErrnoException) =>
                        reject(
                            err.code === "EADDRINUSE"
                                ? new QloraError(`port ${flags.port} on ${flags.host} is in use; pick another with --port`)
                                : err
                        )
                    );
                    ui.server.listen(flags.port, flags.host, () => resolve());
                });
                const address = ui.server.address();
                const port = typeof address === "object" && address ? address.port : flags.port;
                const host = flags.host.includes(":") ? `[${flags.host}]` : flags.host;
                // one line a script can wait for (the port when --port 0; the token when bound beyond this machine)
                console.error(
                    `qlora ui: http://${host}:${port}/${token ? `?token=${token}` : ""} (runs in ${escapeForTerminal(outputRoot)})`
                );
                await new Promise<void>((resolve) => {
                    const stop = () => {
                        console.error("qlora ui: stopping the runs it started (each saves a checkpoint)");
                        void ui.close().then(resolve);
                    };
                    process.once("SIGINT", stop);
                    process.once("SIGTERM", stop);
                });
            })
        );
}
