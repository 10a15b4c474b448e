#!/usr/bin/env bash
# moe-gpu against Hugging Face transformers (torch CPU), by hand (not in CI):
# SmolLM2 perplexity on the validation plays, greedy generation, and an
# exported fine-tuned Mixtral (scripts/transformers-check.py says what each checks).
#   scripts/transformers-check.sh                         # builds moe-gpu (release), all three checks
#   scripts/transformers-check.sh --checks 1,2 --limit 4  # a quick look: first 4 windows of each play
# Options after the script name go to scripts/transformers-check.py (--help lists them).
# MOE_GPU_SCRATCH=DIR builds with --scratch-path DIR (default .build).
# Needs torch (CPU), transformers, accelerate and gguf: installed with pip when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import torch, transformers, accelerate, gguf" 2>/dev/null; then
  echo "transformers-check: installing torch (CPU), transformers, accelerate, gguf" >&2
  user=(); [ -z "${VIRTUAL_ENV:-}" ] && [ "$(id -u)" -ne 0 ] && user=(--user)
  python3 -c "import torch" 2>/dev/null || python3 -m pip install "${user[@]}" "torch==2.13.0+cpu" \
    --extra-index-url https://download.pytorch.org/whl/cpu
  python3 -m pip install "${user[@]}" "transformers==5.24.0" accelerate gguf
fi

have_bin=0
for a in "$@"; do case "$a" in --bin|--bin=*) have_bin=1 ;; esac; done
args=("$@")
if [ "$have_bin" -eq 0 ]; then
  command -v swift >/dev/null 2>&1 || export PATH="$PATH:/opt/swift/usr/bin"
  scratch=(); [ -n "${MOE_GPU_SCRATCH:-}" ] && scratch=(--scratch-path "$MOE_GPU_SCRATCH")
  swift build -c release --product moe-gpu "${scratch[@]}" >&2
  args=(--bin "$(swift build -c release --product moe-gpu "${scratch[@]}" --show-bin-path)/moe-gpu" "$@")
fi
exec python3 scripts/transformers-check.py "${args[@]}"
