#!/usr/bin/env bash
# The language-model benchmark of issue 9, each side alone, alternating:
# moe-gpu (bench lm-train-step rows) and PyTorch + transformers
# (scripts/compare-pytorch-lm.py), SmolLM2-135M dense and its 8 x top-2
# upcycle, batch 4 x sequence 256, forward + backward + AdamW, 2 threads.
# Prints one JSON line per measurement (tokens/s, peak RSS in GB).
# Usage: scripts/compare-pytorch-lm.sh [DENSE_ROUNDS] [MOE_ROUNDS] [BIN]
set -euo pipefail
DENSE_ROUNDS="${1:-2}"; MOE_ROUNDS="${2:-1}"; BIN="${3:-.build/release/moe-gpu}"
GGUF="$(scripts/fetch-checkpoints.sh)/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
ours() {  # shape filter, runs
  local rss out; rss="$(mktemp)"; out="$(mktemp)"
  /usr/bin/time -f "%M" -o "$rss" "$BIN" bench --device cpu --kernel lm-train-step --shape "$1" \
      --lm-checkpoint "$GGUF" --runs "$2" --json >"$out"
  python3 -c "import json,sys; d=json.loads(open(sys.argv[2]).readline()); print(json.dumps({'side':'moe-gpu','model':sys.argv[1],'tokens_per_s':d['tokens_per_s'],'mfu':d['mfu'],'peak_rss_gb':int(open(sys.argv[3]).read().split()[-1])/2**20}))" "$1" "$out" "$rss"
  rm -f "$rss" "$out"
}
torch() { python3 scripts/compare-pytorch-lm.py --gguf "$GGUF" --model "$1" --steps "$2" 2>/dev/null | tail -n 1; }
for ((r = 0; r < DENSE_ROUNDS; r++)); do ours "dense 4x256" 5; torch dense 5; done
for ((r = 0; r < MOE_ROUNDS; r++)); do ours "top-2 replicate 4x256" 3; torch moe 3; done
