// main.ts: the qlora command line.
import {Command} from "commander";
import {readFileSync} from "node:fs";
import path from "node:path";
import {packageRoot} from "../backend/native.js";
import {registerChat} from "./commands/chat.js";
import {registerData} from "./commands/data.js";
import {registerDoctor} from "./commands/doctor.js";
import {registerDownload} from "./commands/download.js";
import {registerEval} from "./commands/eval.js";
import {registerExport} from "./commands/export.js";
import {registerGenerate} from "./commands/generate.js";
import {registerInspect} from "./commands/inspect.js";
import {registerMerge} from "./commands/merge.js";
import {registerPlan} from "./commands/plan.js";
import {registerServe} from "./commands/serve.js";
import {registerTrain} from "./commands/train.js";
import {registerUi} from "./commands/ui.js";
import {reportError} from "./run.js";

const pkg = JSON.parse(readFileSync(path.join(packageRoot, "package.json"), "utf8")) as {version: string};

const program = new Command("qlora")
    .description("QLoRA fine-tuning of large language models on Node.js")
    .version(pkg.version, "-v, --version")
    .option("--debug", "print stack traces of errors")
    .showHelpAfterError()
    .showSuggestionAfterError(true);

registerTrain(program);
registerGenerate(program);
registerEval(program);
registerMerge(program);
registerChat(program);
registerServe(program);
registerData(program);
registerInspect(program);
registerExport(program);
registerPlan(program);
registerDoctor(program);
registerDownload(program);
registerUi(program);

program.parseAsync(process.argv).catch(reportError);
