#!/usr/bin/env bash
# The one prepared measurement to run on a lent GPU machine (no Swift, no Debian
# packages, no internet), from the repo root, with the bundle that
# scripts/device-package.sh built carried along (run tool: carry [".build-device/bundle"]).
# The bundle's NAME.xz files are unpacked into a temporary folder first (a few seconds;
# system xz, else the bundle's unxz/xz, else python3's lzma); BUNDLE may also name an
# unpacked folder such as .build-device/stage.
#
#   bash scripts/device-run.sh        (run tool: timeout_s 540 leaves room for unpacking and a slow start)
#
# Everything lands under $OUT (default ./device-out): env.txt, nvidia-smi.txt,
# one <step>.out/.err per step (bench steps as .jsonl), train/metrics.jsonl, and
# SUMMARY.txt listing each step as PASS / FAIL rc / TIMEOUT / SKIP with seconds.
# A failing step does not stop the others. The whole run stays within
# BUDGET_S seconds (default 420): each step's timeout is cut to what is left.
#
#   BUNDLE=.build-device/bundle  OUT=./device-out  BUDGET_S=420  RUNS=10  TRAIN_STEPS=200
#   DEVICE=opencl   (the --device of the OpenCL steps; opencl:P:D to pick one)
#   QUICK=1         bench --quick shapes (for testing this script on PoCL, where the full
#                   gemm and moe-layer shapes outlast their timeouts on 2 cores)
#   ICD_LIB=libnvidia-opencl.so*  (the vendor library looked for when no ICD is registered)
#   VENDORS_DIR=/etc/OpenCL/vendors  (where registered ICDs are looked for)
set -u
cd "$(dirname "$0")/.."

BUNDLE=${BUNDLE:-.build-device/bundle}
OUT=${OUT:-./device-out}
BUDGET_S=${BUDGET_S:-420}
RUNS=${RUNS:-10}
TRAIN_STEPS=${TRAIN_STEPS:-200}
DEVICE=${DEVICE:-opencl}
QUICK=${QUICK:-0}
ICD_LIB=${ICD_LIB:-libnvidia-opencl.so*}
VENDORS_DIR=${VENDORS_DIR:-/etc/OpenCL/vendors}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ ! -x "$BUNDLE/moe-gpu" ] && [ ! -f "$BUNDLE/moe-gpu.xz" ]; then
  echo "device-run: $BUNDLE/moe-gpu[.xz] missing: run scripts/device-package.sh and carry $BUNDLE" | tee "$OUT/SUMMARY.txt" >&2
  exit 1
fi
BUNDLE=$(cd "$BUNDLE" && pwd)
START=$(date +%s)
SUMMARY=$OUT/SUMMARY.txt
: > "$SUMMARY"
: > "$OUT/run.log"
log() { echo "device-run: $*" | tee -a "$OUT/run.log" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
TEMPS=()
trap 'rm -rf "${TEMPS[@]}"' EXIT

# --- Unpack: the carried bundle has its big files as NAME.xz (device-package.sh);
# a folder with moe-gpu itself (.build-device/stage) runs as it is.
if [ ! -x "$BUNDLE/moe-gpu" ]; then
  PB=$BUNDLE
  if have xz; then UNXZ=(xz -dc)
  elif LD_LIBRARY_PATH="$PB/unxz" "$PB/unxz/xz" --version >/dev/null 2>&1; then UNXZ=(env LD_LIBRARY_PATH="$PB/unxz" "$PB/unxz/xz" -dc)
  elif l=$(ls "$PB"/glibc/ld-linux* 2>/dev/null | head -1) && "$l" --library-path "$PB/unxz:$PB/glibc" "$PB/unxz/xz" --version >/dev/null 2>&1; then
    UNXZ=("$l" --library-path "$PB/unxz:$PB/glibc" "$PB/unxz/xz" -dc)
  elif have python3; then UNXZ=(python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.decompress(sys.stdin.buffer.read()))')
  else log "no way to decompress $PB/*.xz (no xz, the bundled one does not start, no python3)"; echo "FAIL unpack" >> "$SUMMARY"; exit 1
  fi
  BUNDLE=$(mktemp -d "${TMPDIR:-/tmp}/moe-gpu-bundle.XXXXXX"); TEMPS+=("$BUNDLE")
  t0=$(date +%s)
  (cd "$PB" && find . -type f) | while read -r f; do
    mkdir -p "$BUNDLE/$(dirname "$f")"
    case "$f" in
      *.xz) "${UNXZ[@]}" < "$PB/$f" > "$BUNDLE/${f%.xz}" && chmod --reference="$PB/$f" "$BUNDLE/${f%.xz}" ;;
      *) cp -p "$PB/$f" "$BUNDLE/$f" ;;
    esac
  done
  if [ ! -x "$BUNDLE/moe-gpu" ]; then
    log "unpacking $PB failed (${UNXZ[*]})"; echo "FAIL unpack" >> "$SUMMARY"; exit 1
  fi
  log "unpacked $PB into $BUNDLE with ${UNXZ[0]} in $(( $(date +%s) - t0 ))s"
