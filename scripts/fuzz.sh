#!/usr/bin/env bash
# Fuzzes moe-gpu's file readers with libFuzzer (+ AddressSanitizer): safetensors,
# GGUF (with its tokenizer), IDX, CSV, training configs (JSON/YAML), tokenizer.json.
#
# Usage: scripts/fuzz.sh [-t SECONDS | -n RUNS] [-s SEED] [TARGET ...]
#   default: 30 seconds per target, every target, a random seed; make test runs
#   -n 150000 -s 1 (the same inputs every time, about 30 s a reader on 2 cores).
# Seeds: Tests/Fuzz/corpus/TARGET (real files, scripts/fuzz-seeds.py). The corpus
# grown here stays in .build-fuzz/corpus/TARGET. A crash, a hang over 1 s, an
# allocation over 256 MB or a multi-line error is a finding: the input is copied to
# Tests/Fuzz/regressions/TARGET/ (commit it with the fix; a unit test replays the
# folder) and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=30; RUNS=""; SEED=0
while getopts "t:n:s:" o; do case $o in t) SECONDS_PER=$OPTARG;; n) RUNS=$OPTARG;; s) SEED=$OPTARG;; *) exit 2;; esac; done
shift $((OPTIND - 1))
TARGETS=("$@"); [[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(safetensors gguf idx csv config tokenizer)
export PATH="/opt/swift/usr/bin:$PATH"

echo "fuzz: building moe-gpu-fuzz with libFuzzer and AddressSanitizer"
# Package.swift (MOE_GPU_FUZZ=1) gives the reader modules ASan and libFuzzer's
# coverage hooks and links libFuzzer into moe-gpu-fuzz only: `swift build
# --sanitize=fuzzer` would also turn the build-tool executable (embed-kernels) into a library.
MOE_GPU_FUZZ=1 swift build -c release --product moe-gpu-fuzz --scratch-path .build-fuzz 2>&1 | grep -E "error|Build" || true
BIN=.build-fuzz/release/moe-gpu-fuzz
[[ -x $BIN ]] || { echo "fuzz: the build failed"; exit 1; }

status=0
for t in "${TARGETS[@]}"; do
    corpus=.build-fuzz/corpus/$t; found=.build-fuzz/findings/$t
    mkdir -p "$corpus" "$found"
    limit=(-max_total_time="$SECONDS_PER"); [[ -n $RUNS ]] && limit=(-runs="$RUNS")
    log=.build-fuzz/fuzz-$t.log
    set +e
    MOE_GPU_FUZZ_TARGET=$t ASAN_OPTIONS=detect_leaks=0 "$BIN" "$corpus" "Tests/Fuzz/corpus/$t" "${limit[@]}" \
        -seed="$SEED" -timeout=1 -rss_limit_mb=2048 -malloc_limit_mb=256 -max_len=65536 -artifact_prefix="$found/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    runs=$(grep -E "stat::number_of_executed_units" "$log" | awk '{print $2}' | tail -1 || true)
    if [[ $rc -ne 0 ]]; then
        status=1
        mkdir -p "Tests/Fuzz/regressions/$t"
        cp "$found"/* "Tests/Fuzz/regressions/$t/" 2>/dev/null || true
        echo "fuzz: $t: FINDING after ${runs:-?} runs (inputs copied to Tests/Fuzz/regressions/$t; log $log):"
        grep -E "ERROR|==|Fatal|precondition|SUMMARY|Timeout|out-of-memory|malloc" "$log" | head -8
    else
        echo "fuzz: $t: ${runs:-?} executions, no finding"
    fi
done
exit $status
