#!/usr/bin/env bash
# Builds a release moe-gpu and assembles .build-device/bundle/: the binary and the
# shared libraries a bare GPU machine (no Swift, no Debian packages) lacks, plus a
# small Fashion-MNIST CSV for a short `train`. scripts/device-run.sh runs it there.
#
# Usage: scripts/device-package.sh            (from anywhere; works in the repo root)
#   SKIP_BUILD=1  reuse .build-device/release/moe-gpu as it is
#   DATA_IMAGES=N images in the CSV (default 2000)
#
# Uncompressed, binary + libraries are ~100 MiB (ICU data in Foundation, every CPU's
# kernels in OpenBLAS), over the 64 MiB the run tool carries. So the runnable tree is
# assembled in .build-device/stage/, and .build-device/bundle/ holds the same tree with
# every file over 256 KiB but glibc/ xz-compressed (NAME.xz), plus xz itself and
# liblzma in unxz/ for a machine without xz. device-run.sh unpacks it to a temporary folder.
#
# Layout of stage/ (bundle/ the same, compressed):
#   moe-gpu                      the stripped binary (Swift stdlib and Foundation linked in)
#   lib*.so.*                    OpenCL ICD loader, OpenBLAS and its Fortran runtime, zlib, ...
#   compat/                      libstdc++.so.6, libgcc_s.so.1: used only where the machine has none
#                                or too old ones (device-run.sh decides)
#   glibc/                       this machine's glibc and loader: used only if the machine's glibc
#                                is older than the binary needs (device-run.sh decides)
#   fashion-mnist-<N>.csv.gz     the first N training images, label last (1/6 becomes the test split)
#   MANIFEST.txt                 commit, build host, files and sizes
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/opt/swift/usr/bin"

SCRATCH=.build-device
BUNDLE=$SCRATCH/stage
PACKED=$SCRATCH/bundle
LIMIT_MIB=48          # the run tool carries at most 64 MiB in all
DATA_IMAGES=${DATA_IMAGES:-2000}
FMNIST=/usr/share/datasets/fashion-mnist
ARCH=$(uname -m)

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "device-package: swift build -c release --product moe-gpu --static-swift-stdlib --scratch-path $SCRATCH"
  swift build -c release --product moe-gpu --static-swift-stdlib --scratch-path "$SCRATCH"
fi
BIN=$SCRATCH/release/moe-gpu
[ -x "$BIN" ] || { echo "device-package: $BIN not built" >&2; exit 1; }

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/compat" "$BUNDLE/glibc"
cp "$BIN" "$BUNDLE/moe-gpu"
strip "$BUNDLE/moe-gpu"

# Debian packages holding the libraries we expect, for the fallback when one is not installed.
declare -A PKG=(
  [libOpenCL.so.1]=ocl-icd-libopencl1 [libopenblas.so.0]=libopenblas0-pthread
  [libgfortran.so.5]=libgfortran5 [libquadmath.so.0]=libquadmath0 [libz.so.1]=zlib1g
  [libstdc++.so.6]=libstdc++6 [libgcc_s.so.1]=libgcc-s1
)
# The C library set: the target machine has its own (glibc/ is the fallback).
is_glibc() {
  case "$1" in
    linux-vdso.so*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libresolv.so.*|libutil.so.*|libmvec.so.*) return 0 ;;
  esac
  return 1
}
# Where a library goes: libstdc++ and libgcc_s into compat/, the rest at the top.
dest_of() {
  case "$1" in libstdc++.so.*|libgcc_s.so.*) echo "$BUNDLE/compat/$1" ;; *) echo "$BUNDLE/$1" ;; esac
}

# Extracts package $2 with apt-get download + dpkg-deb -x and copies library $1 from it.
from_package() {
  local lib=$1 pkg=$2 tmp
  tmp=$(mktemp -d)
  echo "device-package: $lib is not installed; fetching Debian package $pkg"
  ( cd "$tmp" && apt-get download "$pkg" >/dev/null ) || { rm -rf "$tmp"; echo "device-package: apt-get download $pkg failed" >&2; return 1; }
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  local found
  found=$(find "$tmp/root" -name "$lib" \( -type f -o -type l \) | head -1)
  [ -n "$found" ] || { rm -rf "$tmp"; echo "device-package: $lib not in $pkg" >&2; return 1; }
  cp -L "$found" "$(dest_of "$lib")"
  rm -rf "$tmp"
}

# Every non-glibc library ldd resolves (ldd lists the transitive closure).
missing=()
while read -r name arrow path _; do
  [ "$arrow" = "=>" ] || continue
  is_glibc "$name" && continue
  if [ "$path" = "not" ]; then missing+=("$name"); continue; fi
  cp -L "$path" "$(dest_of "$name")"
  echo "  $name <- $path$( [ -L "$path" ] && echo " ($(readlink -f "$path"))")"
done < <(ldd "$BIN")

# The ones the brief of this bundle promises, even if ldd did not list them.
for lib in libOpenCL.so.1 libopenblas.so.0 libstdc++.so.6 libgcc_s.so.1 "${missing[@]}"; do
  [ -e "$(dest_of "$lib")" ] && continue
  sys=$( { ldconfig -p 2>/dev/null || true; } | awk -v n="$lib" '$1 == n && /x86-64|'"$ARCH"'/ { print $NF; exit }')
  if [ -n "$sys" ] && [ -e "$sys" ]; then
    cp -L "$sys" "$(dest_of "$lib")"; echo "  $lib <- $sys"
  elif [ -n "${PKG[$lib]:-}" ]; then
    from_package "$lib" "${PKG[$lib]}"
  else
    echo "device-package: $lib not found and no package known for it" >&2; exit 1
  fi
