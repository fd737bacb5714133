// qlora doctor [--json]: what this machine has for qlora, one check a line; exit code 1 when a required one fails.
import type {Command} from "commander";
import {pc} from "../colors.js";
import {runDoctor, type CheckStatus} from "../../api/doctor.js";
import {action, escapeForTerminal} from "../run.js";

const MARK: Record<CheckStatus, (t: string) => string> = {ok: pc.green, warn: pc.yellow, fail: pc.red};

export function registerDoctor(program: Command): void {
    program
        .command("doctor")
        .description("check this machine for qlora: Node.js, native addons, CPU features, GPUs, CUDA, disk, optional tools")
        .option("--json", "print the checks as JSON")
        .action(
            action(async (flags: {json?: boolean}) => {
                const report = await runDoctor();
                if (flags.json) console.log(JSON.stringify(report, null, 2));
                else
                    for (const c of report.checks)
                        console.log(
                            `${MARK[c.status](c.status.padEnd(4))}  ${c.name.padEnd(15)} ${escapeForTerminal(c.detail)}` +
                                (c.fix ? pc.dim(` -> ${escapeForTerminal(c.fix)}`) : "")
                        );
                if (!report.ok) process.exitCode = 1;
            })
        );
}
