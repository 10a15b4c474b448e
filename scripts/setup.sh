#!/usr/bin/env bash
# Installs what moe-gpu needs on Debian/Ubuntu, only what is missing.
# Usage: scripts/setup.sh [build|test|run]   (test and run add the data packages)
set -euo pipefail
need=(ocl-icd-opencl-dev opencl-headers pocl-opencl-icd libopenblas-dev zlib1g-dev)
case "${1:-build}" in
  run) need+=(dataset-fashion-mnist) ;;
  test) need+=(dataset-fashion-mnist python3 python3-pip unzip oclgrind openmpi-bin iproute2) ;;
esac
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "moe-gpu needs these packages; run as root:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v swift >/dev/null 2>&1; then
  for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
    [ -x "$d/swift" ] && { echo "setup: swift is in $d; add it to PATH" >&2; exit 1; }
  done
  echo "setup: Swift 6 is not installed. Install it from swift.org (or 'apt-get install swiftlang' on Debian 13 / Ubuntu 24.04+), then re-run." >&2
  exit 1
fi
