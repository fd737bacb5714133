#!/usr/bin/env bash
# Runs on the GPU machine (after scripts/device-pack.sh here, with .device carried):
#   bash scripts/device-run.sh test [filter]   the GPU tests (test/gpu/*filter*)
#   bash scripts/device-run.sh bench [args]    the GPU training benchmark (bench/gpu.ts)
#   bash scripts/device-run.sh generate [args] the GPU generation benchmark (bench/generate.ts)
#   bash scripts/device-run.sh fuzz [args]     npm run fuzz on the machine's cores (--jobs N)
#   bash scripts/device-run.sh soak [args]     npm run soak
#   bash scripts/device-run.sh qlora [args]    the CLI (e.g. qlora eval --compare ...; the eval data is in .device/data)
# Output goes to stdout and, when $OUT is set, to $OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if ! command -v node >/dev/null; then
    xz -dc .device/node.xz > /usr/local/bin/node && chmod +x /usr/local/bin/node
fi
# js/ and node_modules/ may travel as one tar.xz (device-pack.sh)
if [ -e .device/runtime.tar.xz ] && [ ! -e .device/js ]; then
    xz -dc .device/runtime.tar.xz | tar -C .device -xf -
fi
for z in .device/data.tar.xz .device/seeds.tar.xz; do
    [ -e "$z" ] && xz -dc "$z" | tar -C .device -xf - --skip-old-files
done
# node-llama-cpp travels as one tar.xz (device-pack.sh), when carried
if [ -e .device/node-llama-cpp.tar.xz ] && [ ! -e .device/node_modules/node-llama-cpp ]; then
    xz -dc .device/node-llama-cpp.tar.xz | tar -C .device/node_modules -xf -
fi
# the addons travel compressed (device-pack.sh)
for z in .device/build/Release/*.node.xz; do
    [ -e "$z" ] && xz -dc "$z" > "${z%.xz}"
done
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
export QLORA_NATIVE_DIR="$root/.device/build/Release" QLORA_SHARED="$root/.device/shared"
# the compiled tree needs the package's data beside it
for p in models examples eval-tasks package.json node_modules; do
    [ -e ".device/js/$p" ] || ln -s "$root/$([ "$p" = node_modules ] && echo .device/node_modules || echo "$p")" ".device/js/$p"
done
mkdir -p .device/shared/models && ln -sfn "$root/models/tiny-qwen2" .device/shared/models/tiny-qwen2
# the data sets travel in .device/data when carried (device-pack.sh)
[ -d .device/data/datasets ] && [ ! -e .device/shared/datasets ] && ln -s "$root/.device/data/datasets" .device/shared/datasets
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
what=${1:-test}; shift || true
case "$what" in
    test) node --test --test-reporter=spec $(find .device/js/test/gpu -name "*${1:-}*.test.js" | sort) 2>&1 | tee "${OUT:-/tmp}/gpu-tests.log" ;;
    bench) node .device/js/bench/gpu.js "$@" 2>&1 | tee "${OUT:-/tmp}/gpu-bench.log" ;;
    generate) node .device/js/bench/generate.js --peer .device/shared/bench/peer_generate.py "$@" 2>&1 | tee "${OUT:-/tmp}/generate-bench.log" ;;
    fuzz) node .device/js/scripts/fuzz.js "$@" 2>&1 | tee "${OUT:-/tmp}/fuzz.log" ;;
    soak) node .device/js/scripts/soak.js "$@" 2>&1 | tee "${OUT:-/tmp}/soak.log" ;;
    qlora) QLORA_EVAL_DATA="$root/.device/data/datasets/eval" node .device/js/src/cli/main.js "$@" ;;
    *) node "$what" "$@" ;;
esac
