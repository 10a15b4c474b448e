#!/usr/bin/env bash
# Runs OpenCL test cases under oclgrind (Debian package `oclgrind`) with its
# data-race and uninitialized-memory checks, and fails when oclgrind reports
# anything (oclgrind itself exits 0 even then). Kernels are built with
# -cl-opt-disable: the uninitialized-memory plugin rejects LLVM's `freeze`.
# oclgrind is an interpreter: pick small test classes. Not in CI yet (issue 11).
#
# Usage: scripts/oclgrind.sh TESTCLASS...   e.g. scripts/oclgrind.sh MoEComputeTests.ElementwiseTests
# Needs a debug test build (swift build --build-tests); its path: $BUILD (default .build).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v oclgrind >/dev/null || { echo "oclgrind: not installed: apt-get install oclgrind"; exit 2; }
[[ $# -gt 0 ]] || { echo "usage: scripts/oclgrind.sh TESTCLASS..."; exit 2; }
BUILD="${BUILD:-.build}"
XCTEST="$(ls -d "$BUILD"/debug/*.xctest 2>/dev/null | head -1)"
[[ -n $XCTEST ]] || { echo "oclgrind: no test bundle under $BUILD/debug: run swift build --build-tests first"; exit 2; }
status=0
for t in "$@"; do
    log="$(mktemp /tmp/oclgrind-XXXXXX.log)"
    # swift test's own tools crash under oclgrind's preload: run the bundle directly.
    MOE_GPU_CL_OPTIONS=-cl-opt-disable MOE_GPU_TEST_BACKENDS=opencl \
        oclgrind --data-races --uninitialized --log "$log" "$XCTEST" "$t" >"$log.out" 2>&1 || { echo "oclgrind: $t: the tests failed (see $log.out)"; status=1; }
    reports=$(grep -c "^\s*Kernel:" "$log" || true)
    if [[ $reports -gt 0 ]]; then
        echo "oclgrind: $t: $reports reports in $log, by kernel:"
        grep -E "^\s*Kernel:" "$log" | sort | uniq -c
        status=1
    else
        echo "oclgrind: $t: no reports"
    fi
done
exit $status
