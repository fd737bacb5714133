#!/usr/bin/env bash
# Prepares what the GPU machine needs (it has CUDA but no Node.js and no registry), under .device/ (ignored):
#   node.xz        this machine's node binary (../shared/device/pack-node.sh)
#   js/            src, test and bench compiled to JavaScript (no tsx needed there)
#   node_modules/  the runtime dependencies only
#   shared/        the fixtures the GPU tests read (../shared does not travel)
#   data/          the example data sets (the fuzz seeds) and the eval tasks' data (qlora eval --task)
#   node-llama-cpp.tar.xz  node-llama-cpp and its prebuilt CPU binary (the gguf column of qlora eval --compare)
# The native addons come from build/. The run tool carries at most 64 MiB with the tracked files (32 MB), so the
# carries are compressed: for tests and benchmarks .device/node.xz .device/runtime.tar.xz (js/ and node_modules/)
# .device/build .device/shared (about 29 MB); for qlora eval (scripts/device-eval-table.sh) and fuzz
# .device/node.xz .device/runtime.tar.xz .device/build .device/data.tar.xz (or .device/seeds.tar.xz for fuzz)
# .device/node-llama-cpp.tar.xz (about 34 MB) instead. device-run.sh unpacks what came. Then, on the device:
# bash scripts/device-run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/device/pack-node.sh >/dev/null
# without its debug symbols (Debian's node carries them): 22 MB instead of 24 on the trip, the same program
node_bin=$(readlink -f "$(command -v node)")
if [[ ! -f .device/node.stripped || $node_bin -nt .device/node.stripped ]]; then
    strip --strip-all -o .device/node.stripped "$node_bin"
    xz -T0 -6 -c .device/node.stripped > .device/node.xz.tmp && mv .device/node.xz.tmp .device/node.xz
fi
rm -rf .device/js .device/node_modules .device/shared .device/data
npx tsc -p tsconfig.json --outDir .device/js --noEmit false --declaration false --sourceMap false || echo "(tsc reported errors; the JavaScript was emitted anyway)"
mkdir -p .device/node_modules
for dep in $(node -p "Object.keys(require('./package.json').dependencies).join(' ')"); do
    mkdir -p ".device/node_modules/$(dirname "$dep")"
    cp -r "node_modules/$dep" ".device/node_modules/$dep"
