# The two commands of the README quickstart: `make run` and `make test`.
SWIFT ?= swift
SHELL := /bin/bash
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: run test build release check clean

# Installs what is missing, builds in release mode and runs the built-in default job:
# pretrain (or reuse) a small dense ViT on Fashion-MNIST, recycle it into a
# SpheroMoE model (MoE Jetpack) and fine-tune it, on the best device here.
run: release
	.build/release/moe-gpu devices
	.build/release/moe-gpu train

# Installs what is missing (packages, real checkpoints) and runs every test in
# two passes over one build (the rule is at the top of Tests/MoETestSupport/TestSupport.swift):
#  1. every test but the OpenCL cases, on the CPU backend with no OpenCL platform
#     visible; any skip fails (only OpenCL cases may skip);
#  2. the OpenCL cases of every target and the op tests (their CPU half as the
#     reference) on the OpenCL device, PoCL here;
# then every kernel under oclgrind, and the file readers under libFuzzer.
TEST_LOGS := .build/test-logs
NO_OPENCL := .build/no-opencl-vendors
OPENCL_CASES := /testOpenCL|OpenCL$$
test:
	scripts/setup.sh test
	scripts/fetch-checkpoints.sh || echo "test: checkpoints could not be fetched; the CPU pass will fail on the tests that need them"
	scripts/fetch-data.sh || echo "test: the Shakespeare plays could not be fetched; the CPU pass will fail on the tests that need them"
	scripts/fetch-mnist5k.sh || echo "test: MNIST-5k could not be fetched; the CPU pass will fail on the experiment test"
	$(SWIFT) build --build-tests
	@mkdir -p $(TEST_LOGS) $(NO_OPENCL)
	@echo "test: pass 1 of 2: CPU backend, no OpenCL platform visible"
	set -o pipefail; OCL_ICD_VENDORS=$(CURDIR)/$(NO_OPENCL) MOE_GPU_TEST_BACKENDS=cpu \
	    $(SWIFT) test --skip-build --disable-swift-testing --skip '$(OPENCL_CASES)' 2>&1 | tee $(TEST_LOGS)/cpu.log
	@grep -qE "^[[:space:]]*Executed [0-9]+ tests?," $(TEST_LOGS)/cpu.log || { echo "test: no XCTest summary in $(TEST_LOGS)/cpu.log"; exit 1; }
	@if grep -qE "^Test Case '.*' skipped|Executed [0-9]+ tests?, with [0-9]+ tests? skipped" $(TEST_LOGS)/cpu.log; then \
	    grep -E ": Test skipped" $(TEST_LOGS)/cpu.log; \
	    echo "test: FAILED: the CPU pass skipped tests (above); only OpenCL cases may skip"; exit 1; fi
	@echo "test: pass 2 of 2: OpenCL cases and op tests on the OpenCL device"
	set -o pipefail; MOE_GPU_TEST_BACKENDS=opencl \
	    $(SWIFT) test --skip-build --disable-swift-testing --filter '^MoEComputeTests\.|$(OPENCL_CASES)' \
	    --skip '\.GPUCompileTests/|/testCPU' 2>&1 | tee $(TEST_LOGS)/opencl.log
	@n=$$(grep -cE "^Test Case '.*' skipped" $(TEST_LOGS)/opencl.log); \
	    if [ "$$n" != 0 ]; then echo "test: note: $$n OpenCL tests skipped (reasons in $(TEST_LOGS)/opencl.log)"; fi
	@echo "test: every kernel on tiny shapes under oclgrind's race, uninitialized-memory and API checks (about a minute; scripts/oclgrind.sh)"
	scripts/oclgrind.sh
	@echo "test: the file readers under libFuzzer + AddressSanitizer, 150,000 inputs each, seed 1 (about 30 s a reader; scripts/fuzz.sh)"
	scripts/fuzz.sh -n 150000 -s 1

release:
	scripts/setup.sh run
	$(SWIFT) build -c release --product moe-gpu

build:
	scripts/setup.sh build
	$(SWIFT) build

clean:
	rm -rf .build
