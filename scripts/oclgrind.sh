#!/usr/bin/env bash
# Runs OpenCL test cases under oclgrind (Debian package `oclgrind`) with its
# data-race, uninitialized-memory and API checks, and fails when oclgrind
# reports anything (oclgrind itself exits 0 even then). Reports go to stderr
# (not --log: each OpenCL context reopens and truncates that file, so a test
# with several contexts can leave it empty); the tests write nothing there.
# Kernels are built with
# -cl-opt-disable: the uninitialized-memory plugin rejects LLVM's `freeze`.
# MOE_GPU_CL_KEEP_BUFFERS=1 works around an oclgrind 21.10 false positive on
# reused buffer ids (scripts/oclgrind-reuse.c). oclgrind interprets every
# work-item: the default case runs every kernel on tiny shapes (about a minute);
# the op test classes take hours.
#
# Usage: scripts/oclgrind.sh [TESTCASE...]   default: MoEModelTests.KernelCoverageTests
# Needs a debug test build (swift build --build-tests); its path: $BUILD (default .build).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v oclgrind >/dev/null || { echo "oclgrind: not installed: apt-get install oclgrind"; exit 2; }
BUILD="${BUILD:-.build}"
XCTEST="$(ls -d "$BUILD"/debug/*.xctest 2>/dev/null | head -1)"
[[ -n $XCTEST ]] || { echo "oclgrind: no test bundle under $BUILD/debug: run swift build --build-tests first"; exit 2; }
[[ $# -gt 0 ]] || set -- MoEModelTests.KernelCoverageTests
status=0
for t in "$@"; do
    log="$(mktemp /tmp/oclgrind-XXXXXX.log)"   # oclgrind's reports (stderr); the test output in $log.out
    start=$SECONDS
    # swift test's own tools crash under oclgrind's preload: run the bundle directly.
    MOE_GPU_CL_OPTIONS=-cl-opt-disable MOE_GPU_CL_KEEP_BUFFERS=1 MOE_GPU_TEST_BACKENDS=opencl \
        oclgrind --data-races --uninitialized --check-api "$XCTEST" "$t" >"$log.out" 2>"$log" \
        || { echo "oclgrind: $t: the tests failed (see $log.out)"; status=1; }
    grep -qE "Executed [1-9][0-9]* tests?, with 0 failures" "$log.out" || { echo "oclgrind: $t: no test passed (see $log.out)"; status=1; }
    if [[ -s $log ]]; then
        echo "oclgrind: $t: reports in $log ($(grep -c "^\s*Kernel:" "$log" || true) in kernels), by kernel:"
        grep -E "^\s*Kernel:" "$log" | sort | uniq -c || true
        head -20 "$log"
        status=1
    else
        echo "oclgrind: $t: no reports ($((SECONDS - start)) s)"
    fi
done
exit $status