done
# libgfortran/libquadmath follow OpenBLAS when it came from a package: resolve them too.
for lib in "$BUNDLE"/lib*.so*; do
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    is_glibc "$name" && continue
    [ -e "$(dest_of "$name")" ] && continue
    if [ "$path" != "not" ]; then cp -L "$path" "$(dest_of "$name")"; echo "  $name <- $path (for $(basename "$lib"))"
    elif [ -n "${PKG[$name]:-}" ]; then from_package "$name" "${PKG[$name]}"
    else echo "device-package: $name (needed by $lib) not found" >&2; exit 1; fi
  done < <(LD_LIBRARY_PATH="$BUNDLE:$BUNDLE/compat" ldd "$lib")
done

# glibc fallback: the loader and the C library set of this machine, same version as the build.
for name in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libresolv.so.2 libmvec.so.1; do
  p=$( { ldconfig -p 2>/dev/null || true; } | awk -v n="$name" '$1 == n && /x86-64/ { print $NF; exit }')
  [ -n "$p" ] && [ -e "$p" ] && cp -L "$p" "$BUNDLE/glibc/$name"
done
loader=$(ldd "$BIN" | awk '/ld-linux/ { print $1; exit }')
[ -n "$loader" ] && cp -L "$loader" "$BUNDLE/glibc/$(basename "$loader")"
glibc_needed=$(objdump -T "$BIN" "$BUNDLE"/*.so* "$BUNDLE"/compat/*.so* 2>/dev/null \
  | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)

# A small Fashion-MNIST table for `train` (the device machine has no data sets).
csv=$BUNDLE/fashion-mnist-$DATA_IMAGES.csv.gz
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -f "$FMNIST/train-labels-idx1-ubyte.gz" ]; then
  # IDX: 16-byte image header, 8-byte label header, then one byte a pixel / label.
  paste -d, \
    <(gzip -dc "$FMNIST/train-images-idx3-ubyte.gz" | tail -c +17 | head -c $((DATA_IMAGES * 784)) \
        | od -An -v -tu1 -w784 | awk '{ $1 = $1; gsub(/ /, ","); print }') \
    <(gzip -dc "$FMNIST/train-labels-idx1-ubyte.gz" | tail -c +9 | head -c "$DATA_IMAGES" | od -An -v -tu1 -w1 | tr -d ' ') \
    | gzip -9 > "$csv"
  rows=$(gzip -dc "$csv" | wc -l)
  [ "$rows" = "$DATA_IMAGES" ] || { echo "device-package: $csv has $rows rows, expected $DATA_IMAGES" >&2; exit 1; }
else
  echo "device-package: $FMNIST not installed (scripts/setup.sh run): no training data in the bundle; device-run.sh will skip train"
fi

{
  echo "moe-gpu device bundle"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- Sources Kernels Package.swift 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm), $(ldd --version | head -1)"
  echo "needs glibc: ${glibc_needed:-unknown} (glibc/ is the fallback)"
  echo "version: $("$BUNDLE/moe-gpu" --version 2>/dev/null || echo '?')"
  echo
  (cd "$BUNDLE" && find . -type f ! -name MANIFEST.txt | sort | xargs ls -l | awk '{ printf "%10d  %s\n", $5, $9 }')
} > "$BUNDLE/MANIFEST.txt"

# The binary must start from the stage folder alone.
LD_LIBRARY_PATH="$BUNDLE" "$BUNDLE/moe-gpu" --version >/dev/null
if LD_LIBRARY_PATH="$BUNDLE" ldd "$BUNDLE/moe-gpu" | grep -q "not found"; then
  LD_LIBRARY_PATH="$BUNDLE" ldd "$BUNDLE/moe-gpu" | grep "not found" >&2
  exit 1
fi

# The carried bundle: big files xz-compressed, small ones as they are.
rm -rf "$PACKED"
(cd "$BUNDLE" && find . -type f | sort) | while read -r f; do
  mkdir -p "$PACKED/$(dirname "$f")"
  # glibc/ stays as it is: the bundled xz may need it to start.
  if [ "$(stat -c %s "$BUNDLE/$f")" -gt 262144 ] && [[ "$f" != *.gz && "$f" != ./glibc/* ]]; then
    xz -6 -T2 -c "$BUNDLE/$f" > "$PACKED/$f.xz"
    chmod --reference="$BUNDLE/$f" "$PACKED/$f.xz"
  else
    cp -p "$BUNDLE/$f" "$PACKED/$f"
  fi
done
mkdir -p "$PACKED/unxz"
cp -L "$(command -v xz)" "$PACKED/unxz/xz"
lzma=$(ldd "$(command -v xz)" | awk '$1 ~ /^liblzma/ { print $3; exit }')
[ -n "$lzma" ] && cp -L "$lzma" "$PACKED/unxz/$(basename "$(ldd "$(command -v xz)" | awk '$1 ~ /^liblzma/ { print $1; exit }')")"
listing=$(cd "$PACKED" && find . -type f | sort | xargs ls -l | awk '{ printf "%10d  %s\n", $5, $9 }')
echo "$listing" > "$PACKED/PACKED.txt"

cat "$BUNDLE/MANIFEST.txt"
echo
cat "$PACKED/PACKED.txt"
ukib=$(du -sk "$BUNDLE" | cut -f1)
kib=$(du -sk "$PACKED" | cut -f1)
echo "device-package: $PACKED is $((kib / 1024)) MiB ($kib KiB; $((ukib / 1024)) MiB unpacked in $BUNDLE)"
echo "device-package: on a lent machine: run tool, carry [\"$PACKED\"], command 'bash scripts/device-run.sh'"
if [ "$kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "device-package: the bundle is over $LIMIT_MIB MiB (the carry limit is 64 MiB in all)" >&2
  exit 1
fi
