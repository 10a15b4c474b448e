#!/usr/bin/env bash
# Training speed, PyTorch (eager, CPU) vs moe-gpu train --device cpu, on the same models.
# Run by hand, on an otherwise idle machine (not in CI):
#   scripts/compare-pytorch.sh                       # builds moe-gpu (release), all rows, 3 rounds
#   scripts/compare-pytorch.sh --bin path/to/moe-gpu --rows 1,4 --steps 60 --rounds 3 --threads 2
# Options after the script name go to scripts/compare-pytorch.py (--help lists them).
# MOE_GPU_SCRATCH=DIR builds with --scratch-path DIR (default .build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0+cpu

have_bin=0
for a in "$@"; do case "$a" in --bin|--bin=*) have_bin=1 ;; esac; done

if ! python3 -c "import torch, numpy, sys; sys.exit(torch.__version__ != '$TORCH_VERSION')" 2>/dev/null; then
  echo "compare-pytorch: installing torch==$TORCH_VERSION" >&2
  user=(); [ -z "${VIRTUAL_ENV:-}" ] && [ "$(id -u)" -ne 0 ] && user=(--user)
  python3 -m pip install "${user[@]}" "torch==$TORCH_VERSION" numpy \
    --extra-index-url https://download.pytorch.org/whl/cpu
fi

args=("$@")
if [ "$have_bin" -eq 0 ]; then
  command -v swift >/dev/null 2>&1 || export PATH="$PATH:/opt/swift/usr/bin"
  scratch=(); [ -n "${MOE_GPU_SCRATCH:-}" ] && scratch=(--scratch-path "$MOE_GPU_SCRATCH")
  swift build -c release --product moe-gpu "${scratch[@]}"
  args=(--bin "$(swift build -c release --product moe-gpu "${scratch[@]}" --show-bin-path)/moe-gpu" "$@")
fi
exec python3 scripts/compare-pytorch.py "${args[@]}"