done
# transitive runtime dependencies of those packages
for dep in $(node -e '
    const seen = new Set(); const root = require("./package.json").dependencies;
    const walk = (n) => { if (seen.has(n)) return; seen.add(n);
        try { const p = require(`./node_modules/${n}/package.json`); Object.keys(p.dependencies ?? {}).forEach(walk); } catch {} };
    Object.keys(root).forEach(walk); console.log([...seen].filter((n) => !(n in root)).join(" "));'); do
    mkdir -p ".device/node_modules/$(dirname "$dep")"
    cp -r "node_modules/$dep" ".device/node_modules/$dep"
done
# the fuzz harness reads GGUF files with @huggingface/gguf (a development dependency, 0.5 MiB)
cp -r node_modules/@huggingface/gguf .device/node_modules/@huggingface/gguf
cp -r node_modules/@huggingface/tasks .device/node_modules/@huggingface/tasks  # which @huggingface/gguf imports
rm -rf .device/node_modules/@huggingface/tasks/src .device/node_modules/@huggingface/tasks/dist/commonjs
# the carried tree is limited to 64 MiB: no type declarations, maps or sources in the runtime packages
find .device/node_modules \( -name '*.d.ts' -o -name '*.d.cts' -o -name '*.d.mts' -o -name '*.map' -o -name '*.md' \) -delete
rm -rf .device/node_modules/zod/src  # zod's TypeScript sources (its JavaScript is beside them)
# the compiled tree imports ESM only: zod's CommonJS copies and yaml's browser build are not loaded there
find .device/node_modules/zod -name '*.cjs' -delete
rm -rf .device/node_modules/yaml/browser
# the addons for the H200 only (sm_90), built in their own folder so the full build stays as it is
CUDA_ARCHS="90-real" QLORA_BUILD_DIR=build-device QLORA_CUDA=ON node scripts/build-native.mjs >/dev/null
rm -rf .device/build && mkdir -p .device/build/Release && cp build-device/Release/*.node .device/build/Release/
strip --strip-unneeded .device/build/Release/*.node
# compressed for the trip (the carried tree is limited to 64 MiB); device-run.sh unpacks them
xz -T0 -9 .device/build/Release/*.node
mkdir -p .device/shared/fixtures/ref-qwen2 .device/shared/bench
for f in adapter batch.safetensors greedy.json lora_grads.safetensors qlora_grads.safetensors trainable_r8.txt; do
    cp -r "../shared/fixtures/ref-qwen2/$f" .device/shared/fixtures/ref-qwen2/
done
cp ../shared/bench/peer_lora.py ../shared/bench/peer_generate.py .device/shared/bench/
# the fuzz seeds (the tiny model is linked to the package's copy on the device)
mkdir -p .device/data/datasets
cp ../shared/datasets/{alpaca_zh_demo.json,alpaca_en_demo.json,messages_demo.jsonl,sharegpt_demo.json} .device/data/datasets/
# the eval tasks' data (qlora eval --task; 3.3 MiB), a carry of its own
mkdir -p .device/data/datasets/eval
cp ../shared/datasets/eval/* .device/data/datasets/eval/
# node-llama-cpp with its prebuilt CPU binary (the gguf column of qlora eval --compare) and what it imports, one
# tar.xz (device-run.sh unpacks it into .device/node_modules); carry .device/node-llama-cpp.tar.xz too. Its 34 MiB
# llama.cpp source bundle is for building from source, which the eval never does (build: "never"); type
# declarations, source maps and markdown are not loaded.
nlc_deps=$(node -e '
    // every package node-llama-cpp imports, resolved as Node resolves it (a nested copy first, then upwards);
    // the top-level folders that hold them (a nested copy travels inside its parent)
    const fs = require("fs"), path = require("path");
    const root = path.resolve("node_modules"), seen = new Set();
    const resolveFrom = (dir, name) => {
        for (let d = dir; ; d = path.dirname(d)) {
            const c = path.join(d, "node_modules", name);
            if (fs.existsSync(path.join(c, "package.json"))) return c;
            if (path.dirname(d) === d) return null;
        }
    };
    const walk = (dir) => {
        if (!dir || seen.has(dir)) return;
        seen.add(dir);
        const p = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
        for (const name of Object.keys(p.dependencies ?? {})) walk(resolveFrom(dir, name));
    };
    walk(path.join(root, "node-llama-cpp"));
    walk(path.join(root, "@node-llama-cpp/linux-x64"));
    const top = new Set([...seen].map((d) => {
        const parts = path.relative(root, d).split(path.sep);
        return parts[0].startsWith("@") ? parts.slice(0, 2).join("/") : parts[0];
    }));
    console.log([...top].join(" "));')
# shellcheck disable=SC2086
tar -C node_modules --exclude=node-llama-cpp/llama/gitRelease.bundle --exclude='*.d.ts' --exclude='*.map' --exclude='*.md' -cf - $nlc_deps | xz -T0 -6 > .device/node-llama-cpp.tar.xz
# js/ and node_modules/ also travel as one tar.xz (3 MiB instead of 7; device-run.sh unpacks it when they are absent):
# carry .device/runtime.tar.xz in their place when the fixtures would pass the limit
tar -C .device -cf - js node_modules | xz -T0 -9 > .device/runtime.tar.xz
# data/ likewise, in two: the eval tasks' data (data.tar.xz, 3.3 MB: qlora eval) and the fuzz seeds
# (seeds.tar.xz, 0.5 MB: npm run fuzz); carry what the run needs in place of data/
tar -C .device -cf - data/datasets/eval | xz -T0 -9 > .device/data.tar.xz
tar -C .device --exclude=data/datasets/eval -cf - data | xz -T0 -9 > .device/seeds.tar.xz
du -sh .device/* .device/build/Release