fi
BIN=$BUNDLE/moe-gpu

# --- How the binary starts: the bundle's libraries, the machine's libstdc++ and glibc
# when they suffice, else the bundle's compat/ copies, else the bundle's own glibc loader.
LAUNCH=()
export LD_LIBRARY_PATH="$BUNDLE${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if "$BIN" --version >/dev/null 2>"$OUT/launch.err"; then
  rm -f "$OUT/launch.err"
  log "launch: system glibc and libstdc++, LD_LIBRARY_PATH=$BUNDLE"
else
  export LD_LIBRARY_PATH="$BUNDLE:$BUNDLE/compat${LD_LIBRARY_PATH#"$BUNDLE"}"
  if "$BIN" --version >/dev/null 2>>"$OUT/launch.err"; then
    log "launch: with the bundle's libstdc++/libgcc_s (compat/)"
  else
    loader=$(ls "$BUNDLE"/glibc/ld-linux* 2>/dev/null | head -1)
    LAUNCH=("$loader" --library-path "$BUNDLE:$BUNDLE/compat:$BUNDLE/glibc")
    if [ -n "$loader" ] && "${LAUNCH[@]}" "$BIN" --version >/dev/null 2>>"$OUT/launch.err"; then
      log "launch: through the bundle's glibc loader ($loader)"
    else
      log "the binary does not start; see $OUT/launch.err"
      cat "$OUT/launch.err" >&2
      echo "FAIL launch (see launch.err)" >> "$SUMMARY"
      exit 1
    fi
  fi
fi

