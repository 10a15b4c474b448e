# The two commands of the README quickstart: `make run` and `make test`.
SWIFT ?= swift
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: run test build release check clean

# Installs what is missing, builds in release mode and runs the built-in default job:
# pretrain (or reuse) a small dense ViT on Fashion-MNIST, recycle it into a
# SpheroMoE model (MoE Jetpack) and fine-tune it, on the best device here.
run: release
	.build/release/moe-gpu devices
	.build/release/moe-gpu train

# Installs what is missing (packages, real checkpoints) and runs every test.
test:
	scripts/setup.sh test
	scripts/fetch-checkpoints.sh || echo "test: checkpoints could not be fetched; the tests that need them will say so"
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --disable-swift-testing

release:
	scripts/setup.sh run
	$(SWIFT) build -c release --product moe-gpu

build:
	scripts/setup.sh build
	$(SWIFT) build

clean:
	rm -rf .build
