#!/usr/bin/env bash
# SmolLM2-135M-Instruct on Shakespeare: upcycled online to 8 experts top-2 vs the
# dense model continued, each trained for the same wall-clock budget (EXPERIMENTS.md).
# Usage: scripts/smollm2-experiment.sh [MINUTES_PER_RUN] [BIN]
# Validation loss every 25 steps on the first 16 windows of 256 tokens of Hamlet + Macbeth.
set -euo pipefail
MINUTES="${1:-30}"
BIN="${2:-.build/release/moe-gpu}"
GGUF="$(scripts/fetch-checkpoints.sh)/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
scripts/fetch-data.sh >/dev/null
OUT=runs/smollm2-experiment
mkdir -p "$OUT"
# Steps large enough never to finish: the run is stopped by the time budget, after
# which its metrics.jsonl holds the curve (the last evaluation is at most 25 steps old).
cat >"$OUT/config.json" <<JSON
{"task": "lm", "seqLen": 256, "batchSize": 4, "steps": 100000, "warmupSteps": 10,
 "learningRate": 0.0001, "minLearningRate": 0.00001, "weightDecay": 0.1, "beta2": 0.95,
 "labelSmoothing": 0, "augment": false, "evalEvery": 25, "testExamples": 16, "logEvery": 5, "checkpointEvery": 0}
JSON
run() {  # name, extra args
  local name="$1"; shift
  echo "== $name: $MINUTES minutes" >&2
  timeout --signal=INT "${MINUTES}m" "$BIN" train --task lm --config "$OUT/config.json" --init "$GGUF" \
      --device cpu --out "$OUT/$name" "$@" || true
}
# Step 0: the dense model's validation loss (the upcycled model's too: replicate keeps the logits).
"$BIN" train --task lm --config "$OUT/config.json" --init "$GGUF" --upcycle none --steps 0 --device cpu --out "$OUT/step0" >/dev/null
python3 -c "import json,sys; print('step 0 validation loss: %.4f' % json.load(open(sys.argv[1]))['eval_loss'])" "$OUT/step0/eval.json"
run moe-8x-top2 --upcycle replicate --experts 8 --top-k 2
run dense --upcycle none
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
for name in ["moe-8x-top2", "dense"]:
    rows = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))]
    ev = [(r["step"], r["eval_loss"], r.get("elapsed_s")) for r in rows if "eval_loss" in r]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    print(f"### {name}: {len(ev)} evaluations, last step {rows[-1]['step']}, median {sorted(tps)[len(tps)//2]:.1f} tokens/s")
    print("| step | tokens | validation loss |\n|--:|--:|--:|")
    for s, l, _ in ev:
        print(f"| {s} | {s * 1024} | {l:.4f} |")
PY
