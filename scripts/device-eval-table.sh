#!/usr/bin/env bash
# The seed's quality table (docs/EVAL.md, "The seed's table") made on the GPU machine, with the wall time of each
# part: the adapter of a default `qlora train` on the embedded model, then the two --compare commands (base,
# adapter, merged and GGUF q4_k_m columns; the GGUF column runs in llama.cpp on the CPU, as everywhere).
#
# Here: bash scripts/device-pack.sh; then run this on the device machine, carrying .device/node.xz,
# .device/runtime.tar.xz, .device/build, .device/data.tar.xz and .device/node-llama-cpp.tar.xz:
#   bash scripts/device-eval-table.sh [--device cuda|cpu]
# The tables (compare.md, compare.json, compare.html of each command) and times.md go to $OUT (or /tmp/eval-table).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
[ "${1:-}" = "--device" ] && device=$2
bash scripts/device-run.sh -e 0 >/dev/null # unpacks node, the addons, the compiled tree and the data
work=$(mktemp -d)
out=${OUT:-/tmp}/eval-table
mkdir -p "$out"
export QLORA_CACHE="$work/cache" # a cold cache: every column is computed
qlora() { bash scripts/device-run.sh qlora "$@"; }
times=()
timed() {
    local name=$1 start=$SECONDS
    shift
    "$@" 2>&1 | tee "$out/$name.log" | tail -40
    times+=("| $name | $((SECONDS - start)) s |")
}
timed train qlora train --output_dir "$work/qlora_output" --device "$device"
timed table-mc qlora eval --task mmlu,cmmlu --limit 4 --compare base,adapter,merged,gguf:q4_k_m \
    --adapter "$work/qlora_output/final" --device "$device" --output "$out/table-mc"
timed table-gen qlora eval --task gsm8k,examples/alpaca_eval_loss.yaml --limit 200 --threads 1 \
    --compare base,adapter,merged,gguf:q4_k_m --adapter "$work/qlora_output/final" --device "$device" \
    --output "$out/table-gen"
{
    echo "device $device, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU'), $(nproc) CPUs"
    echo
    echo "| part | wall time |"
    echo "|---|---|"
    printf '%s\n' "${times[@]}"
} | tee "$out/times.md"
rm -rf "$work"