# --- OpenCL: a registered ICD, else the NVIDIA vendor library wherever the driver put it.
if [ -z "${OCL_ICD_VENDORS:-}" ] && ! ls "$VENDORS_DIR"/*.icd >/dev/null 2>&1; then
  log "no ICD in $VENDORS_DIR; looking for $ICD_LIB"
  found=""
  for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
           /usr/local/cuda/lib64 /usr/local/cuda/compat /usr/lib/wsl/lib /run/nvidia/driver/usr/lib/x86_64-linux-gnu; do
    for f in $d/$ICD_LIB; do [ -e "$f" ] && { found=$f; break 2; }; done
  done
  if [ -z "$found" ] && have ldconfig; then
    found=$(ldconfig -p 2>/dev/null | awk -v pat="${ICD_LIB%%\**}" 'index($1, pat) == 1 { print $NF; exit }')
  fi
  if [ -z "$found" ]; then
    found=$(timeout 20 find /usr /opt /lib /lib64 -xdev -name "$ICD_LIB" 2>/dev/null | head -1)
  fi
  if [ -n "$found" ]; then
    vendors=$(mktemp -d); TEMPS+=("$vendors")
    echo "$found" > "$vendors/device-run.icd"
    export OCL_ICD_VENDORS=$vendors
    log "registered $found through OCL_ICD_VENDORS=$vendors"
  else
    log "no OpenCL vendor library found: the OpenCL steps will fail (the CPU steps still run)"
  fi
fi

# --- The machine.
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm), $(nproc 2>/dev/null || echo '?') CPUs"
  grep -m1 'model name' /proc/cpuinfo 2>/dev/null
  grep -m1 MemTotal /proc/meminfo 2>/dev/null
  echo "glibc: $(ldd --version 2>/dev/null | head -1)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "OCL_ICD_VENDORS=${OCL_ICD_VENDORS:-} (registered: $(ls "$VENDORS_DIR" 2>/dev/null | tr '\n' ' '))"
  [ ${#LAUNCH[@]} -gt 0 ] && echo "launch: ${LAUNCH[*]}"
  echo "moe-gpu: $("${LAUNCH[@]}" "$BIN" --version 2>&1)"
  echo "bundle:"; sed -n '2,4p' "$BUNDLE/MANIFEST.txt" 2>/dev/null
} > "$OUT/env.txt"
if [ ${#LAUNCH[@]} -gt 0 ]; then "${LAUNCH[@]}" --list "$BIN" > "$OUT/ldd.txt" 2>&1
elif have ldd; then ldd "$BIN" > "$OUT/ldd.txt" 2>&1; fi
if have nvidia-smi; then
  timeout 30 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
    --format=csv >> "$OUT/nvidia-smi.txt" 2>&1
  cat "$OUT/nvidia-smi.txt" >&2
else
  echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
fi

# --- Steps. step NAME TIMEOUT_S SUFFIX ARGS...: moe-gpu ARGS > NAME.SUFFIX, stderr to NAME.err.
step() {
  local name=$1 limit=$2 suffix=$3; shift 3
  local now left t0 rc secs
  now=$(date +%s); left=$((BUDGET_S - (now - START)))
  if [ "$left" -lt 15 ]; then
    printf '%-22s SKIP (budget of %ss spent)\n' "$name" "$BUDGET_S" >> "$SUMMARY"; log "$name: skipped (budget)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name: moe-gpu $* (timeout ${limit}s)"
  t0=$(date +%s)
  if have timeout; then
    timeout -k 10 "$limit" "${LAUNCH[@]}" "$BIN" "$@" > "$OUT/$name.$suffix" 2> "$OUT/$name.err"; rc=$?
  else
    "${LAUNCH[@]}" "$BIN" "$@" > "$OUT/$name.$suffix" 2> "$OUT/$name.err"; rc=$?
  fi
  secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) printf '%-22s PASS %4ss\n' "$name" "$secs" >> "$SUMMARY" ;;
    124|137) printf '%-22s TIMEOUT %4ss (limit %ss)\n' "$name" "$secs" "$limit" >> "$SUMMARY" ;;
    *) printf '%-22s FAIL rc=%s %4ss: %s\n' "$name" "$rc" "$secs" "$(tail -1 "$OUT/$name.err" | cut -c1-160)" >> "$SUMMARY" ;;
  esac
  tail -1 "$SUMMARY" >&2
  [ -s "$OUT/$name.err" ] || rm -f "$OUT/$name.err"
}

B=(--runs "$RUNS" --json); [ "$QUICK" = 1 ] && B+=(--quick)
# Most important first: if the budget runs out, what is lost is the least needed.
step devices              30 json  devices --json
step check               120 txt   check --device "$DEVICE"
step bench-train-step    150 jsonl bench --device "$DEVICE" --kernel train-step "${B[@]}"
step bench-gemm           90 jsonl bench --device "$DEVICE" --kernel gemm "${B[@]}"
step bench-moe-layer      60 jsonl bench --device "$DEVICE" --kernel moe-layer "${B[@]}"
step bench-permute        60 jsonl bench --device "$DEVICE" --kernel permute "${B[@]}"
step bench-combine        60 jsonl bench --device "$DEVICE" --kernel combine "${B[@]}"
step bench-attention      60 jsonl bench --device "$DEVICE" --shape attention "${B[@]}"
data=$(ls "$BUNDLE"/fashion-mnist-*.csv.gz 2>/dev/null | head -1)
if [ -n "$data" ]; then
  rm -rf "$OUT/train"
  step train             120 txt   train --device "$DEVICE" --init scratch --steps "$TRAIN_STEPS" --data "$data" --out "$OUT/train"
  rm -f "$OUT"/train/*.safetensors   # keep metrics.jsonl, config.json, eval.json; the weights are not needed back
else
  printf '%-22s SKIP (no fashion-mnist-*.csv.gz in the bundle)\n' train >> "$SUMMARY"
  log "train: skipped, the bundle has no data (device-package.sh found no Fashion-MNIST)"
fi
step bench-cpu-train-step 120 jsonl bench --device cpu --kernel train-step "${B[@]}"

total=$(( $(date +%s) - START ))
pass=$(grep -c ' PASS ' "$SUMMARY")
steps=$(grep -c . "$SUMMARY")
echo "total ${total}s: $pass of $steps steps passed" >> "$SUMMARY"
echo "=== $SUMMARY" >&2
cat "$SUMMARY" >&2
[ "$pass" = "$steps" ]
