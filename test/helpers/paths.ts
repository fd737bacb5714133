// paths.ts: where tests find the shared fixtures (../shared beside the checkout) and the embedded model.
import path from "node:path";
import {fileURLToPath} from "node:url";

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const SHARED = process.env.QLORA_SHARED ?? path.resolve(REPO_ROOT, "..", "shared");
export const FIXTURES = path.join(SHARED, "fixtures", "ref-qwen2");
export const DATASETS = path.join(SHARED, "datasets");
export const MODEL_DIR = path.join(REPO_ROOT, "models", "tiny-qwen2");
